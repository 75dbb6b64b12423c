"""Flags shared by every CLI, and the one function that turns parsed flags into a run.

Flag names, meanings and defaults follow the scripts users already have (XRIGHT, a fork of
OpenRLHF 0.3.6): see ``shared/compat/cli-flags.md``. A CLI declares its objectives as
:class:`ObjectiveSpec` and its schedule; :func:`run` does the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

COMPAT = "(accepted for compatibility with XRIGHT/OpenRLHF scripts; has no effect in xright)"


# ---- flags ----------------------------------------------------------------------------------

# What --train_batch_size counts, fixed per CLI: (its help, --micro_train_batch_size's help).
BATCH_MEANINGS = {
    # OpenRLHF's CLIs and xright's own (train_sft, train_dpo, train_joint …)
    "examples": ("examples per optimizer step over all ranks: each objective accumulates train_batch_size / "
                 "(its micro batch × ranks) micro-batches",
                 "examples per rank per micro-batch"),
    # XRIGHT's CLIs (train_sft_dpo_*, train_sft_seq, train_dpo_seq, train_sft_pref) give DeepSpeed a micro
    # batch of --micro_train_batch_size (1: the joint ones have no such flag) while every micro-step is one
    # loader batch, so --train_batch_size counts loader batches, not examples
    "xright": ("as XRIGHT: loader batches per optimizer step over all ranks: each objective accumulates "
               "train_batch_size / (--micro_train_batch_size × ranks) loader batches of its own "
               "--*micro_train_batch_size examples (the paper passes the number of GPUs: one loader batch per rank)",
               "as XRIGHT: DeepSpeed's micro batch, counted in loader batches (keep 1)"),
}


def base_parser(description: str, batch_meaning: str = "examples", **defaults) -> argparse.ArgumentParser:
    """The shared flags. ``batch_meaning`` says what ``--train_batch_size`` counts (see :data:`BATCH_MEANINGS`)."""
    if batch_meaning not in BATCH_MEANINGS:
        raise ValueError(f"batch_meaning must be one of {sorted(BATCH_MEANINGS)}")
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(batch_meaning=batch_meaning)
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save_path", type=str, default="./ckpt", help="final HF model and metrics.jsonl")
    g.add_argument("--save_steps", type=int, default=-1, help="resumable checkpoint every N steps (-1: never)")
    g.add_argument("--logging_steps", type=int, default=1)
    g.add_argument("--eval_steps", type=int, default=-1, help="-1: evaluate once per epoch")
    g.add_argument("--ckpt_path", type=str, default="./ckpt/checkpoints")
    g.add_argument("--max_ckpt_num", type=int, default=3)
    g.add_argument("--max_ckpt_mem", type=int, default=1000, help="GB kept in --ckpt_path; oldest removed beyond it")
    g.add_argument("--load_checkpoint", action="store_true", default=False,
                   help="resume from the latest checkpoint in --ckpt_path")
    g.add_argument("--use_wandb", type=str, default=None,
                   help="True, or a wandb API key (WANDB_API_KEY is preferred); never printed or saved")
    g.add_argument("--wandb_org", type=str, default=None)
    g.add_argument("--wandb_group", type=str, default=None)
    g.add_argument("--wandb_project", type=str, default="xright")
    g.add_argument("--wandb_run_name", type=str, default="exp_%s" % datetime.now().strftime("%m%dT%H:%M"))
    g.add_argument("--use_tensorboard", type=str, default=None, metavar="DIR")
    g.add_argument("--debug_log_picks", action="store_true", default=False,
                   help="debug: every rank writes its schedule decisions to picks.rank<r>.jsonl")
    g.add_argument("--debug_rank_seed", action="store_true", default=False,
                   help="debug: seed each rank's schedule differently (rank 0's broadcast pick must still win)")

    g = p.add_argument_group("DeepSpeed")
    g.add_argument("--deepspeed", type=str, default=None, metavar="PATH",
                   help="DeepSpeed JSON config (ds_configs/*.json); flags overlay it, contradictions are errors")
    g.add_argument("--zero_stage", type=int, default=2)
    g.add_argument("--bf16", action="store_true", default=False)
    g.add_argument("--adam_offload", action="store_true", default=False)
    g.add_argument("--ref_offload", action="store_true", default=False)
    g.add_argument("--precompute_ref_log_probs", action="store_true", default=True,
                   help="compute the frozen reference's log-probs once before training (cached under "
                        "--ref_cache_dir) and release the reference model; unless typed, skipped for runs too "
                        "short to see their data once")
    g.add_argument("--no_precompute_ref_log_probs", dest="precompute_ref_log_probs", action="store_false",
                   help="keep the reference model live and run it at every step")
    g.add_argument("--ref_cache_dir", type=str, default=None, help="default: <ckpt_path>/ref_cache")
    g.add_argument("--zpg", type=int, default=1, help="ZeRO++ hierarchical partition size (stage 3)")
    g.add_argument("--grad_accum_dtype", type=str, default=None)
    g.add_argument("--disable_trace_cache", action="store_true", default=False)
    g.add_argument("--max_norm", type=float, default=1.0, help="gradient clipping")
    g.add_argument("--train_batch_size", type=int, default=128, help=BATCH_MEANINGS[batch_meaning][0])
    g.add_argument("--micro_train_batch_size", type=int, default=8, help=BATCH_MEANINGS[batch_meaning][1])
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")

    g = p.add_argument_group("model")
    g.add_argument("--pretrain", type=str, default=None, help="hub id or local path; default: built-in tiny model")
    g.add_argument("--trust_remote_code", action="store_true", default=False)
    g.add_argument("--flash_attn", action="store_true", default=False)
    g.add_argument("--gradient_checkpointing", action="store_true", default=False)
    g.add_argument("--gradient_checkpointing_use_reentrant", action="store_true", default=False)
    g.add_argument("--disable_fast_tokenizer", action="store_true", default=False)
    g.add_argument("--load_in_4bit", action="store_true", default=False, help="QLoRA (needs CUDA + bitsandbytes)")
    g.add_argument("--lora_rank", type=int, default=0)
    g.add_argument("--lora_alpha", type=int, default=16)
    g.add_argument("--lora_dropout", type=float, default=0)
    g.add_argument("--target_modules", type=str, nargs="*", default="all-linear")
    g.add_argument("--merge_lora", action="store_true", default=False,
                   help="also save the LoRA adapter merged into the base model (save_path/merged)")
    g.add_argument("--aux_loss_coef", type=float, default=0, help=f"MoE auxiliary loss {COMPAT}")
    g.add_argument("--packing_samples", action="store_true", default=False,
                   help="padding-free micro-batches: each micro-batch's sequences in one row (same examples, "
                        "same loss), with a per-sequence attention (flash-attention-2 with --flash_attn)")
    g.add_argument("--group_by_length", action="store_true", default=False,
                   help="micro-batches of similar lengths, in a shuffled order (less padding; resumable exactly)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--max_epochs", type=int, default=1)
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--learning_rate", type=float, default=1e-5)
    g.add_argument("--lr_scheduler", type=str, default="cosine_with_min_lr",
                   help="any transformers scheduler name (constant, constant_with_warmup, cosine_with_min_lr, linear…)")
    g.add_argument("--lr_warmup_ratio", type=float, default=0.03)
    g.add_argument("--min_lr_ratio", type=float, default=0.1, help="min lr as a fraction of --learning_rate")
    g.add_argument("--l2", type=float, default=0.0, help="weight decay")
    g.add_argument("--adam_betas", type=float, nargs=2, default=(0.9, 0.95))
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--skip_bad_records", action="store_true", default=False,
                   help="count and report malformed records instead of failing")
    g.add_argument("--skip_nonfinite", action="store_true", default=False,
                   help="skip an optimizer step whose loss or gradients are NaN/inf (counted, logged) instead of "
                        "stopping the run; needs ZeRO stage >= 1")
    g.add_argument("--truncation", choices=["truncate", "drop"], default="truncate",
                   help="over-long examples: cut responses on the right, or drop them")
    p.set_defaults(**defaults)
    return p


def add_data_flags(p: argparse.ArgumentParser, prefix: str = "", *, max_len: int = 2048, kind: str = "sft",
                   keys: bool = True) -> None:
    """``--dataset`` & co. (``--sft_dataset``/``--rlhf_dataset`` in the joint CLIs)."""
    g = p.add_argument_group(f"{prefix or ''}data")
    g.add_argument(f"--{prefix}dataset", type=str, default=None,
                   help="comma-separated files/dirs/hub names; default: built-in synthetic data")
    g.add_argument(f"--{prefix}dataset_probs", type=str, default="1.0")
    g.add_argument(f"--{prefix}train_split", type=str, default="train")
    g.add_argument(f"--{prefix}eval_split", type=str, default="test",
                   help="'dummy': first 3%% of train (XRIGHT; overlaps train)")
    g.add_argument(f"--{prefix}eval_fraction", type=float, default=0.0, help="hold out a disjoint slice of train")
    g.add_argument(f"--{prefix}max_samples", type=int, default=100000000)
    g.add_argument(f"--{prefix}max_len", type=int, default=max_len)
    if not keys:
        return
    g = p.add_argument_group("record fields and templates")
    g.add_argument("--input_key", type=str, default="input")
    g.add_argument("--output_key", type=str, default="output")
    g.add_argument("--prompt_key", type=str, default="prompt")
    g.add_argument("--chosen_key", type=str, default="chosen")
    g.add_argument("--rejected_key", type=str, default="rejected")
    g.add_argument("--label_key", type=str, default="label")
    g.add_argument("--completion_key", type=str, default="completion")
    g.add_argument("--completions_key", type=str, default="completions")
    g.add_argument("--rewards_key", type=str, default="rewards")
    g.add_argument("--margin_key", type=str, default=None)
    g.add_argument("--input_template", type=str, default="User: {}\nAssistant: ")
    g.add_argument("--apply_chat_template", action="store_true", default=False)
    g.add_argument("--tokenizer_chat_template", type=str, default=None)
    g.add_argument("--pretrain_mode", action="store_true", default=False, help="SFT without prompt masking")
    g.add_argument("--data_cache_dir", type=str, default=None,
                   help="tokenise once into memory-mapped Arrow tables under this directory, reused while the "
                        "files, tokenizer and data flags are unchanged (one process builds, the others wait)")


def add_pref_flags(p: argparse.ArgumentParser, rlhf_aliases: bool = False) -> None:
    """``--beta``, ``--ipo``, ``--label_smoothing`` (also as ``--rlhf_*`` in the joint CLIs, as XRIGHT's seq CLIs)."""
    names = lambda flag: [f"--{flag}", f"--rlhf_{flag}"] if rlhf_aliases else [f"--{flag}"]  # noqa: E731
    g = p.add_argument_group("preference loss")
    g.add_argument(*names("beta"), dest="beta", type=float, default=0.1)
    g.add_argument(*names("ipo"), dest="ipo", action="store_true", default=False, help="same as --loss ipo")
    g.add_argument(*names("label_smoothing"), dest="label_smoothing", type=float, default=0.0,
                   help="conservative DPO ε")
    g.add_argument("--ipo_average", action="store_true", default=False,
                   help="IPO on length-averaged log-probs (TRL/HALOs); default summed (DPO reference code)")
    g.add_argument("--ref_pretrain", type=str, default=None, help="reference model; default: --pretrain")


def parse(p: argparse.ArgumentParser, argv=None):
    """Parse, and record which flags the user typed (a typed flag may contradict a ds_config)."""
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    probe = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for action in p._actions:
        if action.option_strings and action.dest != "help":
            kwargs = {"dest": action.dest}
            if action.nargs == 0:
                kwargs.update(action="store_const", const=True)
            else:
                kwargs["nargs"] = action.nargs
            probe.add_argument(*action.option_strings, **kwargs)
    args.explicit = set(vars(probe.parse_known_args(argv)[0]))
    _batch_sizes_from_file(args)
    token = getattr(args, "use_wandb", None)
    if token and token.lower() not in ("true", "false", "1", "0", "yes", "no", "none"):
        # wandb records sys.argv in its run metadata: keep the key out of it
        sys.argv[:] = [a.replace(token, "<redacted>") for a in sys.argv]
    return args


def _batch_sizes_from_file(args) -> None:
    """A --deepspeed file's batch sizes stand for the batch flags the user did not type, so that the
    loop trains what the written config says (a typed flag that contradicts the file is an error later).
    A file with micro batch and accumulation but no train_batch_size means micro × accumulation × ranks."""
    if not getattr(args, "deepspeed", None):
        return
    from xright.strategy import ConfigError, read_ds_config

    cfg = read_ds_config(args.deepspeed)
    given = {}
    for key in ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        value = cfg.get(key)
        if value in (None, "auto"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"DeepSpeed config {args.deepspeed}: {key} must be a positive integer or \"auto\", "
                              f"got {value!r}")
        given[key] = value
    if "train_micro_batch_size_per_gpu" in given and "micro_train_batch_size" not in args.explicit:
        args.micro_train_batch_size = given["train_micro_batch_size_per_gpu"]
    if "train_batch_size" not in args.explicit:
        if "train_batch_size" in given:
            args.train_batch_size = given["train_batch_size"]
        elif "gradient_accumulation_steps" in given:
            world = int(os.environ.get("WORLD_SIZE", "1"))  # set by the launcher before Python starts
            args.train_batch_size = args.micro_train_batch_size * given["gradient_accumulation_steps"] * world


# ---- run --------------------------------------------------------------------------------------

@dataclass
class ObjectiveSpec:
    name: str
    objective: object
    data: object               # xright.data.DataSpec
    micro_batch_size: int
    optimum: float = 0.0


@dataclass(frozen=True)
class Batching:
    """One objective's batch geometry."""

    per_rank: int     # examples per rank per micro-batch (the loader batch)
    micro_steps: int  # micro-batches per optimizer step (gradient accumulation)
    world: int

    @property
    def per_step(self) -> int:
        return self.per_rank * self.micro_steps * self.world

    def __str__(self) -> str:
        return (f"{self.per_rank} examples per rank per micro-batch × {self.micro_steps} micro-batches per "
                f"optimizer step × {self.world} rank{'s' * (self.world != 1)} = {self.per_step} examples per "
                f"optimizer step")


def ds_micro_batch(args, specs: list[ObjectiveSpec]) -> int:
    """The micro batch the DeepSpeed config gets: the first objective's loader batch ("examples"), or
    --micro_train_batch_size loader batches ("xright")."""
    return specs[0].micro_batch_size if args.batch_meaning == "examples" else args.micro_train_batch_size


def batch_plan(args, specs: list[ObjectiveSpec], world_size: int) -> dict[str, Batching]:
    """Every objective's batches under the CLI's meaning of --train_batch_size (:data:`BATCH_MEANINGS`)."""
    from xright.strategy import accumulation_steps

    plan = {}
    for sp in specs:
        if args.batch_meaning == "examples":
            accum = accumulation_steps(args.train_batch_size, sp.micro_batch_size, world_size,
                                       f"{sp.name} micro batch size")
        else:
            accum = accumulation_steps(
                args.train_batch_size, args.micro_train_batch_size, world_size,
                "--micro_train_batch_size (as XRIGHT: DeepSpeed's micro batch in loader batches)")
        plan[sp.name] = Batching(sp.micro_batch_size, accum, world_size)
    return plan


def ds_options(args, specs: list[ObjectiveSpec]):
    from xright.strategy import DSOptions

    explicit = set(args.explicit)
    if args.batch_meaning == "examples":  # an objective's own micro batch flag is DeepSpeed's micro batch
        explicit |= {"micro_train_batch_size" for f in args.explicit if f.endswith("micro_train_batch_size")}
    return DSOptions(
        deepspeed=args.deepspeed, zero_stage=args.zero_stage, bf16=args.bf16, adam_offload=args.adam_offload,
        ref_offload=getattr(args, "ref_offload", False), max_norm=args.max_norm,
        train_batch_size=args.train_batch_size, micro_train_batch_size=ds_micro_batch(args, specs),
        grad_accum_dtype=args.grad_accum_dtype, zpg=args.zpg, disable_trace_cache=args.disable_trace_cache,
        explicit=explicit)


def _check_resolved_batches(args, specs: list[ObjectiveSpec], cfg: dict) -> None:
    """The loop trains the batch sizes of the DeepSpeed config it writes, or stops (parse() takes a
    --deepspeed file's values for the flags not typed; a caller that skipped parse() may disagree)."""
    from xright.strategy import ConfigError

    want = (args.train_batch_size, ds_micro_batch(args, specs))
    got = (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"])
    if got != want:
        raise ConfigError(f"the DeepSpeed config ({args.deepspeed or 'from --zero_stage'}) resolves to "
                          f"train_batch_size {got[0]}, train_micro_batch_size_per_gpu {got[1]} but the loop would "
                          f"train {want[0]} and "
                          f"{want[1]}; set --train_batch_size / --micro_train_batch_size to the file's values")


def data_spec(args, kind: str, prefix: str = "", name: str = "data", **extra):
    from xright.data import DataSpec

    get = lambda f: getattr(args, prefix + f)  # noqa: E731
    return DataSpec(
        kind=kind, dataset=get("dataset"), dataset_probs=get("dataset_probs"), train_split=get("train_split"),
        eval_split=get("eval_split"), eval_fraction=get("eval_fraction"), max_samples=int(get("max_samples")),
        max_len=get("max_len"), truncation=args.truncation, input_key=args.input_key, output_key=args.output_key,
        prompt_key=args.prompt_key, chosen_key=args.chosen_key, rejected_key=args.rejected_key,
        completion_key=args.completion_key, label_key=args.label_key, completions_key=args.completions_key,
        rewards_key=args.rewards_key, margin_key=args.margin_key, input_template=args.input_template,
        apply_chat_template=args.apply_chat_template, pretrain_mode=args.pretrain_mode,
        skip_bad_records=args.skip_bad_records, seed=args.seed, name=name,
        cache_dir=getattr(args, "data_cache_dir", None), **extra)


def safe_config(args) -> dict:
    """The run's flags for config dumps and wandb — never the wandb token."""
    cfg = {k: v for k, v in vars(args).items() if k not in ("use_wandb", "explicit")}
    cfg["use_wandb"] = bool(args.use_wandb)
    return {k: (list(v) if isinstance(v, (set, tuple)) else v) for k, v in cfg.items()}


# Exit codes of every CLI (README "Exit codes"): the code the run decided, on every rank.
EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_NONFINITE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 3, 130, 143


class Terminated(Exception):
    """SIGTERM: the run checkpointed and stopped before its last step (resume with --load_checkpoint)."""


def main_guard(fn: Callable[[], None]) -> None:
    """Run a CLI, then tear down in order and exit with the code the run decided.

    Input and configuration errors end it with one clear line, not a traceback. Whatever happened,
    the engines and process groups are torn down while the interpreter is intact
    (``strategy.close_process_group``), after the exception and its frames are released, so that no
    communication thread outlives ``main`` to abort the process at exit and replace the code.
    """
    shutdown(guarded(fn))


def guarded(fn: Callable[[], None]) -> int:
    """Run ``fn`` and return the exit code its outcome means (``main_guard``'s, without the exit)."""
    from xright.data import DataError
    from xright.models import ModelLoadError
    from xright.strategy import ConfigError
    from xright.trainer import NonFiniteLoss

    try:
        fn()
        code = EXIT_OK
    except (DataError, ConfigError, ModelLoadError, UsageError) as e:
        print(f"xright: error: {e}", file=sys.stderr, flush=True)
        code = EXIT_USAGE
    except NonFiniteLoss as e:
        print(f"xright: error: {e}", file=sys.stderr, flush=True)
        code = EXIT_NONFINITE
    except Terminated as e:
        print(f"xright: {e}", file=sys.stderr, flush=True)
        code = EXIT_TERMINATED
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        code = e.code if isinstance(e.code, int) else EXIT_OK if e.code is None else EXIT_BUG
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    except Exception:  # a bug: its traceback, and exit 1 rather than whatever finalisation makes of it
        import traceback

        traceback.print_exc()
        code = EXIT_BUG
    return code


def shutdown(code: int) -> None:
    """Tear down (engines, process groups, their threads) and exit with ``code``."""
    sys.stdout.flush()
    sys.stderr.flush()
    if "xright.strategy" not in sys.modules:  # stopped before any process group (e.g. --help)
        sys.exit(code)
    from xright.strategy import close_process_group

    left = close_process_group()
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if left and main is not None and main.name.startswith("xright."):  # never inside a host process (pytest)
        # A group outlived the teardown (ZeRO-3: see close_process_group). Its threads would be torn
        # down by interpreter finalisation, which can abort the process and replace the code; everything
        # is written, closed and flushed by now, so end the process without finalisation.
        if os.environ.get("XRIGHT_DEBUG_EXIT"):
            print(f"xright: {len(left)} gloo threads alive at exit ({', '.join(left)}): os._exit({code})",
                  file=sys.stderr, flush=True)
        import atexit

        atexit._run_exitfuncs()  # Python-level exit handlers (logging, wandb, tqdm) still run
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


class UsageError(ValueError):
    pass


def run(args, specs: list[ObjectiveSpec], make_schedule: Callable, *, task: str = "causal",
        steps_per_epoch: Callable | None = None, extra_save_files: Callable | None = None) -> dict:
    """Build everything from flags, train, save. Returns the final eval metrics.

    ``make_schedule(total_steps, steps_per_epoch, tasks)`` builds the schedule once the data
    sizes are known; ``steps_per_epoch(tasks)`` defines a (joint) epoch (default: the first
    objective's optimizer steps per pass over its data).
    """
    import numpy as np
    import torch
    from transformers import get_scheduler

    from xright.data import CyclingLoader, load_data
    from xright.logging import MetricsLogger, wandb_settings
    from xright.models import LoraSpec, is_peft, load_model, load_tokenizer
    from xright.objectives import Reference
    from xright.strategy import Strategy, atomic_write_json
    from xright.trainer import TrainArgs, Task, Trainer

    for sp in specs:
        try:
            sp.objective.check_micro_batch(sp.micro_batch_size)
        except ValueError as e:
            raise UsageError(f"{sp.name}: {e}") from None
    if args.packing_samples and task == "reward":
        raise UsageError("--packing_samples is not supported for reward models (their score is read at each "
                         "row's last token of a padded batch); drop it, or use --group_by_length")
    _check_writable(args.save_path)
    strategy = Strategy(seed=args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    batches = batch_plan(args, specs, strategy.world_size)
    strategy.configure(ds_options(args, specs))
    _check_resolved_batches(args, specs, strategy.ds_config)
    if args.skip_nonfinite:
        _check_skip_nonfinite(strategy)
    accum = {name: b.micro_steps for name, b in batches.items()}

    tokenizer = load_tokenizer(args.pretrain, use_fast=not args.disable_fast_tokenizer,
                               trust_remote_code=args.trust_remote_code,
                               chat_template=getattr(args, "tokenizer_chat_template", None))
    data = {sp.name: load_data(sp.data, tokenizer, log=strategy.print) for sp in specs}
    loaders = {}
    for sp in specs:
        try:
            loaders[sp.name] = CyclingLoader(data[sp.name][0], sp.objective.kind, sp.micro_batch_size,
                                             tokenizer.pad_token_id, rank=strategy.rank,
                                             world_size=strategy.world_size, seed=args.seed,
                                             packed=args.packing_samples, group_by_length=args.group_by_length,
                                             accumulation=accum[sp.name])
        except ValueError as e:
            raise UsageError(f"{sp.name}: {e}") from None
    for sp in specs:  # KTO's z is a mean over ranks; objectives import no deepspeed
        sp.objective.reduce_mean = lambda t: strategy.all_reduce(t, op="mean")
    tasks = {sp.name: Task(sp.objective, loaders[sp.name], data[sp.name][1], sp.micro_batch_size,
                           accum[sp.name], sp.optimum) for sp in specs}
    per_epoch = steps_per_epoch(tasks) if steps_per_epoch else len(tasks[specs[0].name].loader) // tasks[specs[0].name].grad_accum
    total = args.max_steps if args.max_steps else args.max_epochs * per_epoch

    lora = LoraSpec(args.lora_rank, args.lora_alpha, args.lora_dropout, args.target_modules)
    model = load_model(args.pretrain, task=task, bf16=args.bf16, flash_attn=args.flash_attn, lora=lora,
                       gradient_checkpointing=args.gradient_checkpointing,
                       gradient_checkpointing_use_reentrant=args.gradient_checkpointing_use_reentrant,
                       load_in_4bit=args.load_in_4bit, trust_remote_code=args.trust_remote_code,
                       seed=args.seed, vocab_size=len(tokenizer), packing=args.packing_samples,
                       pad_token_id=tokenizer.pad_token_id)
    # the world size is not part of it: a checkpoint moves to another rank count (Strategy.plan_resume)
    signature = {"model": args.pretrain or "tiny", "lora_rank": args.lora_rank,
                 "num_params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
                 "objectives": sorted(tasks),
                 # loader positions are global counts: they mean the same examples under any world size ×
                 # micro batch × accumulation of the same examples per optimizer step, and other data elsewhere
                 "examples_per_step": {k: t.loader.global_batch for k, t in tasks.items()},
                 "group_by_length": args.group_by_length,
                 "data": {k: f"{len(t.loader.examples)} examples, ids sha256 " +
                          hashlib.sha256("\n".join(e["id"] for e in t.loader.examples).encode()).hexdigest()[:16]
                          for k, t in tasks.items()}}
    optimizer = strategy.optimizer(model, args.learning_rate, args.adam_betas, args.l2)
    scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=math.ceil(total * args.lr_warmup_ratio),
        num_training_steps=total,
        scheduler_specific_kwargs={"min_lr": args.learning_rate * args.min_lr_ratio}
        if args.lr_scheduler == "cosine_with_min_lr" else None)
    if args.load_checkpoint:  # another world size: convert to a universal checkpoint before the engine exists
        strategy.plan_resume(args.ckpt_path, signature)
    engine = strategy.prepare(model, optimizer, scheduler)

    reference = None
    ref_specs = [sp for sp in specs if sp.objective.needs_reference]
    if ref_specs:
        ref_path = getattr(args, "ref_pretrain", None)

        def live_reference():
            if is_peft(engine.module) and not ref_path:
                return Reference(lora_policy=engine)
            ref = load_model(ref_path or args.pretrain, bf16=args.bf16, flash_attn=args.flash_attn,
                             trust_remote_code=args.trust_remote_code, seed=args.seed,
                             vocab_size=len(tokenizer), trainable=False, packing=args.packing_samples,
                             pad_token_id=tokenizer.pad_token_id)
            return Reference(model=strategy.prepare_reference(ref))

        if _precompute_pays(args, ref_specs, tasks, total, strategy):
            from xright import refcache

            reference = refcache.cached_reference(
                live_reference, strategy, [ex for sp in ref_specs for ex in data[sp.name] if ex],
                tuple(sorted({p for sp in ref_specs for p in sp.objective.live_reference_prefixes})),
                refcache.fingerprint(args, specs, tokenizer),
                args.ref_cache_dir or os.path.join(args.ckpt_path, "ref_cache"),
                min(sp.micro_batch_size for sp in ref_specs), tokenizer.pad_token_id, packed=args.packing_samples)
        else:
            reference = live_reference()

    schedule = make_schedule(total, per_epoch, tasks)
    if args.debug_rank_seed and hasattr(schedule, "rng"):
        schedule.rng.seed(args.seed + 1000 * strategy.rank)
    strategy.write_config(args.save_path)
    if strategy.is_rank0:
        atomic_write_json(os.path.join(args.save_path, "xright_args.json"), safe_config(args))
    logger = MetricsLogger(
        args.save_path, strategy.is_rank0, resume=args.load_checkpoint,
        wandb=wandb_settings(args.use_wandb, args.wandb_org, args.wandb_group, args.wandb_project,
                             args.wandb_run_name),
        tensorboard_dir=args.use_tensorboard, config=safe_config(args))
    strategy.print(f"xright: {total} optimizer steps ({per_epoch} per epoch), world size {strategy.world_size}, "
                   f"ZeRO-{strategy.zero_stage}, objectives {', '.join(tasks)}; --train_batch_size "
                   f"{args.train_batch_size} counts " +
                   ("loader batches, as XRIGHT's CLIs" if args.batch_meaning == "xright" else "examples"))
    for name, b in batches.items():
        strategy.print(f"xright: {name}: {b}")
    train_args = TrainArgs(
        total_steps=total, save_path=args.save_path,
        eval_steps=args.eval_steps if args.eval_steps > 0 else per_epoch,
        logging_steps=max(1, args.logging_steps), debug_log_picks=args.debug_log_picks,
        pad_id=tokenizer.pad_token_id, eps=getattr(args, "eps", 0.0),
        stop_at_optimum=getattr(args, "stop_at_optimum", False), ref_pareto=getattr(args, "ref_pareto", {}) or {},
        save_steps=args.save_steps, ckpt_path=args.ckpt_path, max_ckpt_num=args.max_ckpt_num,
        max_ckpt_mem=args.max_ckpt_mem, signature=signature, equal_length=getattr(args, "equal_length", False),
        steps_per_epoch=per_epoch, skip_nonfinite=args.skip_nonfinite)
    strategy.seed_rank()  # after every model is built: dropout masks differ across ranks, weights do not
    trainer = Trainer(strategy, engine, reference, tasks, schedule, train_args, logger, tokenizer)
    try:
        if args.load_checkpoint:
            trainer.resume()
        final = trainer.fit()
        if final.get("terminated"):
            raise Terminated(f"stopped by SIGTERM before the last step (exit code {EXIT_TERMINATED}); resume "
                             f"with --load_checkpoint")
        _write_batches(args, batches, tasks, strategy)
        if final:
            strategy.print("final " + " ".join(f"{k}={v:.4f}" for k, v in final.items()))
    finally:
        logger.close()
    strategy.save_hf(engine, tokenizer, args.save_path,
                     extra_files=extra_save_files(trainer) if extra_save_files else None)
    strategy.release_hf_config()
    if args.merge_lora and is_peft(engine.module) and strategy.is_rank0:
        from xright.models import merge_saved_adapter

        merge_saved_adapter(args.pretrain, args.save_path, os.path.join(args.save_path, "merged"), tokenizer,
                            seed=args.seed, task=task)  # the tiny base is built from the run's seed
    strategy.barrier()
    strategy.print(f"saved to {args.save_path}")
    return final


def _precompute_pays(args, ref_specs, tasks, total: int, strategy) -> bool:
    """--precompute_ref_log_probs, unless left at its default for a run whose steps cannot draw every
    training example once (a smoke test of a few steps): then one pass over all of them costs more
    than the live reference forwards it replaces."""
    if not getattr(args, "precompute_ref_log_probs", False):
        return False
    if "precompute_ref_log_probs" in args.explicit:
        return True
    for sp in ref_specs:  # an objective picked at every step draws micro × accum × world examples per step
        t = tasks[sp.name]
        drawn, have = total * t.micro_batch_size * t.grad_accum * strategy.world_size, len(t.loader.examples)
        if drawn < have:
            strategy.print(f"reference log-probs: live ({total} steps draw at most {drawn} of the {have} {sp.name} "
                           "examples; --precompute_ref_log_probs forces the pass)")
            return False
    return True


def _write_batches(args, batches: dict[str, Batching], tasks: dict, strategy) -> None:
    """save_path/batches.json: each objective's batch geometry and the examples its loader delivered
    (the same on every rank: every rank draws the same number of micro-batches)."""
    from xright.strategy import atomic_write_json

    out = {"batch_meaning": args.batch_meaning, "train_batch_size": args.train_batch_size,
           "world_size": strategy.world_size, "objectives": {}}
    for name, b in batches.items():
        loader = tasks[name].loader
        drawn = loader.epoch * len(loader) + loader.position
        out["objectives"][name] = {
            "examples_per_rank_per_micro_batch": b.per_rank, "micro_batches_per_step": b.micro_steps,
            "examples_per_step": b.per_step, "micro_batches_drawn_per_rank": drawn,
            "examples_drawn": drawn * b.per_rank * b.world}
        strategy.print(f"xright: {name}: {drawn * b.per_rank * b.world} examples drawn "
                       f"({drawn} micro-batches of {b.per_rank} per rank)")
    if strategy.is_rank0:
        atomic_write_json(os.path.join(args.save_path, "batches.json"), out)


def _check_skip_nonfinite(strategy) -> None:
    """--skip_nonfinite relies on DeepSpeed's ZeRO optimizers discarding a step with non-finite gradients."""
    if strategy.zero_stage == 0:
        raise UsageError("--skip_nonfinite needs --zero_stage 1, 2 or 3: only DeepSpeed's ZeRO optimizers discard "
                         "a step whose gradients are non-finite; at stage 0 it would already be applied")
    bf16 = strategy.ds_config.get("bf16") or {}
    if bf16.get("enabled") and bf16.get("check_grad_overflow") is False:
        raise UsageError("--skip_nonfinite contradicts bf16.check_grad_overflow = false in the DeepSpeed config: "
                         "without that check a bf16 ZeRO-1/2 optimizer applies non-finite gradients")


def _check_writable(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--save_path {path!r} cannot be created: {e.strerror}") from e
    if not os.access(path, os.W_OK):
        raise UsageError(f"--save_path {path!r} is not writable")
