"""Generated tokens/s of xright's batched generation vs a plain one-prompt-at-a-time ``model.generate`` loop.

    OMP_NUM_THREADS=2 python benchmarks/bench_generate.py --prompts 64 --max_new_tokens 64 [--two_ranks] [--no_cache]

Tiny built-in model, built-in prompts, greedy decoding (an untrained model rarely emits eos, so every
prompt gets max_new_tokens tokens and the rates compare equal work). Rows: plain ``model.generate`` one
prompt per call with and without the KV cache; ``xright.generation.generate`` in one process with
micro-batches of --micro_batch_size (left padding, KV cache); and with ``--two_ranks`` the CLI
``batch_inference --eval_task generate`` under ``deepspeed --num_gpus 2`` (ZeRO-0, OMP_NUM_THREADS=1 per
rank), timed by the CLI from the first batch to the gathered results.
"""

import argparse
import os
import re
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from xright.data import DataSpec  # noqa: E402
from xright.generation import Sampling, encode_prompts, generate, read_prompts  # noqa: E402
from xright.models import load_model, load_tokenizer  # noqa: E402


def plain_loop(model, tok, ids, max_new_tokens, use_cache):
    tokens = 0
    start = time.perf_counter()
    for x in ids:
        out = model.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, use_cache=use_cache,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        tokens += out.shape[1] - len(x)
    return tokens / (time.perf_counter() - start)


def batched(model, tok, ids, max_new_tokens, mb):
    start = time.perf_counter()
    out = generate(model, ids, Sampling(max_new_tokens=max_new_tokens, greedy=True), mb, eos_ids=tok.eos_token_id,
                   pad_id=tok.pad_token_id)
    wall = time.perf_counter() - start
    return sum(len(c) + (len(c) < max_new_tokens) for cs in out.values() for c in cs) / wall


def two_ranks(args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    out = os.path.join("/tmp", f"bench_generate_{os.getpid()}.jsonl")
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--module", "xright.cli.batch_inference", "--eval_task",
                           "generate", "--max_samples", str(args.prompts), "--max_new_tokens", str(args.max_new_tokens),
                           "--micro_batch_size", str(args.micro_batch_size), "--greedy_sampling", "--zero_stage", "0",
                           "--output_path", out], cwd=ROOT, env=env, capture_output=True, text=True)
    m = re.search(r"([\d.]+) tokens/s", proc.stdout)
    if proc.returncode or not m:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    os.remove(out)
    return float(m.group(1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--micro_batch_size", type=int, default=32)
    p.add_argument("--two_ranks", action="store_true")
    p.add_argument("--no_cache", action="store_true", help="also the plain loop without the KV cache (slow)")
    args = p.parse_args()
    tok = load_tokenizer("tiny")
    model = load_model("tiny", seed=42, trainable=False)
    ids = encode_prompts(read_prompts(DataSpec(kind="sft", max_samples=args.prompts, seed=42)), tok,
                         DataSpec(kind="sft"), 1024)
    print(f"threads {torch.get_num_threads()}, {args.prompts} prompts × {args.max_new_tokens} new tokens, greedy")
    print("| | generated tokens/s | × plain loop (KV cache) |\n| --- | --- | --- |", flush=True)
    runs = [("plain model.generate, 1 prompt per call, KV cache", lambda: plain_loop(model, tok, ids, args.max_new_tokens, True)),
            (f"xright generate, 1 process, micro batch {args.micro_batch_size}",
             lambda: batched(model, tok, ids, args.max_new_tokens, args.micro_batch_size))]
    if args.two_ranks:
        runs.append((f"xright batch_inference, 2 ranks (ZeRO-0), micro batch {args.micro_batch_size}",
                     lambda: two_ranks(args)))
    if args.no_cache:
        runs.append(("plain model.generate, 1 prompt per call, no KV cache",
                     lambda: plain_loop(model, tok, ids, args.max_new_tokens, False)))
    base = None
    for name, fn in runs:
        rate = fn()
        base = base or rate
        print(f"| {name} | {rate:.0f} | {rate / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
