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


def run_many(runs: list[dict], workdir: str, nproc: int = 2, timeout: int = 900,
             check: bool = True) -> list[subprocess.CompletedProcess]:
    """Several CLI runs in one launch (``tests/multirun.py``): ``runs`` = [{"module", "args", "env"?,
    "check"?}]. Returns one CompletedProcess per run: its exit code as the CLI decides it, and its output
    (rank 0's, then rank 1's). With ``check``, a run whose code is not 0 fails the caller (unless the run
    says ``"check": False``)."""
    os.makedirs(workdir, exist_ok=True)
    plan = os.path.join(workdir, "plan.json")
    with open(plan, "w") as f:
        json.dump({"workdir": workdir, "runs": runs}, f)
    script = os.path.join(ROOT, "tests", "multirun.py")
    port = None
    if nproc > 1:
        port = free_port()
        cmd = ["deepspeed", "--num_gpus", str(nproc), "--master_port", str(port), "--no_local_rank", script, plan]
    else:
        cmd = [sys.executable, script, plan]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)

    def read(path):
        return open(path).read() if os.path.exists(path) else ""
    codes = [json.loads(read(os.path.join(workdir, f"codes.rank{r}.json")) or "[]") for r in range(nproc)]
    results = []
    for i, run in enumerate(runs):
        mine = [c[i] for c in codes if len(c) > i]
        out = "".join(read(os.path.join(workdir, f"run{i}.rank{r}.out")) for r in range(nproc))
        err = "".join(read(os.path.join(workdir, f"run{i}.rank{r}.err")) for r in range(nproc))
        if len(mine) < nproc:  # the launch ended inside this run (a crash or a hang's timeout)
            raise AssertionError(f"launch ended during run {i} ({run['module']} {' '.join(run['args'])}), "
                                 f"launcher {proc.returncode}:\n{out[-4000:]}\n{err[-4000:]}\n{proc.stderr[-3000:]}")
        code = next((c for c in mine if c != 0), 0)
        if check and run.get("check", True) and code != 0:
            raise AssertionError(f"run {i} ({run['module']} {' '.join(run['args'])}) exited {mine}:\n"
                                 f"{out[-6000:]}\n{err[-6000:]}")
        results.append(subprocess.CompletedProcess(run["args"], code, out, err))
    if proc.returncode != 0:
        raise AssertionError(f"launch failed ({proc.returncode}) after its runs:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    if port is not None:
        assert_no_shm_left(port)
    return results


class Launched:
    """Named runs of a test file, launched together by :func:`launch_named`; ``runs(name)`` -> (save path,
    process), failing the calling test (with the run's output) unless the run exited 0 or ``ok=False``."""

    def __init__(self, done: dict):
        self.done = done

    def __call__(self, name: str, ok: bool = True):
        out, proc = self.done[name]
        assert not ok or proc.returncode == 0, \
            f"{name} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        return out, proc


def launch_named(root, plans: dict) -> Launched:
    """``plans`` = {nproc: {name: (module, args) or (module, args, env)}}: one ``run_many`` launch per world
    size, each run saving to ``root/name``. A failed run fails only the tests that read it."""
    done = {}
    for nproc, plan in plans.items():
        outs = {name: os.path.join(str(root), name) for name in plan}
        runs = [{"module": spec[0], "args": [*spec[1], "--save_path", outs[name]],
                 "env": spec[2] if len(spec) > 2 else {}} for name, spec in plan.items()]
        procs = run_many(runs, os.path.join(str(root), f"launch{nproc}"), nproc=nproc, check=False)
        done.update({name: (outs[name], proc) for name, proc in zip(plan, procs)})
    return Launched(done)


def metrics(save_path: str) -> list[dict]:
    with open(os.path.join(save_path, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def train_records(save_path: str) -> list[dict]:
    return [r for r in metrics(save_path) if "objectives" in r]


def final_eval(save_path: str) -> dict:
    return [r for r in metrics(save_path) if r.get("final")][-1]
