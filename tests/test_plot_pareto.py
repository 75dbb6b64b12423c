"""plot_pareto on hand-written metrics files: method naming, sequential chains, the ideal point, the table."""

import json
import math
import os

import pytest

from xright.cli import plot_pareto


def write_run(root, name, args, evals, steps, wall=10.0, stopped=None, final=True):
    """A run dir as the trainer leaves it: eval records (step, sft, dpo), train records, final and done."""
    d = os.path.join(root, name)
    os.makedirs(d)
    recs = []
    for i, (step, sft, dpo) in enumerate(evals):
        last = i == len(evals) - 1
        for s in range(evals[i - 1][0] + 1 if i else 1, step + 1):
            recs.append({"step": s, "objectives": ["sft"], "weights": {"sft": 1.0}, "train/sft/loss": 1.0})
        rec = {"step": step, "eval/sft/loss": sft, "eval/dpo/loss": dpo,
               "eval/ideal_distance": math.hypot(sft, dpo)}
        if last and final:
            rec["final"] = True
        recs.append(rec)
    recs.append({"step": steps, "done": True, "stopped_early": stopped, "wall_time": wall})
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.write("\n".join(json.dumps(r) for r in recs) + "\n")
    with open(os.path.join(d, "xright_args.json"), "w") as f:
        json.dump({"save_path": d, **args}, f)
    return d


@pytest.fixture
def runs(tmp_path):
    root = str(tmp_path)
    ref = os.path.join(root, "ref")
    seq = {"schedule": "sequential", "lambd": 0.5}
    out = {
        "sft_opt": write_run(root, "sft_opt", {**seq, "train_only": "sft", "pretrain": ref},
                             [(0, 5.0, 0.69), (20, 1.0, 9.0)], 20, wall=4.0),
        "dpo_opt": write_run(root, "dpo_opt", {**seq, "train_only": "dpo", "pretrain": ref},
                             [(0, 5.0, 0.69), (20, 6.0, 0.1)], 20, wall=8.0),
        "seq_sft": write_run(root, "seq_sft", {**seq, "train_only": "sft", "pretrain": ref},
                             [(0, 5.0, 0.69), (5, 1.5, 6.0), (10, 1.2, 8.0)], 10, wall=2.0),
        # the second phase names its parent by a path relative to where it was launched (here: root)
        "seq_sft_dpo": write_run(root, "seq_sft_dpo", {**seq, "train_only": "dpo", "pretrain": "./seq_sft"},
                                 [(0, 1.2, 8.0), (5, 3.0, 0.5), (10, 4.0, 0.2)], 10, wall=5.0),
        "alright": write_run(root, "alright_0.5", {"schedule": "alright", "lambd": 0.5, "pretrain": ref,
                                                   "sft_opt": 1.0, "dpo_opt": 0.1},
                             [(0, 5.0, 0.69), (20, 1.4, 0.6)], 20, wall=6.0),
        "maxright": write_run(root, "maxright_0.25", {"schedule": "maxright", "lambd": 0.25, "pretrain": ref,
                                                      "sft_opt": 1.0, "dpo_opt": 0.1},
                              [(0, 5.0, 0.69), (20, 1.3, 0.7)], 20, wall=6.5, stopped="dominates", final=False),
        "mix": write_run(root, "mix_0.75", {"schedule": "mix", "lambd": 0.75, "pretrain": ref},
                         [(0, 5.0, 0.69), (20, 2.0, 0.3)], 20, wall=12.0),
        "whole_seq": write_run(root, "seq_onerun", {"schedule": "sequential", "order": "dpo,sft", "pretrain": ref},
                               [(0, 5.0, 0.69), (20, 1.6, 3.0)], 20, wall=7.0),
    }
    return root, out


