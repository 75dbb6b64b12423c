"""DeepSpeed: configuration, engines, collectives, saving. The only module that imports deepspeed."""

from __future__ import annotations

import argparse
import ctypes
import functools
import gc
import glob
import json
import math
import mmap
import os
import shutil
import socket
from dataclasses import dataclass, field

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.checkpoint import ds_to_universal
from deepspeed.comm import comm as ds_comm  # the module itself: the package re-exports a stale cdb
from deepspeed.ops.adam import DeepSpeedCPUAdam
from deepspeed.runtime.config import DtypeEnum
from deepspeed.runtime.utils import mask_nan_or_inf_with_val_inplace
from deepspeed.runtime.zero import parameter_offload
from deepspeed.runtime.zero import utils as zero_utils
from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as zero_init
from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from torch.optim.adam import adam

from xright.files import atomic_write_json, install_checkpoint, save_model

TEMPLATES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ds_configs")


class ConfigError(ValueError):
    pass


@dataclass
class DSOptions:
    """The CLI flags that shape the DeepSpeed config. ``explicit`` holds the flags the user typed."""

    deepspeed: str | None = None
    zero_stage: int = 2
    bf16: bool = False
    adam_offload: bool = False
    ref_offload: bool = False
    max_norm: float = 1.0
    train_batch_size: int = 128
    micro_train_batch_size: int = 8
    grad_accum_dtype: str | None = None
    zpg: int = 1
    disable_trace_cache: bool = False
    explicit: set = field(default_factory=set)


def _get(cfg: dict, path: str):
    node = cfg
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _set(cfg: dict, path: str, value) -> None:
    keys = path.split(".")
    node = cfg
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def read_ds_config(path: str) -> dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read DeepSpeed config {path!r}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"DeepSpeed config {path} line {e.lineno} column {e.colno}: {e.msg}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"DeepSpeed config {path}: top level must be a JSON object")
    return cfg


def build_ds_config(opts: DSOptions, world_size: int) -> dict:
    """The user's (or the template's) config with the CLI flags laid over it. A typed flag that contradicts the
    file is an error: silently preferring either would train something other than what one of the two says."""
    from_file = opts.deepspeed is not None
    if not from_file:
        if opts.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"--zero_stage must be 0, 1, 2 or 3, got {opts.zero_stage}")
        cfg = read_ds_config(os.path.join(TEMPLATES, "zero3.json" if opts.zero_stage == 3 else "zero2.json"))
        _set(cfg, "zero_optimization.stage", opts.zero_stage)
    else:
        cfg = read_ds_config(opts.deepspeed)
    overlay = {
        "zero_optimization.stage": ("zero_stage", opts.zero_stage),
        "gradient_clipping": ("max_norm", opts.max_norm),
        "bf16.enabled": ("bf16", opts.bf16),
        "train_micro_batch_size_per_gpu": ("micro_train_batch_size", opts.micro_train_batch_size),
        "train_batch_size": ("train_batch_size", opts.train_batch_size),
    }
    if opts.grad_accum_dtype:
        overlay["data_types.grad_accum_dtype"] = ("grad_accum_dtype", opts.grad_accum_dtype)
    overlay["zero_optimization.offload_optimizer.device"] = ("adam_offload", "cpu" if opts.adam_offload else "none")
    if opts.zpg > 1:
        overlay["zero_optimization.zero_hpz_partition_size"] = ("zpg", opts.zpg)
    for path, (flag, value) in overlay.items():
        current = _get(cfg, path) if from_file else None
        typed = flag in opts.explicit
        if current is not None and current != "auto" and typed and current != value:
            raise ConfigError(f"--{flag} {value} contradicts {path} = {current!r} in {opts.deepspeed}; "
                              "change one of them")
        if current is None or current == "auto" or typed:
            _set(cfg, path, value)
    if opts.disable_trace_cache:
        for key in ("stage3_prefetch_bucket_size", "stage3_max_live_parameters", "stage3_max_reuse_distance"):
            _set(cfg, f"zero_optimization.{key}", 0)
    written = cfg.pop("gradient_accumulation_steps", None)  # derived here (per objective in joint runs)
    micro, total = cfg["train_micro_batch_size_per_gpu"], cfg["train_batch_size"]
    cfg["gradient_accumulation_steps"] = accumulation_steps(total, micro, world_size)
    if from_file and written not in (None, "auto") and written != cfg["gradient_accumulation_steps"]:
        raise ConfigError(
            f"gradient_accumulation_steps = {written!r} in {opts.deepspeed} contradicts train_batch_size {total} / "
            f"(train_micro_batch_size_per_gpu {micro} × world size {world_size}) = "
            f"{cfg['gradient_accumulation_steps']}; remove it (xright derives it) or make them agree")
    if _get(cfg, "fp16.enabled") and _get(cfg, "bf16.enabled"):
        raise ConfigError("fp16 and bf16 are both enabled in the DeepSpeed config")
    stage = _get(cfg, "zero_optimization.stage")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0..3, got {stage!r}")
    if stage == 0:
        _stage0_grad_accum_dtype(cfg, opts, from_file)
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg


