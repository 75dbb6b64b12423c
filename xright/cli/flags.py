"""Flags shared by every CLI and what they build; names, meanings and defaults as XRIGHT's (``docs/flags.md``)."""

import argparse
import sys
from datetime import datetime

from xright.cli.batching import batch_sizes_from_file
from xright.cli.lifecycle import UsageError

COMPAT = "(accepted for compatibility with XRIGHT/OpenRLHF scripts; has no effect in xright)"

# What --train_batch_size counts, fixed per CLI: (its help, --micro_train_batch_size's help).
BATCH_MEANINGS = {
    # OpenRLHF's CLIs and xright's own (train_sft, train_dpo, train_joint …)
    "examples": ("examples per optimizer step over all ranks: each objective accumulates train_batch_size / "
                 "(its micro batch × ranks) micro-batches",
                 "examples per rank per micro-batch"),
    # XRIGHT's CLIs (train_sft_dpo_*, *_seq, train_sft_pref): DeepSpeed's micro batch is --micro_train_batch_size
    # (1 in the joint ones, which lack the flag) while a micro-step is one loader batch
    "xright": ("as XRIGHT: loader batches per optimizer step over all ranks: each objective accumulates "
               "train_batch_size / (--micro_train_batch_size × ranks) loader batches of its own "
               "--*micro_train_batch_size examples (the paper passes the number of GPUs: one loader batch per rank)",
               "as XRIGHT: DeepSpeed's micro batch, counted in loader batches (keep 1)"),
}


def base_parser(description: str, batch_meaning: str = "examples", **defaults) -> argparse.ArgumentParser:
    """The shared flags. ``batch_meaning`` says what ``--train_batch_size`` counts (see :data:`BATCH_MEANINGS`)."""
    if batch_meaning not in BATCH_MEANINGS:
        raise ValueError(f"batch_meaning must be one of {sorted(BATCH_MEANINGS)}")
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(batch_meaning=batch_meaning)
    g = p.add_argument_group("checkpoints and logging")
    g.add_argument("--save_path", type=str, default="./ckpt", help="final HF model and metrics.jsonl")
    g.add_argument("--save_steps", type=int, default=-1, help="resumable checkpoint every N steps (-1: never)")
    g.add_argument("--logging_steps", type=int, default=1)
    g.add_argument("--eval_steps", type=int, default=-1, help="-1: evaluate once per epoch")
    g.add_argument("--ckpt_path", type=str, default="./ckpt/checkpoints")
    g.add_argument("--max_ckpt_num", type=int, default=3)
    g.add_argument("--max_ckpt_mem", type=int, default=1000, help="GB kept in --ckpt_path; oldest removed beyond it")
    g.add_argument("--load_checkpoint", action="store_true", default=False,
                   help="resume from the latest checkpoint in --ckpt_path")
    g.add_argument("--use_wandb", type=str, default=None,
                   help="True, or a wandb API key (WANDB_API_KEY is preferred); never printed or saved")
    g.add_argument("--wandb_org", type=str, default=None)
    g.add_argument("--wandb_group", type=str, default=None)
    g.add_argument("--wandb_project", type=str, default="xright")
    g.add_argument("--wandb_run_name", type=str, default="exp_%s" % datetime.now().strftime("%m%dT%H:%M"))
    g.add_argument("--use_tensorboard", type=str, default=None, metavar="DIR")
    g.add_argument("--debug_log_picks", action="store_true", default=False,
                   help="debug: every rank writes its schedule decisions to picks.rank<r>.jsonl")
    g.add_argument("--debug_rank_seed", action="store_true", default=False,
                   help="debug: seed each rank's schedule differently (rank 0's broadcast pick must still win)")

    g = p.add_argument_group("DeepSpeed")
    g.add_argument("--deepspeed", type=str, default=None, metavar="PATH",
                   help="DeepSpeed JSON config (ds_configs/*.json); flags overlay it, contradictions are errors")
    g.add_argument("--zero_stage", type=int, default=2)
    for switch in ("bf16", "adam_offload", "ref_offload"):
        g.add_argument(f"--{switch}", action="store_true", default=False)
    g.add_argument("--precompute_ref_log_probs", action="store_true", default=True,
                   help="compute the frozen reference's log-probs once before training (cached under "
                        "--ref_cache_dir) and release the reference model; unless typed, skipped for runs too "
                        "short to see their data once")
    g.add_argument("--no_precompute_ref_log_probs", dest="precompute_ref_log_probs", action="store_false",
                   help="keep the reference model live and run it at every step")
    g.add_argument("--ref_cache_dir", type=str, default=None, help="default: <ckpt_path>/ref_cache")
    g.add_argument("--zpg", type=int, default=1, help="ZeRO++ hierarchical partition size (stage 3)")
    g.add_argument("--grad_accum_dtype", type=str, default=None)
    g.add_argument("--disable_trace_cache", action="store_true", default=False)
    g.add_argument("--max_norm", type=float, default=1.0, help="gradient clipping")
    g.add_argument("--train_batch_size", type=int, default=128, help=BATCH_MEANINGS[batch_meaning][0])
    g.add_argument("--micro_train_batch_size", type=int, default=8, help=BATCH_MEANINGS[batch_meaning][1])
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")

    g = p.add_argument_group("model")
    g.add_argument("--pretrain", type=str, default=None, help="hub id or local path; default: built-in tiny model")
    for switch in ("trust_remote_code", "flash_attn", "gradient_checkpointing", "gradient_checkpointing_use_reentrant",
                   "disable_fast_tokenizer"):
        g.add_argument(f"--{switch}", action="store_true", default=False)
    g.add_argument("--load_in_4bit", action="store_true", default=False, help="QLoRA (needs CUDA + bitsandbytes)")
    g.add_argument("--lora_rank", type=int, default=0)
    g.add_argument("--lora_alpha", type=int, default=16)
    g.add_argument("--lora_dropout", type=float, default=0)
    g.add_argument("--target_modules", type=str, nargs="*", default="all-linear")
    g.add_argument("--merge_lora", action="store_true", default=False,
                   help="also save the LoRA adapter merged into the base model (save_path/merged)")
    g.add_argument("--aux_loss_coef", type=float, default=0, help=f"MoE auxiliary loss {COMPAT}")
    g.add_argument("--packing_samples", action="store_true", default=False,
                   help="padding-free micro-batches: each micro-batch's sequences in one row (same examples, "
                        "same loss), with a per-sequence attention (flash-attention-2 with --flash_attn)")
    g.add_argument("--logprob_chunk_size", type=int, default=None, metavar="N",
                   help="tokens per chunk of the output head for log-probs (the [tokens, vocab] logits never exist "
                        "whole); default: as many as fit 2^24 logits; 0: the full logits")
    g.add_argument("--group_by_length", action="store_true", default=False,
                   help="micro-batches of similar lengths, in a shuffled order (less padding; resumable exactly)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--max_epochs", type=int, default=1)
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--learning_rate", type=float, default=1e-5)
    g.add_argument("--lr_scheduler", type=str, default="cosine_with_min_lr",
                   help="any transformers scheduler name (constant, constant_with_warmup, cosine_with_min_lr, linear…)")
    g.add_argument("--lr_warmup_ratio", type=float, default=0.03)
    g.add_argument("--min_lr_ratio", type=float, default=0.1, help="min lr as a fraction of --learning_rate")
    g.add_argument("--l2", type=float, default=0.0, help="weight decay")
    g.add_argument("--adam_betas", type=float, nargs=2, default=(0.9, 0.95))
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--skip_bad_records", action="store_true", default=False,
                   help="count and report malformed records instead of failing")
    g.add_argument("--skip_nonfinite", action="store_true", default=False,
                   help="skip an optimizer step whose loss or gradients are NaN/inf (counted, logged) instead of "
                        "stopping the run; needs ZeRO stage >= 1")
    g.add_argument("--truncation", choices=["truncate", "drop"], default="truncate",
                   help="over-long examples: cut responses on the right, or drop them")
    p.set_defaults(**defaults)
    return p


