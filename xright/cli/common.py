"""The composition root: a CLI declares its flags (:mod:`xright.cli.flags`), its objectives as
:class:`ObjectiveSpec` and its schedule; :func:`run` builds the run from them in named steps and trains it."""

import math
import os
import random
from typing import Callable

import numpy as np
import torch

from xright.cli.batching import ObjectiveSpec, batch_plan, check_resolved_batches, ds_options, write_batches
from xright.cli.flags import safe_config
from xright.cli.lifecycle import EXIT_TERMINATED, Terminated, UsageError
from xright.fingerprints import digest
from xright.schedules import Single, Stopping


def run(args, specs: list[ObjectiveSpec], make_schedule: Callable | None = None, **kwargs) -> dict:
    """Build everything from flags, train, save; the final eval metrics. ``make_schedule(tasks)`` builds the
    schedule once the data is loaded (default: the first objective alone); ``steps_per_epoch(tasks)``: the
    steps of a (joint) epoch (default: one pass over the first objective's data). However it ends, the
    engines it built are released, so that several runs in one process behave as separate launches."""
    try:  # (the run's objects live in _run's frame: gone before release_engines collects them)
        return _run(args, specs, make_schedule, **kwargs)
    finally:
        from xright.strategy import release_engines

        release_engines()


def _run(args, specs: list[ObjectiveSpec], make_schedule: Callable | None, *, task: str = "causal",
         steps_per_epoch: Callable | None = None, extra_save_files: Callable | None = None, stopping=None) -> dict:
    strategy, batches = _configure(args, specs, task)
    tokenizer, data, tasks = _data(args, specs, strategy, batches)
    first = tasks[specs[0].name]
    per_epoch = steps_per_epoch(tasks) if steps_per_epoch else len(first.loader) // first.grad_accum
    total = args.max_steps if args.max_steps else args.max_epochs * per_epoch
    engine, signature = _policy(args, task, strategy, tokenizer, tasks, total)
    reference = _reference(args, specs, strategy, engine, tokenizer, data, tasks, total)
    schedule = make_schedule(tasks) if make_schedule else Single(specs[0].name)
    if args.debug_rank_seed:
        schedule.reseed(args.seed + 1000 * strategy.rank)
    trainer, logger = _trainer(args, strategy, batches, engine, reference, tasks, schedule, signature, stopping,
                               per_epoch, total)
    try:
        if args.load_checkpoint:
            trainer.resume()
        final = trainer.fit()
        if final.get("terminated"):
            raise Terminated(f"stopped by SIGTERM before the last step (exit code {EXIT_TERMINATED}); resume "
                             f"with --load_checkpoint")
        write_batches(args, batches, tasks, strategy)
        if final:
            strategy.print("final " + " ".join(f"{k}={v:.4f}" for k, v in final.items()))
    finally:
        logger.close()
    _save(args, task, strategy, engine, tokenizer, extra_save_files(trainer) if extra_save_files else None)
    return final


