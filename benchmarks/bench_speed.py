"""DPO pairs/s of TRL's DPOTrainer against xright.cli.train_dpo, feature by feature, in one run.

    python benchmarks/bench_speed.py [--rounds 2] [--workloads whole,cut] [--configs trl,base,...] [--results FILE]
    python benchmarks/bench_speed.py --count_tokens     # each configuration's work, counted (seconds, no training)

Workloads (Anthropic HH harmless-base test, ../shared/data/hh-rlhf, see its README):
  whole  the first 64 pairs whose longer dialogue is <= 1000 bytes, max_len 1024 (nothing truncated)
  cut    the first 64 pairs cut short: the last 300 characters of the prompt, answers cut at 200, max_len 512
Both are written as {prompt, chosen, rejected} (prompt = the shared prefix through the last
"\\n\\nAssistant:"), so both trainers see the same text, untemplated.

Model: a 3.3M-parameter byte-level GPT-NeoX (hidden 256, 4 layers, 4 heads, intermediate 1024),
random weights from seed 0, saved once with xright's byte-level tokenizer; both trainers start from
it. Batch 8, one epoch, one process, 2 threads (OMP_NUM_THREADS=2), fp32, constant lr 1e-4,
Adam betas (0.9, 0.999), β = 0.1, gradient clipping 1.0, no evaluation, seed 42. TRL's own defaults
otherwise, except gradient checkpointing and bf16 (TRL 1.16 turns both on by default; xright uses
neither unless asked), which are off.

Configurations (each a fresh process with fresh output and cache directories, so a precompute is
computed, except by the ``*-cached`` ones): ``trl`` (TRL defaults: live reference, padded batches); xright
``base`` (--no_precompute_ref_log_probs), ``precompute``, ``group`` (--group_by_length), ``packing``
(--packing_samples), ``all`` (the three together), and ``precompute-cached`` / ``all-cached``, which
find the table an earlier run of the round computed (what every run of a sweep after the first does;
in one epoch the precompute pass does the reference's work once either way, so only a cached table
or a second epoch removes it). Every round runs every configuration once,
TRL first, so slow spells of a shared machine hit all of them alike (A/B alternated).

Measured per run: *train seconds* — TRL's ``train_runtime`` (``trainer.train()``; tokenisation
before it excluded), xright's loop wall time (``wall_time`` of metrics.jsonl) plus its reference
precompute pass (printed by the run), so the work moved out of the loop is still counted; pairs/s
= 64 / train seconds; the whole process's wall and CPU seconds and its peak RSS (``wait4``); the
*work CPU seconds* (all threads, from after the imports to the end: data, model, set-up, training —
the figure least moved by other jobs on a shared machine); the
training loss averaged over the epoch (every pair seen once) and at the last step. Medians over
rounds are reported; the section (with the exact command) is written into ``--results``.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HH = os.path.join(os.path.dirname(ROOT), "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz")
N_PAIRS, BATCH, LR, SEED = 64, 8, 1e-4, 42
WORKLOADS = {"whole": 1024, "cut": 512}  # name -> max_len
XRIGHT_CONFIGS = {
    "base": ["--no_precompute_ref_log_probs"],
    "precompute": ["--precompute_ref_log_probs"],
    "group": ["--no_precompute_ref_log_probs", "--group_by_length"],
    "packing": ["--no_precompute_ref_log_probs", "--packing_samples"],
    "all": ["--precompute_ref_log_probs", "--group_by_length", "--packing_samples"],
    # the same, finding the table an earlier run of this workload computed (a sweep's second run)
    "precompute-cached": ["--precompute_ref_log_probs"],
    "all-cached": ["--precompute_ref_log_probs", "--group_by_length", "--packing_samples"],
}
CONFIGS = ["trl", *XRIGHT_CONFIGS]
MARK, END = "<!-- bench_speed -->", "<!-- /bench_speed -->"


# ---- setup ----------------------------------------------------------------------------------

def split_prompt(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """HH dialogue pair -> (prompt through the last shared '\\n\\nAssistant:', chosen answer, rejected answer)."""
    i = 0
    while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
        i += 1
    cut = chosen.rfind("\n\nAssistant:", 0, i + 1)
    if cut < 0:
        return None
    cut += len("\n\nAssistant:")
    return chosen[:cut], chosen[cut:], rejected[cut:]


def write_workloads(workdir: str) -> dict[str, str]:
    whole, cut = [], []
    with gzip.open(HH, "rt") as f:
        for line in f:
            r = json.loads(line)
            parts = split_prompt(r["chosen"], r["rejected"])
            if parts is None or not parts[1].strip() or not parts[2].strip():
                continue
            p, c, j = parts
            if len(cut) < N_PAIRS:
                cut.append({"prompt": p[-300:], "chosen": c[:200], "rejected": j[:200]})
            if len(whole) < N_PAIRS and max(len(r["chosen"].encode()), len(r["rejected"].encode())) <= 1000:
                whole.append({"prompt": p, "chosen": c, "rejected": j})
            if len(whole) == len(cut) == N_PAIRS:
                break
    paths = {}
    for name, rows in (("whole", whole), ("cut", cut)):
        paths[name] = os.path.join(workdir, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return paths


def write_model(workdir: str) -> tuple[str, int]:
    sys.path.insert(0, ROOT)
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from xright.models import tiny_tokenizer

    tok = tiny_tokenizer()
    V = len(tok)
    config = GPTNeoXConfig(vocab_size=V, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                           intermediate_size=1024, max_position_embeddings=1024, rotary_pct=0.25,
                           use_parallel_residual=True, tie_word_embeddings=False,
                           bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    path = os.path.join(workdir, "model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


# ---- one run ----------------------------------------------------------------------------------

def trl_child(model_dir: str, data: str, max_len: int, out: str) -> None:
    """Runs in a child process: TRL's DPOTrainer, defaults except the shared settings above."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    cpu0 = time.process_time()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = [json.loads(line) for line in open(data)]
    cfg = DPOConfig(output_dir=out, per_device_train_batch_size=BATCH, num_train_epochs=1, learning_rate=LR,
                    lr_scheduler_type="constant", warmup_steps=0, beta=0.1, max_length=max_len, logging_steps=1,
                    save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True, seed=SEED,
                    dataloader_num_workers=0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
                    weight_decay=0.0, disable_tqdm=True,
                    # TRL 1.16 defaults to gradient checkpointing and bf16 where supported; xright does
                    # neither unless asked, so both are off here (the same arithmetic on both sides)
                    gradient_checkpointing=False, bf16=False)
    trainer = DPOTrainer(model=model, args=cfg, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok)
    result = trainer.train()
    losses = [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]
    print("BENCH " + json.dumps({"train_s": result.metrics["train_runtime"], "losses": losses,
                                 "work_cpu_s": time.process_time() - cpu0}), flush=True)


