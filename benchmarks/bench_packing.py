"""Padding-free and length-grouped micro-batches against padded random ones, A/B alternated in one run.

    OMP_NUM_THREADS=2 python benchmarks/bench_packing.py [--model neox3m|tiny] \\
        [--sft_steps 3] [--dpo_steps 2] [--micro 8] [--dpo_micro 4] [--max_len 1024]

* SFT on the HH SFT subset (``shared/data/xright/rm_hh_rlhf_test_subset_formatted.json``,
  instruction/output): real (non-pad) tokens per second of padded random micro-batches, of
  ``--group_by_length`` micro-batches and of ``--packing_samples`` micro-batches.
* DPO on HH pairs (``shared/data/hh-rlhf/harmless-base-test.jsonl.gz``, whole dialogues that fit
  max_len): pairs per second padded vs packed (policy forward+backward on chosen+rejected, reference
  forward).

A step is xright's own pieces — ``CyclingLoader`` (and its collate), the objective (``SFT`` /
``Pairwise("dpo")`` with a ``Reference``), ``logprobs``, the registered per-sequence attention for
packed rows — and a ``torch.optim.AdamW`` step, without DeepSpeed (one process: the engine adds the
same cost to every layout). All configurations of a job live in one forked child and take one step
each in turn, the order reversed every other round (A B C, C B A, …), so that the load drifts of a
shared machine hit all of them alike; the speed-up is the median over rounds of a step's rate ÷ the
padded step's rate of the same round. Padded and packed configurations start from the same weights
and draw the same micro-batches (same seed), so their losses at every step must agree (reported);
length-grouped ones draw other batches of the same data. Peak RSS is that of a separate child running
one configuration alone for one step (it includes the parent's imports and tokenised data, the same
for all).

The model: ``neox3m`` is the issue's 3.3M-parameter byte-level GPT-NeoX (hidden 256, 4 layers, 4
heads); ``tiny`` is the built-in 0.9M one. The section and its command go into ``--results``.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import resource
import shlex
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from xright.data import CyclingLoader, DataSpec, load_data  # noqa: E402
from xright.logprobs import num_tokens  # noqa: E402
from xright.models import register_varlen_attention, tiny_config, tiny_tokenizer  # noqa: E402
from xright.objectives import SFT, Pairwise, Reference  # noqa: E402

DATA = os.path.join(os.path.dirname(ROOT), "shared", "data")
SFT_FILE = os.path.join(DATA, "xright", "rm_hh_rlhf_test_subset_formatted.json")
HH_FILE = os.path.join(DATA, "hh-rlhf", "harmless-base-test.jsonl.gz")
CONFIGS = {"sft": {"padded random": {}, "length-grouped": {"group_by_length": True}, "packed": {"packed": True}},
           "dpo": {"padded random": {}, "packed": {"packed": True}}}
MARK = "<!-- bench_packing {} -->"  # one section per model


def build_model(name: str, packing: bool, seed: int = 0):
    from transformers import GPTNeoXForCausalLM

    cfg = tiny_config()
    if name == "neox3m":
        cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size = 256, 4, 4, 1024
    cfg._attn_implementation = register_varlen_attention() if packing else "sdpa"
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(cfg)


class Run:
    """One configuration's model, reference, loader, objective and optimizer; :meth:`step` times one step."""

    def __init__(self, job: str, config: str, examples: list, args):
        opts = CONFIGS[job][config]
        packed = opts.get("packed", False)
        self.model = build_model(args.model, packed).train()  # same seed: every configuration starts equal
        self.reference = None
        if job == "dpo":
            self.reference = Reference(model=build_model(args.model, packed).eval().requires_grad_(False))
        self.objective = SFT() if job == "sft" else Pairwise("dpo")
        micro = args.micro if job == "sft" else args.dpo_micro
        self.loader = CyclingLoader(examples, self.objective.kind, micro, tiny_tokenizer().pad_token_id,
                                    seed=args.seed, **opts)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)

    def step(self) -> dict:
        start = time.perf_counter()
        batch = self.loader.next()
        loss, _ = self.objective(self.model, self.reference, batch)
        loss = loss / self.objective.units(batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"seconds": time.perf_counter() - start, "real": int(num_tokens(batch)),
                "slots": batch["input_ids"].numel(), "examples": len(batch["ids"]), "loss": float(loss.detach())}


def interleaved(job: str, examples: list, args, out) -> None:
    """Every configuration of ``job`` in one process, one step each in turn (order reversed every other
    round), so that the shared machine's load drifts hit all of them alike."""
    torch.set_num_threads(args.threads)
    names = list(CONFIGS[job])
    runs = {c: Run(job, c, examples, args) for c in names}
    steps = {c: [] for c in names}
    for i in range(args.warmup + (args.sft_steps if job == "sft" else args.dpo_steps)):
        for c in names if i % 2 == 0 else names[::-1]:
            res = runs[c].step()
            if i >= args.warmup:
                steps[c].append(res)
        print(f"{job} step {i}: " + ", ".join(f"{c} {steps[c][-1]['seconds']:.1f} s" for c in names if steps[c]),
              flush=True)
    out.put(steps)


