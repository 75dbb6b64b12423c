"""Batch inference: generate completions, score (prompt, answer) records with a reward model, and turn
scored completions into training data (XRIGHT's ``batch_inference``, same flags).

    deepspeed --num_gpus 2 --module xright.cli.batch_inference --eval_task generate --pretrain ./ckpt/sft \\
        --dataset prompts.jsonl --input_key prompt --best_of_n 4 --output_path samples.jsonl
    deepspeed --module xright.cli.batch_inference --eval_task rm --pretrain ./ckpt/rm \\
        --dataset samples.jsonl --post_processor exo --output_path scored.jsonl

``generate`` writes one JSON line per completion, in input order: ``{"id", "prompt_id", "input", "output"}``
(``id`` is the prompt's record id, ``<id>#<k>`` with ``--best_of_n`` K > 1; ``input`` is the raw prompt, which
the trainers template again: messages stay messages, an HH dialogue through its last ``"\n\nAssistant:"`` stays
untemplated). ``generate_alpaca_eval`` writes AlpacaEval's JSON list of ``{"instruction", "output",
"generator"}``. ``rm`` reads ``input``/``output`` records and writes them with a ``reward``, or, with
``--post_processor``, training records: ``rs``/``csft`` → SFT (``input``, ``output``), ``iter_dpo`` → pairwise
(``prompt``, ``chosen``, ``rejected``), ``exo`` → scored (``prompt``, ``completions``, ``rewards``), ``kto`` →
binary (``prompt``, ``completion``, ``label``); after message prompts each answer is ``[{"role": "assistant",
"content": …}]`` (TRL's layout). Differences from XRIGHT: ``--input_template`` defaults to the trainers'
template (XRIGHT: none), ``--seed`` to 42, the trainers' seed, which also picks the built-in prompts.
"""

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

from xright.cli import flags, lifecycle

def add_generation_flags(p: argparse.ArgumentParser, pretrain_help: str) -> None:
    """The model, template and sampling flags of this CLI and interactive_chat (which sets its sampling defaults)."""
    p.add_argument("--pretrain", type=str, default=None, help=pretrain_help)
    for name in ("bf16", "flash_attn", "load_in_4bit", "disable_fast_tokenizer", "trust_remote_code"):
        p.add_argument(f"--{name}", action="store_true", default=False)
    p.add_argument("--seed", type=int, default=42)
    flags.add_template_flags(p)
    g = p.add_argument_group("generation")
    g.add_argument("--max_new_tokens", type=int, default=1024)
    g.add_argument("--greedy_sampling", action="store_true", default=False)
    for name in ("top_p", "temperature", "repetition_penalty"):
        g.add_argument(f"--{name}", type=float, default=1.0)


def tokenizer_for(args):
    from xright.models import load_tokenizer

    return load_tokenizer(args.pretrain, use_fast=not args.disable_fast_tokenizer,
                          trust_remote_code=args.trust_remote_code, chat_template=args.tokenizer_chat_template)


def model_for(args, vocab_size: int, task: str = "causal"):
    from xright.models import load_for_inference

    return load_for_inference(args.pretrain, task=task, bf16=args.bf16, flash_attn=args.flash_attn,
                              load_in_4bit=args.load_in_4bit, trust_remote_code=args.trust_remote_code, seed=args.seed,
                              vocab_size=vocab_size)


