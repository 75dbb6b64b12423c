"""Several CLI runs in one launch: ``deepspeed --num_gpus 2 tests/multirun.py PLAN.json`` (or ``python ...``).

A launch costs about 9 s before a run's first step on this machine (the launcher's two Python processes,
each rank's imports and its shared-memory comm op), more than most test runs train. Tests that need
several runs of the same world size put them in one plan (``launch.run_many``): each run is the CLI's own
``main(argv)`` under ``lifecycle.guarded``, so it parses, validates, trains, saves and decides its exit code
as on its own; between runs the engines are destroyed (hooks, ZeRO state) and the process group is kept
(one rendezvous per launch). Each rank writes each run's stdout/stderr to its own files (fd-level, so
DeepSpeed's and tqdm's output land there too) and the codes to ``codes.rank<r>.json``.

PLAN.json: ``{"workdir": DIR, "runs": [{"module": "train_sft", "args": [...], "env": {...}}, ...]}``.
"""

from __future__ import annotations

import importlib
import json
import os
import sys


def _redirect(path: str, fd: int) -> int:
    saved = os.dup(fd)
    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(f, fd)
    os.close(f)
    return saved


def main() -> None:
    plan_path = next(a for a in sys.argv[1:] if not a.startswith("--"))  # the launcher may add --local_rank
    with open(plan_path) as f:
        plan = json.load(f)
    from xright.cli import lifecycle
    from xright.strategy import close_process_group, release_engines

    rank = int(os.environ.get("RANK", "0"))
    codes = []
    for i, run in enumerate(plan["runs"]):
        saved_env = {k: os.environ.get(k) for k in run.get("env", {})}
        os.environ.update(run.get("env", {}))
        sys.stdout.flush()
        sys.stderr.flush()
        base = os.path.join(plan["workdir"], f"run{i}.rank{rank}")
        out, err = _redirect(base + ".out", 1), _redirect(base + ".err", 2)
        try:
            cli = importlib.import_module(f"xright.cli.{run['module']}")
            codes.append(lifecycle.guarded(lambda: cli.main(run["args"])))
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(out, 1)
            os.dup2(err, 2)
            os.close(out)
            os.close(err)
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        release_engines()
        with open(os.path.join(plan["workdir"], f"codes.rank{rank}.json"), "w") as f:
            json.dump(codes, f)
    # the end of a launch is every CLI's end: the same ordered teardown, then an exit finalisation cannot abort
    close_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
