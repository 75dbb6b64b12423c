"""Model and tokenizer loading: hub ids, local paths and the built-in ``tiny`` default. The only module that
imports peft; nothing here knows about DeepSpeed (the strategy wraps what this module returns)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import warnings
from dataclasses import dataclass

import torch
from transformers import (AttentionInterface, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          GPTNeoXConfig, GPTNeoXForCausalLM, GPTNeoXForSequenceClassification, PreTrainedModel,
                          PreTrainedTokenizerFast)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

TINY = "tiny"
PAD, EOS = "<|pad|>", "<|endoftext|>"

# A chat template for the tiny tokenizer, so --apply_chat_template works without a download.
TINY_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
                      "{% if add_generation_prompt %}Assistant: {% endif %}")


class ModelLoadError(RuntimeError):
    pass


class PackingRefused(ModelLoadError):
    """--packing_samples on a model whose packed rows would not give its padded rows' log-probs."""


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer built in code: 256 byte tokens + pad + eos. No merges, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab[PAD] = len(vocab)
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, bos_token=EOS,
                                   padding_side="right")
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.model_max_length = 1024
    return fast


def tiny_config(vocab_size: int = 258) -> GPTNeoXConfig:
    """A ~0.9M-parameter GPT-NeoX: big enough to learn the built-in tasks in a CPU minute."""
    return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=512, max_position_embeddings=1024, rotary_pct=0.25,
                         use_parallel_residual=True, tie_word_embeddings=False, bos_token_id=vocab_size - 1,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 2)


def _check_local(path: str) -> None:
    looks_local = path.startswith((".", "/", "~")) or os.sep in path.strip("/").split("/", 1)[-1] or path.count("/") > 1
    if looks_local and not os.path.exists(os.path.expanduser(path)):
        raise ModelLoadError(f"model path {path!r} does not exist")


def load_tokenizer(pretrain: str | None, *, use_fast: bool = True, trust_remote_code: bool = False,
                   chat_template: str | None = None):
    """Tokenizer for ``pretrain``; pad defaults to eos (as OpenRLHF); right padding."""
    if pretrain in (None, TINY):
        tok = tiny_tokenizer()
    else:
        _check_local(pretrain)
        try:
            tok = AutoTokenizer.from_pretrained(pretrain, use_fast=use_fast, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load tokenizer {pretrain!r}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if chat_template:  # Jinja text or a file holding it
        from xright.data.chat import template_text

        tok.chat_template = template_text(chat_template)
    return tok


@dataclass
class LoraSpec:
    rank: int = 0
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"


VARLEN_SDPA = "xright_varlen_sdpa"
VARLEN_SDPA_CHECKED = VARLEN_SDPA + "_checked"


def register_varlen_attention() -> str:
    """Register (idempotent) xright's variable-length attention with transformers; return its name: a causal SDPA
    per sequence of a packed row, bounded by the ``cu_seq_lens_q`` that ``logprobs.model_inputs`` passes (Σ Lᵢ²
    instead of L×L under a block-diagonal mask); without them, transformers' SDPA under its own mask."""
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # not in the oldest transformers allowed

    def attention(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
        if cu_seq_lens_q is None:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        # split, not slices: the backward of a split is one cat, of each slice a full-size zero tensor
        lengths = cu_seq_lens_q.diff().tolist()
        window = kwargs.get("sliding_window")
        if window is not None and max(lengths) > window:
            raise ValueError(f"--packing_samples: a sequence of {max(lengths)} tokens exceeds this model's sliding "
                             f"window ({window}), which packed rows do not apply; drop --packing_samples or use "
                             "--flash_attn")
        outs = [sdpa_attention_forward(module, q, k, v, None, **kwargs)[0]
                for q, k, v in zip(*(x.split(lengths, dim=2) for x in (query, key, value)))]
        return torch.cat(outs, dim=1), None  # [1, L, heads, head_dim], as sdpa_attention_forward returns

    def no_packed_mask(*args, attention_mask=None, **kwargs):
        return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)

    AttentionInterface.register(VARLEN_SDPA, attention)
    AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)
    # the same for a model whose every attention call was seen to get the boundaries (check_model): transformers'
    # L×L mask of a packed row would be built and never read (130 ms, 23 MiB per forward at 4.9k tokens)
    AttentionInterface.register(VARLEN_SDPA_CHECKED, attention)
    AttentionMaskInterface.register(VARLEN_SDPA_CHECKED, no_packed_mask)
    return VARLEN_SDPA