def _stage0_grad_accum_dtype(cfg: dict, opts: DSOptions, from_file: bool) -> None:
    """Without ZeRO, DeepSpeed accumulates gradients in the model's dtype only (it refuses bf16 weights
    with fp32 accumulation). The templates' fp32 is meant for the ZeRO optimizers: drop it at stage 0;
    a value the user wrote or typed is an error rather than silently changed."""
    value = _get(cfg, "data_types.grad_accum_dtype")
    if value is None:
        return
    model = "fp16" if _get(cfg, "fp16.enabled") is True else "bf16" if _get(cfg, "bf16.enabled") is True else "fp32"
    try:
        accum = DtypeEnum(value).name
    except ValueError:
        raise ConfigError(f"data_types.grad_accum_dtype {value!r} is not a dtype DeepSpeed knows "
                          "(fp32, bf16, fp16)") from None
    if accum == model:
        return
    if "grad_accum_dtype" in opts.explicit or from_file:
        where = "--grad_accum_dtype" if "grad_accum_dtype" in opts.explicit else \
            f"data_types.grad_accum_dtype in {opts.deepspeed}"
        raise ConfigError(f"{where} = {value} is impossible at ZeRO stage 0 with {model} weights: DeepSpeed then "
                          f"accumulates gradients in the model's dtype ({model}); use ZeRO stage 1 or higher for "
                          f"{accum} accumulation, or drop the setting")
    del cfg["data_types"]["grad_accum_dtype"]


def accumulation_steps(train_batch_size: int, micro_batch_size: int, world_size: int,
                       what: str = "micro batch size") -> int:
    """Micro-batches per rank per optimizer step: train_batch_size / (micro × world), which must divide."""
    per_step = micro_batch_size * world_size
    if micro_batch_size < 1 or train_batch_size < 1 or train_batch_size % per_step:
        micros = [m for m in range(1, train_batch_size + 1) if train_batch_size % (m * world_size) == 0]
        worlds = [w for w in range(1, train_batch_size + 1) if micro_batch_size >= 1 and
                  train_batch_size % (micro_batch_size * w) == 0]
        raise ConfigError(
            f"--train_batch_size {train_batch_size} must be a positive multiple of "
            f"{what} {micro_batch_size} × world size {world_size} = {per_step} (each optimizer step splits its "
            f"examples evenly over ranks and micro-batches); with {world_size} rank{'s' * (world_size != 1)} a "
            f"micro batch size of {', '.join(map(str, micros)) or 'none'} would work" +
            (f", with micro batch size {micro_batch_size} a world size of {', '.join(map(str, worlds))}"
             if worlds else ""))
    return train_batch_size // per_step


