"""The one training loop (:meth:`Trainer.fit`) for every schedule and objective: pick, compute, backward, step,
log, evaluate, checkpoint. It knows objectives only by name and by what they declare."""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from xright.data import CyclingLoader
from xright.logprobs import num_tokens
from xright.objectives import Objective, Reference
from xright.schedules import Stopping
from xright.sharding import run_pass

PROBE_SEED = 1_000_003  # offset of the probe loaders' seed from the training loaders'


@dataclass
class Task:
    """An objective with its data: the unit the schedule picks."""

    objective: Objective
    loader: CyclingLoader
    eval_examples: list | None
    micro_batch_size: int
    grad_accum: int
    optimum: float = 0.0


@dataclass
class TrainArgs:
    total_steps: int
    save_path: str
    eval_steps: int = -1
    logging_steps: int = 1
    eval_at_start: bool = True
    stopping: Stopping = field(default_factory=Stopping)  # the joint runs' early stopping
    debug_log_picks: bool = False
    # resumable checkpoints (docs/DESIGN.md §2 invariant 5)
    save_steps: int = -1
    ckpt_path: str = "./ckpt/checkpoints"
    max_ckpt_num: int = 3
    max_ckpt_mem: float = 1000.0
    signature: dict = field(default_factory=dict)  # facts a checkpoint must match (world size, model)
    # XRIGHT's pairing (--equal_length): every loader advances every step and all restart together
    equal_length: bool = False
    steps_per_epoch: int = 0
    # a step with a non-finite loss or gradient: stop (default) or skip it and count
    skip_nonfinite: bool = False


class NonFiniteLoss(RuntimeError):
    pass


