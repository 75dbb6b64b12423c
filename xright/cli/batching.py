"""Batch geometry: what --train_batch_size means per CLI, and its agreement with the DeepSpeed config."""

import os
from dataclasses import dataclass

from xright.cli.lifecycle import UsageError


def batch_sizes_from_file(args) -> None:
    """A --deepspeed file's batch sizes stand for the batch flags the user did not type (a typed flag that
    contradicts it is an error later); micro batch and accumulation without train_batch_size: × ranks."""
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
            micro, what = sp.micro_batch_size, f"{sp.name} micro batch size"
        else:
            micro, what = args.micro_train_batch_size, ("--micro_train_batch_size (as XRIGHT: DeepSpeed's micro "
                                                        "batch in loader batches)")
        accum = accumulation_steps(args.train_batch_size, micro, world_size, what)
        plan[sp.name] = Batching(sp.micro_batch_size, accum, world_size)
    return plan


def ds_options(args, specs: list[ObjectiveSpec]):
    from xright.strategy import DSOptions

    explicit = set(args.explicit)
    if args.batch_meaning == "examples":  # an objective's own micro batch flag is DeepSpeed's micro batch
        explicit |= {"micro_train_batch_size" for f in args.explicit if f.endswith("micro_train_batch_size")}
    return DSOptions(
        deepspeed=args.deepspeed, zero_stage=args.zero_stage, bf16=args.bf16, adam_offload=args.adam_offload,
        ref_offload=getattr(args, "ref_offload", False), max_norm=args.max_norm, train_batch_size=args.train_batch_size,
        micro_train_batch_size=ds_micro_batch(args, specs), grad_accum_dtype=args.grad_accum_dtype, zpg=args.zpg,
        disable_trace_cache=args.disable_trace_cache, explicit=explicit)


def check_resolved_batches(args, specs: list[ObjectiveSpec], cfg: dict) -> None:
    """The loop trains the batch sizes of the DeepSpeed config it writes, or stops (a caller that skipped
    parse() may disagree with a --deepspeed file)."""
    from xright.strategy import ConfigError

    want = (args.train_batch_size, ds_micro_batch(args, specs))
    got = (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"])
    if got != want:
        raise ConfigError(f"the DeepSpeed config ({args.deepspeed or 'from --zero_stage'}) resolves to "
                          f"train_batch_size {got[0]}, train_micro_batch_size_per_gpu {got[1]} but the loop would "
                          f"train {want[0]} and {want[1]}; set --train_batch_size / --micro_train_batch_size to the "
                          "file's values")


def write_batches(args, batches: dict[str, Batching], tasks: dict, strategy) -> None:
    """save_path/batches.json: each objective's batch geometry and the examples its loader delivered
    (the same on every rank: every rank draws the same number of micro-batches)."""
    from xright.files import atomic_write_json

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

