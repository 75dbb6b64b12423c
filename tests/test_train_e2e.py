"""End-to-end: the SFT, DPO and SFT-on-chosen CLIs under 2 CPU ranks (ZeRO-2/3, ± LoRA) and as one process.

Each run trains on fixed data; the loss must go down, and the saved HF model, reloaded with
``AutoModelForCausalLM.from_pretrained``, must reproduce the trained model's final eval loss
(computed by the run under DeepSpeed) — so the save gathers the right weights. A step whose gradients
alone are non-finite is discarded on both ranks, and the count of such steps survives a resume.
"""

import math
import os
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from launch import SHARED_DATA, final_eval, launch_named, metrics, train_records
from test_chat import chat_layouts
from xright.data import CyclingLoader, DataSpec, collate, load_data
from xright.logprobs import sequence_logps, split_choices
from xright.models import load_for_inference, load_model, load_tokenizer
from xright.objectives import SFT, Pairwise, Reference

COMMON = ["--train_batch_size", "8", "--micro_train_batch_size", "2", "--learning_rate", "3e-3",
          "--lr_scheduler", "constant", "--max_samples", "32", "--max_epochs", "4", "--eval_steps", "1000"]


HH = os.path.join(SHARED_DATA, "hh-rlhf", "harmless-base-test.jsonl.gz")
HH_ARGS = ["--pretrain", "tiny", "--dataset", HH, "--max_samples", "64", "--micro_train_batch_size", "4",
           "--train_batch_size", "8", "--zero_stage", "3"]


CHAT_ARGS = ["--zero_stage", "3", "--train_batch_size", "8", "--micro_train_batch_size", "2", "--max_samples", "32",
             "--max_steps", "3", "--eval_fraction", "0.25", "--eval_steps", "1000", "--learning_rate", "1e-3",
             "--lr_scheduler", "constant"]


