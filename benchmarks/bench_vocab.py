"""Memory and time of the log-probs against the vocabulary size: the full [tokens, vocab] logits
(``--logprob_chunk_size 0``) against the chunked output head (the default), whole CLI runs.

    python benchmarks/bench_vocab.py [--vocab 512 32000 128256] [--threads 1] [--steps 2]

For each vocabulary size V a 2-layer Llama (hidden 256, 4 heads, MLP 512, untied head, random weights) is saved
to a temporary directory with the built-in byte-level tokenizer (the token ids stay below 258, the logits are V
wide). Jobs, each one process (``python -m xright.cli...``) under ``/usr/bin/time -v``:

* ``train_dpo`` micro-batch 4 pairs (global 4), max_len 512, live reference (``--no_precompute_ref_log_probs``),
  padded and ``--packing_samples``;
* ``train_sft`` micro-batch 8 (global 8), max_len 1,024, padded.

Synthetic records long enough to fill max_len (DPO: a 200-byte prompt, 320-byte responses, cut at 512 tokens;
SFT: a 300-byte input and a 760-byte output, cut at 1,024). Each job runs full and chunked (``--repeats`` times,
the order alternated), then a "floor" run: chunked on ~10-token records, i.e. what the run holds besides its
activations and logits. The time per step is the last step's (``elapsed`` of the metrics; the first step includes
one-time work). The section goes into ``--results`` (``benchmarks/RESULTS.md``) between its markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
MARK = "<!-- bench_vocab -->"

from bench_packing import write_section  # noqa: E402 (one way to rewrite a section of RESULTS.md)


def build(v: int, root: str) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from xright.models import tiny_tokenizer

    out = os.path.join(root, f"llama-v{v}")
    cfg = LlamaConfig(vocab_size=v, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False, pad_token_id=256, bos_token_id=257, eos_token_id=257)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def write_data(root: str, scale: float = 1.0, tag: str = "") -> dict:
    rng = random.Random(0)
    text = lambda n: "".join(rng.choice("abcdefghij klmnopqrstuvwxyz.") for _ in range(max(1, int(n * scale))))  # noqa
    paths = {"dpo": os.path.join(root, f"pairs{tag}.jsonl"), "sft": os.path.join(root, f"sft{tag}.jsonl")}
    with open(paths["dpo"], "w") as f:
        for _ in range(64):
            f.write(json.dumps({"prompt": text(200), "chosen": text(320), "rejected": text(320)}) + "\n")
    with open(paths["sft"], "w") as f:
        for _ in range(64):
            f.write(json.dumps({"input": text(300), "output": text(760)}) + "\n")
    return paths


JOBS = {  # name: (module, flags)
    "DPO padded": ("train_dpo", ["--micro_train_batch_size", "4", "--train_batch_size", "4", "--max_len", "512",
                                 "--no_precompute_ref_log_probs"]),
    "DPO packed": ("train_dpo", ["--micro_train_batch_size", "4", "--train_batch_size", "4", "--max_len", "512",
                                 "--no_precompute_ref_log_probs", "--packing_samples"]),
    "SFT padded": ("train_sft", ["--micro_train_batch_size", "8", "--train_batch_size", "8", "--max_len", "1024"]),
}


def one_run(model: str, data: str, module: str, flags: list, chunk: list, steps: int, threads: int, tmp: str):
    save = tempfile.mkdtemp(dir=tmp)
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", f"xright.cli.{module}", "--pretrain", model,
           "--dataset", data, "--max_steps", str(steps), "--save_path", save, "--ckpt_path", os.path.join(save, "ck"),
           "--learning_rate", "1e-5", "--lr_warmup_ratio", "0", "--logging_steps", "1", "--eval_steps", "100000",
           "--zero_stage", "2", *flags, *chunk]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    rows = [json.loads(line) for line in open(os.path.join(save, "metrics.jsonl"))]
    rows = [r for r in rows if "elapsed" in r]
    loss = [v for r in rows for k, v in r.items() if k.startswith("train/") and k.endswith("/loss")]
    last = rows[-1]["elapsed"] - rows[-2]["elapsed"]
    said = [line for line in proc.stdout.splitlines() if "full [tokens, vocab] path" in line]
    return {"rss": rss, "step": last, "loss": loss, "said": said}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, nargs="+", default=[512, 32000, 128256])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="runs of each of full / chunked (order alternated)")
    ap.add_argument("--jobs", nargs="+", default=list(JOBS), choices=list(JOBS))
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    args = ap.parse_args(argv)
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data, short = write_data(tmp), write_data(tmp, 0.02, "-short")
        for v in args.vocab:
            model = build(v, tmp)
            for job in args.jobs:
                module, flags = JOBS[job]
                kind = "dpo" if module == "train_dpo" else "sft"
                runs = {"full": [], "chunked": []}
                for i in range(args.repeats):
                    for which in ("full", "chunked") if i % 2 == 0 else ("chunked", "full"):
                        chunk = ["--logprob_chunk_size", "0"] if which == "full" else []
                        runs[which].append(one_run(model, data[kind], module, flags, chunk, args.steps, args.threads,
                                                   tmp))
                        r = runs[which][-1]
                        print(f"V={v} {job} {which}: {r['rss']:.0f} MB, last step {r['step']:.2f} s, "
                              f"losses {r['loss']}", flush=True)
                # the floor: the same run on ~10-token records (imports, data, weights, gradients, optimizer states)
                runs["floor"] = [one_run(model, short[kind], module, flags, [], args.steps, args.threads, tmp)]
                print(f"V={v} {job} floor: {runs['floor'][0]['rss']:.0f} MB", flush=True)
                rows.append((v, job, runs))
    section = report(args, rows, started, load_before, os.getloadavg(), argv)
    print(section)
    write_section(args.results, section, MARK)


def report(args, rows, started, load_before, load_after, argv) -> str:
    import torch

    cmd = "python benchmarks/bench_vocab.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    lines = [MARK, "## Log-probs against the vocabulary: full logits vs the chunked head (`bench_vocab.py`)", "",
             f"Measured {started:%Y-%m-%d %H:%M} UTC with:", "", "```", cmd.strip(), "```", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other work (load average "
             f"{' '.join(f'{x:.1f}' for x in load_before)} before, {' '.join(f'{x:.1f}' for x in load_after)} "
             f"after: the times are noisy, the memory is not), torch {torch.__version__}, {args.threads} thread(s), "
             f"one process, ZeRO-2, fp32, {args.steps} optimizer steps per run. Model: 2-layer Llama, hidden 256, "
             "untied head, vocabulary V. Full = `--logprob_chunk_size 0`, chunked = the default. Peak RSS: "
             f"`/usr/bin/time -v` of the whole run (max over its {args.repeats} run(s)); floor: the chunked run on "
             "~10-token records (imports, data, weights, gradients, ZeRO-2 and Adam states, the reference: no "
             f"activations, no logits); step: the last step's seconds, mean of {args.repeats} run(s) (full and "
             "chunked alternated); losses: every step's training loss, full vs chunked.", "",
             "| V | job | peak RSS full (MB) | peak RSS chunked (MB) | floor (MB) | step full (s) | step chunked (s) | "
             "chunked ÷ full time | losses equal |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v, job, runs in rows:
        rss = {k: max(r["rss"] for r in rs) for k, rs in runs.items()}
        step = {k: sum(r["step"] for r in rs) / len(rs) for k, rs in runs.items() if k != "floor"}
        a, b = runs["full"][0]["loss"], runs["chunked"][0]["loss"]
        same = len(a) == len(b) and all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(a, b))
        lines.append(f"| {v:,} | {job} | {rss['full']:,.0f} | **{rss['chunked']:,.0f}** | {rss['floor']:,.0f} | "
                     f"{step['full']:.2f} | "
                     f"{step['chunked']:.2f} | {step['chunked'] / step['full']:.2f}× | "
                     f"{'yes' if same else 'NO'} ({', '.join(f'{x:.4f}' for x in b)}) |")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
