"""Repeat 2-rank launches and count their exit codes (issue: a finished run must exit 0).

Before the ordered teardown in ``xright.cli.lifecycle.shutdown``, about one launch in a suite's ~80
died after saving with "terminate called without an active exception" (SIGABRT on one rank,
launcher exit 250): gloo threads still running when the interpreter finalised. This script is the
reproduction loop, kept to show it stays fixed:

    python benchmarks/exit_codes.py --repeat 50 --configs z3-alright      # the configuration that failed
    python benchmarks/exit_codes.py --repeat 5                           # every configuration and stop path

Each launch is ``deepspeed --num_gpus 2 --module xright.cli.<cli> ...`` on CPU with the tiny model.
Prints one line per launch and a summary; exits 1 if any launch ended with another code than expected.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from launch import ROOT, env, launcher_cmd  # noqa: E402

JOINT = ["--train_batch_size", "8", "--learning_rate", "2e-3", "--max_steps", "16", "--save_steps", "4",
         "--eval_steps", "6", "--sft_micro_train_batch_size", "4", "--rlhf_micro_train_batch_size", "2",
         "--sft_max_samples", "64", "--rlhf_max_samples", "48"]
DPO = ["--train_batch_size", "8", "--micro_train_batch_size", "2", "--max_steps", "8", "--save_steps", "4",
       "--max_samples", "48"]
# name: (cli, args, extra env, expected launcher exit code)
CONFIGS = {
    "z3-alright": ("train_sft_dpo_alright", ["--zero_stage", "3", *JOINT], {}, 0),   # sharded reference engine
    "z2-alright": ("train_sft_dpo_alright", ["--zero_stage", "2", *JOINT], {}, 0),   # replicated reference
    "z3-dpo-lora": ("train_dpo", ["--zero_stage", "3", "--lora_rank", "4", *DPO], {}, 0),  # no reference model
    "z2-dpo-lora": ("train_dpo", ["--zero_stage", "2", "--lora_rank", "4", *DPO], {}, 0),
    "z3-sft-earlystop": ("train_sft_dpo_maxright", ["--zero_stage", "3", *JOINT, "--ref_pareto_sft", "99",
                                                     "--ref_pareto_dpo", "99"], {}, 0),
    "z3-nonfinite": ("train_sft_dpo_alright", ["--zero_stage", "3", *JOINT], {"XRIGHT_DEBUG_NAN_AT_STEP": "3"}, 3),
    "z2-usage-error": ("train_dpo", ["--zero_stage", "2", *DPO, "--dataset", "/nonexistent/pairs.jsonl"], {}, 2),
    # SIGTERM to the whole process group: the ranks checkpoint and exit 143; the `deepspeed` runner dies of
    # the signal itself (-15 here, 143 in a shell); the log must show both ranks' checkpoint-and-exit
    "z3-sigterm": ("train_sft_dpo_alright", ["--zero_stage", "3", *JOINT, "--save_steps", "100"], {},
                   -signal.SIGTERM),
}


def launch(name: str, out: str) -> tuple[int, float, str]:
    cli, args, extra, _ = CONFIGS[name]
    cmd, _ = launcher_cmd(cli, [*args, "--save_path", out, "--ckpt_path", os.path.join(out, "ckpt")])
    e = {**env(), **extra}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    if name.endswith("sigterm"):
        metrics = os.path.join(out, "metrics.jsonl")
        while proc.poll() is None and not (os.path.exists(metrics) and '"step": 5' in open(metrics).read()):
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
    log = proc.communicate(timeout=900)[0]
    return proc.returncode, time.perf_counter() - start, log


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--configs", type=str, default=",".join(CONFIGS))
    args = p.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    codes: dict[str, collections.Counter] = {n: collections.Counter() for n in names}
    bad = 0
    for i in range(args.repeat):
        for name in names:
            out = tempfile.mkdtemp(prefix=f"xright-exit-{name}-")
            try:
                rc, secs, log = launch(name, out)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            codes[name][rc] += 1
            expected = CONFIGS[name][3]
            aborted = "terminate called" in log
            if name.endswith("sigterm") and log.count("stopped by SIGTERM before the last step (exit code 143)") != 2:
                rc = f"{rc} (a rank did not checkpoint and exit 143)"
            print(f"{i + 1:3d} {name:18s} exit {rc!s:>3} (expected {expected}) {secs:6.1f}s"
                  f"{'  ABORT: terminate called' if aborted else ''}", flush=True)
            if rc != expected or aborted:
                bad += 1
                print(log[-3000:], flush=True)
    print("\nsummary (exit code: launches)")
    for name in names:
        print(f"  {name:18s} expected {CONFIGS[name][3]}: {dict(codes[name])}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
