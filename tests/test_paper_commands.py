"""The XRIGHT README's three commands, with its flag values, on 2 CPU ranks (issue 8, part A).

Reference SFT on the chosen answers (``train_sft_pref``), then ALRIGHT and MAXRIGHT with that model as
the DPO reference — as in github.com/heshandevaka/XRIGHT's README. Changed: ``--pretrain`` (a tiny
GPT-NeoX saved here), the datasets (small local files in the ``Dahoas/rm-hh-rlhf`` and
``alpaca-gpt4`` formats), sample counts and epochs, paths, and no ``--flash_attn`` (CUDA only).
``--input_key instruction`` points the SFT prompt at alpaca's instruction field. Each run must train,
save, and take the optimizer steps and see the examples that XRIGHT's batch arithmetic gives.
"""

import json
import math
import os

import pytest
from safetensors.torch import load_file

from launch import metrics, run_many, train_records

WORLD = 2
TRAIN_BATCH = 2           # the README: "set to no. GPUS used"
SFT_MICRO, RLHF_MICRO = 12, 4
PREF_MICRO = SFT_MICRO // 2   # train_sft_pref's --rlhf_micro_train_batch_size $(($sft_micro_train_batch_size/2))
N_SFT_PREF, N_SFT, N_RLHF = 72, 72, 72   # --max_samples / --sft_max_samples / --rlhf_max_samples (README: 24000/8000)
EPOCHS = 2                # README: 6