def parser() -> argparse.ArgumentParser:
    from xright.generation import POST_PROCESSORS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval_task", choices=("generate", "generate_vllm", "rm", "generate_alpaca_eval"), required=True)
    add_generation_flags(p, "policy (generate) or reward model (rm): hub id, HF dir or xright LoRA adapter dir; "
                            "default: built-in tiny model")
    p.add_argument("--zero_stage", type=int, default=0, help="3: the model stays sharded (ranks generate in sync)")
    p.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    p.add_argument("--micro_batch_size", type=int, default=16, help="prompts (or answers) per forward, per rank")
    p.add_argument("--value_head_prefix", type=str, default="value_head", help=f"reward head name {flags.COMPAT}")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", type=str, default=None, help="default: built-in preference prompts")
    for name, default in (("dataset_probs", "1.0"), ("dataset_split", "train"), ("input_key", "input"),
                          ("output_key", "output"), ("max_samples", 100000000), ("rollout_batch_size", 2048)):
        g.add_argument(f"--{name}", type=type(default), default=default)
    g.add_argument("--max_len", type=int, default=2048, help="rm: prompt + answer tokens (answers cut to fit)")
    g.add_argument("--output_path", type=str, required=True)
    g.add_argument("--prompt_max_len", type=int, default=1024, help="longer prompts keep their last tokens")
    g.add_argument("--best_of_n", type=int, default=1, help="completions per prompt")
    g.add_argument("--iter", type=int, default=None,
                   help="generate for prompts [iter × rollout_batch_size, (iter + 1) × rollout_batch_size) of the "
                        "blend of --max_samples prompts (drawn once, so iterations never repeat a prompt)")
    g.add_argument("--enable_csft", action="store_true", default=False, help="append --csft_prompt to each prompt")
    g.add_argument("--csft_prompt", type=str, default="<rm_score>: 5.00")
    g.add_argument("--generator", type=str, default=None, help="generate_alpaca_eval: the model's name")
    g.add_argument("--tp_size", type=int, default=1, help="generate_vllm: tensor-parallel size")
    g.add_argument("--max_num_seqs", type=int, default=256, help="generate_vllm")
    g.add_argument("--enable_prefix_caching", action="store_true", default=False, help="generate_vllm")
    g = p.add_argument_group("reward labelling")
    g.add_argument("--post_processor", choices=sorted(POST_PROCESSORS), default=None)
    g.add_argument("--normalize_reward", action="store_true", default=False,
                   help="(r − mean) / std with the reward model's saved statistics (the reward_stats.json train_rm "
                        "writes, else mean/std in its config.json)")
    g.add_argument("--reward_template", type=str, default=None, help="csft: default '{input} <rm_score>: {reward} '")
    g.add_argument("--kto_threshold", type=float, default=None,
                   help="kto: reward > threshold is desirable; default: above the prompt's median")
    return p


def data_spec(args):
    from xright.data import DataSpec

    return DataSpec(kind="sft", dataset=args.dataset, dataset_probs=args.dataset_probs, train_split=args.dataset_split,
                    max_samples=int(args.max_samples), max_len=args.max_len, input_key=args.input_key,
                    output_key=args.output_key, input_template=args.input_template or None,
                    apply_chat_template=args.apply_chat_template, seed=args.seed, name="prompts")


def prompts(args, tokenizer):
    from xright.generation import encode_prompts, read_prompts

    spec = data_spec(args)
    spec.check()
    start, count = (0, None) if args.iter is None else (args.iter * args.rollout_batch_size, args.rollout_batch_size)
    records = read_prompts(spec, start, count)
    if args.enable_csft:
        cue = lambda text: f"{text} {args.csft_prompt.strip()} "  # messages: into the last (user) turn
        records = [{**r, "prompt": r["prompt"][:-1] + [{**r["prompt"][-1], "content": cue(r["prompt"][-1]["content"])}]
                    if isinstance(r["prompt"], list) else cue(r["prompt"])} for r in records]
    return records, encode_prompts(records, tokenizer, spec, args.prompt_max_len)


def generation_records(records, completions, tokenizer, eval_task: str, generator: str):
    K = len(completions[0]) if completions else 1
    if eval_task == "generate_alpaca_eval":
        return [{"instruction": r["prompt"][-1]["content"] if isinstance(r["prompt"], list) else r["prompt"],
                 "output": tokenizer.decode(cs[0], skip_special_tokens=True), "generator": generator}
                for r, cs in zip(records, completions)]
    return [{"id": r["id"] if K == 1 else f"{r['id']}#{k}", "prompt_id": r["id"], "input": r["prompt"],
             "output": tokenizer.decode(c, skip_special_tokens=True)}
            for r, cs in zip(records, completions) for k, c in enumerate(cs)]