def _configure(args, specs: list[ObjectiveSpec], task: str):
    """Checks that need no model or data, the seeds, the batch plan and the DeepSpeed config."""
    from xright import logprobs
    from xright.strategy import Strategy

    for sp in specs:
        try:
            sp.objective.check_micro_batch(sp.micro_batch_size)
        except ValueError as e:
            raise UsageError(f"{sp.name}: {e}") from None
    if args.packing_samples and task == "reward":
        raise UsageError("--packing_samples is not supported for reward models (their score is read at each "
                         "row's last token of a padded batch); drop it, or use --group_by_length")
    if args.logprob_chunk_size is not None and args.logprob_chunk_size < 0:
        raise UsageError(f"--logprob_chunk_size {args.logprob_chunk_size}: must be >= 0 (0: the full logits)")
    try:
        os.makedirs(args.save_path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--save_path {args.save_path!r} cannot be created: {e.strerror}") from e
    if not os.access(args.save_path, os.W_OK):
        raise UsageError(f"--save_path {args.save_path!r} is not writable")
    strategy = Strategy(seed=args.seed)
    logprobs.CHUNK_SIZE, logprobs.say = args.logprob_chunk_size, strategy.print
    for seed in (random.seed, np.random.seed, torch.manual_seed):
        seed(args.seed)
    batches = batch_plan(args, specs, strategy.world_size)
    strategy.configure(ds_options(args, specs))
    check_resolved_batches(args, specs, strategy.ds_config)
    # --skip_nonfinite relies on DeepSpeed's ZeRO optimizers discarding a step with non-finite gradients
    if args.skip_nonfinite and strategy.zero_stage == 0:
        raise UsageError("--skip_nonfinite needs --zero_stage 1, 2 or 3: only DeepSpeed's ZeRO optimizers discard "
                         "a step whose gradients are non-finite; at stage 0 it would already be applied")
    bf16 = strategy.ds_config.get("bf16") or {}
    if args.skip_nonfinite and bf16.get("enabled") and bf16.get("check_grad_overflow") is False:
        raise UsageError("--skip_nonfinite contradicts bf16.check_grad_overflow = false in the DeepSpeed config: "
                         "without that check a bf16 ZeRO-1/2 optimizer applies non-finite gradients")
    return strategy, batches


def _data(args, specs: list[ObjectiveSpec], strategy, batches):
    """The tokenizer, each objective's (train, eval) examples, and its Task (loader, accumulation)."""
    from xright.data import CyclingLoader, load_data
    from xright.models import load_tokenizer
    from xright.trainer import Task

    tokenizer = load_tokenizer(args.pretrain, use_fast=not args.disable_fast_tokenizer,
                               trust_remote_code=args.trust_remote_code, chat_template=args.tokenizer_chat_template)
    data = {sp.name: load_data(sp.data, tokenizer, log=strategy.print) for sp in specs}
    tasks = {}
    for sp in specs:
        accum = batches[sp.name].micro_steps
        try:
            loader = CyclingLoader(data[sp.name][0], sp.objective.kind, sp.micro_batch_size, tokenizer.pad_token_id,
                                   rank=strategy.rank, world_size=strategy.world_size, seed=args.seed,
                                   packed=args.packing_samples, group_by_length=args.group_by_length,
                                   accumulation=accum)
        except ValueError as e:
            raise UsageError(f"{sp.name}: {e}") from None
        sp.objective.bind(strategy)  # KTO's z is a mean over ranks (objectives import no deepspeed)
        sp.objective.check_data(loader.examples)  # KTO's class balance
        tasks[sp.name] = Task(sp.objective, loader, data[sp.name][1], sp.micro_batch_size, accum, sp.optimum)
    return tokenizer, data, tasks


def _policy(args, task: str, strategy, tokenizer, tasks: dict, total: int):
    """The trained model, its optimizer and lr schedule in a DeepSpeed engine, and the signature a
    checkpoint must match to be resumed."""
    from transformers import get_scheduler

    from xright.models import LoraSpec, check_model, load_model

    lora = LoraSpec(args.lora_rank, args.lora_alpha, args.lora_dropout, args.target_modules)
    bf16 = strategy.precision == "bf16"  # the resolved config's (a --deepspeed file may say so), not the flag's
    model = load_model(args.pretrain, task=task, bf16=bf16, flash_attn=args.flash_attn, lora=lora,
                       gradient_checkpointing=args.gradient_checkpointing,
                       gradient_checkpointing_use_reentrant=args.gradient_checkpointing_use_reentrant,
                       load_in_4bit=args.load_in_4bit, trust_remote_code=args.trust_remote_code, seed=args.seed,
                       vocab_size=len(tokenizer), packing=args.packing_samples, pad_token_id=tokenizer.pad_token_id)
    # the world size is not part of it: a checkpoint moves to another rank count (Strategy.plan_resume)
    signature = {"model": args.pretrain or "tiny", "lora_rank": args.lora_rank,
                 "num_params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
                 "objectives": sorted(tasks),
                 # loader positions are global counts: they mean the same examples under any world size ×
                 # micro batch × accumulation of the same examples per optimizer step, and other data elsewhere
                 "examples_per_step": {k: t.loader.global_batch for k, t in tasks.items()},
                 "group_by_length": args.group_by_length,
                 "data": {k: f"{len(t.loader.examples)} examples, ids sha256 " +
                          digest("\n".join(e["id"] for e in t.loader.examples)) for k, t in tasks.items()}}
    optimizer = strategy.optimizer(model, args.learning_rate, args.adam_betas, args.l2)
    min_lr = {"min_lr": args.learning_rate * args.min_lr_ratio} if args.lr_scheduler == "cosine_with_min_lr" else None
    scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=math.ceil(total * args.lr_warmup_ratio),
                              num_training_steps=total, scheduler_specific_kwargs=min_lr)
    if args.load_checkpoint:  # another world size: convert to a universal checkpoint before the engine exists
        strategy.plan_resume(args.ckpt_path, signature)
    engine = strategy.prepare(model, optimizer, scheduler)
    # after prepare: on the device, and under ZeRO-3 every rank probes the partitioned engine in lockstep
    strategy.print("xright: " + check_model(engine, packing=args.packing_samples))
    return engine, signature


