"""The rank count changes nothing but the order of summation: the same losses on 1, 2 and 3 ranks (and on two
nodes), and a checkpoint resumes on another number of ranks with the uninterrupted run's losses and picks.

fp32 on CPU. 34 SFT examples, 34 and 29 preference pairs, 12 examples per optimizer step: no epoch is a whole
number of steps, so an order cut at one rank's share (as before) would move the epoch boundary with the rank
count. Runs of one world size share one launch (CI budget): four launches and one two-node pair in all.

Covered (run name: CLI, ZeRO stage, packing; world sizes × micro batch × accumulation):
- sft-z2 (padded): 1×2×6, 2×2×3, 3×2×2
- sft-z3-pack: 1×2×6, 2×2×3
- dpo-z3 (padded): 1×2×6, 2×2×3, 3×4×1 (another micro batch), 2 nodes × 1 rank × 2 × 3
- dpo-z2-pack: 1×2×6, 2×2×3
- alright-z2-pack (ALRIGHT, XRIGHT's batch meaning: 6 loader batches of 2 per step): 1, 2, 3 ranks
- alright-z3 (padded): 1, 2 ranks
- resumes: alright-z2-pack SIGTERMed on 2 ranks, resumed on 1 and on 3; alright-z3 SIGTERMed on 1 rank,
  resumed on 2 (each engine state converted to a universal checkpoint).
"""

import json
import os
import shutil
import subprocess

import pytest

from launch import ROOT, Launched, env, free_port, launch_named, metrics, train_records

REL = 2e-5
STEPS = 6
CUT = 2  # SIGTERM after step 2: every rank finishes step 3, checkpoints and exits 143
COMMON = ["--learning_rate", "2e-3", "--lr_warmup_ratio", "0", "--max_steps", str(STEPS), "--logging_steps", "1",
          "--eval_steps", "3"]
SINGLE = [*COMMON, "--train_batch_size", "12", "--max_samples", "34"]
# XRIGHT's joint CLIs count --train_batch_size in loader batches: 6 of 2 examples = 12 examples per step
JOINT = [*COMMON, "--train_batch_size", "6", "--sft_micro_train_batch_size", "2", "--rlhf_micro_train_batch_size",
         "2", "--sft_max_samples", "34", "--rlhf_max_samples", "29"]
CASES = {
    "sft-z2": ("train_sft", [*SINGLE, "--zero_stage", "2", "--micro_train_batch_size", "2"]),
    "sft-z3-pack": ("train_sft", [*SINGLE, "--zero_stage", "3", "--micro_train_batch_size", "2", "--packing_samples"]),
    "dpo-z3": ("train_dpo", [*SINGLE, "--zero_stage", "3", "--micro_train_batch_size", "2"]),
    "dpo-z2-pack": ("train_dpo", [*SINGLE, "--zero_stage", "2", "--micro_train_batch_size", "2", "--packing_samples"]),
    "alright-z2-pack": ("train_sft_dpo_alright", [*JOINT, "--zero_stage", "2", "--packing_samples"]),
    "alright-z3": ("train_sft_dpo_alright", [*JOINT, "--zero_stage", "3"]),
}
FRESH = {1: list(CASES), 2: list(CASES), 3: ["sft-z2", "dpo-z3", "alright-z2-pack"]}


def spec(root, name, case, *extra, env_=None):
    module, args = CASES[case]
    out = os.path.join(str(root), name)
    return (module, [*args, *extra, "--ckpt_path", os.path.join(out, "ckpt")], env_ or {})


def cut(root, name, case):
    return spec(root, name, case, env_={"XRIGHT_DEBUG_SIGTERM_AT_STEP": str(CUT)})


def resume(root, name, case):
    return spec(root, name, case, "--load_checkpoint")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (save path, process). Launch order: the 1-rank runs (and a 1-rank run cut by SIGTERM), the 2-rank
    runs (one cut, one resuming the 1-rank cut), the 3-rank runs (one resuming a copy of the 2-rank cut), then
    one process resuming another copy of it."""
    root = tmp_path_factory.mktemp("ranks")
    done = {}

    def launch(nproc, plan):
        done.update(launch_named(root, {nproc: plan}).done)

    def copy(src, dst):
        shutil.copytree(os.path.join(str(root), src), os.path.join(str(root), dst))

    dpo3 = list(CASES["dpo-z3"][1])
    dpo3[dpo3.index("--micro_train_batch_size") + 1] = "4"  # 3 ranks × 4 × 1: another micro batch, the same step
    fresh = lambda w: {f"{c}-w{w}": spec(root, f"{c}-w{w}", c) for c in FRESH[w]}  # noqa: E731
    launch(1, {**fresh(1), "cut-w1": cut(root, "cut-w1", "alright-z3")})
    copy("cut-w1", "cut-w1-on2")
    launch(2, {**fresh(2), "cut-w2": cut(root, "cut-w2", "alright-z2-pack"),
               "cut-w1-on2": resume(root, "cut-w1-on2", "alright-z3")})
    copy("cut-w2", "cut-w2-on3")
    copy("cut-w2", "cut-w2-on1")
    plan3 = {**fresh(3), "cut-w2-on3": resume(root, "cut-w2-on3", "alright-z2-pack")}
    plan3["dpo-z3-w3"] = ("train_dpo", [*dpo3, "--ckpt_path", os.path.join(str(root), "dpo-z3-w3", "ckpt")], {})
    launch(3, plan3)
    launch(1, {"cut-w2-on1": resume(root, "cut-w2-on1", "alright-z2-pack")})
    return Launched(done)


def steps(out):
    """step -> (picked objectives, {objective: train loss}) of a run's metrics."""
    return {r["step"]: (r["objectives"], {k: v for k, v in r.items() if k.startswith("train/") and k.endswith("/loss")})
            for r in train_records(out)}