def eval_loss(model_dir: str, kind: str, objective, model=None) -> float:
    """The eval loss of a saved model (or of ``model``, with ``model_dir``'s tokenizer) on the built-in eval
    set, computed without DeepSpeed."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = (model or AutoModelForCausalLM.from_pretrained(model_dir)).eval()
    _, ev = load_data(DataSpec(kind=kind, max_samples=32, max_len=512 if kind == "pairwise" else 2048), tok,
                      log=lambda *a: None)
    ref = Reference(model=load_model("tiny", seed=42, trainable=False)) if objective.needs_reference else None
    total = units = 0.0
    with torch.no_grad():
        for i in range(0, len(ev), 16):
            batch = collate(kind, ev[i:i + 16], tok.pad_token_id)
            value, _ = objective(model, ref, batch)
            total += float(value)
            units += float(objective.units(batch))
    return total / units


def first_last(save_path, name):
    losses = [r[f"train/{name}/loss"] for r in train_records(save_path)]
    return sum(losses[:4]) / 4, sum(losses[-4:]) / 4


TWO_RANK = [("train_sft", z, lora) for z in ("2", "3") for lora in (False, True)] + \
    [("train_dpo", z, lora) for z in ("2", "3") for lora in (False, True)]
ONE_PROCESS = [("train_sft", "2", False), ("train_dpo", "2", False)]


# Non-finite gradients (not loss) on rank 1 at step 3. The whole data set (8 examples) is every step's batch, so
# each step's loss is that of the weights it starts from: a discarded step leaves the run one step behind the
# clean one, on the same trajectory.
NAN_GRAD = ["--train_batch_size", "8", "--micro_train_batch_size", "2", "--max_samples", "8", "--max_steps", "6",
            "--learning_rate", "1e-3", "--lr_scheduler", "linear", "--lr_warmup_ratio", "0", "--eval_steps", "1000",
            "--skip_nonfinite"]
GRAD_AT = {"XRIGHT_DEBUG_NAN_GRAD_AT_STEP": "3:1"}  # rank 1's gradients only; every loss stays finite


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """get(module, zero, lora, nproc) -> (save_path, process). Every configuration of this file runs once, the
    2-rank ones in one launch and the one-process ones in one process (``run_many``), so the tests that read
    the same run (reload, 2 ranks = 1 process) share it and no run pays a launch of its own."""
    def name(module, zero, lora, nproc):
        return f"{module}-z{zero}{'-lora' if lora else ''}-n{nproc}"

    lora_flags = ["--lora_rank", "8", "--lora_alpha", "16", "--merge_lora"]
    plans = {nproc: {name(m, z, lora, nproc): (m, ["--zero_stage", z, *COMMON, *(lora_flags if lora else [])])
                     for m, z, lora in configs} for nproc, configs in ((2, TWO_RANK), (1, ONE_PROCESS))}
    plans[2]["sft_pref"] = ("train_sft_pref", SFT_PREF)  # the other 2-rank runs of this file join the launch
    root = tmp_path_factory.mktemp("e2e")
    ckpt = ["--ckpt_path", str(root / "grad-z2" / "ckpt")]
    plans[2].update({
        "clean": ("train_sft", ["--zero_stage", "2", *NAN_GRAD]),
        "grad-z2": ("train_sft", ["--zero_stage", "2", *NAN_GRAD, *ckpt, "--save_steps", "4"], GRAD_AT),
        "grad-z3": ("train_sft", ["--zero_stage", "3", *NAN_GRAD], GRAD_AT),
        "grad-stop": ("train_sft", ["--zero_stage", "2", *[a for a in NAN_GRAD if a != "--skip_nonfinite"]], GRAD_AT),
        # resumes grad-z2's step-4 checkpoint (after the skipped step 3) into a save path of its own
        "resumed": ("train_sft", ["--zero_stage", "2", *NAN_GRAD, *ckpt, "--load_checkpoint"]),
    })
    if os.path.exists(HH):
        plans[2]["hh"] = ("train_dpo", HH_ARGS)
    chat = chat_layouts(root)  # conversational DPO (tests/test_chat.py) under ZeRO-3 on 2 ranks
    for layout in ("uf", "plain"):
        plans[2][f"chat-{layout}"] = ("train_dpo", [*CHAT_ARGS, "--dataset", chat[layout],
                                                    *(["--input_template", ""] if layout == "plain" else [])])
    launched = launch_named(root, plans)
    return lambda module, zero=None, lora=False, nproc=2, ok=True: launched(
        module if zero is None else name(module, zero, lora, nproc), ok=ok)


@pytest.mark.parametrize("module,name,zero,lora", [
    ("train_sft", "sft", "2", False), ("train_sft", "sft", "3", True),
    ("train_sft", "sft", "3", False), ("train_sft", "sft", "2", True),
    ("train_dpo", "dpo", "2", False), ("train_dpo", "dpo", "3", True),
    ("train_dpo", "dpo", "3", False), ("train_dpo", "dpo", "2", True),
])
def test_two_ranks_train_save_reload(launched, module, name, zero, lora):
    out, _ = launched(module, zero, lora)
    first, last = first_last(out, name)
    assert last < first - 0.05, (first, last)
    start = [r for r in metrics(out) if r.get("step") == 0][0][f"eval/{name}/loss"]
    final = final_eval(out)[f"eval/{name}/loss"]
    assert final < start
    model_dir = os.path.join(out, "merged") if lora else out
    if lora:
        assert os.path.exists(os.path.join(out, "adapter_model.safetensors"))
    objective = SFT() if name == "sft" else Pairwise("dpo")
    kind = "sft" if name == "sft" else "pairwise"
    assert eval_loss(model_dir, kind, objective) == pytest.approx(final, rel=1e-4, abs=1e-5)


def test_lora_adapter_saved_by_a_run_loads_on_its_base(launched):
    """The adapter directory a LoRA run saves (no base weights in it) loads on its base, as batch_inference,
    interactive_chat and eval_winrate load it, and gives the trained model: the run's final eval loss and
    the logits of the merged model the run wrote."""
    out, _ = launched("train_sft", "3", True)
    assert os.path.exists(os.path.join(out, "adapter_config.json"))
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    model = load_for_inference(out)
    assert eval_loss(out, "sft", SFT(), model=model) == pytest.approx(final_eval(out)["eval/sft/loss"], rel=1e-4,
                                                                      abs=1e-5)
    ids = torch.tensor([list(range(3, 40))])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged")).eval()(input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, merged, rtol=1e-4, atol=1e-5)
        base = load_model("tiny", seed=42, trainable=False)(input_ids=ids).logits
    assert (merged - base).abs().max() > 1e-2  # the adapter matters


def test_single_process_sft_matches_reload(launched):
    out, proc = launched("train_sft", "2", nproc=1)
    assert "world size 1" in proc.stdout
    first, last = first_last(out, "sft")
    assert last < first - 0.05
    assert eval_loss(out, "sft", SFT()) == pytest.approx(final_eval(out)["eval/sft/loss"], rel=1e-4)


# as XRIGHT: loader batches of 2 (--rlhf_micro_train_batch_size), 8 / (2 × 2 ranks) = 2 of them per step
SFT_PREF = ["--zero_stage", "2", *COMMON, "--micro_train_batch_size", "2", "--rlhf_micro_train_batch_size", "2"]


def test_sft_pref_masks_prompt_and_trains(launched):
    out, _ = launched("sft_pref")
    first, last = first_last(out, "sft")
    assert last < first - 0.05
    # the loss is the NLL of the chosen responses only: the initial model's value (step-0 eval) and the saved
    # model's (final eval), recomputed here with the prompt masked, and far from the unmasked value
    tok = load_tokenizer("tiny")
    _, ev = load_data(DataSpec(kind="sft", sft_from_chosen=True, max_samples=32), tok, log=lambda *a: None)
    assert all(e["prompt_ids"] and e["response_ids"] for e in ev)
    start = [r for r in metrics(out) if r.get("step") == 0][0]["eval/sft/loss"]
    for model, logged in ((load_model("tiny", seed=42), start),
                          (AutoModelForCausalLM.from_pretrained(out), final_eval(out)["eval/sft/loss"])):
        batch = collate("sft", ev, tok.pad_token_id)
        with torch.no_grad():
            masked = -sequence_logps(model.eval(), batch)[0].sum() / batch["loss_mask"][:, 1:].sum()
            whole = -sequence_logps(model, {**batch, "loss_mask": batch["attention_mask"]})[0].sum() / \
                batch["attention_mask"][:, 1:].sum()
        assert logged == pytest.approx(float(masked), rel=1e-4)
        assert abs(float(whole) - float(masked)) > 1e-3 * float(masked)  # 10x the tolerance above


# ---- 2 ranks = 1 process ------------------------------------------------------------------------------

def rank_batches(examples, micro, world, accum, steps, seed=42):
    """The example ids each optimizer step sees over all ranks, from the loaders the CLIs build."""
    loaders = [CyclingLoader(examples, "sft", micro, 0, rank=r, world_size=world, seed=seed, accumulation=accum)
               for r in range(world)]
    return [sorted(i for ld in loaders for _ in range(accum) for i in ld.next()["ids"]) for _ in range(steps)]


def test_two_ranks_see_the_one_process_examples_every_step():
    # the geometry of the runs below: 32 examples, micro 2, global 8 (2 ranks × accum 2 vs 1 process × accum 4)
    examples = [{"id": f"e{i}", "prompt_ids": [1], "response_ids": [2]} for i in range(32)]
    two, one = rank_batches(examples, 2, 2, 2, 16), rank_batches(examples, 2, 1, 4, 16)
    assert two == one
    assert len({tuple(s) for s in two[:4]}) == 4 and sorted(i for s in two[:4] for i in s) == sorted(
        e["id"] for e in examples)  # each epoch covers the data once, in a new order
    assert two[:4] != two[4:8]


@pytest.mark.parametrize("module,name", [("train_sft", "sft"), ("train_dpo", "dpo")])
def test_two_ranks_equal_one_process(launched, module, name):
    """Per-step training losses and the eval losses of 2-rank ZeRO-2 and ZeRO-3 runs equal a one-process run on
    the same global batches (fp32: only summation order differs)."""
    one = metrics(launched(module, "2", nproc=1)[0])
    for zero in ("2", "3"):
        two = metrics(launched(module, zero)[0])
        steps = [r for r in two if "objectives" in r]
        assert len(steps) == 16
        assert [r[f"train/{name}/loss"] for r in steps] == pytest.approx(
            [r[f"train/{name}/loss"] for r in one if "objectives" in r], rel=2e-5, abs=1e-6), zero
        evals = lambda rows: [(r["step"], r[f"eval/{name}/loss"]) for r in rows if f"eval/{name}/loss" in r]  # noqa
        assert [s for s, _ in evals(two)] == [s for s, _ in evals(one)] == [0, 16]
        assert [v for _, v in evals(two)] == pytest.approx([v for _, v in evals(one)], rel=2e-5, abs=1e-6), zero
        assert [r[f"train/{name}/logp_chosen" if name == "dpo" else "tokens"] for r in steps] == pytest.approx(
            [r[f"train/{name}/logp_chosen" if name == "dpo" else "tokens"] for r in one if "objectives" in r],
            rel=2e-5)


@pytest.mark.skipif(not os.path.exists(HH), reason="shared HH data absent")
def test_dpo_on_hh_zero3(launched):
    out, proc = launched("hh")
    # byte-level tokens: HH prompts over 512 bytes are dropped (OpenRLHF's policy), and the count printed
    m = re.search(r"dpo train: (\d+) examples \(\d+ truncated, (\d+) dropped", proc.stdout)
    kept, dropped = int(m.group(1)), int(m.group(2))
    assert kept + dropped == 64 and kept >= 16
    recs = train_records(out)
    assert len(recs) == kept // 8 and all(r["objectives"] == ["dpo"] for r in recs)
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    # step 1 in numbers: the policy is still its reference, so the loss is log 2 and the chosen log-probs
    # are the initial model's on the step's 8 HH pairs (both ranks' micro-batches, parsed and tokenised here)
    tok = load_tokenizer("tiny")
    train, _ = load_data(DataSpec(kind="pairwise", dataset=HH, max_samples=64, max_len=512), tok, log=lambda *a: None)
    assert len(train) == kept
    loaders = [CyclingLoader(train, "pairwise", 4, tok.pad_token_id, rank=r, world_size=2) for r in range(2)]
    model = load_model("tiny", seed=42).eval()
    with torch.no_grad():
        chosen = torch.cat([split_choices(sequence_logps(model, ld.next())[0], 2)[:, 0] for ld in loaders])
    assert recs[0]["train/dpo/loss"] == pytest.approx(math.log(2), rel=1e-6)
    assert recs[0]["train/dpo/logp_chosen"] == pytest.approx(float(chosen.mean()), rel=1e-4)
    final = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():  # and the saved model is the trained one: it prefers the chosen answers more
        batch = collate("pairwise", train[:16], tok.pad_token_id)
        pi, ref = (split_choices(sequence_logps(m, batch)[0], 2) for m in (final, model))
    assert float(((pi[:, 0] - pi[:, 1]) - (ref[:, 0] - ref[:, 1])).mean()) > 0


# ---- a step whose gradients alone are non-finite; skipped_nonfinite across a resume ---------------------

@pytest.mark.parametrize("zero", ["2", "3"])
def test_nonfinite_gradients_with_a_finite_loss_are_discarded_on_every_rank(launched, zero):
    out, proc = launched(f"grad-z{zero}")
    clean = {r["step"]: r for r in train_records(launched("clean")[0])}
    recs = {r["step"]: r for r in train_records(out)}
    assert sorted(recs) == list(range(1, 7))
    assert recs[3]["skipped"] == "non-finite gradients at step 3 (the losses are finite)"
    assert recs[3]["skipped_nonfinite"] == 1 and "train/sft/loss" not in recs[3]
    # weights, optimizer state and LR schedule as after step 2, on both ranks (a rank that applied the step
    # would have moved its ZeRO partition): steps 4-6 are the clean run's steps 3-5
    for s in (1, 2):
        assert recs[s]["train/sft/loss"] == pytest.approx(clean[s]["train/sft/loss"], rel=1e-6)
    for s in (4, 5, 6):
        assert recs[s]["train/sft/loss"] == pytest.approx(clean[s - 1]["train/sft/loss"], rel=1e-5)
        assert recs[s]["lr"] == pytest.approx(clean[s - 1]["lr"], rel=1e-9)
    assert clean[5]["train/sft/loss"] < clean[3]["train/sft/loss"] - 1e-3  # the steps do move the weights
    # the rate each step applies: the skipped step 3 did not move the schedule, so step 4 applies step 3's rate
    assert recs[4]["lr"] == recs[3]["lr"] != recs[2]["lr"] != recs[1]["lr"]
    assert "skipped 1 optimizer step(s)" in proc.stdout


def test_nonfinite_gradients_stop_the_run_with_exit_code_3(launched):
    out, proc = launched("grad-stop", ok=False)
    assert proc.returncode == 3
    assert "non-finite gradients at step 3 (the losses are finite); stopping" in proc.stderr, proc.stderr[-2000:]
    assert max(r["step"] for r in train_records(out)) == 2 and not os.path.exists(os.path.join(out, "config.json"))


def test_skipped_nonfinite_is_kept_across_resume(launched):
    out, proc = launched("resumed")
    assert "resumed from" in proc.stdout and "at step 4" in proc.stdout
    first = {r["step"]: r for r in train_records(launched("grad-z2")[0])}
    recs = {r["step"]: r for r in train_records(out)}
    assert sorted(recs) == [5, 6]
    assert [recs[s]["train/sft/loss"] for s in (5, 6)] == [first[s]["train/sft/loss"] for s in (5, 6)]
    assert [r for r in metrics(out) if r.get("done")][-1]["skipped_nonfinite"] == 1


def test_conversational_dpo_zero3_two_ranks_equals_the_pre_rendered_text(launched):
    """UltraFeedback-layout records (whole conversations) through the chat template train exactly as the same
    pairs pre-rendered to plain text: every logged number of the two 2-rank ZeRO-3 runs agrees."""
    (uf, _), (plain, _) = launched("chat-uf"), launched("chat-plain")
    a, b = metrics(uf), metrics(plain)
    assert [r["step"] for r in a if "eval/dpo/logp_chosen" in r] == [0, 3]
    keys = lambda r: {k: v for k, v in r.items() if k.startswith(("train/", "eval/"))}  # noqa: E731
    assert [keys(r) for r in a] == [keys(r) for r in b]
