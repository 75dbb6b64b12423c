"""Exact resume: a run killed after a checkpoint and resumed with --load_checkpoint produces the same
per-step losses and picks as an uninterrupted run (fp32 on CPU: bitwise)."""

import json
import math
import os
import pathlib
import random
import re
import signal
import subprocess
import time

import pytest
import torch

from launch import (ROOT, assert_no_shm_left, env, final_eval, launcher_cmd, metrics, launch_named, run_cli, run_many,
                    train_records)

STEPS, SAVE = 16, 4
BASE = ["--train_batch_size", "8", "--learning_rate", "2e-3", "--max_steps", str(STEPS), "--save_steps", str(SAVE),
        "--max_samples", "64", "--eval_steps", "6", "--logging_steps", "1"]
CASES = {
    "sft": ("train_sft", ["--micro_train_batch_size", "2", "--packing_samples", "--group_by_length"]),
    "dpo": ("train_dpo", ["--micro_train_batch_size", "2"]),
    "alright": ("train_sft_dpo_alright", ["--sft_micro_train_batch_size", "4", "--rlhf_micro_train_batch_size", "2",
                                          "--sft_max_samples", "64", "--rlhf_max_samples", "48"]),
    "maxright": ("train_sft_dpo_maxright", ["--sft_micro_train_batch_size", "4", "--rlhf_micro_train_batch_size", "2",
                                            "--sft_max_samples", "64", "--rlhf_max_samples", "48",
                                            "--max_eval_steps", "3"]),
}


def args_for(case, zero, out):
    module, extra = CASES[case]
    extra = [a for a in extra]
    if case in ("alright", "maxright"):
        # XRIGHT's joint CLIs count --train_batch_size in loader batches: 2 on 2 ranks is one per rank per step
        base = [a for a in BASE if a not in ("--max_samples", "64")]
        base[base.index("--train_batch_size") + 1] = "2"
        extra = base + extra
    else:
        extra = BASE + extra
    if case == "dpo" and zero == "3":  # resume under LoRA too (the reference is the adapter-less policy), with
        # dropout: a resume that did not restore the torch RNG would draw other dropout masks
        extra += ["--lora_rank", "4", "--lora_alpha", "8", "--lora_dropout", "0.1"]
    return module, ["--zero_stage", zero, "--save_path", out, "--ckpt_path", os.path.join(out, "ckpt"), *extra]


def trajectory(out):
    return [(r["step"], r["objectives"], {k: v for k, v in r.items() if k.startswith(("train/", "stale/"))})
            for r in train_records(out)]


def launch_and_kill(module, args, at_step, sig):
    """Start a 2-rank run and send ``sig`` to its whole process group once it has logged ``at_step``."""
    cmd, port = launcher_cmd(module, args)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    out = args[args.index("--save_path") + 1]
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if any(r.get("step", 0) >= at_step and "objectives" in r for r in metrics(out)):
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted:\n" + proc.stdout.read()[-3000:]
    os.killpg(proc.pid, sig)
    log = proc.communicate(timeout=120)[0]
    assert_no_shm_left(port)
    return proc.returncode, log


REFERENCES = [("maxright", "3"), ("dpo", "3"), ("sft", "2"), ("alright", "3"), ("maxright", "2")]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One launch for every uninterrupted run of this file: the reference run of each (case, ZeRO stage)
    the interrupted runs are compared with, and the non-finite-loss runs (fault injected by their env).
    name -> (save path, process)."""
    root = tmp_path_factory.mktemp("launched")
    # args_for's --save_path (and the --ckpt_path inside it) is root/name: launch_named's own is the same
    plan = {f"ref-{c}-z{z}": args_for(c, z, str(root / f"ref-{c}-z{z}")) for c, z in REFERENCES}
    for zero in ("2", "3"):  # rank 1's loss only: every rank must skip
        module, args = args_for("sft", zero, str(root / f"skip-z{zero}"))
        plan[f"skip-z{zero}"] = (module, [*args, "--skip_nonfinite"], {"XRIGHT_DEBUG_NAN_AT_STEP": "6:1"})
    plan["nan"] = (*args_for("sft", "2", str(root / "nan")), {"XRIGHT_DEBUG_NAN_AT_STEP": "6"})
    return launch_named(root, {2: plan})


@pytest.fixture(scope="module")
def reference_run(launched):
    """The uninterrupted run's trajectory of a (case, ZeRO stage)."""
    def get(case, zero):
        return trajectory(launched(f"ref-{case}-z{zero}")[0])
    return get