def add_template_flags(g) -> None:
    """How a prompt becomes text: a plain-text template, or the tokenizer's chat template (or one given)."""
    g.add_argument("--input_template", type=str, default="User: {}\nAssistant: ",
                   help="'' for none (XRIGHT's default)")
    g.add_argument("--apply_chat_template", action="store_true", default=False)
    g.add_argument("--tokenizer_chat_template", type=str, default=None, help="Jinja text or a file holding it")


def add_data_flags(p: argparse.ArgumentParser, prefix: str = "", *, max_len: int = 2048, keys: bool = True) -> None:
    """``--dataset`` & co. (``--sft_dataset``/``--rlhf_dataset`` in the joint CLIs)."""
    g = p.add_argument_group(f"{prefix or ''}data")
    g.add_argument(f"--{prefix}dataset", type=str, default=None,
                   help="comma-separated files/dirs/hub names; default: built-in synthetic data")
    g.add_argument(f"--{prefix}dataset_probs", type=str, default="1.0")
    g.add_argument(f"--{prefix}train_split", type=str, default="train")
    g.add_argument(f"--{prefix}eval_split", type=str, default="test",
                   help="'dummy': first 3%% of train (XRIGHT; overlaps train)")
    g.add_argument(f"--{prefix}eval_fraction", type=float, default=0.0, help="hold out a disjoint slice of train")
    g.add_argument(f"--{prefix}max_samples", type=int, default=100000000)
    g.add_argument(f"--{prefix}max_len", type=int, default=max_len)
    if not keys:
        return
    g = p.add_argument_group("record fields and templates")
    for key in ("input", "output", "prompt", "chosen", "rejected", "label", "completion", "completions", "rewards"):
        g.add_argument(f"--{key}_key", type=str, default=key)
    g.add_argument("--margin_key", type=str, default=None)
    add_template_flags(g)
    g.add_argument("--multiturn", action="store_true", default=False,
                   help="SFT on messages: train every assistant turn (default: the last assistant message)")
    g.add_argument("--pretrain_mode", action="store_true", default=False, help="SFT without prompt masking")
    g.add_argument("--data_cache_dir", type=str, default=None,
                   help="tokenise once into memory-mapped Arrow tables under this directory, reused while the "
                        "files, tokenizer and data flags are unchanged (one process builds, the others wait)")


