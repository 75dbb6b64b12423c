"""The rank count changes nothing but the order of summation: the same losses on 1, 2 and 3 ranks (and on two
nodes), and a checkpoint resumes on another number of ranks with the uninterrupted run's losses and picks.

fp32 on CPU. 34 SFT examples, 34 and 29 preference pairs, 12 examples per optimizer step: no epoch is a whole
number of steps, so an order cut at one rank's share (as before) would move the epoch boundary with the rank
count. Runs of one world size share one launch (CI budget): 2 ranks, 1 process, two nodes × 1 rank, 3 ranks.

Covered (run name: CLI, ZeRO stage, layout; world size × micro batch × accumulation):
- sft-z2-pack (packed): 1×2×6, 2×2×3, 3×2×2
- dpo-z3 (padded): 1×2×6, 2×2×3, 3×4×1 (another micro batch), 2 nodes × 1 rank × 2 × 3
- alright-z2-pack (ALRIGHT, packed; XRIGHT's batch meaning: 6 loader batches of 2 per step): 1 and 2 ranks
- alright-z3 (ALRIGHT, padded): 1 and 2 ranks
- resumes: alright-z2-pack SIGTERMed on 2 ranks, resumed on 1 and on 3 (ZeRO-2); alright-z3 SIGTERMed on 1
  rank, resumed on two nodes × 1 rank (ZeRO-3); each engine state converted to a universal checkpoint.
- in process: the loader's order under 7 splits of the global batch (padded/grouped, packed) and its state
  moved between splits.
"""

import json
import os
import shutil
import subprocess

import pytest

from launch import ROOT, Launched, env, free_port, launch_named, metrics, train_records
from xright.data import CyclingLoader

REL = 2e-5
STEPS = 5
CUT = 1  # SIGTERM after step 1: every rank finishes step 2, checkpoints and exits 143; step 3 opens epoch 1
# a constant learning rate, so that a shorter run is a prefix of a longer one
COMMON = ["--learning_rate", "2e-3", "--lr_scheduler", "constant", "--lr_warmup_ratio", "0", "--max_steps",
          str(STEPS), "--logging_steps", "1", "--eval_steps", "100"]
SINGLE = [*COMMON, "--train_batch_size", "12", "--max_samples", "34"]
# XRIGHT's joint CLIs count --train_batch_size in loader batches: 6 of 2 examples = 12 examples per step
JOINT = [*COMMON, "--train_batch_size", "6", "--sft_micro_train_batch_size", "2", "--rlhf_micro_train_batch_size",
         "2", "--sft_max_samples", "34", "--rlhf_max_samples", "29"]
CASES = {
    "sft-z2-pack": ("train_sft", [*SINGLE, "--zero_stage", "2", "--micro_train_batch_size", "2", "--packing_samples"]),
    "dpo-z3": ("train_dpo", [*SINGLE, "--zero_stage", "3", "--micro_train_batch_size", "2"]),
    "alright-z2-pack": ("train_sft_dpo_alright", [*JOINT, "--zero_stage", "2", "--packing_samples"]),
    "alright-z3": ("train_sft_dpo_alright", [*JOINT, "--zero_stage", "3"]),
}
FRESH = {1: list(CASES), 2: list(CASES), 3: ["sft-z2-pack", "dpo-z3"]}


def spec(root, name, case, *extra, env_=None):
    module, args = CASES[case]
    out = os.path.join(str(root), name)
    return (module, [*args, *extra, "--ckpt_path", os.path.join(out, "ckpt")], env_ or {})


def cut(root, name, case):
    return spec(root, name, case, env_={"XRIGHT_DEBUG_SIGTERM_AT_STEP": str(CUT)})


def resume(root, name, case):
    return spec(root, name, case, "--load_checkpoint")


