"""Each rank's real exit code under the deepspeed launcher: ``deepspeed --num_gpus 2 tests/rank_codes.py PLAN.json``.

On every rank, runs each CLI of the plan as a process of its own (``python -m xright.cli.<module>``, its
``main_guard`` teardown and exit included), so the code recorded is the one the operating system reports,
and writes the codes to ``codes.rank<r>.json``. The launch then exits with the last run's code, which the
launcher passes on. A run with ``"sigterm_at_step": N`` gets SIGTERM on rank 0 only, once its metrics log
step N: the other ranks must stop on rank 0's word.

PLAN.json: ``{"workdir": DIR, "runs": [{"module", "args", "port", "save_path", "env"?, "sigterm_at_step"?}]}``;
each run rendezvouses on its own free ``port``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time


def _reached(metrics: str, step: int) -> bool:
    try:
        with open(metrics) as f:
            return any(json.loads(line).get("step", 0) >= step and "objectives" in line for line in f if line.strip())
    except (FileNotFoundError, ValueError):
        return False


def main() -> None:
    with open(next(a for a in sys.argv[1:] if not a.startswith("--"))) as f:
        plan = json.load(f)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    codes = []
    for i, run in enumerate(plan["runs"]):
        env = {**os.environ, **run.get("env", {}), "MASTER_PORT": str(run["port"])}
        base = os.path.join(plan["workdir"], f"run{i}.rank{rank}")
        with open(base + ".out", "w") as out, open(base + ".err", "w") as err:
            proc = subprocess.Popen([sys.executable, "-u", "-m", f"xright.cli.{run['module']}", *run["args"]],
                                    env=env, stdout=out, stderr=err)
            if run.get("sigterm_at_step") and rank == 0:
                metrics = os.path.join(run["save_path"], "metrics.jsonl")
                while proc.poll() is None and not _reached(metrics, run["sigterm_at_step"]):
                    time.sleep(0.05)
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            codes.append(proc.wait())
    with open(os.path.join(plan["workdir"], f"codes.rank{rank}.json"), "w") as f:
        json.dump(codes, f)
    # the launcher kills the other ranks once one exits non-zero: wait until every rank has written its codes
    deadline = time.time() + 120
    while time.time() < deadline and not all(
            os.path.exists(os.path.join(plan["workdir"], f"codes.rank{r}.json")) for r in range(world)):
        time.sleep(0.1)
    code = codes[-1]
    sys.exit(code if code >= 0 else 128 - code)


if __name__ == "__main__":
    main()