# SIGKILL at a random step after a checkpoint, then --load_checkpoint. The alright/ZeRO-3 and
# maxright/ZeRO-2 resumes are the SIGTERM and kill-during-save tests below; these cover the rest:
# MAXRIGHT's stale losses and probe loaders under ZeRO-3, LoRA (reference = adapter-less policy)
# under ZeRO-3, and plain SFT under ZeRO-2.
@pytest.mark.parametrize("case,zero", [("maxright", "3"), ("dpo", "3"), ("sft", "2")])
def test_sigkill_then_resume_is_exact(tmp_path, reference_run, case, zero):
    module, args = args_for(case, zero, str(tmp_path / "cut"))
    kill_at = random.Random(f"{case}{zero}").randint(SAVE + 1, STEPS - 4)
    launch_and_kill(module, args, kill_at, signal.SIGKILL)
    assert not any(r.get("done") for r in metrics(str(tmp_path / "cut")))
    proc = run_cli(module, [*args, "--load_checkpoint"])
    assert "resumed from" in proc.stdout
    assert trajectory(str(tmp_path / "cut")) == reference_run(case, zero)
    assert len(reference_run(case, zero)) == STEPS
    # each rank saved its own RNG, accelerator included, and the ranks' torch seeds differ (dropout masks)
    ckpt = tmp_path / "cut" / "ckpt"
    ranks = json.loads((ckpt / (ckpt / "latest").read_text().strip() / "xright_state.json").read_text())["ranks"]
    assert len(ranks) == 2 and all("accelerator" in r for r in ranks) and ranks[0]["torch"] != ranks[1]["torch"]


def test_sigterm_saves_and_resumes_exactly(tmp_path, reference_run):
    module, args = args_for("alright", "3", str(tmp_path / "cut"))
    args[args.index("--save_steps") + 1] = "100"  # no periodic checkpoints: SIGTERM makes the only one
    code, log = launch_and_kill(module, args, 7, signal.SIGTERM)
    # every rank checkpointed and exited 143 (128 + SIGTERM: not finished); the `deepspeed` runner, which got
    # the SIGTERM too, dies of it (a shell sees 143 either way)
    assert log.count("stopped by SIGTERM before the last step (exit code 143)") == 2, log[-3000:]
    assert "terminate called" not in log and code == -signal.SIGTERM, (code, log[-3000:])
    ckpt = str(tmp_path / "cut" / "ckpt")
    assert os.path.exists(os.path.join(ckpt, "latest")), log[-3000:]
    assert not os.path.exists(os.path.join(str(tmp_path / "cut"), "config.json"))  # no final model: not finished
    proc = run_cli(module, [*args, "--load_checkpoint"])
    assert "resumed from" in proc.stdout
    assert trajectory(str(tmp_path / "cut")) == reference_run("alright", "3")


def test_kill_during_checkpoint_write_keeps_previous(tmp_path, monkeypatch, reference_run):
    module, args = args_for("maxright", "2", str(tmp_path / "cut"))
    expected = reference_run("maxright", "2")
    monkeypatch.setenv("XRIGHT_DEBUG_CRASH_IN_CHECKPOINT", str(2 * SAVE))
    proc = run_cli(module, args, check=False)
    assert proc.returncode == 9  # the debug crash's own code, passed on by the launcher
    ckpt = str(tmp_path / "cut" / "ckpt")
    with open(os.path.join(ckpt, "latest")) as f:
        assert f.read().strip() == f"global_step{SAVE}"  # the half-written step-8 checkpoint is not the latest
    monkeypatch.delenv("XRIGHT_DEBUG_CRASH_IN_CHECKPOINT")
    proc = run_cli(module, [*args, "--load_checkpoint"])
    assert f"global_step{SAVE} at step {SAVE}" in proc.stdout
    assert trajectory(str(tmp_path / "cut")) == expected


def test_nonfinite_loss_stops_with_checkpoint_intact(launched):
    out, proc = launched("nan", ok=False)
    out = pathlib.Path(out)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 3 and "non-finite sft loss (nan) at step 6" in text, text[-3000:]
    assert "builtin:sft:train:" in text  # the batch's example ids are named
    with open(out / "ckpt" / "latest") as f:
        assert f.read().strip() == f"global_step{SAVE}"
    assert max(r["step"] for r in train_records(str(out))) == 5
    assert not (out / "config.json").exists()