def reference_config(train_cfg: dict, offload: bool) -> dict:
    """ZeRO-3 runs shard the reference too; otherwise it is replicated (stage 0), as in OpenRLHF."""
    stage = 3 if _get(train_cfg, "zero_optimization.stage") == 3 or offload else 0
    cfg = {
        "train_micro_batch_size_per_gpu": train_cfg["train_micro_batch_size_per_gpu"],
        "train_batch_size": train_cfg["train_batch_size"],
        "gradient_accumulation_steps": train_cfg["gradient_accumulation_steps"],
        "zero_optimization": {"stage": stage},
        "bf16": {"enabled": bool(_get(train_cfg, "bf16.enabled"))},
        "steps_per_print": 10**9,
    }
    if offload:
        cfg["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    return cfg


def fill_bucket_sizes(cfg: dict, hidden: int | None) -> None:
    """The templates' "auto" bucket sizes: hidden² elements (at least 2**20), as transformers' DeepSpeed integration,
    not DeepSpeed's 5e8 (2 GB per fp32 buffer, two with overlap_comm, filled up to the model's size)."""
    for key in ("reduce_bucket_size", "allgather_bucket_size"):
        if _get(cfg, f"zero_optimization.{key}") == "auto":
            _set(cfg, f"zero_optimization.{key}", max(hidden * hidden, 1 << 20) if hidden else int(5e8))


def _lighten_zero12(optimizer) -> None:
    """What ZeRO-1/2 hold beyond the weights, the gradients and the optimizer states (263 MB per copy of an fp32
    partition at 65.7M parameters), gone:

    * the fp32 master weights, which are the partition bit for bit: make them the partition, as DeepSpeed's
      reload_states moves them;
    * ZeRO-2's flat copy of the gradients, made in the step while their buffer is still alive: reduce them straight
      into one flat partition that the step uses as it is, DeepSpeed's own path for bf16 weights with fp32 gradients
      (``_use_compact_grad_partition_buffer``), and free each gradient once it is in there, as DeepSpeed's own
      contiguous buffer does. (ZeRO-1 reduces in its step: that copy is its reduction.)
    * the gradient norm's fp64 copy of each gradient (:func:`_grad_norm`);
    * on CPU, the activations the backward has freed, which glibc keeps in its heap: returned after each reduction,
      before the next gradients are allocated; and the flat gradient partition is resident only where written
      (:func:`_lazily_zeroed`), not all at the first gradient, while every activation is still alive."""
    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return
    for i, master in enumerate(optimizer.single_partition_of_fp32_groups):
        part = optimizer.parallel_partitioned_bit16_groups[i][dist.get_rank(group=optimizer.real_dp_process_group[i])]
        if (master.dtype, master.device, master.shape) == (part.dtype, part.device, part.shape):
            master.data = part.data
    optimizer._link_all_hp_params()
    fp32 = optimizer.dtype == getattr(optimizer, "gradient_accumulation_dtype", None) == torch.float32
    if optimizer.partition_gradients and fp32 and hasattr(optimizer, "_build_compact_grad_partition_buffer"):
        # (a DeepSpeed without that path keeps its own copies: freeing a gradient here would lose it)
        muon = getattr(optimizer, "_is_muon_group", lambda params: False)
        compact = lambda i: not (optimizer.params_in_partition[i] and muon(optimizer.params_in_partition[i]))  # noqa
        copy, build = optimizer.copy_grads_in_partition, optimizer._build_compact_grad_partition_buffer
        optimizer._use_compact_grad_partition_buffer = compact
        optimizer.copy_grads_in_partition = lambda param, i=None: (
            optimizer.clear_grad_attribute(param) if compact(i) else copy(param, i))
        optimizer._build_compact_grad_partition_buffer = lambda i: _lazily_zeroed(build, i)
    if torch.device(optimizer.device).type == "cpu" and _malloc_trim is not None:  # activations: host memory
        reduce = optimizer.reduce_ipg_grads

        def reduce_and_trim(*args, **kwargs):
            reduce(*args, **kwargs)
            _malloc_trim(0)
        optimizer.reduce_ipg_grads = reduce_and_trim
    optimizer.get_grad_norm_direct = functools.partial(_grad_norm, optimizer, optimizer.get_grad_norm_direct)


def _lazily_zeroed(build, *args):
    """``build(*args)`` with its large CPU ``torch.zeros`` in fresh anonymous memory: zero, and resident only where
    written."""
    zeros = torch.zeros

    def lazy(*size, dtype=None, device=None, **kwargs):
        shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if kwargs or torch.device(device or "cpu").type != "cpu" or nbytes < (1 << 20):
            return zeros(*size, dtype=dtype, device=device, **kwargs)
        memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        return torch.frombuffer(memory, dtype=dtype or torch.get_default_dtype()).view(shape)

    torch.zeros = lazy
    try:
        return build(*args)
    finally:
        torch.zeros = zeros


_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
NORM_SLICE = 1 << 16


def _grad_norm(optimizer, direct, gradients, params, norm_type=2):
    """ZeRO-1/2's gradient norm (fp64 sums of squares, the all-reduce, -1 for inf/NaN), without DeepSpeed's fp64 copy
    of each whole gradient: 2 × the largest one at the peak of every step (250 MiB for a 128k × 256 embedding)."""
    if norm_type != 2 or optimizer.model_parallel_rank != 0:
        return direct(gradients, params, norm_type)
    total = torch.zeros((), dtype=torch.float64, device=optimizer.device)
    for g in gradients:
        if not getattr(g, "_zero_padding", False):  # small slices on CPU (faster than whole); few kernels on a GPU
            for piece in g.detach().reshape(-1).split(NORM_SLICE if g.device.type == "cpu" else NORM_SLICE << 8):
                total += piece.double().square().sum()
    total = total.float()
    ds_comm.all_reduce(total, op=ds_comm.ReduceOp.SUM, group=optimizer.dp_process_group)
    optimizer._model_parallel_all_reduce(tensor=total, op=ds_comm.ReduceOp.SUM)
    total = total.pow(0.5)
    mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)
    return total