def evals(out):
    return {(r["step"], k): v for r in metrics(out) if not r.get("final") for k, v in r.items()
            if k.startswith("eval/") and k.endswith("/loss")}


def assert_same(got: dict, want: dict, what: str):
    assert sorted(got) == sorted(want), (what, sorted(got), sorted(want))
    for step in sorted(want):
        (g_picks, g), (w_picks, w) = got[step], want[step]
        assert g_picks == w_picks, (what, step, g_picks, w_picks)
        assert sorted(g) == sorted(w) and all(g[k] == pytest.approx(w[k], rel=REL) for k in w), (what, step, g, w)


@pytest.mark.parametrize("case", list(CASES))
def test_fresh_runs_have_the_same_losses_on_any_number_of_ranks(runs, case):
    want = steps(runs(f"{case}-w1")[0])
    assert len(want) == STEPS
    want_eval = evals(runs(f"{case}-w1")[0])
    assert {s for s, _ in want_eval} == {0, 3, 6}
    for w in (2, 3):
        if case in FRESH[w]:
            assert_same(steps(runs(f"{case}-w{w}")[0]), want, f"{case} on {w} ranks")
            got_eval = evals(runs(f"{case}-w{w}")[0])
            assert sorted(got_eval) == sorted(want_eval)
            assert all(got_eval[k] == pytest.approx(v, rel=REL) for k, v in want_eval.items()), (case, w, got_eval)


def test_the_step_losses_differ_after_the_first_epoch_boundary(runs):
    """The comparison above is not vacuous: the runs train (losses move) and cross epoch boundaries mid-stream
    (34 examples = 2 steps of 12 + 10 left out), the place where a rank-dependent cut used to diverge."""
    losses = [v["train/dpo/loss"] for _, v in (steps(runs("dpo-z3-w1")[0])[s] for s in range(1, STEPS + 1))]
    assert len(set(round(x, 6) for x in losses)) == STEPS
    drawn = json.load(open(os.path.join(runs("dpo-z3-w2")[0], "batches.json")))["objectives"]["dpo"]
    assert drawn["examples_per_step"] == 12 and drawn["examples_drawn"] == 12 * STEPS
    alright = [p for p, _ in steps(runs("alright-z2-pack-w1")[0]).values()]
    assert ["sft"] in alright and ["dpo"] in alright  # both objectives picked: both loaders and the schedule move


@pytest.mark.parametrize("name,saved,now,case", [("cut-w2-on1", 2, 1, "alright-z2-pack"),
                                                 ("cut-w2-on3", 2, 3, "alright-z2-pack"),
                                                 ("cut-w1-on2", 1, 2, "alright-z3")])
def test_resume_on_another_number_of_ranks_follows_the_uninterrupted_run(runs, name, saved, now, case):
    cut_name = name.rsplit("-on", 1)[0]
    _, cut_proc = runs(cut_name, ok=False)
    assert cut_proc.returncode == 143, cut_proc.stdout[-3000:] + cut_proc.stderr[-3000:]
    out, proc = runs(name)
    text = proc.stdout + proc.stderr
    tag = f"global_step{CUT + 1}"
    assert f"was saved by {saved} rank{'s' * (saved != 1)}, this run has {now}" in text, text[-3000:]
    assert f"resumed from {os.path.join(out, 'ckpt')}/{tag} at step {CUT + 1}" in text
    ckpt = os.path.join(out, "ckpt")
    assert os.path.isdir(os.path.join(ckpt, f"{tag}_universal", "zero"))  # the converted copy, beside
    assert os.path.isfile(os.path.join(ckpt, tag, "xright_state.json"))  # the original, kept
    # every remaining step: the picks and losses of the uninterrupted run (on its own rank count)
    for w in (saved, now):
        assert_same(steps(out), steps(runs(f"{case}-w{w}")[0]), f"{name} vs {case} on {w} ranks")
    assert os.path.exists(os.path.join(out, "config.json"))  # finished: the final model is saved


def test_two_nodes_train_as_one_node_of_two_ranks(runs, tmp_path):
    """Two simulated nodes on this machine (a hostfile naming 127.0.0.1 and localhost with one slot each; one
    launcher per node with --no_ssh --node_rank): the same step losses as one node with 2 ranks."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    out = str(tmp_path / "dpo-z3-nodes")
    module, args, _ = spec(tmp_path, "dpo-z3-nodes", "dpo-z3")
    workdir = str(tmp_path / "launch")
    os.makedirs(workdir)
    plan = os.path.join(workdir, "plan.json")
    with open(plan, "w") as f:
        json.dump({"workdir": workdir, "runs": [{"module": module, "args": [*args, "--save_path", out]}]}, f)
    port = free_port()
    procs = [subprocess.Popen(["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "--no_local_rank",
                               os.path.join(ROOT, "tests", "multirun.py"), plan],
                              cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    codes = [json.load(open(os.path.join(workdir, f"codes.rank{r}.json"))) for r in (0, 1)]
    assert [p.returncode for p in procs] == [0, 0] and codes == [[0], [0]], "\n".join(x[-3000:] for x in logs)
    assert "world size 2" in open(os.path.join(workdir, "run0.rank0.out")).read()
    assert_same(steps(out), steps(runs("dpo-z3-w2")[0]), "2 nodes × 1 rank vs 1 node × 2 ranks")
