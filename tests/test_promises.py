"""README promises that no other test file pins down (issue 21): each test here fails when its promise breaks.

In this process: the compatibility flags' defaults and help, EXO's one forward, the RNG state a checkpoint
carries, XRIGHT's zip pairing under ``--equal_length`` (a real one-process DeepSpeed run). One 2-rank launch
whose ranks run the real CLI processes, so that each rank's exit code is the one the operating system sees
(2 bad input, 3 non-finite, 143 SIGTERM) and the launcher passes it on. (The other promises' runs join the
shared launches of test_joint_cli, test_train_e2e and test_resume.)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from launch import ROOT, assert_no_shm_left, env, free_port, train_records
from test_flags import _no_process_group_after_this_module, in_process  # noqa: F401 (an autouse fixture)
from xright.data import CyclingLoader, DataSpec, collate, load_data
from xright.data.synthetic import preference_records
from xright.models import load_model, load_tokenizer
from xright.objectives import EXO, Reference
from xright.trainer import Trainer, _rng_state, _set_rng_state

TOK = load_tokenizer("tiny")
QUIET = dict(log=lambda *a: None)




# ---- flags kept for compatibility: XRIGHT's defaults, and --help says they do nothing ----------------------

# XRIGHT's (OpenRLHF 0.3.6's) defaults of the flags xright accepts without using them
COMPAT_DEFAULTS = {"aux_loss_coef": "0", "ideal_dist": "0.0", "value_head_prefix": "value_head"}
TRAIN_CLIS = ["train_sft", "train_sft_pref", "train_dpo", "train_kto", "train_rm", "train_exo", "train_joint",
              "train_sft_dpo_alright", "train_sft_dpo_maxright", "train_sft_dpo_mix", "train_sft_seq",
              "train_dpo_seq"]


def help_entries(module: str) -> dict[str, str]:
    """--flag -> its whole --help entry (flag line and wrapped help, whitespace collapsed)."""
    import importlib

    cli = importlib.import_module(f"xright.cli.{module}")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e, \
            pytest.MonkeyPatch.context() as mp:
        mp.setenv("COLUMNS", "200")
        cli.main(["--help"])
    assert e.value.code == 0
    entries, flag = {}, None
    for line in out.getvalue().splitlines():
        words = line.split()
        if line.startswith("  --") and words:
            flag = words[0].rstrip(",")
            entries[flag] = line
        elif flag and line.startswith("    ") and words:
            entries[flag] += " " + line
        else:
            flag = None
    return {k: " ".join(v.split()) for k, v in entries.items()}


@pytest.mark.parametrize("module", TRAIN_CLIS)
def test_compatibility_flags_keep_xright_defaults_and_say_so(module):
    from xright.cli import flags

    entries = help_entries(module)
    compat = {f for f, text in entries.items() if " ".join(flags.COMPAT.split()) in text}
    assert "--aux_loss_coef" in compat  # every training CLI of XRIGHT has it
    if module.startswith("train_sft_dpo") or module.endswith("_seq"):  # XRIGHT's joint CLIs
        assert "--ideal_dist" in compat
    if module == "train_rm":
        assert "--value_head_prefix" in compat
    for flag in compat:
        name = flag.lstrip("-")
        assert name in COMPAT_DEFAULTS, f"{module}: {flag} is new as a compatibility flag: add XRIGHT's default here"
        assert entries[flag].endswith(f"(default: {COMPAT_DEFAULTS[name]})"), (module, entries[flag])


# ---- EXO: the K completions of every prompt in one forward -------------------------------------------------

@pytest.mark.parametrize("packed", [False, True])
def test_exo_runs_its_k_completions_in_one_forward(tmp_path, packed):
    data = tmp_path / "scored.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"], "no"],
                                        "rewards": [1.0, 0.0, -1.0]}) + "\n" for r in preference_records(4, seed=0)))
    exs, _ = load_data(DataSpec(kind="scored", dataset=str(data), eval_split="", max_len=512), TOK, **QUIET)
    batch = collate("scored", exs, TOK.pad_token_id, packed=packed)
    policy = load_model("tiny", seed=1, packing=packed).eval()
    reference = Reference(model=load_model("tiny", seed=2, trainable=False, packing=packed))
    exo = EXO("exo-rw", beta=0.1, beta_r=0.5)
    with torch.no_grad():  # the first call also checks each model's head once (xright.logprobs): not counted
        exo(policy, reference, batch)
    rows = []  # counted at the input embedding: every forward of the decoder passes it, whatever calls it
    hook = policy.get_input_embeddings().register_forward_hook(lambda m, args, out: rows.append(args[0].shape))
    try:
        with torch.no_grad():
            exo(policy, reference, batch)
    finally:
        hook.remove()
    tokens = sum(len(e["prompt_ids"]) + len(r) for e in exs for r in e["responses"])
    assert len(rows) == 1, rows
    assert (rows[0][0] == 1 and rows[0][1] == tokens) if packed else rows[0][0] == 3 * len(exs)


# ---- the RNGs a checkpoint carries ---------------------------------------------------------------------

def test_checkpoint_rng_state_restores_python_numpy_and_torch():
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    state = json.loads(json.dumps(_rng_state()))  # as the checkpoint stores it (JSON)
    first = (random.random(), float(np.random.rand()), torch.rand(3))
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    _set_rng_state(state)
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert first[:2] == again[:2] and torch.equal(first[2], again[2])


# ---- --equal_length: XRIGHT's zip, batch by batch ------------------------------------------------------

EQ_STEPS, EQ_PER_EPOCH = 10, 4


def test_equal_length_trains_on_xrights_zip_of_the_loaders(tmp_path):
    """XRIGHT zips the SFT and preference loaders: step i of a joint epoch trains the picked objective on
    batch i of that loader's epoch (the other one's batch i is drawn and dropped) and every epoch restarts
    both. The batches each step trained on (example ids) must be exactly those."""
    from xright.cli import train_sft_dpo_alright

    out = tmp_path / "eq"
    trained = []
    step = Trainer.train_step

    def spy(self, plan):
        result = step(self, plan)
        trained.append({k: list(v) for k, v in self._last_ids.items()})
        return result

    # 8 SFT examples in batches of 2: a joint epoch of 4 steps; 24 pairs: 12 batches, so without the restart
    # the preference loader would go on in its epoch 0
    with in_process(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_step", spy)
        train_sft_dpo_alright.main([
            "--zero_stage", "2", "--train_batch_size", "1", "--sft_micro_train_batch_size", "2",
            "--rlhf_micro_train_batch_size", "2", "--sft_max_samples", "8", "--rlhf_max_samples", "24",
            "--max_steps", str(EQ_STEPS), "--equal_length", "--lambd", "0.5", "--eval_steps", "1000",
            "--learning_rate", "1e-3", "--save_path", str(out), "--ckpt_path", str(out / "ckpt")])
    picks = [r["objectives"] for r in train_records(str(out))]
    assert len(trained) == len(picks) == EQ_STEPS and {p[0] for p in picks} == {"sft", "dpo"}
    zipped = {}
    for name, kind, n in (("sft", "sft", 8), ("dpo", "pairwise", 24)):
        examples, _ = load_data(DataSpec(kind=kind, max_samples=n, max_len=2048 if kind == "sft" else 512), TOK,
                                **QUIET)
        loader = CyclingLoader(examples, kind, 2, TOK.pad_token_id, seed=42)
        zipped[name] = []
        for epoch in range(EQ_STEPS // EQ_PER_EPOCH + 1):
            loader.load_state_dict({"epoch": epoch, "examples": 0, "seed": 42})
            zipped[name] += [loader.next()["ids"] for _ in range(EQ_PER_EPOCH)]
    assert trained == [{p[0]: zipped[p[0]][s]} for s, p in enumerate(picks)]


# ---- every rank exits with its own code, and the launcher passes it on ---------------------------------

def test_every_rank_exits_with_its_code_under_the_launcher(tmp_path):
    """Under ``deepspeed --num_gpus 2``, each rank's process (as the OS sees it) exits 2 on bad input, 3 when
    one rank's loss is NaN, 143 when rank 0 alone gets SIGTERM (rank 1 stops on rank 0's word); the launch
    exits with the last of them."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "q", "output": "a"}\n{"input": "q"}\n')
    small = ["--train_batch_size", "4", "--micro_train_batch_size", "2", "--max_samples", "16", "--eval_steps",
             "1000"]
    runs = [
        {"module": "train_sft", "args": ["--dataset", str(bad), "--eval_split", "", *small]},
        {"module": "train_sft", "args": [*small, "--max_steps", "2"], "env": {"XRIGHT_DEBUG_NAN_AT_STEP": "1:1"}},
        {"module": "train_sft", "args": [*small, "--max_steps", "500"], "sigterm_at_step": 2},
    ]
    for i, run in enumerate(runs):
        out = str(tmp_path / f"run{i}")
        run.update(port=free_port(), save_path=out)
        run["args"] += ["--save_path", out, "--ckpt_path", os.path.join(out, "ckpt")]
    with open(tmp_path / "plan.json", "w") as f:
        json.dump({"workdir": str(tmp_path), "runs": runs}, f)
    port = free_port()
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(port), "--no_local_rank",
                           os.path.join(ROOT, "tests", "rank_codes.py"), str(tmp_path / "plan.json")],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    codes = [json.load(open(tmp_path / f"codes.rank{r}.json")) for r in range(2)]

    def text(i):
        return "".join(open(tmp_path / f"run{i}.rank{r}.{s}").read() for r in range(2) for s in ("out", "err"))
    assert codes == [[2, 3, 143], [2, 3, 143]], (codes, text(0)[-2000:], text(1)[-2000:], text(2)[-2000:])
    assert proc.returncode == 143, proc.stderr[-3000:]
    assert text(0).count("bad.jsonl line 2: field 'output'") == 2
    assert text(1).count("non-finite sft loss (nan) at step 1") == 2
    assert text(2).count("stopped by SIGTERM before the last step (exit code 143)") == 2
    assert os.path.exists(tmp_path / "run2" / "ckpt" / "latest")
    for r in range(2):
        assert "Traceback" not in open(tmp_path / f"run2.rank{r}.err").read()
    for run in runs:
        assert_no_shm_left(run["port"])
