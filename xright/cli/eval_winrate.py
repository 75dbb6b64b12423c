"""Win rate of generated answers against a baseline, judged by a reward model: the offline counterpart
of the paper's AlpacaEval number.

    python -m xright.cli.eval_winrate --reward_pretrain ./ckpt/rm --baseline ref.jsonl \\
        --candidates exo.jsonl,dpo.jsonl --names exo-rw,iter-dpo --output_dir ./eval

Every file is a generation file (``batch_inference --eval_task generate``: ``prompt_id``, ``input``,
``output``) with one answer per prompt, for the same prompts; a baseline or candidate that is not a file is a
model (HF dir, LoRA adapter dir, hub id or ``tiny``) whose greedy answers to ``--dataset`` (default: the
built-in held-out prompts) are generated first, into ``output_dir/answers_<name>.jsonl``. Per candidate, from
the reward model's scores (``train_rm``'s): the win rate over the baseline with ties counted half, a bootstrap
interval over prompts, the mean score difference and the mean answer lengths in tokens (a judge that likes long
answers shows up as a length gap). Writes ``winrate.json``, ``winrate.md`` and, with matplotlib,
``winrate.png``. Under ``deepspeed --num_gpus N`` the scoring is sharded as in ``batch_inference --eval_task rm``.
"""

import argparse
import json
import os

from xright.cli import flags, lifecycle


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reward_pretrain", type=str, required=True, help="the judge: a model trained by train_rm")
    p.add_argument("--baseline", type=str, required=True, help="generation file of the baseline (B)")
    p.add_argument("--baseline_name", type=str, default=None, help="default: the file's name")
    p.add_argument("--candidates", type=str, required=True, help="comma-separated generation files (A, …)")
    p.add_argument("--names", type=str, default=None, help="comma-separated names for --candidates")
    p.add_argument("--output_dir", type=str, required=True)
    g = p.add_argument_group("generating first (for models among --baseline / --candidates)")
    g.add_argument("--dataset", type=str, default=None, help="prompts; default: the built-in held-out prompts")
    for name, default in (("dataset_split", "test"), ("max_samples", 100000000), ("max_new_tokens", 1024),
                          ("generate_micro_batch_size", 16)):
        g.add_argument(f"--{name}", type=type(default), default=default)
    flags.add_template_flags(p)
    for name, default in (("input_key", "input"), ("output_key", "output"), ("max_len", 2048), ("micro_batch_size", 16),
                          ("n_bootstrap", 2000), ("seed", 42), ("zero_stage", 0), ("local_rank", -1)):
        p.add_argument(f"--{name}", type=type(default), default=default)
    for name in ("bf16", "flash_attn"):
        p.add_argument(f"--{name}", action="store_true", default=False)
    return p


def _name(path: str) -> str:
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def aligned(files: dict, answers: dict) -> list[str]:
    """The baseline's prompt ids, after checking every file answers exactly those prompts, once each."""
    order = None
    for name, recs in answers.items():
        ids = [r["prompt_id"] for r in recs]
        dup = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
        if dup:
            raise lifecycle.UsageError(f"{files[name]}: {len(dup)} prompts have several answers (first {dup[0]!r}); "
                                    "the judge compares one answer per prompt (generate without --best_of_n)")
        if order is None:
            order = ids
            continue
        missing, extra = set(order) - set(ids), set(ids) - set(order)
        if missing or extra:
            what = f"misses {len(missing)} (first {sorted(missing)[0]!r})" if missing else \
                f"has {len(extra)} extra (first {sorted(extra)[0]!r})"
            raise lifecycle.UsageError(f"{files[name]} {what} prompts of the baseline {next(iter(files.values()))}: "
                                    "generate both for the same prompts")
    return order


def answers_file(path: str, name: str, args) -> str:
    """``path`` if it is a file; else ``path`` is a model: its greedy answers, generated now."""
    if os.path.isfile(path):
        return path
    from xright.cli import batch_inference

    out = os.path.join(args.output_dir, f"answers_{name}.jsonl")
    batch_inference.main(["--eval_task", "generate", "--pretrain", path, "--greedy_sampling", "--output_path", out,
                          "--max_new_tokens", str(args.max_new_tokens), "--max_samples", str(args.max_samples),
                          "--dataset_split", args.dataset_split, "--input_key", args.input_key,
                          "--input_template", args.input_template, "--micro_batch_size",
                          str(args.generate_micro_batch_size), "--zero_stage", str(args.zero_stage), "--seed",
                          str(args.seed), *(["--dataset", args.dataset] if args.dataset else []),
                          *(["--apply_chat_template"] if args.apply_chat_template else []),
                          *(["--tokenizer_chat_template", args.tokenizer_chat_template]
                            if args.tokenizer_chat_template else []),
                          *(["--bf16"] if args.bf16 else [])])
    return out