class SlicedAdamW(torch.optim.AdamW):
    """torch's AdamW (its single-tensor path, the same arithmetic) on slices of :data:`SLICE` elements of each
    parameter. Whole, its step allocates two temporaries the size of the parameter, and a ZeRO partition is one
    flat parameter: 2 × the model's fp32 size at the peak of every step."""

    SLICE = 1 << 20

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None or any(g["foreach"] or g["fused"] or g["amsgrad"] or g["maximize"] or g["capturable"]
                                      or g["differentiable"] for g in self.param_groups):
            return super().step(closure)
        for group in self.param_groups:
            lists = [], [], [], [], [], []
            complex_ = self._init_group(group, *lists)
            for p, g, m, v, count in zip(*lists[:4], lists[5]):
                whole = not all(t.is_contiguous() for t in (p, g, m, v))
                for part in zip(*((t,) if whole else t.view(-1).split(self.SLICE) for t in (p, g, m, v))):
                    # adam() counts the step in the tensor it is given: each slice gets the count before the step
                    adam(*([t] for t in part), [], [count.clone()], foreach=False, amsgrad=False, has_complex=complex_,
                         beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"], eps=group["eps"],
                         weight_decay=group["weight_decay"], maximize=False, decoupled_weight_decay=True)
                count += 1
        return None


zero_utils.ZERO_SUPPORTED_OPTIMIZERS.append(SlicedAdamW)  # torch's AdamW: DeepSpeed's ZeRO checks the exact type


# Engines built by Strategy.prepare*/: torn down, in order, by close_process_group().
_ENGINES: list = []


def close_process_group() -> list[str]:
    """Ordered teardown of what owns communication threads, on every CLI exit path; no collective. A gloo group's
    threads stop with its last reference, and DeepSpeed keeps some (``deepspeed.utils.groups``, each ZeRO-3
    parameter's ``ds_process_group``): left to interpreter finalisation they raced C++ static destruction (SIGABRT
    after a complete run). Returns the names of gloo threads still alive (ZeRO-3 autograd state keeps some:
    ``lifecycle.shutdown`` then skips finalisation)."""
    release_engines()
    if dist.is_initialized():
        if getattr(ds_comm, "cdb", None) is not None:
            ds_comm.destroy_process_group()
        else:  # initialised by torch directly (in-process tests)
            dist.destroy_process_group()
    gc.collect()
    names = []
    for comm in glob.glob("/proc/self/task/*/comm"):  # Linux; elsewhere none
        try:
            with open(comm) as f:
                names.append(f.read().strip())
        except OSError:
            continue
    return [n for n in names if "gloo" in n]


def release_engines() -> None:
    """Destroy every engine built in this process; the process group stays. Also undoes what would leak into a
    later run in the same process: transformers' global ZeRO-3 config, and ``zero.Init``'s replacement of
    ``torch.nn.functional.linear`` (left in place, a later run's losses differ in the 7th digit)."""
    while _ENGINES:  # (no loop variable: it would keep the last engine alive through the collection below)
        release_engine(_ENGINES[0], collect=False)
    if getattr(zero_init, "linear_bk", None) is not None:
        torch.nn.functional.linear = zero_init.linear_bk
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()  # a run that failed before release_hf_config would leave ZeRO-3 model building on
    gc.collect()


