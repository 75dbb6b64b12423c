"""The paper's joint CLIs under 2 CPU ranks: every rank makes the same pick, MAXRIGHT follows its rule,
loaders of very different lengths never stop a run, Mix computes both objectives every step."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from launch import launch_named, metrics, train_records
from xright.data import DataSpec, collate, load_data
from xright.models import load_model, load_tokenizer
from xright.objectives import SFT, Pairwise, Reference

STEPS = 12
# --train_batch_size as XRIGHT means it: one loader batch per rank per step on 2 ranks
JOINT = ["--train_batch_size", "2", "--sft_micro_train_batch_size", "4", "--rlhf_micro_train_batch_size", "2",
         "--learning_rate", "2e-3", "--max_steps", str(STEPS), "--eval_steps", "6",
         # very different lengths: 8 SFT examples (one optimizer step per epoch) vs 96 pairs (24 steps)
         "--sft_max_samples", "8", "--rlhf_max_samples", "96", "--debug_log_picks"]


def rank_picks(out, rank):
    with open(os.path.join(out, f"picks.rank{rank}.jsonl")) as f:
        return [json.loads(line) for line in f]


def check_common(out):
    recs = train_records(out)
    assert [r["step"] for r in recs] == list(range(1, STEPS + 1))  # no StopIteration, no early end
    r0, r1 = rank_picks(out, 0), rank_picks(out, 1)
    assert [p["plan"] for p in r0] == [p["plan"] for p in r1]
    assert [sorted(p["plan"]) for p in r0] == [r["objectives"] for r in recs]
    evals = [r for r in metrics(out) if "eval/ideal_distance" in r]
    assert {r["step"] for r in evals} >= {0, 6, 12}
    assert all("eval/sft/loss" in r and "eval/dpo/loss" in r for r in evals)
    return recs, r0, r1


def one_process_flags(flags):
    """The JOINT flags for 1 process on the same global batches: each loader batch twice as big (one
    process reads what both ranks read); where --train_batch_size counts loader batches (XRIGHT's
    meaning) it halves with the ranks."""
    from xright.cli import joint

    xright_meaning = joint.parser("", "alright").get_default("batch_meaning") == "xright"
    out = list(flags)
    for flag in ("--sft_micro_train_batch_size", "--rlhf_micro_train_batch_size"):
        i = out.index(flag) + 1
        out[i] = str(2 * int(out[i]))
    if xright_meaning:
        i = out.index("--train_batch_size") + 1
        out[i] = str(int(out[i]) // 2)
    return out


SEQ = [a for a in JOINT if a not in ("--max_steps", str(STEPS))]
PHASE = [a for a in JOINT if a != "--debug_log_picks"]
ALRIGHT = ["--lambd", "0.5", "--debug_rank_seed"]
MAXRIGHT = [*JOINT, "--lambd", "0.6", "--max_eval_steps", "5", "--sft_opt", "0.5", "--dpo_opt", "0.1"]
TWO_RANK = {
    "alright-z2": ("train_sft_dpo_alright", ["--zero_stage", "2", *JOINT, *ALRIGHT]),
    "alright-z3": ("train_sft_dpo_alright", ["--zero_stage", "3", *JOINT, *ALRIGHT]),
    "maxright-z2": ("train_sft_dpo_maxright", ["--zero_stage", "2", *MAXRIGHT]),
    "maxright-z3": ("train_sft_dpo_maxright", ["--zero_stage", "3", *MAXRIGHT]),
    "mix": ("train_sft_dpo_mix", ["--zero_stage", "3", *JOINT, "--lambd", "0.25"]),
    "seq": ("joint", ["--schedule", "sequential", "--order", "dpo,sft", "--zero_stage", "2", *SEQ,
                      "--rlhf_max_samples", "16", "--max_epochs", "2"]),
    "train_sft_seq": ("train_sft_seq", ["--zero_stage", "3", *PHASE, "--rlhf_beta", "0.2"]),
    "train_dpo_seq": ("train_dpo_seq", ["--zero_stage", "2", *PHASE, "--rlhf_beta", "0.2"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> save path: every 2-rank run of this file in one launch, the one-process ALRIGHT run alone."""
    one = {"alright-1": ("train_sft_dpo_alright", ["--zero_stage", "2", *one_process_flags(JOINT), *ALRIGHT]),
           # the quickstart's geometry: --train_batch_size 2 in one process accumulates 2 loader batches
           "alright-1-accum2": ("train_sft_dpo_alright", ["--zero_stage", "2", *JOINT, *ALRIGHT]),
           "maxright-1-accum2": ("train_sft_dpo_maxright", ["--zero_stage", "2", *MAXRIGHT])}
    launched = launch_named(tmp_path_factory.mktemp("joint"), {2: TWO_RANK, 1: one})
    return lambda name: launched(name)[0]