def peak_rss(job: str, config: str, examples: list, args, out) -> None:
    """Peak RSS of a process that runs one configuration (one step) alone."""
    torch.set_num_threads(args.threads)
    Run(job, config, examples, args).step()
    out.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def in_child(fn, *args):
    ctx = mp.get_context("fork")  # the tokenised data is shared with the child, not rebuilt
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(*args, q))
    p.start()
    result = q.get()
    p.join()
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["neox3m", "tiny"], default="neox3m")
    ap.add_argument("--sft_steps", type=int, default=3)
    ap.add_argument("--dpo_steps", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=0)
    ap.add_argument("--micro", type=int, default=8, help="SFT rows per micro-batch")
    ap.add_argument("--dpo_micro", type=int, default=4, help="DPO pairs per micro-batch (2 × as many rows)")
    ap.add_argument("--max_len", type=int, default=1024)
    ap.add_argument("--dpo_pairs", type=int, default=256, help="HH pairs loaded (whole dialogues ≤ max_len)")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    args = ap.parse_args(argv)
    for f in (SFT_FILE, HH_FILE):
        if not os.path.exists(f):
            sys.exit(f"bench_packing: {f} not found (the shared HH data)")
    tok = tiny_tokenizer()
    quiet = lambda *a, **k: None  # noqa: E731
    data = {
        "sft": load_data(DataSpec(kind="sft", dataset=SFT_FILE, input_key="instruction", output_key="output",
                                  eval_split="", max_len=args.max_len, name="sft"), tok, log=quiet)[0],
        "dpo": load_data(DataSpec(kind="pairwise", dataset=HH_FILE, eval_split="", max_len=args.max_len,
                                  truncation="drop", max_samples=args.dpo_pairs, name="dpo"), tok, log=quiet)[0],
    }
    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()
    results = {job: in_child(interleaved, job, data[job], args) for job in CONFIGS}
    rss = {(job, c): in_child(peak_rss, job, c, data[job], args) for job in CONFIGS for c in CONFIGS[job]}
    section = report(args, data, results, rss, started, load_before, os.getloadavg(), argv)
    print(section)
    write_section(args.results, section, MARK.format(args.model))


def report(args, data, results, rss, started, load_before, load_after, argv) -> str:
    cmd = "OMP_NUM_THREADS=%d python benchmarks/bench_packing.py %s" % (
        args.threads, shlex.join(sys.argv[1:] if argv is None else argv))
    params = sum(p.numel() for p in build_model(args.model, False).parameters()) / 1e6
    lines = [MARK.format(args.model), f"## Packing and length grouping, {args.model} model (`bench_packing.py`)", "",
             f"Measured {started:%Y-%m-%d %H:%M} UTC with:", "", "```", cmd, "```", "",
             f"Machine: {platform.machine()}, {os.cpu_count()} CPUs shared with other work (load average "
             f"{' '.join(f'{x:.1f}' for x in load_before)} before, {' '.join(f'{x:.1f}' for x in load_after)} "
             f"after), torch {torch.__version__}, {args.threads} threads. Model: {args.model} ({params:.1f}M "
             f"parameters, byte-level), micro-batches of {args.micro} SFT rows / {args.dpo_micro} DPO pairs, "
             f"max_len {args.max_len}; SFT {args.sft_steps} and DPO {args.dpo_steps} timed optimizer steps per "
             f"configuration, the configurations' steps interleaved in one process (order reversed every other "
             f"step), {args.warmup} untimed warm-up steps. Data: {len(data['sft'])} SFT examples of the HH SFT "
             f"subset, {len(data['dpo'])} HH pairs (whole dialogues that fit max_len). Rate = sum over the timed "
             f"steps; × padded = median over steps of the step's rate ÷ the padded step's rate of the same "
             f"round. Peak RSS: a process running that configuration alone for one step.", ""]
    for job, unit, count in (("sft", "real tokens/s", "real"), ("dpo", "pairs/s", "examples")):
        lines += [f"| {job.upper()} | {unit} | × padded random (per-step median) | real / padded tokens | "
                  "loss at each timed step | peak RSS (MB) |", "| --- | --- | --- | --- | --- | --- |"]
        base = results[job]["padded random"]
        for config, steps in results[job].items():
            rate = sum(x[count] for x in steps) / sum(x["seconds"] for x in steps)
            ratio = statistics.median([(x[count] / x["seconds"]) / (b[count] / b["seconds"])
                                       for x, b in zip(steps, base)])
            fill = sum(x["real"] for x in steps) / sum(x["slots"] for x in steps)
            losses = ", ".join(f"{x['loss']:.4f}" for x in steps)
            lines.append(f"| {config} | {rate:.1f} | **{ratio:.2f}×** | {fill:.0%} | {losses} | "
                         f"{rss[(job, config)]:.0f} |")
        lines.append("")
    return "\n".join(lines)


def write_section(path: str, section: str, mark: str) -> None:
    """Replace this benchmark's section of RESULTS.md: from its marker to the next marker or top-level
    heading (another benchmark's section), or the end."""
    text = open(path).read() if os.path.exists(path) else ""
    if mark in text:
        head, rest = text.split(mark, 1)
        ends = [i for i in (rest.find("\n<!-- ", 1), rest.find("\n# ", 1)) if i >= 0]
        text = head + section + (rest[min(ends):] if ends else "\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