def plot(rows: list[dict], baseline: str, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(rows), 3.2))
    x = range(len(rows))
    wr = [r["win_rate"] for r in rows]
    err = [[w - r["ci_low"] for w, r in zip(wr, rows)], [r["ci_high"] - w for w, r in zip(wr, rows)]]
    ax.bar(x, wr, yerr=err, capsize=4, color="#4c72b0")
    ax.axhline(0.5, color="grey", lw=1, ls="--")
    ax.set_xticks(list(x), [r["name"] for r in rows], rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate vs {baseline}")
    ax.set_title("reward-model judge, 95 % bootstrap CI", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None):
    args = parser().parse_args(argv)
    from xright.data import DataSpec
    from xright.generation import markdown_table, read_answers, score, tokenize_answers, win_rate
    from xright.models import load_for_inference, load_tokenizer
    from xright.sharding import gather_ordered
    from xright.strategy import Strategy, configure_inference

    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    names = [n.strip() for n in args.names.split(",")] if args.names else [_name(c) for c in candidates]
    if len(names) != len(candidates):
        raise lifecycle.UsageError(f"{len(candidates)} --candidates but {len(names)} --names")
    baseline = args.baseline_name or _name(args.baseline)
    files = {baseline: args.baseline, **dict(zip(names, candidates))}
    if len(files) != len(candidates) + 1:
        raise lifecycle.UsageError(f"names must differ: {baseline}, {', '.join(names)}")
    files = {n: answers_file(f, n, args) for n, f in files.items()}
    strategy = Strategy(seed=args.seed)
    configure_inference(strategy, args.zero_stage, args.bf16)
    tokenizer = load_tokenizer(args.reward_pretrain, chat_template=args.tokenizer_chat_template)
    spec = lambda f: DataSpec(kind="sft", dataset=f, max_len=args.max_len, input_key=args.input_key,  # noqa: E731
                              output_key=args.output_key, input_template=args.input_template or None,
                              apply_chat_template=args.apply_chat_template, seed=args.seed)
    answers = {n: read_answers(spec(f)) for n, f in files.items()}
    order = aligned(files, answers)
    flat = [r for n in files for r in answers[n]]
    examples, counts = tokenize_answers(flat, tokenizer, spec(None))
    if len(examples) != len(flat):
        raise lifecycle.UsageError(f"{len(flat) - len(examples)} answers have a prompt longer than --max_len "
                                f"{args.max_len}: raise it")
    model = strategy.prepare_reference(load_for_inference(args.reward_pretrain, task="reward", bf16=args.bf16,
                                                          flash_attn=args.flash_attn, vocab_size=len(tokenizer)))
    # each distinct token sequence is scored once: the same answer in two files gets the same score (an exact
    # tie), not two values that differ in the last bits because they were padded in different batches
    key = lambda e: (tuple(e["prompt_ids"]), tuple(e["response_ids"]))  # noqa: E731
    where = {}
    for e in examples:
        where.setdefault(key(e), {**e, "index": len(where)})
    local = score(model, list(where.values()), args.micro_batch_size, tokenizer.pad_token_id, rank=strategy.rank,
                  world_size=strategy.world_size, synced=strategy.zero_stage == 3 and strategy.world_size > 1,
                  device=strategy.device)
    unique = gather_ordered(local, len(where), strategy.all_gather_object)
    scores = {e["index"]: unique[where[key(e)]["index"]] for e in examples}
    if strategy.is_rank0:
        at = iter(range(len(flat)))  # flat is every file's answers in turn: its i-th answer has scores[i]
        length = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        # (score, answer length in tokens) per prompt id, per file
        by = {n: {r["prompt_id"]: (scores[next(at)], length(r["response"])) for r in answers[n]} for n in files}
        mean = lambda n, k: sum(by[n][p][k] for p in order) / len(order)  # noqa: E731
        b = [by[baseline][p][0] for p in order]
        rows = [{"name": n, "file": files[n], **win_rate([by[n][p][0] for p in order], b, args.n_bootstrap, args.seed),
                 "mean_score": mean(n, 0), "baseline_mean_score": mean(baseline, 0), "mean_len": mean(n, 1),
                 "baseline_mean_len": mean(baseline, 1)} for n in names]
        os.makedirs(args.output_dir, exist_ok=True)
        table = markdown_table(rows, baseline)
        with open(os.path.join(args.output_dir, "winrate.json"), "w") as f:
            json.dump({"baseline": baseline, "baseline_file": args.baseline, "judge": args.reward_pretrain,
                       "rows": rows}, f, indent=2)
        with open(os.path.join(args.output_dir, "winrate.md"), "w") as f:
            f.write(table)
        drew = plot(rows, baseline, os.path.join(args.output_dir, "winrate.png"))
        print(table + ("" if drew else "(matplotlib not installed: no chart; pip install 'xright[plot]')\n"), flush=True)
    strategy.barrier()
    strategy.release_hf_config()


if __name__ == "__main__":
    lifecycle.main_guard(main)