def xright_child(argv: list[str]) -> None:
    """Runs in a child process: xright.cli.train_dpo, with the CPU time after the imports printed."""
    from xright.cli import train_dpo

    cpu0 = time.process_time()
    train_dpo.main(argv)
    print("BENCH " + json.dumps({"work_cpu_s": time.process_time() - cpu0}), flush=True)
    sys.stderr.flush()
    os._exit(0)  # everything is saved; skip the finalisation of gloo's threads (xright's CLIs avoid it too)


def command(config: str, model_dir: str, data: str, max_len: int, out: str, shared_cache: str) -> list[str]:
    if config == "trl":
        return [sys.executable, os.path.abspath(__file__), "--_trl_child", model_dir, data, str(max_len), out]
    return [sys.executable, os.path.abspath(__file__), "--_xright_child", "--pretrain", model_dir, "--dataset", data,
            "--eval_split", "", "--input_template", "", "--max_len", str(max_len),
            "--train_batch_size", str(BATCH), "--micro_train_batch_size", str(BATCH), "--max_epochs", "1",
            "--learning_rate", str(LR), "--lr_scheduler", "constant", "--lr_warmup_ratio", "0",
            "--adam_betas", "0.9", "0.999", "--beta", "0.1", "--seed", str(SEED), "--logging_steps", "1",
            "--save_path", os.path.join(out, "save"), "--ckpt_path", os.path.join(out, "ckpt"),
            *(["--ref_cache_dir", shared_cache] if config.endswith("-cached") else []), *XRIGHT_CONFIGS[config]]