def alright_runs(runs, zero, nproc=2):
    return runs(f"alright-z{zero}" if nproc == 2 else "alright-1")


@pytest.mark.parametrize("zero", ["2", "3"])
def test_alright_ranks_agree_even_when_seeded_differently(runs, zero):
    out = alright_runs(runs, zero)
    recs, r0, r1 = check_common(out)
    assert all(len(r["objectives"]) == 1 for r in recs)
    # rank 1's own schedule (seeded differently) would have picked otherwise at some step; rank 0's pick won
    assert any(a["local"] != b["local"] for a, b in zip(r0, r1))
    assert {tuple(r["objectives"]) for r in recs} == {("sft",), ("dpo",)}


@pytest.mark.parametrize("zero", ["2", "3"])
def test_alright_two_ranks_equal_one_process(runs, zero):
    """The same picks, per-step losses and evaluations as one process on the same global batches (fp32)."""
    two, one = alright_runs(runs, zero), alright_runs(runs, "2", nproc=1)
    a, b = train_records(two), train_records(one)
    assert [r["objectives"] for r in a] == [r["objectives"] for r in b]
    for k in ("sft", "dpo"):
        assert [r.get(f"train/{k}/loss") for r in a if k in r["objectives"]] == pytest.approx(
            [r.get(f"train/{k}/loss") for r in b if k in r["objectives"]], rel=2e-5, abs=1e-6), k
    ev = lambda out: [(r["step"], r["eval/sft/loss"], r["eval/dpo/loss"], r["eval/ideal_distance"])  # noqa: E731
                      for r in metrics(out) if "eval/ideal_distance" in r]
    assert [e[0] for e in ev(two)] == [e[0] for e in ev(one)] and {0, 6, 12} <= {e[0] for e in ev(two)}
    assert [e[1:] for e in ev(two)] == [pytest.approx(e[1:], rel=2e-5, abs=1e-6) for e in ev(one)]


@pytest.mark.parametrize("zero", ["2", "3"])
def test_maxright_picks_follow_the_rule(runs, zero):
    out = runs(f"maxright-z{zero}")
    recs, _, _ = check_common(out)
    w, opt = {"sft": 0.4, "dpo": 0.6}, {"sft": 0.5, "dpo": 0.1}
    for r in recs:
        scores = {k: w[k] * (r[f"stale/{k}"] - opt[k]) for k in w}
        best = "sft" if scores["sft"] >= scores["dpo"] else "dpo"
        assert r["objectives"] == [best], r
    assert [r["step"] for r in recs if "refresh/sft" in r] == [1, 6, 11]
    # the stepped objective's stale value is refreshed from its own (rank-averaged) loss
    for prev, cur in zip(recs, recs[1:]):
        k = prev["objectives"][0]
        if f"refresh/{k}" not in cur:
            assert cur[f"stale/{k}"] == pytest.approx(prev[f"train/{k}/loss"])


def test_mix_computes_both_every_step(runs):
    out = runs("mix")
    recs, _, _ = check_common(out)
    assert all(r["objectives"] == ["dpo", "sft"] and r["weights"] == {"sft": 0.75, "dpo": 0.25} for r in recs)


def test_sequential_schedule_in_one_run(runs):
    out = runs("seq")
    recs = train_records(out)
    # 16 pairs / (2 × 2 ranks × accum 1) = 4 steps per DPO epoch; 8 SFT examples: 1 step per epoch
    assert [r["objectives"][0] for r in recs] == ["dpo"] * 8 + ["sft"] * 2