def attn_implementation(flash_attn: bool) -> str | None:
    """flash-attention-2 with ``--flash_attn``, else None: transformers' choice (SDPA, or the class's eager)."""
    if not flash_attn:
        return None
    if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
        raise ModelLoadError("--flash_attn needs the flash-attn package and a CUDA GPU (pip install 'xright[flash]'); "
                             "drop the flag to use PyTorch SDPA")
    return "flash_attention_2"


# Layers that carry state along a row (recurrent, state-space, linear attention): a packed sequence would start
# from the state its predecessor left. Found from config fields, or the model type where a family has none.
_STATE_FIELDS = re.compile(r"^(mamba_|ssm_|lru_|linear_attn|linear_conv|conv_l_cache$|state_size$|d_state$|"
                           r"conv1d_width$|time_mix|rescale_every$)")
_STATE_TYPES = {"rwkv", "xlstm", "mamba", "mamba2", "falcon_mamba"}
_ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention", "attention", "global", "local",
                     "mlp", "moe"}


def recurrent_state(config) -> str | None:
    """Why packed rows of this model cannot be exact (state crossing sequence boundaries), or None."""
    if config.model_type in _STATE_TYPES:
        return f"recurrent/state-space layers (model type {config.model_type})"
    for key in ("layer_types", "layers_block_type", "block_types"):
        kinds = getattr(config, key, None)
        other = sorted({str(k) for k in kinds or ()} - _ATTENTION_LAYERS) if isinstance(kinds, (list, tuple)) else []
        if other:
            return f"{other[0]} layers (config {key})"
    fields = [k for k in config.to_dict() if _STATE_FIELDS.match(k.lower())]
    if fields:
        return f"recurrent/state-space layers (config field {fields[0]})"
    return None


# The packed-vs-padded probe: a few short sequences of fixed tokens (the same on every rank, so that
# ranks probing a ZeRO-3 engine in lockstep decide alike)
_PROBE_LENGTHS = (6, 3, 11, 8)