def run_one(config: str, model_dir: str, data: str, max_len: int, shared_cache: str) -> dict:
    """One configuration in a fresh process. A precompute's table is copied to ``shared_cache``, where
    the ``*-cached`` configurations find it."""
    out = tempfile.mkdtemp(prefix=f"bench_speed_{config}_")
    if config.endswith("-cached") and not (os.path.isdir(shared_cache) and os.listdir(shared_cache)):
        raise RuntimeError(f"{config} needs a table: run precompute or all before it in the round")
    env = {**os.environ, "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": ROOT}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    log = os.path.join(out, "log.txt")
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(command(config, model_dir, data, max_len, out, shared_cache), cwd=ROOT, env=env,
                                stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    text = open(log).read()
    if status != 0:
        raise RuntimeError(f"{config} failed (status {status}); log: {log}\n{text[-3000:]}")
    res = {"config": config, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
           "peak_rss_mb": usage.ru_maxrss / 1024, "log": log}
    got = json.loads(re.findall(r"^BENCH (.*)$", text, re.M)[-1])
    res["work_cpu_s"] = got["work_cpu_s"]
    if config == "trl":
        res.update(train_s=got["train_s"], losses=got["losses"])
    else:
        records = [json.loads(line) for line in open(os.path.join(out, "save", "metrics.jsonl"))]
        pre = re.findall(r"reference log-probs: computed .* in ([0-9.]+)s", text)
        res.update(train_s=[r["wall_time"] for r in records if r.get("done")][-1] + (float(pre[0]) if pre else 0.0),
                   precompute_s=float(pre[0]) if pre else 0.0,
                   losses=[r["train/dpo/loss"] for r in records if "train/dpo/loss" in r])
        own = os.path.join(out, "ckpt", "ref_cache")
        if os.path.isdir(own) and not config.endswith("-cached"):
            shutil.copytree(own, shared_cache, dirs_exist_ok=True)
    res["pairs_per_s"] = N_PAIRS / res["train_s"]
    res["loss_mean"] = statistics.fmean(res["losses"])
    res["loss_last"] = res["losses"][-1]
    return res


# ---- work, counted rather than timed ------------------------------------------------------------

def count_tokens(model_dir: str, data: str, max_len: int) -> dict[str, float]:
    """Token positions each configuration computes in the epoch (batch 8, seed 42, xright's loaders):
    policy forward+backward (weighted 3, a backward being about two forwards) plus reference forwards
    (weighted 1). A machine-independent proxy for the work (attention's T² part aside)."""
    sys.path.insert(0, ROOT)
    from xright.data import CyclingLoader, DataSpec, collate, load_data
    from xright.models import load_tokenizer
    from xright.sharding import plan_batches

    tok = load_tokenizer(model_dir)
    train, _ = load_data(DataSpec(kind="pairwise", dataset=data, eval_split="", input_template="", max_len=max_len,
                                  seed=SEED), tok, log=lambda *a: None)

    def epoch(**kw) -> int:
        loader = CyclingLoader(train, "pairwise", BATCH, tok.pad_token_id, seed=SEED, **kw)
        return sum(loader.next()["input_ids"].numel() for _ in range(len(loader)))

    padded, grouped, packed = epoch(), epoch(group_by_length=True), epoch(packed=True)
    longest_first = [-len(e["prompt_ids"]) - max(map(len, e["responses"])) for e in train]  # as refcache's pass
    once = sum(collate("pairwise", [train[i] for i in idx], tok.pad_token_id)["input_ids"].numel()
               for idx in plan_batches(longest_first, BATCH))
    return {"real tokens": packed, "base": 3 * padded + padded, "precompute": 3 * padded + once,
            "group": 3 * grouped + grouped, "packing": 3 * packed + packed,
            "all": 3 * packed + packed,  # under --packing_samples the pass is packed too
            "precompute-cached": 3 * padded, "all-cached": 3 * packed}


# ---- report -----------------------------------------------------------------------------------

def table(results: dict[str, list[dict]], configs: list[str]) -> list[str]:
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    trl = med(results["trl"], "pairs_per_s") if results.get("trl") else None
    base = med(results["base"], "pairs_per_s") if results.get("base") else None
    lines = ["| config | pairs/s (each round) | ÷ TRL | ÷ xright base | train s | precompute s | process wall s "
             "| CPU s | work CPU s (÷ TRL) | peak RSS MB | loss: epoch mean | loss: last step |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    trl_cpu = med(results["trl"], "work_cpu_s") if results.get("trl") else None
    ratio = lambda x, y: f"{x / y:.2f}×" if y else "–"  # noqa: E731
    for c in configs:
        rs = results.get(c) or []
        if not rs:
            continue
        p = med(rs, "pairs_per_s")
        rounds = ", ".join(f"{r['pairs_per_s']:.2f}" for r in rs)
        pre = med(rs, "precompute_s") if c != "trl" else 0.0
        lines.append(f"| {c} | **{p:.2f}** ({rounds}) | {ratio(p, trl)} | {ratio(p, base)} | {med(rs, 'train_s'):.1f} | "
                     f"{pre:.2f} | {med(rs, 'wall_s'):.1f} | {med(rs, 'cpu_s'):.1f} | {med(rs, 'work_cpu_s'):.1f} "
                     f"({ratio(med(rs, 'work_cpu_s'), trl_cpu)}) | {med(rs, 'peak_rss_mb'):.0f} | "
                     f"{med(rs, 'loss_mean'):.4f} | {med(rs, 'loss_last'):.4f} |")
    return lines


def write_results(path: str, section: str) -> None:
    """Replace the text between MARK and END in ``path`` (append both if absent); the rest is kept."""
    old = open(path).read() if os.path.exists(path) else ""
    if MARK in old and END in old.partition(MARK)[2]:
        head, _, rest = old.partition(MARK)
        _, _, tail = rest.partition(END)
        new = head + MARK + "\n" + section + "\n" + END + tail
    else:
        new = old.rstrip("\n") + "\n\n" + MARK + "\n" + section + "\n" + END + "\n"
    with open(path, "w") as f:
        f.write(new)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workloads", default="whole,cut")
    p.add_argument("--configs", default=",".join(CONFIGS), help="for every workload; --configs_cut overrides for cut")
    p.add_argument("--configs_cut", default=None)
    p.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "RESULTS.md"))
    p.add_argument("--workdir", default=None)
    p.add_argument("--count_tokens", action="store_true", help="only count each configuration's work (seconds)")
    args = p.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_speed_")
    data = write_workloads(workdir)
    model_dir, n_params = write_model(workdir)
    if args.count_tokens:
        lines = ["| workload | real tokens | " + " | ".join(XRIGHT_CONFIGS) + " |",
                 "| --- | --- | " + " | ".join("---" for _ in XRIGHT_CONFIGS) + " |"]
        for wl in args.workloads.split(","):
            w = count_tokens(model_dir, data[wl], WORKLOADS[wl])
            lines.append(f"| {wl} | {w['real tokens']} | " + " | ".join(
                f"{w[c] / 1e3:.0f}k ({w['base'] / w[c]:.2f}× less)" for c in XRIGHT_CONFIGS) + " |")
        print("\n".join(lines))
        return
    started = time.time()
    sections = []
    for wl in args.workloads.split(","):
        configs = (args.configs_cut if wl == "cut" and args.configs_cut else args.configs).split(",")
        results: dict[str, list[dict]] = {c: [] for c in configs}
        for rnd in range(args.rounds):
            for c in configs:
                r = run_one(c, model_dir, data[wl], WORKLOADS[wl], os.path.join(workdir, f"refcache-{wl}"))
                results[c].append(r)
                print(f"[{wl} round {rnd + 1}] {c}: {r['pairs_per_s']:.2f} pairs/s, train {r['train_s']:.1f}s, "
                      f"wall {r['wall_s']:.1f}s, peak {r['peak_rss_mb']:.0f} MB, loss mean {r['loss_mean']:.4f} "
                      f"last {r['loss_last']:.4f}", flush=True)
        sections.append((wl, results, configs))
    minutes = (time.time() - started) / 60
    load = os.getloadavg()
    cmd = "python benchmarks/bench_speed.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out = ["## DPO speed against TRL (bench_speed.py)", "",
           f"`{cmd.strip()}` — {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
           f"{minutes:.1f} min in all, load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
           f"(1/5/15 min; other jobs share this machine). Model: {n_params / 1e6:.2f}M-parameter byte-level GPT-NeoX; "
           f"{N_PAIRS} pairs, batch {BATCH}, 1 epoch, 1 process, 2 threads. Medians over {args.rounds} rounds "
           "(each round ran every configuration once, TRL first); per-round pairs/s in brackets.", ""]
    for wl, results, configs in sections:
        out += [f"**{wl}** (max_len {WORKLOADS[wl]}):", "", *table(results, configs), ""]
    text = "\n".join(out)
    print(text)
    write_results(args.results, text)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_trl_child":
        trl_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
    elif len(sys.argv) > 1 and sys.argv[1] == "--_xright_child":
        xright_child(sys.argv[2:])
    else:
        main()