def run_generate(args, strategy, tokenizer) -> None:
    from xright.generation import Progress, Sampling, eos_ids, generate, write_records
    from xright.sharding import gather_ordered

    records, ids = prompts(args, tokenizer)
    model = model_for(args, len(tokenizer))
    stop = eos_ids(tokenizer, model)
    model = strategy.prepare_reference(model)
    synced = strategy.zero_stage == 3 and strategy.world_size > 1
    bar = Progress(len(records), strategy.is_rank0, "generate (rank 0)")
    start = time.perf_counter()
    sampling = Sampling(max_new_tokens=args.max_new_tokens, greedy=args.greedy_sampling, top_p=args.top_p,
                        temperature=args.temperature, repetition_penalty=args.repetition_penalty, n=args.best_of_n,
                        seed=args.seed)
    local = generate(model, ids, sampling, args.micro_batch_size, eos_ids=stop,
                     pad_id=tokenizer.pad_token_id, rank=strategy.rank, world_size=strategy.world_size, synced=synced,
                     device=strategy.device, progress=bar)
    bar.close()
    completions = gather_ordered(local, len(records), strategy.all_gather_object)
    wall = time.perf_counter() - start
    if strategy.is_rank0:
        generator = args.generator or os.path.basename(os.path.normpath(args.pretrain or "tiny"))
        out = generation_records(records, completions, tokenizer, args.eval_task, generator)
        write_records(args.output_path, out, json_list=args.eval_task == "generate_alpaca_eval")
        tokens = sum(len(c) for cs in completions for c in cs)
        print(f"generated {sum(len(cs) for cs in completions)} completions for {len(records)} prompts on "
              f"{strategy.world_size} rank(s) in {wall:.1f} s: {len(records) / wall:.2f} prompts/s, "
              f"{tokens / wall:.1f} tokens/s; wrote {args.output_path}", flush=True)
    strategy.barrier()


def run_vllm(args) -> None:
    if importlib.util.find_spec("vllm") is None:
        raise lifecycle.UsageError("--eval_task generate_vllm needs vLLM, which is not installed: "
                                "pip install 'xright[vllm]' (CUDA GPU only), or use --eval_task generate")
    from vllm import LLM, SamplingParams

    from xright.generation import write_records

    tokenizer = tokenizer_for(args)
    records, ids = prompts(args, tokenizer)
    llm = LLM(model=args.pretrain, tensor_parallel_size=args.tp_size, trust_remote_code=args.trust_remote_code,
              seed=args.seed, max_num_seqs=args.max_num_seqs, enable_prefix_caching=args.enable_prefix_caching,
              dtype="bfloat16" if args.bf16 else "auto")
    params = SamplingParams(n=args.best_of_n, max_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
                            temperature=0.0 if args.greedy_sampling else args.temperature,
                            top_p=1.0 if args.greedy_sampling else args.top_p, seed=args.seed)
    outs = llm.generate([{"prompt_token_ids": x} for x in ids], params)
    completions = [[list(o.token_ids) for o in out.outputs] for out in outs]
    write_records(args.output_path, generation_records(records, completions, tokenizer, "generate", "vllm"))