def check_model(model, *, packing: bool) -> str:
    """How ``model`` (a model, peft model or DeepSpeed engine: under ZeRO-3 every rank calls this together)
    attends and, with ``packing``, whether its packed rows are exact (packed vs padded log-probs agree, and
    changing one sequence moves no other: a tighter bound, catching a leak that 16-bit noise hides); the line to
    print, or :class:`PackingRefused`. A model whose every attention call got the boundaries moves to
    ``VARLEN_SDPA_CHECKED``."""
    hf = next(m for m in model.modules() if isinstance(m, PreTrainedModel))
    config = hf.config
    line = f"attention: {config._attn_implementation} ({config.model_type})"
    if not packing:
        return line
    why = recurrent_state(config)
    if why:
        raise PackingRefused(f"--packing_samples cannot be exact for {config.model_type}: its {why} carry state "
                             "from one sequence of a packed row into the next; drop --packing_samples "
                             "(--group_by_length also cuts padding)")
    from xright.data.collate import collate
    from xright.logprobs import evaluating, token_logps

    vocab = hf.get_input_embeddings().num_embeddings
    pad = config.pad_token_id if isinstance(config.pad_token_id, int) else 0
    g = torch.Generator().manual_seed(0)
    tokens = lambda n: [(t + (t == pad)) % vocab  # noqa: E731
                        for t in torch.randint(0, vocab, (n,), generator=g).tolist()]
    seqs = [{"id": str(i), "prompt_ids": tokens(1), "response_ids": tokens(n - 1)}
            for i, n in enumerate(_PROBE_LENGTHS)]
    changed = [dict(seqs[0], prompt_ids=tokens(1), response_ids=tokens(_PROBE_LENGTHS[0] - 1))] + seqs[1:]
    device = next(model.parameters()).device
    # the cu_seq_lens_q of each call into xright's per-sequence SDPA (None: the row under the mask)
    calls, mapping = [], AttentionInterface._global_mapping
    inner = {name: mapping[name] for name in (VARLEN_SDPA, VARLEN_SDPA_CHECKED) if name in mapping}

    def counted(fn):
        def attention(*args, cu_seq_lens_q=None, **kwargs):
            calls.append(cu_seq_lens_q)
            return fn(*args, cu_seq_lens_q=cu_seq_lens_q, **kwargs)
        return attention

    with evaluating(model), torch.no_grad():
        run = lambda exs, packed: token_logps(model, {  # noqa: E731
            k: v.to(device) if torch.is_tensor(v) else v for k, v in collate("sft", exs, pad, packed).items()})
        padded, mask = run(seqs, False)
        mapping.update({name: counted(fn) for name, fn in inner.items()})
        try:
            packed, _ = run(seqs, True)
        finally:
            mapping.update(inner)
        other, _ = run(changed, True)
    scale = max(1.0, float((padded * mask).abs().max()))
    full = next(p.dtype for p in model.parameters() if p.is_floating_point()) == torch.float32
    delta = float(((packed - padded) * mask).abs().max())
    leak = float(((other - packed) * mask)[1:].abs().max())
    tol = (1e-5 if full else 1e-2) * scale
    if delta > tol or leak > 1e-6 * scale:
        raise PackingRefused(
            f"--packing_samples: packed rows of this {config.model_type} model are not exact with "
            f"{config._attn_implementation} attention (packed vs padded log-probs differ by up to {delta:.1e}, "
            f"allowed {tol:.1e}; changing one sequence moves the others' by {leak:.1e}); drop --packing_samples "
            "(--group_by_length also cuts padding)")
    per_seq = sum(c is not None for c in calls)
    if calls and per_seq == len(calls):
        how = f"per-sequence SDPA in {per_seq} of {len(calls)} attention calls"
        config._attn_implementation = VARLEN_SDPA_CHECKED
    elif config._attn_implementation.startswith("flash"):
        how = "flash-attention's variable-length kernel"
    else:
        how = "transformers' block-diagonal mask from the position ids"
    return f"{line}; packed rows exact (max |Δ| log-prob {delta:.1e} vs padded, {how})"


def load_model(pretrain: str | None, *, task: str = "causal", bf16: bool = False, flash_attn: bool = False,
               lora: LoraSpec | None = None, gradient_checkpointing: bool = False,
               gradient_checkpointing_use_reentrant: bool = False, load_in_4bit: bool = False,
               trust_remote_code: bool = False, seed: int = 42, vocab_size: int | None = None,
               trainable: bool = True, packing: bool = False, pad_token_id: int | None = None):
    """Policy, reference or reward model (``task`` "causal", or "reward": a num_labels=1 sequence classifier).
    ``tiny`` is :func:`tiny_config`'s GPT-NeoX seeded by ``seed`` (every rank and the reference start from the
    same tensors). A config without a pad id gets ``pad_token_id`` (the tokenizer's), else its first eos id."""
    if task not in ("causal", "reward"):
        raise ValueError(f"unknown task {task!r}")
    dtype = torch.bfloat16 if bf16 else torch.float32
    auto = AutoModelForCausalLM if task == "causal" else AutoModelForSequenceClassification
    attn = attn_implementation(flash_attn)
    if pretrain in (None, TINY):
        config = tiny_config(vocab_size or 258)
        config._attn_implementation = attn or "sdpa"
        if task == "reward":
            config.num_labels = 1
        # The class constructor, not from_config: from_config would build under ZeRO-3's zero.Init,
        # which initialises differently, and the tiny model must be the same tensors at every stage.
        cls = GPTNeoXForCausalLM if task == "causal" else GPTNeoXForSequenceClassification
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = cls(config).to(dtype)
        finally:
            torch.random.set_rng_state(state)
    else:
        _check_local(pretrain)
        kwargs = dict(dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code)
        if task == "reward":
            kwargs["num_labels"] = 1
        if load_in_4bit:
            if importlib.util.find_spec("bitsandbytes") is None or not torch.cuda.is_available():
                raise ModelLoadError("--load_in_4bit needs bitsandbytes and a CUDA GPU")
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True)
        try:
            model = auto.from_pretrained(pretrain, **kwargs)
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load model {pretrain!r}: {e}") from e
    # packed rows: the per-sequence SDPA where the class runs SDPA through transformers' attention interface
    if packing and not flash_attn and model.config._attn_implementation == "sdpa" and \
            getattr(model, "_supports_attention_backend", False):
        model.config._attn_implementation = register_varlen_attention()
    if model.config.pad_token_id is None:
        eos = model.config.eos_token_id
        # Llama-3.x-Instruct lists several eos ids; transformers 5 refuses a list as the pad id
        first_eos = eos[0] if isinstance(eos, list) else eos
        model.config.pad_token_id = pad_token_id if pad_token_id is not None else first_eos
    if not trainable:
        model.eval().requires_grad_(False)
        return model
    if gradient_checkpointing:
        kwargs = {"use_reentrant": gradient_checkpointing_use_reentrant}
        if hasattr(model, "activation_checkpointing_enable"):  # its new name; the old one warns "removed in v6"
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # transformers before the rename
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if lora is None or lora.rank <= 0:
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    # peft reads a string as a regex that must match the whole module path (so "query_key_value"
    # matches nothing) and a list as module-name suffixes: only "all-linear" is meant as a string
    targets = [lora.target_modules] if isinstance(lora.target_modules, str) else list(lora.target_modules)
    if targets == ["all-linear"]:
        targets = "all-linear"
    lora_config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                             task_type=TaskType.CAUSAL_LM if task == "causal" else TaskType.SEQ_CLS, bias="none")
    if gradient_checkpointing:
        model.enable_input_require_grads()
    with warnings.catch_warnings():  # peft reads the deprecated is_gradient_checkpointing (not our call)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora_config)