class Trainer:
    def __init__(self, strategy, engine, reference: Reference | None, tasks: dict[str, Task], schedule,
                 args: TrainArgs, logger):
        missing = set(schedule.names) - set(tasks)
        if missing:
            raise ValueError(f"schedule names objectives without data: {sorted(missing)}")
        self.s, self.engine, self.reference = strategy, engine, reference
        self.tasks, self.schedule, self.args, self.logger = tasks, schedule, args, logger
        self.step = 0
        self.skipped = 0  # optimizer steps discarded for a non-finite loss or gradient
        self._terminate = False
        self._last_eval: tuple[int, dict] = (-1, {})
        # debug: "STEP" makes every rank's loss (or only its gradients) NaN at that step, "STEP:RANK" only that rank's
        self._debug_nan_step = _debug_step("XRIGHT_DEBUG_NAN_AT_STEP", strategy.rank)
        self._debug_nan_grad_step = _debug_step("XRIGHT_DEBUG_NAN_GRAD_AT_STEP", strategy.rank)
        # debug: rank 0 sends itself SIGTERM after this step (a scheduler's pre-emption, inside a shared launch)
        self._debug_sigterm_step = int(os.environ.get("XRIGHT_DEBUG_SIGTERM_AT_STEP", "0")) if strategy.rank == 0 else 0
        self._last_ids: dict[str, list] = {}
        # MAXRIGHT's stale-loss probes read their own pass over each objective's data, so the training
        # loaders never lose a batch to a probe (docs/DESIGN.md §2.3); another seed gives another order
        self.probe_loaders = {k: copy.copy(t.loader) for k, t in tasks.items()}  # same examples and layout
        for k, p in self.probe_loaders.items():
            p.load_state_dict({"epoch": 0, "examples": 0, "seed": tasks[k].loader.seed + PROBE_SEED})
        for name, t in tasks.items():
            # the loader's epochs are cut at its global batch, which must be the step's
            accum = getattr(t.loader, "accumulation", t.grad_accum)
            if accum != t.grad_accum:
                raise ValueError(f"{name}: the loader accumulates {accum} micro-batches per step, the task "
                                 f"{t.grad_accum}")
            need, share = t.objective.min_micro_batch, len(t.eval_examples or []) // strategy.world_size
            if t.eval_examples and share < need:
                strategy.print(f"warning: {name}: {len(t.eval_examples)} eval examples give each of the "
                               f"{strategy.world_size} ranks {share}, fewer than the {need} a {name} batch needs: "
                               f"{name} is not evaluated")
        self._pick_log = None
        if args.debug_log_picks:
            os.makedirs(args.save_path, exist_ok=True)
            self._pick_log = open(os.path.join(args.save_path, f"picks.rank{strategy.rank}.jsonl"), "a", buffering=1)

    def _to_device(self, batch: dict) -> dict:
        dev = self.s.device
        return {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self, plan: dict[str, float]):
        """Draw every picked objective's micro-batches first, so that its normaliser N_k (units of the whole step,
        all ranks) is known before the first backward; then accumulate Σ_k w_k · sum_k × W / N_k per micro-step
        (docs/DESIGN.md §4) and step once. The accumulation boundary is ours: objectives may accumulate
        different numbers of micro-batches, which DeepSpeed's single counter cannot express."""
        engine, W, dev = self.engine, self.s.world_size, self.s.device
        batches = {k: [self._to_device(self.tasks[k].loader.next()) for _ in range(self.tasks[k].grad_accum)]
                   for k in plan}
        self._last_ids = {k: [i for b in bs for i in b["ids"]] for k, bs in batches.items()}
        units = {k: self.s.all_reduce(torch.stack([self.tasks[k].objective.units(b) for b in bs]).sum().to(dev))
                 for k, bs in batches.items()}
        micro_steps = max(len(bs) for bs in batches.values())
        sums: dict[str, dict[str, torch.Tensor]] = {k: {} for k in plan}
        tokens = torch.zeros((), device=dev)
        for m in range(micro_steps):
            engine.set_gradient_accumulation_boundary(m == micro_steps - 1)
            loss = 0.0
            for k, w in plan.items():
                if m >= len(batches[k]):
                    continue
                batch = batches[k][m]
                value, metrics = self.tasks[k].objective(engine, self.reference, batch)
                if self._debug_nan_step == self.step + 1:
                    value = value * float("nan")  # debug: a non-finite loss at this step
                    metrics = {**metrics, "loss": metrics["loss"] * float("nan")}
                if self._debug_nan_grad_step == self.step + 1:
                    value = value + torch.sqrt(value * 0)  # debug: + 0 in the loss, NaN (∞ · 0) in its gradients
                loss = loss + w * value * (W / units[k])
                for name, v in metrics.items():
                    sums[k][name] = sums[k].get(name, 0.0) + v.detach()
                tokens += num_tokens(batch)
            engine.backward(_poison_nonfinite(loss), scale_wrt_gas=False)
        engine.step()
        return sums, units, tokens

    def _reduce_metrics(self, sums, units) -> dict[str, dict[str, float]]:
        """All-reduce every objective's metric sums in one collective; divide by the units."""
        keys = [(k, m) for k in sorted(sums) for m in sorted(sums[k])]
        if not keys:
            return {}
        vec = self.s.all_reduce(torch.stack([torch.as_tensor(sums[k][m], dtype=torch.float32, device=self.s.device)
                                             for k, m in keys]))
        out: dict[str, dict[str, float]] = {k: {} for k in sums}
        for (k, m), v in zip(keys, vec.tolist()):
            out[k][m] = v / float(units[k])
        return out

    def evaluate(self) -> dict[str, float]:
        """Every objective's loss on its eval set (global means), one sharded pass each: rank r takes examples r,
        r + W, … in micro-batches (a last one too short for the objective joins the one before)."""
        out: dict[str, float] = {}
        W, r = self.s.world_size, self.s.rank
        for name in sorted(self.tasks):
            task, need = self.tasks[name], self.tasks[name].objective.min_micro_batch
            ev = task.eval_examples or []
            if not ev or len(ev) // W < need:  # none, or too few per rank (warned at start)
                continue
            shares = []
            for q in range(W):
                share = list(range(q, len(ev), W))
                cuts = list(range(0, len(share), task.micro_batch_size))
                if len(cuts) > 1 and len(share) - cuts[-1] < need:
                    cuts.pop()
                shares.append([share[a:b] for a, b in zip(cuts, cuts[1:] + [len(share)])])
            # ranks' batch counts differ by at most one, the larger first: round-robin, batch j is rank j % W's
            batches = [b for rnd in itertools.zip_longest(*shares) for b in rnd if b is not None]

            def compute(_, idx):
                batch = self._to_device(task.loader.collate([ev[i] for i in idx]))  # the training layout
                return batch, task.objective(self.engine, self.reference, batch)[1]

            sums: dict[str, torch.Tensor] = {}
            units = torch.zeros((), device=self.s.device)
            # a rank short of batches repeats its first (batch r), whose KTO z then still joins the ranks' mean
            for _, _, (batch, metrics) in run_pass(compute, batches, r, W, filler=r, model=self.engine.module):
                units += task.objective.units(batch).to(self.s.device)
                for m, v in metrics.items():
                    sums[m] = sums.get(m, 0.0) + v
            reduced = self._reduce_metrics({name: sums}, {name: self.s.all_reduce(units)})
            out.update({f"eval/{name}/{m}": v for m, v in reduced[name].items()})
        self.engine.module.train()  # training goes on in train mode (a pretrained model loads in eval mode)
        losses = {k: out[f"eval/{k}/loss"] for k in self.tasks if f"eval/{k}/loss" in out}
        if len(losses) > 1:
            out["eval/ideal_distance"] = math.sqrt(sum((losses[k] - self.tasks[k].optimum) ** 2 for k in losses))
        return out

    @torch.no_grad()
    def probe_losses(self) -> dict[str, float]:
        """Each objective's loss on the next global batch of its probe loader (its own pass over the same examples,
        saved with the checkpoint), without grad: MAXRIGHT's stale-loss refresh, the same on any number of ranks."""
        out = {}
        for name in self.schedule.names:
            task = self.tasks[name]
            value = torch.zeros((), device=self.s.device)
            units = torch.zeros((), device=self.s.device)
            for _ in range(task.grad_accum):
                batch = self._to_device(self.probe_loaders[name].next())
                loss, _ = task.objective(self.engine, self.reference, batch)
                value += loss.detach()
                units += task.objective.units(batch).to(self.s.device)
            reduced = self.s.all_reduce(torch.stack([value, units]))
            out[name] = float(reduced[0] / reduced[1])
        return out

    def state_dict(self) -> dict:
        """Everything besides the engine that the next step depends on (identical on every rank; loader
        positions are global counts, so it means the same on any number of ranks)."""
        return {"step": self.step, "skipped_nonfinite": self.skipped, "schedule": self.schedule.state_dict(),
                "loaders": {k: t.loader.state_dict() for k, t in self.tasks.items()},
                "probe_loaders": {k: p.state_dict() for k, p in self.probe_loaders.items()},
                "world_size": self.s.world_size, **self.args.signature}

    def save_checkpoint(self) -> None:
        a = self.args
        tag = self.s.save_checkpoint(self.engine, a.ckpt_path, self.step, self.state_dict(), _rng_state(),
                                     a.max_ckpt_num, a.max_ckpt_mem)
        self.s.print(f"checkpoint {tag} saved to {a.ckpt_path}")

    def resume(self) -> bool:
        """Restore the latest checkpoint of ``--ckpt_path`` (engine, counters, data, schedule, RNG)."""
        state = self.s.load_checkpoint(self.engine, self.args.ckpt_path, self.args.signature)
        if state is None:
            self.s.print(f"no checkpoint in {self.args.ckpt_path}: starting from scratch")
            self.logger.truncate(-1)
            return False
        self.step = state["step"]
        self.skipped = state.get("skipped_nonfinite", 0)
        self.schedule.load_state_dict(state["schedule"])
        for k, t in self.tasks.items():
            t.loader.load_state_dict(state["loaders"][k])
            self.probe_loaders[k].load_state_dict(state["probe_loaders"][k])
        saved, W = len(state["ranks"]), self.s.world_size
        if self.s.rank < saved:
            _set_rng_state(state["ranks"][self.s.rank])
        else:  # a rank the saving run did not have: a seed of its own (only dropout reads it)
            seed = self.s.seed + 1_000_003 * self.s.rank + self.step
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
        self.logger.truncate(self.step)
        moved = ""
        if saved != W:  # loader positions and schedule state are global: they need no conversion
            ranks = lambda a, b: f"rank {a}" if a == b else f"ranks {a}–{b}"  # noqa: E731
            moved = (f" (saved by {saved} rank{'s' * (saved != 1)}, now {W}: data positions and schedule state "
                     f"taken as they are, the RNG states of {ranks(0, min(saved, W) - 1)} restored" +
                     (f", {ranks(saved, W - 1)} seeded afresh)" if W > saved else ")"))
        self.s.print(f"resumed from {self.args.ckpt_path}/{state['tag']} at step {self.step}{moved}")
        return True

    def _log_eval(self) -> str | None:
        """Evaluate and log; the joint runs' reason to stop early, if any."""
        ev = self.evaluate()
        self._last_eval = (self.step, ev)
        if ev:
            self.logger.log({"step": self.step, **ev})
            self.s.print("eval " + " ".join(f"{k}={v:.4f}" for k, v in ev.items()))
        losses = {k: ev.get(f"eval/{k}/loss") for k in self.tasks}
        if any(v is None for v in losses.values()):
            return None
        return self.args.stopping.reason(losses, {k: t.optimum for k, t in self.tasks.items()})

    def fit(self) -> dict:
        args, s, sched = self.args, self.s, self.schedule
        bar = tqdm(total=args.total_steps, initial=self.step, disable=not s.is_rank0, desc="train", dynamic_ncols=True)
        stop = None
        # a scheduler's pre-emption: finish the step, checkpoint, exit
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, "_terminate", True))
        if args.eval_at_start and self.step == 0:
            stop = self._log_eval()
        start = time.perf_counter()
        tokens_since, t_since = torch.zeros((), device=s.device), time.perf_counter()
        terminate = False
        while self.step < args.total_steps and stop is None:
            if terminate:  # rank 0's word, broadcast with the last plan, so all ranks stop at the same step
                self.save_checkpoint()
                s.print(f"SIGTERM: checkpoint saved at step {self.step}; exiting")
                signal.signal(signal.SIGTERM, previous)
                return {"terminated": True}
            record: dict = {}
            if sched.wants_refresh(self.step):
                probes = s.broadcast_object(self.probe_losses())
                sched.refresh(probes)
                record.update({f"refresh/{k}": v for k, v in probes.items()})
            local_plan = sched.plan(self.step)
            plan, terminate = s.broadcast_object((local_plan, self._terminate))
            info = sched.info()
            if self._pick_log is not None:
                self._pick_log.write(json.dumps({"step": self.step + 1, "local": local_plan, "plan": plan}) + "\n")
            lr = self.engine.get_lr()[0]  # the rate this step applies: engine.step() moves the scheduler on
            sums, units, tokens = self.train_step(plan)
            tokens_since += tokens  # on the device: no host sync outside logging steps
            self.step += 1
            if self.step == self._debug_sigterm_step:
                os.kill(os.getpid(), signal.SIGTERM)
            if args.equal_length:  # XRIGHT's zip, for exact reproduction only: unpicked loaders advance too, and a
                # joint epoch (the shorter loader) restarts every loader
                for k, t in self.tasks.items():
                    for _ in range(0 if k in plan else t.grad_accum):
                        t.loader.next()
                    if self.step % args.steps_per_epoch == 0:
                        t.loader.load_state_dict({"epoch": self.step // args.steps_per_epoch, "examples": 0,
                                                  "seed": t.loader.seed})
            log_now = self.step % args.logging_steps == 0 or self.step == args.total_steps
            save_now = args.save_steps > 0 and self.step % args.save_steps == 0
            record.update({"step": self.step, "objectives": sorted(plan), "weights": plan, **info})
            if not self.engine.was_step_applied():  # DeepSpeed discarded it: non-finite gradients (same on all ranks)
                # (a non-finite loss is made to poison them); the weights are unchanged
                what = self._nonfinite(self._reduce_metrics(sums, units), sums) or \
                    f"non-finite gradients at step {self.step} (the losses are finite)"
                if not args.skip_nonfinite:
                    raise NonFiniteLoss(f"{what}; stopping (--skip_nonfinite skips such steps). The weights are those "
                                        f"of step {self.step - 1}; the last checkpoint in {args.ckpt_path} (if any) is "
                                        f"from before this step.")
                self.skipped += 1
                s.print(f"warning: skipped step: {what}")
                record.update({"skipped": what, "skipped_nonfinite": self.skipped})
            # losses reach the host only when needed: to log, for MAXRIGHT, or to check before a save
            elif log_now or sched.needs_losses or save_now:
                reduced = self._reduce_metrics(sums, units)
                what = self._nonfinite(reduced, sums)
                if what:  # a NaN/inf loss that reached the weights (ZeRO stage 0): stop before logging or saving it
                    raise NonFiniteLoss(f"{what}; stopping. The last checkpoint in {args.ckpt_path} (if any) is from "
                                        f"before this step.")
                sched.observe(self.step - 1, {k: reduced[k]["loss"] for k in reduced})
                for k, metrics in reduced.items():
                    record.update({f"train/{k}/{m}": v for m, v in metrics.items()})
            if log_now:
                tok = float(s.all_reduce(tokens_since))  # every step since the last record, all ranks
                now = time.perf_counter()
                record.update({"lr": lr, "tokens": tok,
                               "tokens_per_sec": tok / max(now - t_since, 1e-9), "elapsed": now - start})
                tokens_since, t_since = torch.zeros((), device=s.device), now
                bar.set_postfix({**{k.split("/")[1]: round(v, 4) for k, v in record.items()
                                    if k.startswith("train/") and k.endswith("/loss")},
                                 "tok/s": round(record["tokens_per_sec"])})
            self.logger.log(record)
            bar.update(1)
            if args.eval_steps > 0 and self.step % args.eval_steps == 0:
                stop = self._log_eval()
            if save_now:
                self.save_checkpoint()
        bar.close()
        signal.signal(signal.SIGTERM, previous)
        if stop:
            s.print(f"stopping early at step {self.step}: {stop}")
        # the final record reuses an evaluation of this very step rather than running it twice
        last_step, last = self._last_eval
        final = {} if stop is not None else last if last_step == self.step else self.evaluate()
        if final:
            self.logger.log({"step": self.step, "final": True, **final})
        if self.skipped:
            s.print(f"skipped {self.skipped} optimizer step(s) with a non-finite loss or gradient")
        self.logger.log({"step": self.step, "done": True, "stopped_early": stop, "skipped_nonfinite": self.skipped,
                         "wall_time": time.perf_counter() - start})
        return final

    def _nonfinite(self, reduced: dict, sums: dict) -> str | None:
        """What was non-finite in this step's losses, naming the ranks and example ids of the batches
        it came from. Collective: every rank calls it on the same step."""
        bad = [k for k, m in reduced.items() if not math.isfinite(m.get("loss", 0.0))]
        if not bad:
            return None
        mine = {k: self._last_ids.get(k, []) for k in bad if not math.isfinite(float(sums[k]["loss"]))}
        where = [(r, ids[bad[0]]) for r, ids in enumerate(self.s.all_gather_object(mine)) if bad[0] in ids]
        return (f"non-finite {bad[0]} loss ({reduced[bad[0]]['loss']}) at step {self.step}, from the batch of " +
                "; ".join(f"rank {r} (examples {', '.join(map(str, ids[:8]))}{' …' if len(ids) > 8 else ''})"
                          for r, ids in where))


def _debug_step(variable: str, rank: int) -> int:
    at = os.environ.get(variable, "0").split(":")
    return int(at[0]) if len(at) == 1 or int(at[1]) == rank else 0


def _poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """A non-finite loss gets non-finite gradients (an inf loss can have finite ones), so that
    DeepSpeed's ZeRO optimizers discard the step on every rank; a finite loss is unchanged (× 1.0).
    No host sync: the check stays on the device."""
    finite = torch.isfinite(loss.detach())
    return loss * torch.where(finite, torch.ones_like(loss), torch.full_like(loss, float("nan")))


def _rng_state() -> dict:
    """Python, NumPy and torch RNG states as JSON (no pickles in xright's own state)."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {"python": [py[0], list(py[1]), py[2]],
            "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "torch": torch.get_rng_state().tolist()}


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
