"""A wandb token passed with --use_wandb is never printed, logged or written anywhere by the run."""

import os

from launch import run_cli

TOKEN = "fake0wandb0token0" + "7f3a9c1e5b2d4068"


def test_wandb_token_never_written(tmp_path, monkeypatch):
    out, wandb_dir = tmp_path / "run", tmp_path / "wandb"
    wandb_dir.mkdir()
    monkeypatch.setenv("WANDB_DIR", str(wandb_dir))
    monkeypatch.setenv("WANDB_MODE", "offline")
    proc = run_cli("train_sft", ["--use_wandb", TOKEN, "--save_path", str(out), "--max_steps", "2",
                                 "--train_batch_size", "4", "--micro_train_batch_size", "2", "--zero_stage", "0",
                                 "--save_steps", "1", "--ckpt_path", str(out / "ckpt")], nproc=1)
    assert TOKEN not in proc.stdout and TOKEN not in proc.stderr
    written = [os.path.join(root, n) for d in (out, wandb_dir) for root, _, names in os.walk(d) for n in names]
    assert any(p.endswith("metrics.jsonl") for p in written)
    assert any("wandb" in p for p in written)  # the offline wandb run really happened
    for path in written:
        with open(path, "rb") as f:
            assert TOKEN.encode() not in f.read(), path
