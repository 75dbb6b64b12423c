"""Every cache key, hashed by :func:`digest` (docs/DESIGN.md). Files count by names, sizes and mtimes, not
content: reading gigabytes at every start would cost what the cache saves."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
from pathlib import Path

import numpy as np


def digest(obj, chars: int = 16) -> str:
    """The first ``chars`` hex digits of the SHA-256 of bytes, text, or anything JSON writes (canonically)."""
    if not isinstance(obj, bytes):
        obj = (obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, default=str)).encode()
    return hashlib.sha256(obj).hexdigest()[:chars]


def token_hash(example) -> int:
    """64-bit hash of an example's token ids (prompt and every completion, length-prefixed)."""
    parts = []
    completions = example["responses"] if "responses" in example else [example["response_ids"]]
    for ids in [example["prompt_ids"], *completions]:
        arr = np.asarray(ids, dtype=np.int64)
        parts += [np.int64(arr.size).tobytes(), arr.tobytes()]
    return int.from_bytes(bytes.fromhex(digest(b"".join(parts))), "little", signed=True)


def files(source: str) -> list:
    """A file as [resolved path, size, mtime]; a folder as [resolved path, that of each file under it but hidden
    folders]; anything else (a hub name) as ["hub", name]."""
    path = os.path.expanduser(source)
    if os.path.isfile(path):
        st = os.stat(path)
        return [os.path.realpath(path), st.st_size, st.st_mtime_ns]
    if not os.path.isdir(path):
        return ["hub", source]
    out = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            st = os.stat(os.path.join(root, name))
            out.append([os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns])
    return [os.path.realpath(path), out]


def tokenizer_id(tokenizer) -> str:
    """The serialised fast tokenizer (else its vocabulary), its special tokens and chat template; not the truncation
    and padding settings its last call left in it."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = json.loads(backend.to_str()) if backend is not None else {"vocab": sorted(tokenizer.get_vocab().items())}
    return digest([{k: v for k, v in body.items() if k not in ("truncation", "padding")}, type(tokenizer).__name__,
                   len(tokenizer), *(getattr(tokenizer, k, None) for k in ("chat_template", "bos_token", "eos_token_id",
                                                                          "pad_token_id"))], 32)


def data_key(spec, tokenizer, fmt: int) -> str:
    """The tokenised tables of ``spec``; ``fmt`` is bumped whenever tokenisation or ids change."""
    fields = {k: v for k, v in dataclasses.asdict(spec).items() if k != "cache_dir"}
    sources = [files(s.strip()) for s in str(spec.dataset or "").split(",") if s.strip()]
    return digest({"format": fmt, "spec": fields, "sources": sources, "tokenizer": tokenizer_id(tokenizer)})


def model(pretrain: str | None, seed: int, vocab_size: int) -> dict:
    """A model folder's files and config; the built-in tiny model's config and seed; a hub id's local snapshot."""
    from xright.models import TINY, tiny_config

    if pretrain in (None, TINY):
        return {"tiny": tiny_config(vocab_size).to_dict(), "seed": seed}
    path = os.path.expanduser(pretrain)
    if not os.path.isdir(path):
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(pretrain, local_files_only=True)
        except Exception:  # noqa: BLE001 — not cached locally: the name is all we know
            return {"hub": pretrain}
    config = Path(path, "config.json")
    return {"files": files(path), "config_sha256": digest(config.read_bytes(), 64) if config.exists() else None}


# Every module whose code can change a reference log-prob: a fix to a mask, an attention path, the LoRA
# adapters-off reference or the reference's dtype must not be answered from a table computed before it.
LOGP_MODULES = (
    "xright.logprobs",      # log-probs from logits, packed rows
    "xright.models",        # model building, attention implementations, adapters_disabled
    "xright.objectives",    # Reference: a separate model or the LoRA policy with its adapters off
    "xright.strategy",      # the reference's DeepSpeed config and dtype cast
    "xright.data.collate",  # batch layout: packing, position ids
    "xright.data.kinds",    # batch layout: padding, K-major rows
    "xright.sharding",      # the pass: batching
    "xright.refcache",      # row order
)


def reference(model_path: str | None, seed: int, precision: str, flash_attn: bool, load_in_4bit: bool, tokenizer,
              data: dict) -> dict:
    """Everything besides the token ids that decides the reference log-probs of a run's examples: ``precision``
    the models' dtype under the resolved DeepSpeed config; ``load_in_4bit`` whether the reference is a 4-bit
    base; ``data`` each reference objective's DataSpec by name."""
    import torch
    import transformers

    sources = b"".join(name.encode() + b"\0" + Path(importlib.import_module(name).__file__).read_bytes() + b"\0"
                       for name in LOGP_MODULES)
    return {
        "code": {"sources_sha256": digest(sources, 64), "torch": torch.__version__,
                 "transformers": transformers.__version__},
        "model": model(model_path, seed, len(tokenizer)), "precision": precision, "flash_attn": flash_attn,
        "load_in_4bit": load_in_4bit, "tokenizer": tokenizer_id(tokenizer),
        "data": {name: {k: getattr(d, k) for k in ("kind", "max_len", "truncation", "input_template",
                                                   "apply_chat_template", "pretrain_mode")}
                 for name, d in data.items()},
    }
