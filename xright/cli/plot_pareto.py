"""Loss-space picture of SFT + preference runs: final eval SFT loss against eval DPO loss.

    python -m xright.cli.plot_pareto runs/demo/* --out runs/demo [--sft_opt 1.79 --dpo_opt 0.02]

Reads every RUN_DIR's ``metrics.jsonl`` and ``xright_args.json``; writes ``<out>/pareto.png`` (a point per
run: method by colour and marker, λ as a label, the ideal point ★, sequential runs' eval trajectories dashed;
needs matplotlib) and ``<out>/pareto.md`` (final eval losses, ideal distance, optimizer steps, wall time).

Runs by ``xright_args.json``: ``schedule`` alright / maxright / mix → that method at ``lambd``; a
``train_only`` phase (``train_sft_seq`` / ``train_dpo_seq``) whose ``--pretrain`` is another phase among the
RUN_DIRs continues it, and the chain is one sequential run (steps and wall time added up, the trajectory through
all phases, earlier phases' ends listed as ``after phase 1``); a lone phase is "SFT only" / "DPO only";
``schedule`` sequential without ``train_only`` is a whole sequential run; anything else is named by its
objectives. The ideal point is ``--sft_opt/--dpo_opt``, else the one the joint runs were given (if they agree),
else the best final losses of the single-objective runs; every row's ideal distance is recomputed from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

SFT, PREF = "sft", "dpo"
METHODS = {"alright": "ALRIGHT", "maxright": "MAXRIGHT", "mix": "Mix"}
# where each method writes its λ next to its points, so that close points' labels don't collide
LABEL_OFFSET = {"Mix": (-8, -12), "ALRIGHT": (6, 4), "MAXRIGHT": (6, -10)}
STYLE = {  # colour and marker per method, in the table's and legend's order
    "SFT only": ("tab:gray", "s"),
    "DPO only": ("tab:brown", "D"),
    "Sequential SFT→DPO": ("tab:red", "v"),
    "Sequential DPO→SFT": ("tab:orange", "^"),
    "Mix": ("tab:green", "P"),
    "ALRIGHT": ("tab:blue", "o"),
    "MAXRIGHT": ("tab:purple", "X"),
}
ORDER = list(STYLE)


class PlotError(ValueError):
    pass


@dataclass
class Run:
    path: str
    name: str
    args: dict
    evals: list            # [(step, sft_loss, pref_loss)] in order, including the final one
    final: dict            # the last eval record (the "final" one unless the run stopped early)
    steps: int
    wall_time: float | None
    stopped_early: str | None = None
    method: str = ""
    lambd: float | None = None

    @property
    def sft(self):
        return self.final.get(f"eval/{SFT}/loss")

    @property
    def pref(self):
        return self.final.get(f"eval/{PREF}/loss")


def read_run(path: str) -> Run:
    metrics = os.path.join(path, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise PlotError(f"{path}: no metrics.jsonl (is it a run's --save_path?)")
    records = []
    with open(metrics) as f:
        for i, line in enumerate(f, 1):
            try:
                records += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
                print(f"plot_pareto: warning: {metrics} line {i} is not JSON; skipped", file=sys.stderr)
    args_file = Path(path) / "xright_args.json"
    args = json.loads(args_file.read_text()) if args_file.is_file() else {}
    evals, final, done = [], {}, {}
    for r in records:
        if r.get("done"):
            done = r
        elif any(k.startswith("eval/") and k.endswith("/loss") for k in r):
            final = r
            evals.append((int(r.get("step", 0)), r.get(f"eval/{SFT}/loss"), r.get(f"eval/{PREF}/loss")))
    if not final:
        raise PlotError(f"{path}: metrics.jsonl has no eval record")
    steps = done.get("step", max((int(r["step"]) for r in records if "objectives" in r), default=0))
    return Run(path=path, name=os.path.basename(os.path.normpath(path)), args=args, evals=evals, final=final,
               steps=int(steps), wall_time=done.get("wall_time"), stopped_early=done.get("stopped_early"))


def _norm(p: str) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(p)))


def _label(objective: str) -> str:
    return "SFT" if objective == SFT else objective.upper()


def assemble(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """Name each run's method and join sequential phases into chains: (points, rows), the points plotted (and
    listed), the rows also the ends of the earlier phases of sequential chains."""
    phases = [r for r in runs if r.args.get("train_only")]
    by_dir = {}
    for r in phases:
        by_dir[_norm(r.path)] = r
        if r.args.get("save_path"):
            by_dir.setdefault(_norm(r.args["save_path"]), r)
    parent = {}
    for r in phases:
        pre = r.args.get("pretrain")
        up = by_dir.get(_norm(pre)) if pre else None
        if up is None and pre and not os.path.isabs(pre):
            # a relative --pretrain is relative to where the run was launched: match it as a suffix
            parts = os.path.normpath(pre).split(os.sep)
            while parts and parts[0] in (".", ".."):
                parts.pop(0)
            tail = os.sep + os.sep.join(parts)
            ups = {id(c): c for k, c in by_dir.items() if k.endswith(tail)}
            up = next(iter(ups.values())) if len(ups) == 1 else None
        if up is not None and up is not r:
            parent[id(r)] = up
    has_child = {id(p) for p in parent.values()}
    points, rows = [], []
    for r in runs:
        schedule, only = r.args.get("schedule"), r.args.get("train_only")
        if only and id(r) in has_child:
            continue  # listed with the chain that continues it
        chain = [r]
        while only and id(chain[0]) in parent:
            chain.insert(0, parent[id(chain[0])])
        if only and len(chain) > 1:
            order = "→".join(_label(p.args["train_only"]) for p in chain)
            seq = Run(path=r.path, name=" + ".join(p.name for p in chain), args=r.args, evals=[], final=r.final,
                      steps=0, wall_time=0.0, stopped_early=r.stopped_early, method=f"Sequential {order}")
            for i, p in enumerate(chain):
                seq.evals += [(s + seq.steps, a, b) for s, a, b in p.evals]
                seq.steps += p.steps
                seq.wall_time = None if seq.wall_time is None or p.wall_time is None else seq.wall_time + p.wall_time
                if i < len(chain) - 1:
                    rows.append(Run(path=p.path, name=p.name, args=p.args, evals=p.evals, final=p.final,
                                    steps=seq.steps, wall_time=seq.wall_time, method=f"{seq.method}, after phase "
                                    f"{i + 1} ({_label(p.args['train_only'])})"))
            r = seq
        elif only:
            r.method = f"{_label(only)} only"
        elif schedule == "sequential":
            order = r.args.get("order") or f"{SFT},{PREF}"
            r.method = "Sequential " + "→".join(_label(o.strip()) for o in order.split(","))
        elif schedule in METHODS:
            r.method, r.lambd = METHODS[schedule], r.args.get("lambd")
        else:
            have = [k.split("/")[1] for k in r.final if k.startswith("eval/") and k.endswith("/loss")]
            r.method = " + ".join(_label(k) for k in have) + " only" if have else "?"
        points.append(r)
        rows.append(r)
    return points, rows


def optimum(points: list[Run], sft_opt, dpo_opt) -> tuple[float | None, float | None, str]:
    """The ideal point and where it came from (see the module docstring)."""
    if sft_opt is not None and dpo_opt is not None:
        return sft_opt, dpo_opt, "given (--sft_opt/--dpo_opt)"
    given = {(r.args.get("sft_opt"), r.args.get("dpo_opt")) for r in points if r.args.get("schedule") in METHODS}
    given = {g for g in given if g[0] or g[1]}
    if len(given) == 1:
        (s, d), source = next(iter(given)), "the joint runs' --sft_opt/--dpo_opt"
    else:
        s = min((r.sft for r in points if r.method == "SFT only" and r.sft is not None), default=None)
        d = min((r.pref for r in points if r.method == "DPO only" and r.pref is not None), default=None)
        source = "the best final losses of the single-objective runs"
    return (sft_opt if sft_opt is not None else s), (dpo_opt if dpo_opt is not None else d), source


def ideal_distance(r: Run, s_opt, d_opt):
    if r.sft is None or r.pref is None:
        return None
    if s_opt is None or d_opt is None:
        return r.final.get("eval/ideal_distance")
    return math.hypot(r.sft - s_opt, r.pref - d_opt)


def _sort_key(r: Run):
    base = r.method.split(",")[0]
    return (ORDER.index(base) if base in ORDER else len(ORDER), base, "after" not in r.method,
            r.lambd if r.lambd is not None else -1, r.name)


def _fmt(v, digits=4):
    return "—" if v is None else f"{v:.{digits}f}"


def table(rows: list[Run], s_opt, d_opt, source: str) -> str:
    lines = [
        f"Ideal point: L*_sft = {_fmt(s_opt)}, L*_dpo = {_fmt(d_opt)} ({source}).",
        "",
        "| run | method | λ | final eval SFT loss | final eval DPO loss | ideal distance | optimizer steps | wall time (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=_sort_key):
        lam = "—" if r.lambd is None else f"{r.lambd:g}"
        method = r.method + (f" (stopped early: {r.stopped_early})" if r.stopped_early else "")
        wall = "—" if r.wall_time is None else f"{r.wall_time:.1f}"
        lines.append(f"| {r.name} | {method} | {lam} | {_fmt(r.sft)} | {_fmt(r.pref)} | "
                     f"{_fmt(ideal_distance(r, s_opt, d_opt))} | {r.steps} | {wall} |")
    lines += ["", "Losses are the last evaluation of each run (after its last optimizer step). Sequential runs add "
              "up the steps and wall time of their phases; wall time is the training loop's, without start-up."]
    return "\n".join(lines) + "\n"


def _draw(ax, points: list[Run], rows: list[Run], s_opt, d_opt, trajectories: str, legend: bool,
          lambdas: bool = True) -> None:
    plotted = [r for r in points if r.sft is not None and r.pref is not None]
    seen = set()
    for r in sorted(plotted, key=_sort_key):
        color, marker = STYLE.get(r.method, ("black", "."))
        if trajectories == "all" or (trajectories == "sequential" and r.method.startswith("Sequential")):
            tr = [(a, b) for _, a, b in r.evals if a is not None and b is not None]
            if len(tr) > 1:
                ax.plot([a for a, _ in tr], [b for _, b in tr], "--", color=color, lw=0.9, alpha=0.6, zorder=1)
        label = r.method if legend and r.method not in seen else None
        seen.add(r.method)
        ax.scatter([r.sft], [r.pref], color=color, marker=marker, s=60, edgecolor="black", linewidth=0.5,
                   label=label, zorder=3)
        if r.lambd is not None and lambdas:
            ax.annotate(f"{r.lambd:g}", (r.sft, r.pref), textcoords="offset points", fontsize=7, color=color,
                        xytext=LABEL_OFFSET.get(r.method, (5, 4)))
    for r in rows:  # ends of earlier sequential phases: hollow markers
        if "after phase" in r.method and r.sft is not None and r.pref is not None:
            color, marker = STYLE.get(r.method.split(",")[0], ("black", "."))
            ax.scatter([r.sft], [r.pref], facecolor="none", edgecolor=color, marker=marker, s=60, zorder=3)
    for method in ORDER:  # connect each joint method's λ sweep
        sweep = sorted((r for r in plotted if r.method == method and r.lambd is not None), key=lambda r: r.lambd)
        if len(sweep) > 1:
            ax.plot([r.sft for r in sweep], [r.pref for r in sweep], "-", color=STYLE[method][0], lw=0.8,
                    alpha=0.5, zorder=2)
    if s_opt is not None and d_opt is not None:
        ax.scatter([s_opt], [d_opt], marker="*", s=220, color="gold", edgecolor="black", linewidth=0.7,
                   label="ideal point" if legend else None, zorder=4)


def plot(points: list[Run], rows: list[Run], s_opt, d_opt, path: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 5.2))
    joint = [r for r in points if r.lambd is not None and r.sft is not None and r.pref is not None]
    inset, yscale = args.inset and bool(joint), args.yscale
    _draw(ax, points, rows, s_opt, d_opt, args.trajectories, legend=True, lambdas=not inset)
    ax.set(yscale=yscale, xlabel="final eval SFT loss", ylabel="final eval DPO loss")
    if args.equal_axes and yscale == "linear":
        ax.set_aspect("equal", adjustable="box")  # the ideal distance is then a distance on the page
    ax.set_title(args.title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", framealpha=0.8, ncol=2 if inset else 1)
    if inset:
        # the joint runs (and the ideal point) often sit close together: repeat them magnified
        xs = [r.sft for r in joint] + ([s_opt] if s_opt is not None else [])
        ys = [r.pref for r in joint] + ([d_opt] if d_opt is not None else [])
        pad_x, pad_y = 0.12 * (max(xs) - min(xs) or 1.0), 0.12 * (max(ys) - min(ys) or 1.0)
        sub = ax.inset_axes([0.45, 0.2, 0.52, 0.45])
        _draw(sub, joint, [], s_opt, d_opt, "none", legend=False)
        sub.set(xlim=(min(xs) - pad_x, max(xs) + pad_x), ylim=(min(ys) - pad_y, max(ys) + pad_y), yscale=yscale)
        sub.tick_params(labelsize=6)
        sub.grid(True, alpha=0.3)
        sub.set_title("joint runs, magnified", fontsize=7)
        ax.indicate_inset_zoom(sub, edgecolor="gray", alpha=0.6)
    fig.text(0.99, 0.01, "numbers: λ (weight of DPO); hollow: end of a sequential run's first phase; "
             "dashed: eval trajectory", ha="right", va="bottom", fontsize=6, color="dimgray")
    fig.tight_layout()
    fig.savefig(path, dpi=args.dpi)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="runs' --save_path directories")
    p.add_argument("--out", default=".", help="directory for the figure and the table")
    p.add_argument("--name", default="pareto", help="file names: <out>/<name>.png and <out>/<name>.md")
    p.add_argument("--sft_opt", type=float, default=None, help="L*_sft of the ideal point")
    p.add_argument("--dpo_opt", type=float, default=None, help="L*_dpo of the ideal point")
    p.add_argument("--trajectories", choices=["none", "sequential", "all"], default="sequential",
                   help="draw the eval trajectory of these runs")
    p.add_argument("--yscale", choices=["linear", "log"], default="linear")
    p.add_argument("--equal_axes", action="store_true", help="same scale on both axes (linear only)")
    p.add_argument("--inset", action="store_true", help="add a magnified view of the joint runs and the ideal point")
    p.add_argument("--title", default="SFT vs DPO loss: final eval losses per method and λ")
    p.add_argument("--dpi", type=int, default=110)
    p.add_argument("--table_only", action="store_true", help="write only the markdown table (needs no matplotlib)")
    args = p.parse_args(argv)
    try:
        runs = [read_run(d) for d in args.runs]
    except PlotError as e:
        print(f"plot_pareto: error: {e}", file=sys.stderr)
        sys.exit(2)
    points, rows = assemble(runs)
    s_opt, d_opt, source = optimum(points, args.sft_opt, args.dpo_opt)
    os.makedirs(args.out, exist_ok=True)
    md = table(rows, s_opt, d_opt, source)
    png, md_path = os.path.join(args.out, f"{args.name}.png"), os.path.join(args.out, f"{args.name}.md")
    Path(md_path).write_text(md)
    print(md, end="")
    result = {"points": points, "rows": rows, "optimum": (s_opt, d_opt), "table": md}
    if args.table_only:
        print(f"wrote {md_path}")
        return result
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"plot_pareto: error: the figure needs matplotlib, which is not installed: pip install 'xright[plot]' "
              f"(wrote {md_path}; --table_only writes only the table)", file=sys.stderr)
        sys.exit(2)
    plot(points, rows, s_opt, d_opt, png, args)
    print(f"wrote {png} and {md_path}")
    return result


if __name__ == "__main__":
    main()