def release_engine(engine, collect: bool = True) -> None:
    """Free one engine now with its module and every parameter: ``engine.destroy()`` (DeepSpeed 0.19.8) keeps
    ``engine.module``, and the ZeRO-3 forward stack and our engine list keep more references."""
    try:
        engine.destroy()
    except Exception:  # noqa: BLE001 - a failed hook removal must not replace the run's exit code
        pass
    _ENGINES[:] = [e for e in _ENGINES if e is not engine]
    module = engine.__dict__.pop("module", None)  # DeepSpeed stores the module both as attribute and as submodule
    engine.__dict__.get("_modules", {}).pop("module", None)
    stack = parameter_offload.FWD_MODULE_STACK  # a ZeRO-3 engine pushes its module there and never pops it
    stack[:] = [m for m in stack if m is not module]
    # ZeRO-3's coordinator memoises which parameters to release per (coordinator, submodule, step) in one
    # process-wide functools.lru_cache, keeping every engine's modules alive; a cleared cache only recomputes
    memo = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    for cell in getattr(memo, "__closure__", None) or ():  # under DeepSpeed's nvtx wrapper
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()
    if collect:
        gc.collect()


class Strategy:
    """Process group, engines and collectives; without the ``deepspeed`` launcher, a world of one."""

    def __init__(self, seed: int = 42):
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
            with socket.socket() as sock:  # a free port
                sock.bind(("127.0.0.1", 0))
                os.environ.setdefault("MASTER_PORT", str(sock.getsockname()[1]))
        if not dist.is_initialized():
            deepspeed.init_distributed()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # DeepSpeed's CPU shm comm op (all ranks local) never unlinks /dev/shm/deepspeed_allreduce_buffer_* (~69 MB
        # per rank, RAM); unlinked once every rank has mapped its peers' (the barrier), it goes with the last process
        if os.environ.get("LOCAL_SIZE") == str(self.world_size):
            dist.barrier()
            try:
                os.unlink(os.path.join("/dev/shm", "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
                    os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), self.rank)))
            except FileNotFoundError:
                pass
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        accel = get_accelerator()
        if accel.device_name() != "cpu":
            accel.set_device(self.local_rank)
        self.device = torch.device(accel.current_device_name())
        self.seed = seed
        self.ds_config: dict | None = None
        self._hf_ds_config = None

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def print(self, *args, **kwargs) -> None:
        if self.is_rank0:
            print(*args, **kwargs, flush=True)

    def configure(self, opts: DSOptions | None = None, cfg: dict | None = None) -> dict:
        """The run's DeepSpeed config, from the flags' ``opts`` or given (``cfg``, no reference offload)."""
        self.ds_config = cfg or build_ds_config(opts, self.world_size)
        self.ref_offload = opts is not None and opts.ref_offload
        if self.zero_stage == 3:  # transformers then builds big models directly sharded (zero.Init)
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        return self.ds_config

    def release_hf_config(self) -> None:
        """Stop transformers from building models sharded (needed before a rank-0-only load)."""
        if self._hf_ds_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._hf_ds_config = None

    @property
    def zero_stage(self) -> int:
        return _get(self.ds_config, "zero_optimization.stage")

    @property
    def precision(self) -> str:
        """The models' dtype under the resolved config (a --deepspeed file may enable bf16 without --bf16)."""
        return "bf16" if _get(self.ds_config, "bf16.enabled") is True else \
            "fp16" if _get(self.ds_config, "fp16.enabled") is True else "fp32"

    @property
    def offload_optimizer(self) -> bool:
        return (_get(self.ds_config, "zero_optimization.offload_optimizer.device") or "none") != "none"

    def write_config(self, out_dir: str) -> None:
        if self.is_rank0:
            os.makedirs(out_dir, exist_ok=True)
            atomic_write_json(os.path.join(out_dir, "ds_config.json"), self.ds_config)

    def optimizer(self, model, lr: float, betas, weight_decay: float):
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        # empty groups are dropped: ZeRO-3 drops them too, which would desynchronise the LR scheduler
        groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        if self.offload_optimizer:
            return DeepSpeedCPUAdam(groups, lr=lr, betas=tuple(betas))
        if self.device.type == "cpu":
            return SlicedAdamW(groups, lr=lr, betas=tuple(betas))
        # torch's fused kernel on a GPU (one launch per step, nothing to compile)
        fused = {"fused": True} if self.device.type == "cuda" else {}
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **fused)

    def prepare(self, model, optimizer, scheduler):
        fill_bucket_sizes(self.ds_config, getattr(model.config, "hidden_size", None))
        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                               config=self.ds_config, dist_init_required=False)
        _ENGINES.append(engine)
        _lighten_zero12(engine.optimizer)
        return engine

    def prepare_reference(self, model):
        """A frozen model for reference log-probs: a stage-3 engine or a replicated module."""
        cfg = reference_config(self.ds_config, self.ref_offload)
        if cfg["zero_optimization"]["stage"] == 3:
            engine, *_ = deepspeed.initialize(model=model, config=cfg, dist_init_required=False)
            _ENGINES.append(engine)
            engine.eval()
            return engine
        dtype = torch.bfloat16 if cfg["bf16"]["enabled"] else None
        return model.to(device=self.device, dtype=dtype).eval()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Sum/max/mean of a tensor over ranks (a new tensor; the input is untouched)."""
        out = tensor.detach().clone()
        if self.world_size > 1:
            red = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
            dist.all_reduce(out, op=red)
        if op == "mean":
            out = out / self.world_size
        return out

    def broadcast_object(self, obj):
        """Rank 0's value of ``obj`` on every rank (used for every schedule decision)."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather_object(self, obj) -> list:
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def save_hf(self, engine, tokenizer, path: str, extra_files: dict | None = None) -> None:
        """HF-format model (``save_pretrained`` + tokenizer) written atomically to ``path``; a LoRA run's adapter
        (peft's ``save_pretrained`` keeps the adapter keys only). The state dict is whole on rank 0."""
        if self.zero_stage == 3:
            state = engine._zero3_consolidated_16bit_state_dict()
        else:
            state = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()} if self.is_rank0 else None
        if self.is_rank0:
            save_model(engine.module, state, tokenizer, path, extra_files)
        self.barrier()

    def seed_rank(self) -> None:
        """Once the models are built (under the shared ``--seed``, identical on every rank), each rank its own torch
        seed, so that dropout masks differ across ranks; rank 0 keeps the run's seed."""
        seed = self.seed + 1_000_003 * self.rank
        torch.manual_seed(seed)
        get_accelerator().manual_seed_all(seed)

    _last_checkpoint: tuple[str, str] | None = None  # (tag, xright state) of this process's last save

    def save_checkpoint(self, engine, ckpt_dir: str, step: int, state: dict, rank_state: dict,
                        max_num: int = 3, max_gb: float = 1000.0) -> str:
        """A resumable checkpoint, atomically (:func:`install_checkpoint`), with ``state`` and every rank's
        ``rank_state`` and accelerator RNG. Saving again what this process just saved (SIGTERM right after a
        scheduled save) is skipped on every rank: it would remove the checkpoint ``latest`` points to."""
        tag = f"global_step{step}"
        tmp_tag = f".tmp-{tag}"
        saving = (tag, json.dumps(state, sort_keys=True))
        if saving == self._last_checkpoint:
            return tag
        rank_state = {**rank_state, "accelerator": get_accelerator().get_rng_state().tolist()}
        if self.is_rank0:
            os.makedirs(ckpt_dir, exist_ok=True)
            shutil.rmtree(os.path.join(ckpt_dir, tmp_tag), ignore_errors=True)
        self.barrier()
        engine.save_checkpoint(ckpt_dir, tag=tmp_tag, save_latest=False)
        if os.environ.get("XRIGHT_DEBUG_CRASH_IN_CHECKPOINT") == str(step):
            os._exit(9)  # debug: die with the checkpoint half written (tests the atomicity)
        ranks = self.all_gather_object(rank_state)
        self.barrier()
        if self.is_rank0:
            install_checkpoint(ckpt_dir, tmp_tag, tag, {**state, "ranks": ranks}, max_num, max_gb)
        self.barrier()
        self._last_checkpoint = saving
        return tag

    _universal: str | None = None  # the converted copy of the checkpoint to resume from (plan_resume)

    def _latest(self, ckpt_dir: str, expect: dict) -> tuple[str, dict] | None:
        """The latest checkpoint's tag and xright state, once it agrees with ``expect``; None if there is none."""
        pointer = os.path.join(ckpt_dir, "latest")
        if not os.path.exists(pointer):
            return None
        with open(pointer) as f:
            tag = f.read().strip()
        path = os.path.join(ckpt_dir, tag, "xright_state.json")
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"checkpoint {os.path.join(ckpt_dir, tag)} is unreadable ({e}); "
                              "remove it or point --ckpt_path elsewhere") from e
        for key, value in expect.items():
            if state.get(key) != value:
                hint = ("its loader positions count optimizer steps of that many examples: resume with the same "
                        "--train_batch_size (any number of ranks and micro batch size that divides it works)"
                        if key == "examples_per_step" else "resume with the same settings")
                raise ConfigError(f"checkpoint {os.path.join(ckpt_dir, tag)} has {key}={state.get(key)!r} but this "
                                  f"run has {key}={value!r}; {hint} or use a new --ckpt_path")
        return tag, state

    def plan_resume(self, ckpt_dir: str, expect: dict) -> None:
        """Before the engines are built: a latest checkpoint saved by another number of ranks is converted once into
        DeepSpeed's universal format beside it (``<tag>_universal``), which the engine then loads."""
        latest = self._latest(ckpt_dir, expect)
        if latest is None:
            return
        tag, state = latest
        saved = len(state["ranks"])
        if saved == self.world_size or self.zero_stage == 0:  # stage 0 saves whole states: they load on any count
            return
        universal = f"{tag}_universal"
        out = os.path.join(ckpt_dir, universal)
        if self.is_rank0 and not os.path.exists(out):
            tmp = os.path.join(ckpt_dir, f".tmp-{universal}")
            shutil.rmtree(tmp, ignore_errors=True)
            # the ZeRO model-states files carry no universal_checkpoint_info (DeepSpeed 0.19.8 refuses it in
            # save_checkpoint's client_state); the converter injects the default
            ds_to_universal.main(argparse.Namespace(
                input_folder=os.path.join(ckpt_dir, tag), output_folder=tmp, num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
            os.replace(tmp, out)
        self.barrier()
        self.ds_config.setdefault("checkpoint", {})["load_universal"] = True
        self._universal = universal
        self.print(f"checkpoint {os.path.join(ckpt_dir, tag)} was saved by {saved} rank{'s' * (saved != 1)}, this run "
                   f"has {self.world_size}: its weights and optimizer states were converted to DeepSpeed's universal "
                   f"checkpoint {out} (the original is kept) and are resharded from it")

    def load_checkpoint(self, engine, ckpt_dir: str, expect: dict) -> dict | None:
        """Restore the latest checkpoint in ``ckpt_dir`` (None if there is none); a mismatch with ``expect`` (model
        signature, examples per step, data) is a clear error before DeepSpeed loads incompatible shards."""
        latest = self._latest(ckpt_dir, expect)
        if latest is None:
            return None
        tag, state = latest
        if len(state["ranks"]) != self.world_size and self.zero_stage and self._universal != f"{tag}_universal":
            raise ConfigError(f"checkpoint {os.path.join(ckpt_dir, tag)} was saved by {len(state['ranks'])} ranks and "
                              f"this run has {self.world_size}, but it was not converted before the engine was built")
        loaded, _ = engine.load_checkpoint(ckpt_dir, tag=self._universal or tag, load_module_strict=True,
                                           load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise ConfigError(f"DeepSpeed could not load checkpoint {os.path.join(ckpt_dir, tag)}")
        if self._universal:
            # DeepSpeed 0.19.8's ZeRO-3 universal load gives every parameter group one shared 'step' tensor; Adam
            # increments it in place once per group, so the bias correction would run ahead (1.4 % off in the
            # loss two steps after a resume, tests/test_ranks.py). One tensor each, as a native load has.
            for st in getattr(getattr(engine.optimizer, "optimizer", None), "state", {}).values():
                if torch.is_tensor(st.get("step")):
                    st["step"] = st["step"].clone()
        if self.rank < len(state["ranks"]):
            get_accelerator().set_rng_state(torch.tensor(state["ranks"][self.rank]["accelerator"], dtype=torch.uint8))
        state["tag"] = tag
        return state


def configure_inference(strategy: Strategy, zero_stage: int, bf16: bool) -> dict:
    """Generation and scoring: ``strategy.prepare_reference(model)`` then returns a sharded stage-3 engine (every
    rank must then run the same number of forwards) or, at any other stage, a replicated module."""
    if zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"--zero_stage must be 0, 1, 2 or 3, got {zero_stage}")
    base = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": strategy.world_size,
            "gradient_accumulation_steps": 1, "zero_optimization": {"stage": zero_stage}, "bf16": {"enabled": bf16}}
    return strategy.configure(cfg=reference_config(base, offload=False))
