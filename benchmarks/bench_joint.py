"""ALRIGHT at λ = 0.5, steps/s: the padded layout with a live reference against packing + precomputed reference.

    python benchmarks/bench_joint.py [--rounds 3] [--steps 16] [--results FILE]

The issue-10 target: a joint ALRIGHT run at λ = 0.5 takes ≥ 1.8× the optimizer steps/s of the run before
packing and the reference cache (``--no_precompute_ref_log_probs``, padded micro-batches). Data: the HH SFT
subset of ``../shared/data/xright`` (instruction/output; rows over max_len are cut by the usual rule) and
the 64 whole HH dialogues of ``bench_speed.py`` (longer row ≤ 1000 bytes), max_len 1024 for both. Model: the
3.3M-parameter byte-level GPT-NeoX of ``bench_speed.py``. One process, 2 threads, fp32, one loader batch of
8 examples (SFT) or 8 pairs (DPO) per step, ``--steps`` optimizer steps, seed 42, so both configurations
make the same picks on the same batches. Each round runs both, alternating which goes first.

Steps/s = steps / (the training loop's wall time + the reference pass's, when there is one): the work the
cache moves out of the loop is counted. The loss at each step is compared, so speed is not bought with
another result (packing keeps the micro-batches; only the summation order changes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_speed  # noqa: E402  (the shared model and HH workloads)

ROOT = bench_speed.ROOT
SFT = os.path.join(os.path.dirname(ROOT), "shared", "data", "xright", "rm_hh_rlhf_test_subset_formatted.json")
CONFIGS = {"today": ["--no_precompute_ref_log_probs"], "packed+cache": ["--packing_samples", "--precompute_ref_log_probs"]}


def run(config: str, model: str, rlhf: str, steps: int) -> dict:
    out = tempfile.mkdtemp(prefix=f"bench_joint_{config}_")
    cmd = [sys.executable, "-m", "xright.cli.train_sft_dpo_alright", "--pretrain", model, "--lambd", "0.5",
           "--sft_dataset", SFT, "--input_key", "instruction", "--output_key", "output", "--sft_max_len", "1024",
           "--rlhf_dataset", rlhf, "--rlhf_max_len", "1024", "--rlhf_eval_split", "", "--sft_eval_split", "",
           "--input_template", "", "--train_batch_size", "1", "--sft_micro_train_batch_size", "8",
           "--rlhf_micro_train_batch_size", "8", "--max_steps", str(steps), "--eval_steps", str(10 ** 6),
           "--learning_rate", "1e-4", "--lr_scheduler", "constant", "--seed", "42", "--logging_steps", "1",
           "--save_path", os.path.join(out, "save"), "--ckpt_path", os.path.join(out, "ckpt"), *CONFIGS[config]]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{config} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in open(os.path.join(out, "save", "metrics.jsonl"))]
    loop = [r["wall_time"] for r in records if r.get("done")][-1]
    pre = re.findall(r"reference log-probs: computed .* in ([0-9.]+)s", proc.stdout + proc.stderr)
    steps_rec = [r for r in records if "objectives" in r]
    return {"seconds": loop + (float(pre[0]) if pre else 0.0), "precompute_s": float(pre[0]) if pre else 0.0,
            "picks": [r["objectives"][0] for r in steps_rec],
            "losses": [r.get(f"train/{r['objectives'][0]}/loss") for r in steps_rec]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    args = p.parse_args(argv)
    work = tempfile.mkdtemp(prefix="bench_joint_")
    model, _ = bench_speed.write_model(work)
    rlhf = bench_speed.write_workloads(work)["whole"]
    results = {c: [] for c in CONFIGS}
    ratios = []
    for k in range(args.rounds):
        order = list(CONFIGS) if k % 2 == 0 else list(reversed(CONFIGS))
        got = {c: run(c, model, rlhf, args.steps) for c in order}
        for c in CONFIGS:
            results[c].append(got[c])
        ratios.append(got["today"]["seconds"] / got["packed+cache"]["seconds"])
        print(f"round {k + 1}: " + ", ".join(f"{c} {got[c]['seconds']:.1f}s" for c in CONFIGS) +
              f", speed-up {ratios[-1]:.2f}x", flush=True)
    a, b = results["today"][0], results["packed+cache"][0]
    assert a["picks"] == b["picks"], "the two configurations picked differently"
    worst = max(abs(x - y) / abs(x) for x, y in zip(a["losses"], b["losses"]))
    lines = [f"`python benchmarks/bench_joint.py --rounds {args.rounds} --steps {args.steps}` — "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load average "
             f"{' / '.join(f'{x:.1f}' for x in os.getloadavg())} at the end. ALRIGHT λ = 0.5, {args.steps} steps "
             f"(picks: {a['picks'].count('sft')} SFT, {a['picks'].count('dpo')} DPO, the same in both), 1 process, "
             "2 threads.", "",
             "| config | seconds per run (each round) | steps/s (median) | reference pass s |", "| --- | --- | --- | --- |"]
    for c in CONFIGS:
        secs = [r["seconds"] for r in results[c]]
        lines.append(f"| {c} | {', '.join(f'{s:.1f}' for s in secs)} | {args.steps / statistics.median(secs):.3f} | "
                     f"{statistics.median(r['precompute_s'] for r in results[c]):.1f} |")
    lines += ["", f"Speed-up per round (today ÷ packed+cache seconds, same round): "
              f"{', '.join(f'{r:.2f}×' for r in ratios)}; median **{statistics.median(ratios):.2f}×**. "
              f"Largest relative difference of a step's loss between the two: {worst:.1e}."]
    section = "\n".join(lines)
    print(section)
    text = open(args.results).read()
    mark, end = "<!-- bench_joint -->", "<!-- /bench_joint -->"
    block = f"{mark}\n## ALRIGHT steps/s, packing + reference cache (`bench_joint.py`)\n\n{section}\n{end}"
    if mark in text and end in text:
        text = text[:text.index(mark)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(args.results, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