def is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def adapters_disabled(model):
    """Context in which a LoRA policy computes the reference (frozen base) log-probs."""
    return model.disable_adapter()


def _merged(base, adapter_dir: str):
    """``base`` with a saved LoRA adapter merged in (peft reads the deprecated is_gradient_checkpointing; we do not)."""
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()


def merge_saved_adapter(pretrain: str | None, adapter_dir: str, out_dir: str, tokenizer, *, seed: int,
                        task: str = "causal") -> None:
    """``--merge_lora``: base model + the saved adapter, merged and saved in HF format. ``seed`` is the
    run's: the built-in tiny base is built from it (no default, so no caller can silently get another base)."""
    base = load_model(pretrain, task=task, seed=seed, vocab_size=len(tokenizer), trainable=False,
                      pad_token_id=tokenizer.pad_token_id)
    _merged(base, adapter_dir).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def load_for_inference(path: str | None, *, task: str = "causal", bf16: bool = False, flash_attn: bool = False,
                       load_in_4bit: bool = False, trust_remote_code: bool = False, seed: int = 42,
                       vocab_size: int | None = None):
    """A frozen model for generation or scoring: a hub id / HF dir, ``tiny``, or a LoRA adapter dir as xright
    saves it (no ``config.json``), merged into its base: the adapter's ``base_model_name_or_path``, else the
    ``pretrain`` (and ``seed``, which built a tiny base) of the run's ``xright_args.json``, else ``tiny``."""
    kw = dict(task=task, bf16=bf16, flash_attn=flash_attn, load_in_4bit=load_in_4bit,
              trust_remote_code=trust_remote_code, vocab_size=vocab_size, trainable=False)
    full = os.path.expanduser(path) if path not in (None, TINY) else None
    if not full or not os.path.exists(os.path.join(full, "adapter_config.json")) or \
            os.path.exists(os.path.join(full, "config.json")):
        return load_model(path, seed=seed, **kw)
    with open(os.path.join(full, "adapter_config.json")) as f:
        base = json.load(f).get("base_model_name_or_path") or None
    run_args = os.path.join(full, "xright_args.json")
    if os.path.exists(run_args):
        with open(run_args) as f:
            saved = json.load(f)
        base = base or saved.get("pretrain")
        seed = saved.get("seed", seed)
    model = load_model(base, seed=seed, **kw)
    try:
        model = _merged(model, full)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelLoadError(f"cannot load LoRA adapter {full!r} on base {base or TINY!r}: {e}") from e
    return model.eval().requires_grad_(False)