def two_nodes(plan: dict, root, workdir: str) -> dict:
    """``plan`` ({name: (module, args, env)}) in one launch on two simulated nodes: a hostfile naming 127.0.0.1 and
    localhost with one slot each, one DeepSpeed launcher per node with --no_ssh --node_rank (as on a cluster
    without ssh). name -> (save path, CompletedProcess)."""
    os.makedirs(workdir)
    hostfile = os.path.join(workdir, "hostfile")
    with open(hostfile, "w") as f:
        f.write("127.0.0.1 slots=1\nlocalhost slots=1\n")
    outs = {name: os.path.join(str(root), name) for name in plan}
    with open(os.path.join(workdir, "plan.json"), "w") as f:
        json.dump({"workdir": workdir, "runs": [{"module": m, "args": [*a, "--save_path", outs[n]], "env": e}
                                                for n, (m, a, e) in plan.items()]}, f)
    port = free_port()
    procs = [subprocess.Popen(["deepspeed", "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node),
                               "--master_addr", "127.0.0.1", "--master_port", str(port), "--no_local_rank",
                               os.path.join(ROOT, "tests", "multirun.py"), os.path.join(workdir, "plan.json")],
                              cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    logs = [p.communicate(timeout=900)[0] for p in procs]
    read = lambda path: open(path).read() if os.path.exists(path) else ""  # noqa: E731
    codes = [json.loads(read(os.path.join(workdir, f"codes.rank{r}.json")) or "[]") for r in (0, 1)]
    done = {}
    for i, name in enumerate(plan):
        code = [c[i] if len(c) > i else None for c in codes]
        out = "".join(read(os.path.join(workdir, f"run{i}.rank{r}.out")) for r in (0, 1))
        err = "".join(read(os.path.join(workdir, f"run{i}.rank{r}.err")) for r in (0, 1))
        done[name] = (outs[name], subprocess.CompletedProcess(
            [], next((c for c in code if c != 0), 0), out, err + "".join(x[-3000:] for x in logs)))
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (save path, process). Four launches, in this order: 2 ranks (the fresh runs, one run cut by
    SIGTERM), 1 process (the fresh runs, one cut, one resuming a copy of the 2-rank cut), two nodes × 1 rank
    (a fresh run, one resuming the 1-rank cut), 3 ranks (the fresh runs, one resuming another copy of the 2-rank
    cut)."""
    root = tmp_path_factory.mktemp("ranks")
    done = {}

    def copy(src, dst):
        shutil.copytree(os.path.join(str(root), src), os.path.join(str(root), dst))

    fresh = lambda w: {f"{c}-w{w}": spec(root, f"{c}-w{w}", c) for c in FRESH[w]}  # noqa: E731
    done.update(launch_named(root, {2: {**fresh(2), "cut-w2": cut(root, "cut-w2", "alright-z2-pack")}}).done)
    copy("cut-w2", "cut-w2-on1")
    copy("cut-w2", "cut-w2-on3")
    done.update(launch_named(root, {1: {**fresh(1), "cut-w1": cut(root, "cut-w1", "alright-z3"),
                                        "cut-w2-on1": resume(root, "cut-w2-on1", "alright-z2-pack")}}).done)
    copy("cut-w1", "cut-w1-on2")
    done.update(two_nodes({"dpo-z3-nodes": spec(root, "dpo-z3-nodes", "dpo-z3"),
                           "cut-w1-on2": resume(root, "cut-w1-on2", "alright-z3")}, root, str(root / "nodes")))
    plan3 = {**fresh(3), "cut-w2-on3": resume(root, "cut-w2-on3", "alright-z2-pack")}
    dpo3 = plan3["dpo-z3-w3"][1]
    dpo3[dpo3.index("--micro_train_batch_size") + 1] = "4"  # 3 ranks × 4 × 1: another micro batch, the same step
    done.update(launch_named(root, {3: plan3}).done)
    return Launched(done)


def steps(out):
    """step -> (picked objectives, {objective: train loss}) of a run's metrics."""
    return {r["step"]: (r["objectives"], {k: v for k, v in r.items() if k.startswith("train/") and k.endswith("/loss")})
            for r in train_records(out)}


def evals(out):
    """(step, metric) -> eval loss: the evaluation before step 1 and the final one."""
    return {(r["step"], k): v for r in metrics(out) for k, v in r.items()
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
    assert {s for s, _ in want_eval} == {0, STEPS}
    for w in (2, 3):
        if case in FRESH[w]:
            assert_same(steps(runs(f"{case}-w{w}")[0]), want, f"{case} on {w} ranks")
            got_eval = evals(runs(f"{case}-w{w}")[0])  # 34 eval examples: 3 ranks take 12, 11 and 11
            assert sorted(got_eval) == sorted(want_eval)
            assert all(got_eval[k] == pytest.approx(v, rel=REL) for k, v in want_eval.items()), (case, w, got_eval)


def test_the_comparison_is_not_vacuous(runs):
    """The runs train (every step's loss moves) and cross an epoch boundary of a stream that is not a whole
    number of steps (34 examples = 2 steps of 12 + 10 left out), where a rank-dependent cut used to diverge."""
    losses = [v["train/dpo/loss"] for _, v in (steps(runs("dpo-z3-w1")[0])[s] for s in range(1, STEPS + 1))]
    assert len(set(round(x, 6) for x in losses)) == STEPS
    drawn = json.load(open(os.path.join(runs("dpo-z3-w3")[0], "batches.json")))["objectives"]["dpo"]
    assert drawn["examples_per_step"] == 12 and drawn["examples_drawn"] == 12 * STEPS
    assert drawn["examples_per_rank_per_micro_batch"] == 4 and drawn["micro_batches_per_step"] == 1
    alright = [p for p, _ in steps(runs("alright-z2-pack-w1")[0]).values()]
    assert ["sft"] in alright and ["dpo"] in alright  # both objectives picked: both loaders and the schedule move


@pytest.mark.parametrize("name,saved,now,case", [("cut-w2-on1", 2, 1, "alright-z2-pack"),
                                                 ("cut-w2-on3", 2, 3, "alright-z2-pack"),
                                                 ("cut-w1-on2", 1, 2, "alright-z3")])  # on two nodes
def test_resume_on_another_number_of_ranks_follows_the_uninterrupted_run(runs, name, saved, now, case):
    _, cut_proc = runs(name.rsplit("-on", 1)[0], ok=False)
    assert cut_proc.returncode == 143, cut_proc.stdout[-3000:] + cut_proc.stderr[-3000:]
    out, proc = runs(name)
    text = proc.stdout + proc.stderr
    tag = f"global_step{CUT + 1}"
    assert f"was saved by {saved} rank{'s' * (saved != 1)}, this run has {now}" in text, text[-3000:]
    assert f"resumed from {os.path.join(out, 'ckpt')}/{tag} at step {CUT + 1} (saved by {saved}" in text
    ckpt = os.path.join(out, "ckpt")
    assert os.path.isdir(os.path.join(ckpt, f"{tag}_universal", "zero"))  # the converted copy, beside
    assert os.path.isfile(os.path.join(ckpt, tag, "xright_state.json"))  # the original, kept
    # every step after the resume: the picks and losses of the uninterrupted runs
    for w in (saved, now):
        if case in FRESH[w]:
            assert_same(steps(out), steps(runs(f"{case}-w{w}")[0]), f"{name} vs {case} on {w} ranks")
    assert os.path.exists(os.path.join(out, "config.json"))  # finished: the final model is saved


def test_two_nodes_train_as_one_node_of_two_ranks(runs):
    out, proc = runs("dpo-z3-nodes")
    assert "world size 2" in proc.stdout
    assert_same(steps(out), steps(runs("dpo-z3-w2")[0]), "2 nodes × 1 rank vs 1 node × 2 ranks")


# ---- the global order itself, in process ---------------------------------------------------------------------

def examples(n):
    return [{"id": f"e{i}", "prompt_ids": [1] * (1 + i % 3), "response_ids": [2] * (1 + (7 * i) % 11)}
            for i in range(n)]


def step_ids(loaders, accumulation):
    """The example ids of one optimizer step: every rank's micro-batches."""
    return sorted(i for ld in loaders for _ in range(accumulation) for i in ld.next()["ids"])


# every way to split 12 examples per step over ranks × micro batch × accumulation
SPLITS = [(1, 2, 6), (2, 2, 3), (3, 2, 2), (3, 4, 1), (2, 6, 1), (4, 3, 1), (1, 12, 1)]


@pytest.mark.parametrize("group_by_length", [False, True])
def test_every_split_of_the_global_batch_draws_the_same_examples_at_every_step(group_by_length):
    ex = examples(34)  # 2 steps of 12 per epoch, 10 left out: 7 steps cross 3 epoch boundaries
    trajectories = {}
    for W, mb, accum in SPLITS:
        loaders = [CyclingLoader(ex, "sft", mb, 0, rank=r, world_size=W, seed=7, accumulation=accum, packed=True,
                                 group_by_length=group_by_length, group_window=2) for r in range(W)]
        trajectories[(W, mb, accum)] = [step_ids(loaders, accum) for _ in range(7)]
    want = trajectories[(1, 2, 6)]
    assert all(len(s) == len(set(s)) == 12 for s in want)
    assert len(set(want[0] + want[1])) == 24 and want[2] != want[0]  # an epoch: no repeats; then a new order
    for split, got in trajectories.items():
        assert got == want, split


def test_loader_state_moves_to_another_split_of_the_global_batch():
    ex = examples(34)
    make = lambda W, mb, accum: [CyclingLoader(ex, "sft", mb, 0, rank=r, world_size=W, seed=3,  # noqa: E731
                                               accumulation=accum, group_by_length=True) for r in range(W)]
    two = make(2, 2, 3)
    for _ in range(3):  # into the second epoch
        step_ids(two, 3)
    state = json.loads(json.dumps(two[1].state_dict()))
    assert state == two[0].state_dict() == {"epoch": 1, "examples": 12, "seed": 3}  # global counts, any rank
    rest = [step_ids(two, 3) for _ in range(4)]
    for W, mb, accum in [(1, 2, 6), (3, 4, 1), (4, 3, 1)]:
        other = make(W, mb, accum)
        for ld in other:
            ld.load_state_dict(state)
        assert [step_ids(other, accum) for _ in range(4)] == rest, (W, mb, accum)
    with pytest.raises(ValueError, match="not a whole number of micro-batches"):
        make(1, 5, 1)[0].load_state_dict({"epoch": 0, "examples": 12, "seed": 3})