def flag_prefix(name: str) -> str:
    """The prefix of an objective's own flags in train_joint: 'exo-rw' -> 'exo_rw_'."""
    return name.replace("-", "_") + "_"


def add_objective_flags(p: argparse.ArgumentParser, losses: list[str], *, default: str | None = None,
                        own: dict[str, str] | None = None, alias: str = "", aliased: tuple = ()) -> None:
    """The ``Flag``s the objectives ``losses`` read (:data:`xright.objectives.OBJECTIVES`), each declared once.
    ``default``: also ``--loss`` (choices ``losses``) and, with ipo among them, OpenRLHF's ``--ipo``. ``own``
    (train_joint: name -> loss): own flags are ``--NAME_beta``, default the loss's. ``aliased`` flags also
    answer to ``--<alias><flag>`` (XRIGHT's ``--rlhf_beta``)."""
    from xright.objectives import OBJECTIVES

    g = p.add_argument_group("objective")
    names = lambda flag: [f"--{flag}", *([f"--{alias}{flag}"] if flag in aliased else [])]  # noqa: E731
    if default is not None:
        g.add_argument("--loss", choices=sorted(losses), default=default)
        if "ipo" in losses:
            g.add_argument(*names("ipo"), dest="ipo", action="store_true", default=False, help="same as --loss ipo")
    declared = set()

    def add(dest, flag, default):
        if dest not in declared:
            declared.add(dest)
            kind = {"action": "store_true"} if isinstance(flag.default, bool) else {"type": flag.type or type(default)}
            g.add_argument(*names(dest), dest=dest, default=default, help=flag.help, **kind)

    for name, loss in (own or {}).items():
        entry = OBJECTIVES[loss]
        for f in entry.flags:
            if f.own:
                add(flag_prefix(name) + f.name, f, entry.defaults.get(f.name, f.default))
    for loss in losses:
        for f in OBJECTIVES[loss].flags:
            if not (own and f.own):
                add(f.name, f, f.default)


def build_objective(args, loss: str | None = None, name: str | None = None):
    """The objective ``loss`` (default: ``--loss``, or ipo with ``--ipo``) built once from its flags; the
    flags an objective owns are read as ``--NAME_<flag>`` when ``name`` is given (train_joint)."""
    from xright.objectives import OBJECTIVES

    loss = loss or ("ipo" if args.ipo else args.loss)
    entry = OBJECTIVES[loss]
    own = {f.name for f in entry.flags if f.own} if name else set()
    try:
        return entry.build(loss, lambda f: getattr(args, (flag_prefix(name) if f in own else "") + f))
    except ValueError as e:
        raise UsageError(f"{name}: {e}" if name else str(e)) from None


def parse(p: argparse.ArgumentParser, argv=None):
    """Parse, and record which flags the user typed (a typed flag may contradict a ds_config)."""
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    unset = object()  # argparse fills in a default only where the namespace has no value yet
    typed = p.parse_args(argv, argparse.Namespace(**{d: unset for d in [a.dest for a in p._actions] + [*p._defaults]}))
    args.explicit = {k for k, v in vars(typed).items() if v is not unset}
    batch_sizes_from_file(args)
    token = getattr(args, "use_wandb", None)
    if token and token.lower() not in ("true", "false", "1", "0", "yes", "no", "none"):
        # wandb records sys.argv in its run metadata: keep the key out of it
        sys.argv[:] = [a.replace(token, "<redacted>") for a in sys.argv]
    return args


def data_spec(args, kind: str, prefix: str = "", name: str = "data", **extra):
    """The ``DataSpec`` of one objective's data flags (``prefix``: ``--sft_dataset`` …) and the shared ones."""
    from xright.data import DataSpec

    own = ("dataset", "dataset_probs", "train_split", "eval_split", "eval_fraction", "max_len")
    shared = ("truncation", "input_key", "output_key", "prompt_key", "chosen_key", "rejected_key", "completion_key",
              "label_key", "completions_key", "rewards_key", "margin_key", "input_template", "apply_chat_template",
              "multiturn", "pretrain_mode", "skip_bad_records", "seed")
    return DataSpec(kind=kind, name=name, max_samples=int(getattr(args, prefix + "max_samples")),
                    cache_dir=args.data_cache_dir, **{f: getattr(args, prefix + f) for f in own},
                    **{f: getattr(args, f) for f in shared}, **extra)


def safe_config(args) -> dict:
    """The run's flags for config dumps and wandb — never the wandb token."""
    cfg = {k: v for k, v in vars(args).items() if k not in ("use_wandb", "explicit")}
    cfg["use_wandb"] = bool(args.use_wandb)
    return {k: (list(v) if isinstance(v, (set, tuple)) else v) for k, v in cfg.items()}