@pytest.mark.parametrize("zero", ["2", "3"])
def test_skip_nonfinite_discards_the_step_and_trains_on(launched, zero):
    out, proc = launched(f"skip-z{zero}")
    out = pathlib.Path(out)
    assert "skipped 1 optimizer step(s)" in proc.stdout
    recs = {r["step"]: r for r in train_records(str(out))}
    assert sorted(recs) == list(range(1, STEPS + 1))
    assert recs[6]["skipped"].startswith("non-finite sft loss (nan) at step 6, from the batch of rank 1 (examples "
                                         "builtin:sft:train:") and recs[6]["skipped_nonfinite"] == 1
    assert "train/sft/loss" not in recs[6]
    # the NaN gradients never reached the weights: every later loss is finite, the model saved
    assert all(math.isfinite(recs[s]["train/sft/loss"]) for s in range(7, STEPS + 1))
    assert (out / "config.json").exists() and math.isfinite(final_eval(str(out))["eval/sft/loss"])
    # the discarded step did not advance the learning-rate schedule either (each step logs the rate it applied:
    # step 7 applies step 6's again)
    assert recs[7]["lr"] == recs[6]["lr"] and recs[6]["lr"] != recs[5]["lr"] and recs[8]["lr"] != recs[7]["lr"]
    assert [r for r in metrics(str(out)) if r.get("done")][-1]["skipped_nonfinite"] == 1


def test_skip_nonfinite_needs_a_zero_optimizer_that_checks(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2},
                              "bf16": {"enabled": True, "check_grad_overflow": False}}))
    z0, bf16 = run_many([
        {"module": "train_sft", "args": ["--zero_stage", "0", "--skip_nonfinite", "--save_path", str(tmp_path / "z0")]},
        {"module": "train_sft", "args": ["--deepspeed", str(ds), "--skip_nonfinite", "--save_path", str(tmp_path / "b")]},
    ], str(tmp_path / "launch"), nproc=1, check=False)
    assert z0.returncode == 2 and "--skip_nonfinite needs --zero_stage 1, 2 or 3" in z0.stderr
    assert bf16.returncode == 2 and "contradicts bf16.check_grad_overflow = false" in bf16.stderr


def test_checkpoint_from_other_model_batch_or_data_is_refused(tmp_path):
    """Another world size or micro batch at the same global batch resumes (tests/test_ranks.py); what would
    give the saved state another meaning is refused before training, saying why."""
    out = str(tmp_path / "one")
    args = ["--save_path", out, "--ckpt_path", os.path.join(out, "ckpt"), "--max_steps", "2", "--save_steps", "2",
            "--train_batch_size", "4", "--micro_train_batch_size", "2", "--zero_stage", "2"]
    # one process: the run, then resumes that must be refused (each in its own fresh CLI main), then one that works
    first, lora, batch, data, split, micro = run_many([
        {"module": "train_sft", "args": args},
        {"module": "train_sft", "args": [*args, "--load_checkpoint", "--lora_rank", "4"], "check": False},
        # another global batch or other data would silently give the saved loader position another meaning
        {"module": "train_sft", "args": [*args, "--load_checkpoint", "--train_batch_size", "8"], "check": False},
        {"module": "train_sft", "args": [*args, "--load_checkpoint", "--max_samples", "40"], "check": False},
        # a global batch that the world size × micro batch does not divide
        {"module": "train_sft", "args": [*args, "--load_checkpoint", "--micro_train_batch_size", "3"], "check": False},
        {"module": "train_sft", "args": [*args, "--load_checkpoint", "--micro_train_batch_size", "1",
                                         "--max_steps", "3"]},
    ], str(tmp_path / "launch"), nproc=1)
    assert first.returncode == 0
    assert lora.returncode == 2 and "has lora_rank=0 but this run has lora_rank=4" in lora.stderr
    assert batch.returncode == 2 and ("has examples_per_step={'sft': 4} but this run has examples_per_step={'sft': 8}; "
                                      "its loader positions count optimizer steps of that many examples: resume with "
                                      "the same --train_batch_size") in batch.stderr, batch.stderr
    assert data.returncode == 2 and re.search(r"has data=\{'sft': '\d+ examples, ids sha256 \w+'\} but this run has "
                                              r"data=\{'sft': '40 examples, ids sha256 \w+'\}", data.stderr), data.stderr
    assert split.returncode == 2 and (
        "--train_batch_size 4 must be a positive multiple of sft micro batch size 3 × world size 1 = 3 (each optimizer "
        "step splits its examples evenly over ranks and micro-batches); with 1 rank a micro batch size of 1, 2, 4 "
        "would work") in split.stderr, split.stderr
    assert micro.returncode == 0 and f"resumed from {os.path.join(out, 'ckpt')}/global_step2 at step 2" in micro.stdout


