"""Time per optimizer step of the joint schedules against single-objective steps, in one run.

    python benchmarks/bench_schedules.py [--steps 12 --rounds 16 --lambd 0.5 --max_eval_steps 10] [JOINT CLI FLAGS]
    deepspeed --num_gpus 2 benchmarks/bench_schedules.py --label "2 ranks, ZeRO-2" ...

One training run of the joint CLI's machinery (``xright.cli.joint`` flags, ``common.run``: same model,
same data, same engine, the real training loop) whose schedule is a sequence of *segments*:
``--steps`` optimizer steps each of SFT only, DPO only, sequential (SFT then DPO, half each), Mix,
ALRIGHT and MAXRIGHT, repeated ``--rounds`` times in a shuffled order per round, so that the slow and
fast spells of a shared machine hit every method alike (short segments, many rounds). Every step's
wall time is the difference of consecutive ``elapsed`` stamps in ``metrics.jsonl``
(``--logging_steps 1``): the whole loop iteration — schedule decision, broadcast, data,
forward/backward, optimizer step, metric reduction, logging. The first ``--skip`` steps of every
segment are dropped (the switch between segments belongs to no method). Any joint CLI flag can be
added (``--pretrain``, batch sizes, ``--sft_opt`` …); with the tiny random default model MAXRIGHT
picks SFT almost always, so pass a trained model (e.g. the demo's ``runs/demo/ref``) and its optima.

Reported:

* per objective, the median time of the steps that computed only that objective, under each
  schedule, and its ratio to the single-objective median;
* sequential / ALRIGHT / MAXRIGHT: measured f_sft·M_sft + f_dpo·M_dpo (their own per-objective
  medians) against predicted f_sft·T_sft + f_dpo·T_dpo (single-objective medians), f = the schedule's
  pick frequency in the benchmark, with a 95 % interval from a bootstrap over whole segments; the same
  ratio with 10 %-trimmed means;
* Mix: its median against T_sft + T_dpo;
* MAXRIGHT's refresh (all objectives recomputed without grad every ``--max_eval_steps`` steps): the
  median extra time of a refresh step over a plain step of the same objective, amortised per step;
* the schedule's own work per step (plan, broadcast, bookkeeping), timed directly.

The section (titled ``--label``) and the exact command go into ``--results`` (default
benchmarks/RESULTS.md); other sections of that file are kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shlex
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from xright.cli import common, flags, joint, lifecycle  # noqa: E402
from xright.objectives import SFT  # noqa: E402
from xright.schedules import Alright, Maxright, Mix, Schedule, Sequential, Single, paper_weights  # noqa: E402

METHODS = ["sft", "dpo", "sequential", "mix", "alright", "maxright"]
PREF = joint.PREF


class Segments(Schedule):
    """Consecutive segments, each driven by its own schedule (which sees steps relative to its start).

    ALRIGHT and MAXRIGHT keep one instance across their segments, so their RNG and stale losses carry
    on as in one long run; MAXRIGHT refreshes every ``refresh_every`` of its own steps.
    """

    kind = "bench-segments"
    needs_losses = True

    def __init__(self, segments: list[tuple[str, Schedule, int, int]], names):
        self.segments = segments  # (label, schedule, first step, steps of earlier segments of that schedule)
        self.names = tuple(names)
        self._starts = [start for _, _, start, _ in segments]

    def _at(self, step):
        i = max(j for j, start in enumerate(self._starts) if start <= step)
        label, sched, start, before = self.segments[i]
        return label, sched, step - start + before

    def wants_refresh(self, step):  # the loop asks before plan(step), and refreshes right after
        _, self._refreshing, local = self._at(step)
        return self._refreshing.wants_refresh(local)

    def refresh(self, losses):
        self._refreshing.refresh(losses)

    def plan(self, step):
        label, sched, local = self._at(step)
        self._current, self._label = sched, label
        return sched.plan(local)

    def observe(self, step, losses):
        _, sched, local = self._at(step)
        sched.observe(local, losses)

    def info(self):
        return {**self._current.info(), "bench/segment": self._label}


def build_segments(args, tasks) -> Segments:
    weights = paper_weights(args.lambd, sft="sft", pref=PREF)
    shared = {
        "alright": Alright(weights, seed=args.seed),
        "maxright": Maxright(weights, {n: t.optimum for n, t in tasks.items()}, seed=args.seed,
                             refresh_every=max(args.max_eval_steps, 0)),
        "mix": Mix(weights),
        "sft": Single("sft"),
        "dpo": Single(PREF),
    }
    n = args.bench_steps
    half = max(1, n // 2)
    segments, step = [], 0
    done = {m: 0 for m in METHODS}
    # warm-up: a few Mix steps touch both objectives' code paths before anything is timed
    segments.append(("warmup", Mix(weights), step, 0))
    step += args.bench_warmup
    rng = random.Random(args.seed)
    for _ in range(args.bench_rounds):
        order = list(METHODS)
        rng.shuffle(order)
        for m in order:
            sched = shared.get(m) or Sequential([("sft", half), (PREF, n - half)])
            segments.append((m, sched, step, done[m] if m in shared else 0))
            step += n
            done[m] += n
    return Segments(segments, ("sft", PREF))


def step_times(records, skip):
    """[(segment, segment index, objectives, refreshed?, switched?, seconds)] from consecutive 'elapsed' stamps.

    switched: the step computed other objectives than the step before it (an ALRIGHT/MAXRIGHT switch).
    """
    out, prev_t, prev_objs, pos, last_seg, index = [], 0.0, None, 0, None, -1
    for r in records:
        if "elapsed" not in r or "objectives" not in r:
            continue
        dt, prev_t = r["elapsed"] - prev_t, r["elapsed"]
        objs, seg = tuple(r["objectives"]), r.get("bench/segment")
        pos = pos + 1 if seg == last_seg else 0
        index += pos == 0
        switched, last_seg, prev_objs = objs != prev_objs, seg, objs
        if seg == "warmup" or pos < skip:
            continue
        out.append((seg, index, objs, any(k.startswith("refresh/") for k in r), switched, dt))
    return out


def trimmed_mean(xs, cut=0.1):
    xs = sorted(xs)
    k = int(len(xs) * cut)
    return statistics.fmean(xs[k:len(xs) - k] if len(xs) > 2 * k else xs)


def analyse(times, max_eval_steps, reps=2000):
    """Medians per (schedule, objective); ratios to the single-objective steps; bootstrap 95 % intervals.

    The intervals resample whole segments (block bootstrap): steps of one segment share the machine's
    load of that moment, so resampling single steps would understate the uncertainty.
    """
    med = statistics.median
    S, D, SD = ("sft",), (PREF,), tuple(sorted(("sft", PREF)))  # the loop logs sorted(plan)
    by, blocks, switch = {}, {}, {}
    for seg, index, objs, refreshed, switched, dt in times:
        by.setdefault((seg, objs, refreshed), []).append(dt)
        blocks.setdefault((seg, objs, refreshed), {}).setdefault(index, []).append(dt)
        if not refreshed:
            switch.setdefault((seg, objs, switched), []).append(dt)
    single = {S: by[("sft", S, False)], D: by[("dpo", D, False)]}
    T = {o: med(v) for o, v in single.items()}
    rng = random.Random(0)
    block_of = {id(by[k]): list(v.values()) for k, v in blocks.items()}

    def boot(xs):  # the steps of as many segments, drawn with replacement, as xs came from
        segs = block_of[id(xs)]
        return [dt for _ in segs for dt in rng.choice(segs)]

    def ratio(groups, f, stat):  # Σ f_o·stat(schedule's o-steps) / Σ f_o·stat(single o-steps)
        return (sum(f[o] * stat(groups[o]) for o in groups if f[o]) /
                sum(f[o] * stat(single[o]) for o in groups if f[o]))

    res = {"T_sft": T[S], "T_dpo": T[D], "n_sft": len(single[S]), "n_dpo": len(single[D]), "methods": {}}
    for m in ("sequential", "alright", "maxright"):
        groups = {o: by.get((m, o, False), []) for o in (S, D)}
        n = {o: len(groups[o]) + len(by.get((m, o, True), [])) for o in (S, D)}
        f = {o: n[o] / (n[S] + n[D]) for o in (S, D)}
        groups = {o: g for o, g in groups.items() if g}
        f = {o: f[o] for o in groups}
        r = ratio(groups, f, med)
        samples = sorted(
            (sum(f[o] * med(boot(groups[o])) for o in groups) /
             sum(f[o] * med(boot(single[o])) for o in groups)) for _ in range(reps))
        res["methods"][m] = {
            "steps": n[S] + n[D], "f_sft": n[S] / (n[S] + n[D]), "f_dpo": n[D] / (n[S] + n[D]),
            "M_sft": med(groups[S]) if S in groups else None, "M_dpo": med(groups[D]) if D in groups else None,
            "predicted": sum(f[o] * T[o] for o in groups), "measured": sum(f[o] * med(groups[o]) for o in groups),
            "ratio": r, "ci": (samples[int(0.025 * reps)], samples[int(0.975 * reps)]),
            "ratio_trimmed": ratio(groups, f, trimmed_mean),
        }
        for o in (S, D):
            res["methods"][m][f"ratio_{o[0]}"] = med(groups[o]) / T[o] if o in groups else None
        if m == "alright":  # does switching objective cost anything? same objective, switched vs not
            res["methods"][m]["switch"] = {
                o[0]: (med(switch[(m, o, True)]) / med(switch[(m, o, False)]))
                if switch.get((m, o, True)) and switch.get((m, o, False)) else None for o in (S, D)}
    mix = by[("mix", SD, False)]
    mix_samples = sorted(med(boot(mix)) / (med(boot(single[S])) + med(boot(single[D]))) for _ in range(reps))
    res["mix"] = {"steps": len(mix), "median": med(mix), "ratio_sum": med(mix) / (T[S] + T[D]),
                  "ci": (mix_samples[int(0.025 * reps)], mix_samples[int(0.975 * reps)]), "ratio_sft": med(mix) / T[S]}
    extra = []
    for o in (S, D):
        base = by.get(("maxright", o, False))
        if base:
            extra += [dt - med(base) for dt in by.get(("maxright", o, True), [])]
    if extra:
        cost = med(extra)
        res["refresh"] = {"count": len(extra), "cost": cost, "every": max_eval_steps,
                          "per_step": cost / max_eval_steps if max_eval_steps > 0 else None}
    return res


def decision_cost(args, n=2000) -> dict:
    """Seconds per step of what a schedule adds to the loop, measured directly: wants_refresh, plan,
    the broadcast of the plan from rank 0 (on every rank, as the loop does), info and observe."""
    import time

    from xright.strategy import Strategy

    strategy = Strategy(seed=args.seed)  # the run's process group, already initialised
    weights = paper_weights(args.lambd, sft="sft", pref=PREF)
    schedules = {
        "single (SFT)": Single("sft"),
        "sequential": Sequential([("sft", n // 2), (PREF, n - n // 2)]),
        "mix": Mix(weights),
        "alright": Alright(weights, seed=args.seed),
        "maxright": Maxright(weights, {"sft": args.sft_opt, PREF: args.dpo_opt}, seed=args.seed, refresh_every=0),
    }
    out = {}
    for name, sched in schedules.items():
        if sched.wants_refresh(0):
            sched.refresh({"sft": 2.0, PREF: 1.0})
        strategy.barrier()
        t0 = time.perf_counter()
        for step in range(n):
            sched.wants_refresh(step)
            plan, _ = strategy.broadcast_object((sched.plan(step), False))  # with the SIGTERM flag, as the loop does
            sched.info()
            sched.observe(step, {k: 1.0 + 1e-3 * (step % 7) for k in plan})
        out[name] = (time.perf_counter() - t0) / n
    return out


def _ms(x):
    return "—" if x is None else f"{1000 * x:.1f}"


def _r(x):
    return "—" if x is None else f"{x:.3f}"


def report(res, command, args, load_before, load_after) -> str:
    import deepspeed
    import torch

    L = [
        f"## {args.label}", "",
        f"Measured {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} with `benchmarks/bench_schedules.py`:", "",
        "```", command, "```", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs (shared with other work; load average "
        f"{load_before} before, {load_after} after), torch {torch.__version__}, deepspeed {deepspeed.__version__}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}. "
        f"{args.bench_rounds} rounds × {len(METHODS)} segments × {args.bench_steps} steps, λ = {args.lambd}, "
        f"first {args.bench_skip} steps of every segment dropped; per-step wall time of the whole loop iteration.",
        "",
        f"Single-objective steps (medians): SFT T_sft = {_ms(res['T_sft'])} ms (n = {res['n_sft']}), "
        f"DPO T_dpo = {_ms(res['T_dpo'])} ms (n = {res['n_dpo']}).",
        "",
        "| schedule | steps | picks SFT / DPO | median SFT step (ms) | ÷ T_sft | median DPO step (ms) | ÷ T_dpo "
        "| measured f·M (ms) | predicted f·T (ms) | **measured ÷ predicted** (95 % CI) | same with 10 %-trimmed means |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m, name in (("sequential", "Sequential (SFT→DPO)"), ("alright", "ALRIGHT"), ("maxright", "MAXRIGHT")):
        r = res["methods"][m]
        L.append(f"| {name} | {r['steps']} | {r['f_sft']:.2f} / {r['f_dpo']:.2f} | {_ms(r['M_sft'])} | "
                 f"{_r(r['ratio_sft'])} | {_ms(r['M_dpo'])} | {_r(r['ratio_dpo'])} | {_ms(r['measured'])} | "
                 f"{_ms(r['predicted'])} | **{_r(r['ratio'])}** ({_r(r['ci'][0])}–{_r(r['ci'][1])}) | "
                 f"{_r(r['ratio_trimmed'])} |")
    sw = res["methods"]["alright"].get("switch", {})
    L += ["", f"ALRIGHT steps that switched objective vs steps that repeated the previous one (median ratio): "
          f"SFT {_r(sw.get('sft'))}, DPO {_r(sw.get(PREF))}."]
    mix = res["mix"]
    L += ["", f"Mix (both objectives every step, λ = {args.lambd}): median {_ms(mix['median'])} ms over "
          f"{mix['steps']} steps = **{_r(mix['ratio_sum'])} × (T_sft + T_dpo)** "
          f"(95 % CI {_r(mix['ci'][0])}–{_r(mix['ci'][1])}) = {_r(mix['ratio_sft'])} × T_sft."]
    dec = res.get("decision")
    if dec:
        L += ["", "The schedule's own work per step, measured directly (2000 iterations of wants_refresh, plan, "
              "broadcast of the plan from rank 0, info, observe): " + ", ".join(
                  f"{name} {1e6 * t:.1f} µs" for name, t in dec.items()) +
              f" — at most {100 * max(dec.values()) / res['T_sft']:.2g} % of an SFT step and "
              f"{100 * max(dec.values()) / res['T_dpo']:.2g} % of a DPO step here."]
    ref = res.get("refresh")
    if ref:
        L += ["", f"MAXRIGHT refresh (`--max_eval_steps {ref['every']}`: every objective's loss recomputed without "
              f"grad on its next batch): median extra time of a refresh step {_ms(ref['cost'])} ms "
              f"(n = {ref['count']}), i.e. {_ms(ref['per_step'])} ms per step amortised "
              f"({_r(ref['per_step'] / res['methods']['maxright']['predicted'] if ref['per_step'] else None)} of a "
              "MAXRIGHT step). Refresh steps are excluded from the MAXRIGHT row above."]
    L += ["", "How to read: *measured ÷ predicted* compares the schedule's step time with the average of the "
          "single-objective step times weighted by how often the schedule picked each objective; 1.000 means the "
          "schedule itself (decision, broadcast, bookkeeping) costs nothing measurable. The per-objective columns "
          "compare like with like (an SFT step under ALRIGHT vs an SFT step of plain SFT).", ""]
    return "\n".join(L)


def write_section(path: str, label: str, text: str) -> None:
    """Replace the section between this label's markers in ``path`` (or append it); keep everything else."""
    begin, end = f"<!-- bench_schedules: {label} -->", f"<!-- /bench_schedules: {label} -->"
    block = f"{begin}\n{text.rstrip()}\n{end}\n"
    old = open(path).read() if os.path.exists(path) else "# Schedule cost: time per optimizer step\n\n"
    if begin in old and end in old:
        new = old[:old.index(begin)] + block + old[old.index(end) + len(end) + 1:]
    else:
        new = old.rstrip("\n") + "\n\n" + block
    with open(path, "w") as f:
        f.write(new)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                add_help=True)
    p.add_argument("--steps", dest="bench_steps", type=int, default=12, help="optimizer steps per segment")
    p.add_argument("--rounds", dest="bench_rounds", type=int, default=16)
    p.add_argument("--warmup", dest="bench_warmup", type=int, default=10)
    p.add_argument("--skip", dest="bench_skip", type=int, default=1, help="steps dropped at each segment start")
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"),
                   help="markdown file; this run's section (by --label) is replaced or appended, the rest kept")
    p.add_argument("--label", default="single process", help="section title in --results")
    p.add_argument("--save_path", default="/tmp/xright_bench_schedules")
    mine, rest = p.parse_known_args()
    total = mine.bench_warmup + mine.bench_rounds * len(METHODS) * mine.bench_steps
    # defaults: the tiny built-in model and data, one micro-batch per step, no evaluation in the loop
    defaults = ["--train_batch_size", "16", "--sft_micro_train_batch_size", "16", "--rlhf_micro_train_batch_size",
                "16", "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--lambd", "0.5",
                "--max_eval_steps", "10", "--sft_eval_split", "dummy", "--rlhf_eval_split", "dummy"]
    argv = [*defaults, *rest, "--save_path", mine.save_path, "--max_steps", str(total), "--logging_steps", "1",
            "--eval_steps", str(10 * total)]
    jp = joint.parser(__doc__, "alright")
    args = flags.parse(jp, argv)
    args.batch_meaning = "examples"  # the recorded commands count --train_batch_size in examples (OpenRLHF)
    for k, v in vars(mine).items():
        setattr(args, k, v)
    specs = [
        common.ObjectiveSpec("sft", SFT(), flags.data_spec(args, "sft", "sft_", name="sft"),
                             args.sft_micro_train_batch_size, args.sft_opt),
        common.ObjectiveSpec(PREF, flags.build_objective(args), flags.data_spec(args, "pairwise", "rlhf_", name=PREF),
                             args.rlhf_micro_train_batch_size, args.dpo_opt),
    ]
    load_before = " ".join(f"{x:.1f}" for x in os.getloadavg())
    common.run(args, specs, lambda tasks: build_segments(args, tasks))
    decisions = decision_cost(args)
    if int(os.environ.get("RANK", "0")) != 0:
        return
    load_after = " ".join(f"{x:.1f}" for x in os.getloadavg())
    with open(os.path.join(mine.save_path, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    res = analyse(step_times(records, mine.bench_skip), args.max_eval_steps)
    res["decision"] = decisions
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launcher = f"deepspeed --num_gpus {world} " if world > 1 else "python "
    command = f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} " * ("OMP_NUM_THREADS" in os.environ) + \
        launcher + "benchmarks/bench_schedules.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]
                                                              if not a.startswith("--local_rank"))
    text = report(res, command, args, load_before, load_after)
    write_section(mine.results, mine.label, text)
    with open(os.path.join(mine.save_path, "bench.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(text)


if __name__ == "__main__":
    lifecycle.main_guard(main)