def xright_steps(n: int, loader_batch: int, epochs: int, ds_micro: int = 1) -> tuple[int, int]:
    """XRIGHT's arithmetic: (optimizer steps, micro-batches per step). Its DeepSpeed config has a micro batch of
    ``ds_micro`` (1 in the joint CLIs, --micro_train_batch_size in train_sft_pref), so DeepSpeed accumulates
    train_batch_size / (ds_micro × world) loader batches; an epoch is one pass of the (SFT) loader, whose
    DistributedSampler and DataLoader drop the remainders: (n // world) // loader_batch batches per rank."""
    accum = TRAIN_BATCH // (ds_micro * WORLD)
    return epochs * ((n // WORLD) // loader_batch) // accum, accum


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def hh_row(i):
    a, b = i % 17, i // 17 + 3
    prompt = f"\n\nHuman: What is {a} plus {b}?\n\nAssistant:"
    return {"prompt": prompt, "response": f" {a + b}.", "chosen": f" {a + b}.",
            "rejected": f" Hmm, maybe {a + b + 1}? I am not sure about that one."}


def alpaca_row(i):
    a, b = i % 13, i // 13 + 2
    return {"instruction": f"Multiply {a} by {b}.", "input": "", "output": f"{a * b}",
            "text": f"### Instruction:\nMultiply {a} by {b}.\n\n### Response:\n{a * b}"}


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    from xright.models import load_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("paper")
    base = str(root / "pythia-tiny")
    load_model("tiny", seed=42).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    rm = str(root / "rm-hh-rlhf")   # the hub set has train and test splits
    write_jsonl(f"{rm}/train.jsonl", [hh_row(i) for i in range(N_RLHF + 8)])
    write_jsonl(f"{rm}/test.jsonl", [hh_row(1000 + i) for i in range(8)])
    alpaca = str(root / "alpaca-gpt4")  # train only, as on the hub
    write_jsonl(f"{alpaca}/train.jsonl", [alpaca_row(i) for i in range(N_SFT + 8)])
    out = {k: str(root / k) for k in ("sft-pref-optim", "sft_dpo_alright", "sft_dpo_maxright")}
    procs = {}
    common = ["--save_steps", "-1", "--logging_steps", "1", "--train_batch_size", str(TRAIN_BATCH),
              "--pretrain", base, "--bf16", "--max_epochs", str(EPOCHS), "--zero_stage", "2",
              "--learning_rate", "5e-5", "--lora_rank", "32", "--lora_alpha", "32", "--use_wandb", "True",
              "--target_module", "query_key_value"]
    joint = ["--eval_steps", "100", "--rlhf_dataset", rm, "--rlhf_micro_train_batch_size", str(RLHF_MICRO),
             "--rlhf_max_samples", str(N_RLHF), "--rlhf_max_len", "2048", "--rlhf_eval_split", "dummy",
             "--sft_dataset", alpaca, "--sft_max_samples", str(N_SFT), "--sft_max_len", "2048",
             "--sft_micro_train_batch_size", str(SFT_MICRO), "--lambd", "0.5", "--ref_pretrain", out["sft-pref-optim"],
             "--beta", "0.1", "--input_key", "instruction"]
    wandb = {"WANDB_MODE": "offline", "WANDB_DIR": str(root)}
    plan = [  # in one launch, in order: the joint runs start from the SFT run's model
        {"module": "train_sft_pref", "env": wandb, "args": [
            "--save_path", out["sft-pref-optim"], "--ckpt_path", str(root / "ckpt_sft"), *common,
            "--eval_steps", "-1", "--dataset", rm, "--max_samples", str(N_SFT_PREF), "--max_len", "2048",
            "--eval_split", "dummy", "--rlhf_micro_train_batch_size", str(PREF_MICRO)]},
        {"module": "train_sft_dpo_alright", "env": wandb, "args": [
            "--save_path", out["sft_dpo_alright"], "--ckpt_path", str(root / "ckpt_alright"), *joint, *common]},
        {"module": "train_sft_dpo_maxright", "env": wandb, "args": [
            "--save_path", out["sft_dpo_maxright"], "--ckpt_path", str(root / "ckpt_maxright"), *joint,
            "--sft_opt", "1.4980", "--dpo_opt", "0.0647", "--ref_pareto_sft", "", "--ref_pareto_dpo", "",
            "--max_eval_steps", "2", *common]},
    ]
    procs = dict(zip(out, run_many(plan, str(root / "launch"))))
    return root, out, procs


def check_saved_lora(path):
    """The run saved a LoRA adapter on query_key_value only, and training moved it (lora_B starts at 0)."""
    with open(os.path.join(path, "adapter_config.json")) as f:
        assert json.load(f)["target_modules"] == ["query_key_value"]
    weights = load_file(os.path.join(path, "adapter_model.safetensors"))
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert b and all("query_key_value" in k for k in weights)
    assert all(float(v.float().abs().max()) > 0 for v in b)
    assert os.path.exists(os.path.join(path, "tokenizer.json"))


def batches(path):
    with open(os.path.join(path, "batches.json")) as f:
        return json.load(f)["objectives"]


def check_objective(got, per_rank, accum, steps_picked):
    assert (got["examples_per_rank_per_micro_batch"], got["micro_batches_per_step"]) == (per_rank, accum)
    assert got["examples_per_step"] == per_rank * accum * WORLD
    assert got["examples_drawn"] == steps_picked * per_rank * accum * WORLD


def test_reference_sft_on_chosen(paper):
    root, out, procs = paper
    steps, accum = xright_steps(N_SFT_PREF, PREF_MICRO, EPOCHS, ds_micro=1)  # its --micro_train_batch_size: 1
    assert (steps, accum) == (12, 1)
    recs = train_records(out["sft-pref-optim"])
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    assert all(r["objectives"] == ["sft"] and math.isfinite(r["train/sft/loss"]) for r in recs)
    check_objective(batches(out["sft-pref-optim"])["sft"], PREF_MICRO, accum, steps)
    assert f"sft: {PREF_MICRO} examples per rank per micro-batch × 1 micro-batches per optimizer step × 2 ranks = " \
           f"{PREF_MICRO * WORLD} examples per optimizer step" in procs["sft-pref-optim"].stdout
    check_saved_lora(out["sft-pref-optim"])
    # eval_split dummy: the first 3 % of the 72 records, two examples, one per rank
    assert any("eval/sft/loss" in r for r in metrics(out["sft-pref-optim"]))
    assert any(name.startswith("offline-run") for _, dirs, _ in os.walk(root) for name in dirs)  # wandb, offline


@pytest.mark.parametrize("run", ["sft_dpo_alright", "sft_dpo_maxright"])
def test_joint_runs_take_xrights_steps(paper, run):
    _, out, procs = paper
    steps, accum = xright_steps(N_SFT, SFT_MICRO, EPOCHS)  # an epoch is one pass over the SFT loader
    assert (steps, accum) == (6, 1)
    recs = train_records(out[run])
    assert [r["step"] for r in recs] == list(range(1, steps + 1))
    assert all(len(r["objectives"]) == 1 for r in recs)  # one objective per optimizer step
    picked = {k: sum(r["objectives"] == [k] for r in recs) for k in ("sft", "dpo")}
    got = batches(out[run])
    check_objective(got["sft"], SFT_MICRO, accum, picked["sft"])
    check_objective(got["dpo"], RLHF_MICRO, accum, picked["dpo"])
    for k, micro in (("sft", SFT_MICRO), ("dpo", RLHF_MICRO)):
        assert all(math.isfinite(r[f"train/{k}/loss"]) for r in recs if r["objectives"] == [k])
        assert f"{k}: {micro} examples per rank per micro-batch × 1 micro-batches per optimizer step × 2 ranks" \
            in procs[run].stdout
    check_saved_lora(out[run])
    evals = [r for r in metrics(out[run]) if "eval/dpo/loss" in r]
    assert evals and evals[0]["step"] == 0  # both objectives are evaluated at the start, as XRIGHT
    if run == "sft_dpo_maxright":  # stale losses refreshed every --max_eval_steps 2 steps
        assert [r["step"] for r in recs if "refresh/sft" in r] == [1, 3, 5]