def test_prune_keeps_the_newest(tmp_path):
    from xright.files import prune_checkpoints as _prune

    for step in (2, 4, 6, 8):
        d = tmp_path / f"global_step{step}"
        d.mkdir()
        (d / "w").write_bytes(b"x" * 1000)
    (tmp_path / ".tmp-global_step10").mkdir()
    _prune(str(tmp_path), keep="global_step8", max_num=2, max_gb=1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step6", "global_step8"]
    _prune(str(tmp_path), keep="global_step8", max_num=5, max_gb=1500 / 2**30)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global_step8"]


# ---- checkpoint files and RNG, in one process (a stand-in engine and accelerator) ---------------------------

class _Accelerator:
    """Stands in for DeepSpeed's accelerator with a generator of its own (a GPU's RNG)."""

    def __init__(self):
        self.gen = torch.Generator().manual_seed(0)

    def get_rng_state(self):
        return self.gen.get_state()

    def set_rng_state(self, state):
        self.gen.set_state(state)

    def manual_seed(self, seed):
        self.gen.manual_seed(seed)

    manual_seed_all = manual_seed


class _Engine:
    def __init__(self):
        self.saved = []

    def save_checkpoint(self, ckpt_dir, tag, save_latest):
        os.makedirs(os.path.join(ckpt_dir, tag))
        with open(os.path.join(ckpt_dir, tag, "weights"), "w") as f:
            f.write(tag)
        self.saved.append(tag)

    def load_checkpoint(self, ckpt_dir, tag, **kwargs):
        return os.path.join(ckpt_dir, tag), {}


def _strategy(monkeypatch, rank=0, seed=42):
    from xright import strategy as S

    accel = _Accelerator()
    monkeypatch.setattr(S, "get_accelerator", lambda: accel)
    s = S.Strategy.__new__(S.Strategy)
    s.rank, s.world_size, s.seed, s._last_checkpoint = rank, 1, seed, None
    return s, accel


def test_checkpoint_saves_and_restores_the_accelerator_rng(tmp_path, monkeypatch):
    s, accel = _strategy(monkeypatch)
    torch.rand(3, generator=accel.gen)
    at_save = accel.get_rng_state().clone()
    s.save_checkpoint(_Engine(), str(tmp_path), 3, {"step": 3}, {"torch": "cpu state"})
    torch.rand(5, generator=accel.gen)  # the run goes on: dropout on the GPU
    state = s.load_checkpoint(_Engine(), str(tmp_path), {})
    assert torch.equal(accel.get_rng_state(), at_save)
    assert state["ranks"][0]["torch"] == "cpu state" and state["ranks"][0]["accelerator"] == at_save.tolist()


def test_each_rank_gets_its_own_seed_for_dropout(monkeypatch):
    draws = {}
    for rank in (0, 1, 0):
        s, accel = _strategy(monkeypatch, rank=rank, seed=5)
        s.seed_rank()
        draws.setdefault(rank, []).append((torch.rand(4), torch.rand(4, generator=accel.gen)))
    (cpu0, acc0), (cpu0b, acc0b) = draws[0]
    (cpu1, acc1), = draws[1]
    assert torch.equal(cpu0, cpu0b) and torch.equal(acc0, acc0b)  # reproducible per rank
    assert not torch.equal(cpu0, cpu1) and not torch.equal(acc0, acc1)  # different across ranks


def test_saving_the_same_step_again_never_removes_the_latest_checkpoint(tmp_path, monkeypatch):
    # SIGTERM right after a scheduled save saves the same step again; a SIGKILL may come at any moment of it
    from xright import strategy as S

    s, _ = _strategy(monkeypatch)
    engine, ckpt = _Engine(), str(tmp_path)
    s.save_checkpoint(engine, ckpt, 4, {"step": 4}, {})
    rmtree = S.shutil.rmtree

    def killed_after_removing(path, *a, **k):
        rmtree(path, *a, **k)
        if os.path.basename(path) == "global_step4":
            raise KeyboardInterrupt("SIGKILL")

    monkeypatch.setattr(S.shutil, "rmtree", killed_after_removing)
    try:
        s.save_checkpoint(engine, ckpt, 4, {"step": 4}, {})
    except KeyboardInterrupt:
        pass
    monkeypatch.setattr(S.shutil, "rmtree", rmtree)
    assert s.load_checkpoint(_Engine(), ckpt, {})["step"] == 4
    assert engine.saved == [".tmp-global_step4"]  # the identical second save was skipped, not rewritten
    s.save_checkpoint(engine, ckpt, 8, {"step": 8}, {})
    assert s.load_checkpoint(_Engine(), ckpt, {})["step"] == 8
    # another state at the same step (a new run in an old --ckpt_path) replaces it, leaving nothing behind
    s.save_checkpoint(engine, ckpt, 8, {"step": 8, "run": 2}, {})
    assert s.load_checkpoint(_Engine(), ckpt, {})["run"] == 2
    assert sorted(os.listdir(ckpt)) == ["global_step4", "global_step8", "latest"]
