"""N-objective joint training: any set of objectives, each on its own data, under one schedule.

    deepspeed --module xright.cli.train_joint --objectives sft,dpo,kto --schedule maxright \\
        --sft_weight 0.5 --dpo_weight 0.3 --kto_weight 0.2 --sft_opt 0.9 --kto_micro_train_batch_size 4

``--objectives``: NAME or NAME:LOSS entries (NAME defaults to LOSS; ``sft,dpo,hh:dpo`` trains dpo twice on two
data sets). Each NAME ('-' read as '_') has its own ``--NAME_dataset`` (and the other data flags),
``--NAME_micro_train_batch_size`` (default ``--micro_train_batch_size``), ``--NAME_weight`` (1), ``--NAME_opt``
(its optimum L*, 0), ``--NAME_beta`` (the loss's β); other hyperparameters (``--label_smoothing`` …) are shared.
Metrics are ``train/NAME/*``, ``eval/NAME/*``. Not the reward model: it trains a scalar head, not the shared LM.
"""

from __future__ import annotations

import argparse
import re

from xright.cli import common, flags, lifecycle
from xright.cli.lifecycle import UsageError
from xright.objectives import OBJECTIVES
from xright.schedules import SCHEDULES, ScheduleInputs, Single, Stopping


def parse_objectives(text: str) -> dict[str, str]:
    """'sft,dpo,hh:dpo' -> {name: loss}, in order."""
    out, losses = {}, list(OBJECTIVES)
    for entry in (e.strip() for e in (text or "").split(",")):
        if not entry:
            continue
        name, _, loss = entry.partition(":")
        loss = loss or name
        if loss == "rm":
            raise UsageError("--objectives: rm trains a scalar-head reward model, not the causal LM the other "
                             "objectives share; train it on its own with xright.cli.train_rm")
        if loss not in losses:
            raise UsageError(f"--objectives: unknown loss {loss!r} in {entry!r}; choose from {losses}")
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
            raise UsageError(f"--objectives: objective name {name!r} must be lower-case letters, digits, - or _")
        if name in out:
            raise UsageError(f"--objectives: {name!r} appears twice; name them apart, e.g. {name}2:{loss}")
        out[name] = loss
    if not out:
        raise UsageError("--objectives: name at least one objective, e.g. --objectives sft,dpo,kto")
    return out


def add_schedule_flags(p: argparse.ArgumentParser, schedule: str | None = None, *, default: str = "maxright",
                       choices=None, order: str | None = None):
    """The schedule flags of the joint CLIs (this one and the paper's presets, :mod:`xright.cli.joint`).
    ``schedule`` fixes the schedule (no ``--schedule`` flag). Returns the group, for a CLI's own flags."""
    g = p.add_argument_group("schedule")
    if schedule is None:
        g.add_argument("--schedule", choices=sorted(choices or SCHEDULES), default=default,
                       help="(one objective: --train_only)")
    else:
        p.set_defaults(schedule=schedule)
    g.add_argument("--max_eval_steps", type=int, default=-1,
                   help="MAXRIGHT: recompute every objective's loss (no grad) every N steps; -1: only at the start")
    g.add_argument("--train_only", type=str, default=None,
                   help="train this objective only and evaluate all (train_sft_seq / train_dpo_seq)")
    g.add_argument("--order", type=str, default=order, help="sequential: phase order (default: the objectives' order)")
    g.add_argument("--steps_per_epoch", type=int, default=None,
                   help="optimizer steps in a joint epoch (default: one pass over the first objective's data, "
                        "SFT's in the paper's CLIs; sequential: all phases)")
    g.add_argument("--eps", type=float, default=0.0001,
                   help="stop when every eval loss is within eps of its optimum (if any optimum is set)")
    g.add_argument("--equal_length", action="store_true", default=False,
                   help="XRIGHT's pairing: epoch = shorter loader, every loader restarts each epoch and the "
                        "unpicked objective's batch is drawn and discarded (exact reproduction only)")
    return g


def parser(objectives: dict[str, str]) -> argparse.ArgumentParser:
    p = flags.base_parser(__doc__, learning_rate=1e-5, max_epochs=1, wandb_project="xright_joint",
                           ckpt_path="./ckpt/checkpoints_joint")
    p.add_argument("--objectives", type=str, required=True, help="comma-separated NAME or NAME:LOSS; LOSS in "
                   + ", ".join(OBJECTIVES))
    for i, (name, loss) in enumerate(objectives.items()):
        pre = flags.flag_prefix(name)
        flags.add_data_flags(p, pre, max_len=2048 if loss == "sft" else 512, keys=i == 0)
        g = p.add_argument_group(f"objective {name} ({loss})")
        g.add_argument(f"--{pre}micro_train_batch_size", type=int, default=None, help="default --micro_train_batch_size")
        g.add_argument(f"--{pre}weight", type=float, default=1.0, help="schedule weight w")
        g.add_argument(f"--{pre}opt", type=float, default=0.0, help="optimal loss L* (MAXRIGHT, stopping)")
    # every objective's shared hyperparameters, as before: a script may pass them whatever it trains
    flags.add_objective_flags(p, list(OBJECTIVES), own=objectives)
    add_schedule_flags(p)
    return p


def run(args, specs: list[common.ObjectiveSpec], weights: dict[str, float], stopping: Stopping) -> None:
    """A joint run (this CLI and the paper's presets): the schedule ``--schedule`` over ``weights``."""
    def steps(tasks):  # optimizer steps of one pass over each objective's data
        return {n: len(t.loader) // t.grad_accum for n, t in tasks.items()}

    def schedule(tasks):
        inputs = ScheduleInputs(
            weights, {n: t.optimum for n, t in tasks.items()}, args.seed, refresh_every=max(args.max_eval_steps, 0),
            phase_steps={n: args.max_epochs * k for n, k in steps(tasks).items()},
            order=tuple(n.strip() for n in args.order.split(",")) if args.order else (), only=args.train_only)
        try:
            return (Single if args.train_only else SCHEDULES[args.schedule]).build(inputs)
        except ValueError as e:
            raise UsageError(str(e)) from None

    def epoch(tasks):
        per = steps(tasks)
        if args.steps_per_epoch:
            return args.steps_per_epoch
        if args.equal_length:
            return min(per.values())
        if args.train_only:
            return per[args.train_only]
        if args.schedule == "sequential":
            return sum(per.values())
        return per[specs[0].name]

    common.run(args, specs, schedule, steps_per_epoch=epoch, stopping=stopping)


def main(argv=None):
    first = argparse.ArgumentParser(add_help=False)  # the objectives name the flags to parse
    first.add_argument("--objectives", type=str, default=None)
    known, _ = first.parse_known_args(argv)
    objectives = parse_objectives(known.objectives) if known.objectives else {}
    args = flags.parse(parser(objectives), argv)
    if args.train_only and args.train_only not in objectives:
        raise UsageError(f"--train_only must be one of {list(objectives)}, got {args.train_only!r}")
    specs, weights = [], {}
    for name, loss in objectives.items():
        pre = flags.flag_prefix(name)
        objective = flags.build_objective(args, loss, name)
        micro = getattr(args, pre + "micro_train_batch_size") or args.micro_train_batch_size
        specs.append(common.ObjectiveSpec(name, objective, flags.data_spec(args, objective.kind, pre, name=name),
                                          micro, getattr(args, pre + "opt")))
        weights[name] = getattr(args, pre + "weight")
    run(args, specs, weights, Stopping(args.eps, at_optimum=any(sp.optimum for sp in specs)))


if __name__ == "__main__":
    lifecycle.main_guard(main)