def _reference(args, specs: list[ObjectiveSpec], strategy, engine, tokenizer, data: dict, tasks: dict, total: int):
    """The frozen reference of the objectives that need one: a table of precomputed log-probs, a live
    model, or the LoRA policy with its adapter off; None if none does."""
    from xright.models import check_model, is_peft, load_model
    from xright.objectives import Reference

    ref_specs = [sp for sp in specs if sp.objective.needs_reference]
    if not ref_specs:
        return None
    ref_path = getattr(args, "ref_pretrain", None)

    def live_reference():
        if is_peft(engine.module) and not ref_path:
            return Reference(lora_policy=engine)
        ref = load_model(ref_path or args.pretrain, bf16=strategy.precision == "bf16", flash_attn=args.flash_attn,
                         seed=args.seed, trust_remote_code=args.trust_remote_code, vocab_size=len(tokenizer),
                         trainable=False, packing=args.packing_samples, pad_token_id=tokenizer.pad_token_id)
        ref = strategy.prepare_reference(ref)
        strategy.print("xright: reference " + check_model(ref, packing=args.packing_samples))
        return Reference(model=ref)

    # --precompute_ref_log_probs, unless left at its default for a run whose steps cannot draw every training
    # example once (a smoke test): then one pass over all of them costs more than the live forwards it saves
    precompute = getattr(args, "precompute_ref_log_probs", False)
    if precompute and "precompute_ref_log_probs" not in args.explicit:
        for sp in ref_specs:  # an objective picked at every step draws micro × accum × world examples per step
            t = tasks[sp.name]
            drawn, have = total * t.micro_batch_size * t.grad_accum * strategy.world_size, len(t.loader.examples)
            if drawn < have:
                strategy.print(f"reference log-probs: live ({total} steps draw at most {drawn} of the {have} "
                               f"{sp.name} examples; --precompute_ref_log_probs forces the pass)")
                precompute = False
                break
    if not precompute:
        return live_reference()
    from xright import fingerprints, refcache

    fp = fingerprints.reference(ref_path or args.pretrain, args.seed, strategy.precision, args.flash_attn,
                                bool(args.lora_rank > 0 and not ref_path and args.load_in_4bit), tokenizer,
                                {sp.name: sp.data for sp in ref_specs})
    return refcache.cached_reference(
        live_reference, strategy, [ex for sp in ref_specs for ex in data[sp.name] if ex],
        tuple(sorted({p for sp in ref_specs for p in sp.objective.live_reference_prefixes})), fp,
        args.ref_cache_dir or os.path.join(args.ckpt_path, "ref_cache"),
        min(sp.micro_batch_size for sp in ref_specs), tokenizer.pad_token_id, packed=args.packing_samples)


def _trainer(args, strategy, batches: dict, engine, reference, tasks: dict, schedule, signature: dict, stopping,
             per_epoch: int, total: int):
    """The config dumps, the metrics logger and the Trainer."""
    from xright.logging import MetricsLogger, wandb_settings
    from xright.files import atomic_write_json
    from xright.trainer import TrainArgs, Trainer

    strategy.write_config(args.save_path)
    if strategy.is_rank0:
        atomic_write_json(os.path.join(args.save_path, "xright_args.json"), safe_config(args))
    wandb = wandb_settings(args.use_wandb, args.wandb_org, args.wandb_group, args.wandb_project, args.wandb_run_name)
    logger = MetricsLogger(args.save_path, strategy.is_rank0, resume=args.load_checkpoint, wandb=wandb,
                           tensorboard_dir=args.use_tensorboard, config=safe_config(args))
    counts = "loader batches, as XRIGHT's CLIs" if args.batch_meaning == "xright" else "examples"
    strategy.print(f"xright: {total} optimizer steps ({per_epoch} per epoch), world size {strategy.world_size}, "
                   f"ZeRO-{strategy.zero_stage}, objectives {', '.join(tasks)}; --train_batch_size "
                   f"{args.train_batch_size} counts {counts}")
    for name, b in batches.items():
        strategy.print(f"xright: {name}: {b}")
    train_args = TrainArgs(
        total_steps=total, save_path=args.save_path,
        eval_steps=args.eval_steps if args.eval_steps > 0 else per_epoch,
        logging_steps=max(1, args.logging_steps), debug_log_picks=args.debug_log_picks, stopping=stopping or Stopping(),
        save_steps=args.save_steps, ckpt_path=args.ckpt_path, max_ckpt_num=args.max_ckpt_num,
        max_ckpt_mem=args.max_ckpt_mem, signature=signature, equal_length=getattr(args, "equal_length", False),
        steps_per_epoch=per_epoch, skip_nonfinite=args.skip_nonfinite)
    strategy.seed_rank()  # after every model is built: dropout masks differ across ranks, weights do not
    return Trainer(strategy, engine, reference, tasks, schedule, train_args, logger), logger


def _save(args, task: str, strategy, engine, tokenizer, extra_files) -> None:
    """The final HF model (and, with --merge_lora, the adapter merged into its base)."""
    from xright.models import is_peft, merge_saved_adapter

    strategy.save_hf(engine, tokenizer, args.save_path, extra_files=extra_files)
    strategy.release_hf_config()
    if args.merge_lora and is_peft(engine.module) and strategy.is_rank0:
        merge_saved_adapter(args.pretrain, args.save_path, os.path.join(args.save_path, "merged"), tokenizer,
                            seed=args.seed, task=task)  # the tiny base is built from the run's seed
    strategy.barrier()
    strategy.print(f"saved to {args.save_path}")