@pytest.mark.parametrize("module,trained", [("train_sft_seq", "sft"), ("train_dpo_seq", "dpo")])  # ZeRO-3, ZeRO-2
def test_seq_phase_trains_one_and_evaluates_both(runs, module, trained):
    out = runs(module)
    recs = train_records(out)
    assert len(recs) == STEPS and all(r["objectives"] == [trained] for r in recs)
    evals = [r for r in metrics(out) if any(k.startswith("eval/") for k in r)]
    assert sorted({r["step"] for r in evals}) == [0, 6, 12]  # at the start, every --eval_steps, the end
    assert all("eval/sft/loss" in r and "eval/dpo/loss" in r for r in evals), evals
    assert json.load(open(os.path.join(out, "xright_args.json")))["beta"] == 0.2


# ---- gradient accumulation in one process: the quickstart (--train_batch_size 2, one process) ---------------

def same_run(a, b):
    """Per-step picks and losses (and every evaluation) of two runs on the same optimizer-step batches (fp32)."""
    ra, rb = train_records(a), train_records(b)
    assert [r["objectives"] for r in ra] == [r["objectives"] for r in rb] and len(ra) == STEPS
    for k in ("sft", "dpo"):
        assert [r[f"train/{k}/loss"] for r in ra if k in r["objectives"]] == pytest.approx(
            [r[f"train/{k}/loss"] for r in rb if k in r["objectives"]], rel=2e-5, abs=1e-6), k
    ev = lambda out: [(r["step"], r["eval/sft/loss"], r["eval/dpo/loss"])  # noqa: E731
                      for r in metrics(out) if "eval/ideal_distance" in r]
    assert [e[0] for e in ev(a)] == [e[0] for e in ev(b)] and {0, 6, 12} <= {e[0] for e in ev(a)}
    assert [e[1:] for e in ev(a)] == [pytest.approx(e[1:], rel=2e-5, abs=1e-6) for e in ev(b)]


def test_alright_accumulates_two_loader_batches_in_one_process(runs):
    """--train_batch_size 2 in one process: every step accumulates two loader batches of the picked
    objective, so the run equals one process with loader batches twice as big and no accumulation."""
    out = runs("alright-1-accum2")
    assert json.load(open(os.path.join(out, "batches.json")))["objectives"]["sft"]["micro_batches_per_step"] == 2
    same_run(out, runs("alright-1"))


def test_maxright_accumulates_two_loader_batches_in_one_process(runs):
    """The same for MAXRIGHT, against the 2-rank run (one loader batch per rank: the same examples per step)."""
    out = runs("maxright-1-accum2")
    assert json.load(open(os.path.join(out, "batches.json")))["objectives"]["dpo"]["micro_batches_per_step"] == 2
    same_run(out, runs("maxright-z2"))


# ---- the saved model is the trained one ----------------------------------------------------------------

@pytest.mark.parametrize("name", ["alright-z3", "maxright-z2"])
def test_saved_joint_model_reloads_with_its_final_eval(runs, name):
    """The HF model a joint CLI saves, reloaded with transformers, gives the run's final eval losses (computed
    under DeepSpeed on 2 ranks: each eval set cut to a multiple of 2)."""
    out = runs(name)
    final = [r for r in metrics(out) if r.get("final")][-1]
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ref = Reference(model=load_model("tiny", seed=42, trainable=False))  # the policy's initial weights
    tok = load_tokenizer(out)
    for key, kind, objective, n, max_len in (("sft", "sft", SFT(), 8, 2048),
                                              ("dpo", "pairwise", Pairwise("dpo"), 96, 512)):
        _, ev = load_data(DataSpec(kind=kind, max_samples=n, max_len=max_len), tok, log=lambda *a: None)
        ev = ev[:len(ev) - len(ev) % 2]
        with torch.no_grad():
            batch = collate(kind, ev, tok.pad_token_id)
            value = float(objective(model, ref, batch)[0]) / float(objective.units(batch))
        assert value == pytest.approx(final[f"eval/{key}/loss"], rel=1e-4, abs=1e-5), key