def test_methods_chain_optimum_and_table(runs, tmp_path):
    root, d = runs
    out = os.path.join(root, "plot")
    res = plot_pareto.main([*d.values(), "--out", out, "--inset"])
    by_method = {r.method: r for r in res["points"]}
    assert set(by_method) == {"SFT only", "DPO only", "Sequential SFT→DPO", "Sequential DPO→SFT", "ALRIGHT",
                              "MAXRIGHT", "Mix"}
    seq = by_method["Sequential SFT→DPO"]
    assert seq.steps == 20 and seq.wall_time == pytest.approx(7.0)
    assert (seq.sft, seq.pref) == (4.0, 0.2)
    # the chain's trajectory runs through both phases, the second offset by the first's steps
    assert [s for s, _, _ in seq.evals] == [0, 5, 10, 10, 15, 20]
    assert by_method["ALRIGHT"].lambd == 0.5 and by_method["MAXRIGHT"].stopped_early == "dominates"
    # stopped early: no "final" record, the last eval counts
    assert (by_method["MAXRIGHT"].sft, by_method["MAXRIGHT"].pref) == (1.3, 0.7)
    # the joint runs agree on --sft_opt/--dpo_opt, so that is the ideal point
    assert res["optimum"] == (1.0, 0.1)

    md = open(os.path.join(out, "pareto.md")).read()
    assert md == res["table"]
    rows = [line for line in md.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 8  # 7 points + the end of the SFT→DPO chain's first phase
    cells = {r.split(" | ")[1]: [c.strip() for c in r.strip("|").split("|")] for r in rows}
    phase1 = cells["Sequential SFT→DPO, after phase 1 (SFT)"]
    assert phase1[0] == "seq_sft" and phase1[3:5] == ["1.2000", "8.0000"] and phase1[6] == "10"
    full = cells["Sequential SFT→DPO"]
    assert full[0] == "seq_sft + seq_sft_dpo" and full[6] == "20" and full[7] == "7.0"
    assert float(full[5]) == pytest.approx(math.hypot(4.0 - 1.0, 0.2 - 0.1), abs=1e-4)
    assert cells["ALRIGHT"][2] == "0.5"
    # table order: single objectives, sequential, Mix, ALRIGHT, MAXRIGHT
    assert [r.split(" | ")[1].split(",")[0].split(" (")[0] for r in rows][-3:] == ["Mix", "ALRIGHT", "MAXRIGHT"]

    png = os.path.join(out, "pareto.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert 5_000 < os.path.getsize(png) < 150_000


def test_optimum_flags_win_and_fallback_to_single_runs(runs):
    root, d = runs
    res = plot_pareto.main([d["sft_opt"], d["dpo_opt"], d["mix"], "--out", os.path.join(root, "a"),
                            "--sft_opt", "0.5", "--dpo_opt", "0.05", "--yscale", "log", "--trajectories", "all"])
    assert res["optimum"] == (0.5, 0.05)
    # without flags or joint runs' optima: the best single-objective runs
    res = plot_pareto.main([d["sft_opt"], d["dpo_opt"], d["mix"], "--out", os.path.join(root, "b")])
    assert res["optimum"] == (1.0, 0.1)
    mix = next(r for r in res["rows"] if r.method == "Mix")
    assert plot_pareto.ideal_distance(mix, *res["optimum"]) == pytest.approx(math.hypot(1.0, 0.2))


def test_a_lone_phase_is_a_single_objective_run(runs):
    root, d = runs
    res = plot_pareto.main([d["seq_sft_dpo"], "--out", os.path.join(root, "c"), "--equal_axes", "--inset"])
    assert [r.method for r in res["points"]] == ["DPO only"]


def test_missing_metrics_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        plot_pareto.main([str(tmp_path), "--out", str(tmp_path)])
    assert e.value.code == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_partial_last_line_is_skipped(runs, capsys):
    root, d = runs
    with open(os.path.join(d["mix"], "metrics.jsonl"), "a") as f:
        f.write('{"step": 21, "objecti')
    res = plot_pareto.main([d["mix"], "--out", os.path.join(root, "e")])
    assert res["points"][0].sft == 2.0
    assert "not JSON" in capsys.readouterr().err


def test_without_matplotlib_the_table_is_written_and_the_figure_is_one_line_exit_2(runs, monkeypatch, capsys):
    import sys

    root, d = runs
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: `import matplotlib` fails
    out = os.path.join(root, "nomatplotlib")
    with pytest.raises(SystemExit) as e:
        plot_pareto.main([d["mix"], d["alright"], "--out", out])
    assert e.value.code == 2
    printed = capsys.readouterr()
    assert printed.err.strip().splitlines() == [
        "plot_pareto: error: the figure needs matplotlib, which is not installed: pip install 'xright[plot]' "
        f"(wrote {os.path.join(out, 'pareto.md')}; --table_only writes only the table)"]
    table = open(os.path.join(out, "pareto.md")).read()
    assert "| mix_0.75 | Mix | 0.75 | 2.0000 | 0.3000 |" in table and table in printed.out
    assert not os.path.exists(os.path.join(out, "pareto.png"))
    res = plot_pareto.main([d["mix"], d["alright"], "--out", out, "--table_only"])  # no figure asked: exit 0
    assert res["table"] == table