def run_rm(args, strategy, tokenizer) -> None:
    from xright.generation import (POST_PROCESSORS, PostOptions, Progress, normalize, post_process, read_answers,
                                   score, tokenize_answers, write_records)

    spec = data_spec(args)
    spec.check()
    answers = read_answers(spec)
    examples, counts = tokenize_answers(answers, tokenizer, spec)
    if not examples:
        raise lifecycle.UsageError(f"rm: no answers to score: the prompts of all {len(answers)} are longer than "
                                f"--max_len {args.max_len}")
    if counts["dropped_prompt"] or counts["truncated"]:
        strategy.print(f"rm: {counts['truncated']} answers cut to --max_len {args.max_len}, "
                       f"{counts['dropped_prompt']} left out: prompt longer than --max_len")
    model = model_for(args, len(tokenizer), task="reward")
    config = model.config
    model = strategy.prepare_reference(model)
    bar = Progress(len(examples), strategy.is_rank0, "score (rank 0)", unit="answers")
    local = score(model, examples, args.micro_batch_size, tokenizer.pad_token_id, rank=strategy.rank,
                  world_size=strategy.world_size, synced=strategy.zero_stage == 3 and strategy.world_size > 1,
                  device=strategy.device, progress=bar)
    bar.close()
    scores: dict[int, float] = {}
    for part in strategy.all_gather_object(local):
        scores.update(part)
    if not strategy.is_rank0:
        strategy.barrier()
        return
    kept = [i for i in range(len(answers)) if i in scores]
    rewards = [scores[i] for i in kept]
    if args.normalize_reward:
        # train_rm writes reward_stats.json beside every save (a LoRA save has no config.json to hold them)
        stats = Path(args.pretrain or "").expanduser() / "reward_stats.json"
        saved = json.loads(stats.read_text()) if args.pretrain and stats.is_file() else {}
        rewards, how = normalize(rewards, saved.get("mean", getattr(config, "mean", None)),
                                 saved.get("std", getattr(config, "std", None)))
        print(f"rm: rewards normalised with {how}", flush=True)
    records = [{"id": answers[i]["id"], "prompt_id": answers[i]["prompt_id"], "input": answers[i]["prompt"],
                "output": answers[i]["response"], "reward": r} for i, r in zip(kept, rewards)]
    if args.post_processor:
        opts = PostOptions(args.kto_threshold, args.reward_template)
        records, blank = post_process(args.post_processor, records, opts)
        if blank:
            print(f"rm: {blank} blank answers left out of the {args.post_processor} records (trainers reject them)")
        _, kind, trainer = POST_PROCESSORS[args.post_processor]
        print(f"rm: {args.post_processor}: {len(records)} {kind} records for {trainer}", flush=True)
    write_records(args.output_path, records)
    print(f"rm: scored {len(kept)} answers; wrote {args.output_path}", flush=True)
    strategy.barrier()


def main(argv=None):
    args = parser().parse_args(argv)
    if args.best_of_n < 1 or args.micro_batch_size < 1 or args.max_new_tokens < 1:
        raise lifecycle.UsageError("--best_of_n, --micro_batch_size and --max_new_tokens must be >= 1")
    if args.post_processor and args.eval_task != "rm":
        raise lifecycle.UsageError("--post_processor needs --eval_task rm: it turns scored answers into training data")
    if args.eval_task == "generate_alpaca_eval" and args.best_of_n != 1:
        raise lifecycle.UsageError("generate_alpaca_eval writes one output per instruction: drop --best_of_n")
    if args.greedy_sampling and args.best_of_n > 1 and os.environ.get("RANK", "0") == "0":
        print(f"warning: --greedy_sampling with --best_of_n {args.best_of_n}: the {args.best_of_n} completions of a "
              "prompt are identical", flush=True)
    if args.eval_task == "generate_vllm":
        return run_vllm(args)
    from transformers import set_seed

    from xright.strategy import Strategy, configure_inference

    strategy = Strategy(seed=args.seed)
    set_seed(args.seed)  # python, numpy and torch
    configure_inference(strategy, args.zero_stage, args.bf16)
    tokenizer = tokenizer_for(args)
    if args.eval_task == "rm":
        run_rm(args, strategy, tokenizer)
    else:
        run_generate(args, strategy, tokenizer)
    strategy.release_hf_config()


if __name__ == "__main__":
    lifecycle.main_guard(main)
