"""Helpers for tests that run the CLIs: under the deepspeed launcher (2 CPU ranks) or as one process."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline", HF_HUB_OFFLINE="1",
             PYTHONUNBUFFERED="1")
    # an in-process run in this pytest process leaves its rendezvous in os.environ (Strategy sets them for a
    # world of one) and its store may still listen on MASTER_PORT: a child must pick its own
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(key, None)
    return e


def launcher_cmd(module: str, args: list[str], nproc: int = 2) -> tuple[list[str], int]:
    port = free_port()
    return ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(port),
            "--module", f"xright.cli.{module}", *args], port


def assert_no_shm_left(port: int) -> None:
    """DeepSpeed's CPU comm op leaves ~69 MB per rank in RAM-backed /dev/shm unless xright unlinks it."""
    left = glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")
    assert not left, f"shared-memory buffers left behind: {left}"


def run_cli(module: str, args: list[str], nproc: int = 2, timeout: int = 600, check: bool = True):
    """Run ``xright.cli.<module>``; with nproc > 1 under ``deepspeed --num_gpus nproc``."""
    port = None
    if nproc > 1:
        cmd, port = launcher_cmd(module, args, nproc)
    else:
        cmd = [sys.executable, "-m", f"xright.cli.{module}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    if port is not None:
        assert_no_shm_left(port)
    return proc


def metrics(save_path: str) -> list[dict]:
    with open(os.path.join(save_path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_records(save_path: str) -> list[dict]:
    return [r for r in metrics(save_path) if "objectives" in r]


def final_eval(save_path: str) -> dict:
    return [r for r in metrics(save_path) if r.get("final")][-1]
