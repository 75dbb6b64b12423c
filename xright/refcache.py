"""Reference log-probs computed once (``--precompute_ref_log_probs``), served from a table keyed by example id.

One no-grad pass over every example a reference objective will see (train and eval, deduplicated
by id) runs before step 1. The pass is sharded over ranks: batches are cut from the examples
sorted by length (little padding), rank r computes batches r, r+W, …, and every rank runs the
same number of forwards (the last share is padded with a repeated batch) because under ZeRO-3
the reference is a sharded engine whose forwards are collective. The results are gathered to
every rank — loaders reshuffle across ranks every epoch, so each rank needs the whole table; it
is small, two float32 per completion — and the reference model is released.

The table is stored as safetensors under ``--ref_cache_dir`` (default ``<ckpt_path>/ref_cache``),
named by a fingerprint of the reference model (path + its files' names, sizes and mtimes and
the config's content; for ``tiny``: its config and seed), the precision of the resolved DeepSpeed
config (a --deepspeed file may enable bf16 without --bf16) and the attention, the tokenizer, each
objective's max_len, truncation and templates, and the code that computes log-probs (the sources
of :data:`LOGP_MODULES`; torch and transformers versions). Inside, every example carries a hash of
its token ids, so a table is reused only when every id of this run is in it with the same
tokens: a second run (or a resumed one) loads it in seconds, and any change recomputes.

:class:`CachedReference` is a :class:`~xright.objectives.Reference`: ``sequence_logps(batch)``
returns the same summed log-probs and lengths, rows K-major, looked up by ``batch["ids"]``.
Objectives cannot tell the difference and the trainer does not change (docs/DESIGN.md §3).

KTO's KL rows (prefix ``kl_``) pair prompt i with completion i+1 of the same micro-batch, which
changes every epoch, so they cannot be tabled: an objective lists such prefixes in
``live_reference_prefixes`` and the run then keeps its live reference for them. KTO therefore
saves half its reference forwards but none of the reference's memory.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time

import numpy as np
import torch

from xright.data import collate
from xright.data.kinds import responses as completions  # the completions whose log-probs the table holds
from xright.objectives import Reference

FORMAT = 1


def token_hash(example) -> int:
    """64-bit hash of an example's token ids (prompt and every completion, length-prefixed)."""
    h = hashlib.blake2b(digest_size=8)
    for ids in [example["prompt_ids"], *completions(example)]:
        arr = np.asarray(ids, dtype=np.int64)
        h.update(np.int64(arr.size).tobytes())
        h.update(arr.tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


# ---- fingerprint ------------------------------------------------------------------------------

def _files_fingerprint(path: str) -> dict:
    """Names, sizes and mtimes of a model directory's files, and its config's content (no weight
    hashing: reading gigabytes at every start would cost what the cache saves)."""
    files = []
    for root, dirs, names in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            full = os.path.join(root, name)
            st = os.stat(full)
            files.append([os.path.relpath(full, path), st.st_size, st.st_mtime_ns])
    config = os.path.join(path, "config.json")
    digest = hashlib.sha256(open(config, "rb").read()).hexdigest() if os.path.exists(config) else None
    return {"path": os.path.abspath(path), "files": files, "config_sha256": digest}


def model_fingerprint(pretrain: str | None, seed: int, vocab_size: int) -> dict:
    from xright.models import TINY, tiny_config

    if pretrain in (None, TINY):
        return {"tiny": tiny_config(vocab_size).to_dict(), "seed": seed}
    path = os.path.expanduser(pretrain)
    if not os.path.isdir(path):  # a hub id: fingerprint its local snapshot when there is one
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(pretrain, local_files_only=True)
        except Exception:  # noqa: BLE001 — not cached locally: the name is all we know
            return {"hub": pretrain}
    return _files_fingerprint(path)


# Every module whose code can change a reference log-prob: a fix to a mask, an attention path, the LoRA
# adapters-off reference or the reference's dtype must not be answered from a table computed before it.
LOGP_MODULES = (
    "xright.logprobs",      # log-probs from logits, packed rows
    "xright.models",        # model building, attention implementations, adapters_disabled
    "xright.objectives",    # Reference: a separate model or the LoRA policy with its adapters off
    "xright.strategy",      # the reference's DeepSpeed config and dtype cast
    "xright.data.collate",  # batch layout: packing, position ids
    "xright.data.kinds",    # batch layout: padding, K-major rows
    "xright.refcache",      # this pass: batching, row order
)


def code_fingerprint() -> dict:
    """Hash of the sources of :data:`LOGP_MODULES`, with the torch and transformers versions."""
    import importlib

    import transformers

    h = hashlib.sha256()
    for name in LOGP_MODULES:
        with open(importlib.import_module(name).__file__, "rb") as f:
            h.update(name.encode() + b"\0" + f.read() + b"\0")
    return {"sources_sha256": h.hexdigest(), "torch": torch.__version__, "transformers": transformers.__version__}


def fingerprint(args, specs, tokenizer, precision: str) -> dict:
    """Everything besides the token ids that decides the reference log-probs of this run's examples;
    ``precision``: the models' dtype under the resolved DeepSpeed config (``Strategy.precision``), which a
    --deepspeed file decides as well as the --bf16 flag."""
    ref_path = getattr(args, "ref_pretrain", None)
    lora_base = args.lora_rank > 0 and not ref_path  # the reference is the policy with adapters off
    chat = getattr(tokenizer, "chat_template", None)
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return {
        "format": FORMAT, "code": code_fingerprint(),
        "model": model_fingerprint(ref_path or args.pretrain, args.seed, len(tokenizer)),
        "precision": precision, "flash_attn": args.flash_attn,
        "load_in_4bit": bool(lora_base and args.load_in_4bit),
        "tokenizer": {"name": getattr(tokenizer, "name_or_path", ""), "size": len(tokenizer),
                      "vocab_sha256": hashlib.sha256(vocab.encode()).hexdigest(),
                      "chat_template_sha256": hashlib.sha256(chat.encode()).hexdigest() if chat else None},
        "data": {sp.name: {"kind": sp.data.kind, "max_len": sp.data.max_len, "truncation": sp.data.truncation,
                           "input_template": sp.data.input_template,
                           "apply_chat_template": sp.data.apply_chat_template,
                           "pretrain_mode": sp.data.pretrain_mode}
                 for sp in specs if sp.objective.needs_reference},
    }


def fingerprint_key(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- the table ------------------------------------------------------------------------------

class RefTable:
    """Summed reference log-probs and response lengths of every completion, by example id.

    Example e's K completions are entries ``offsets[e] : offsets[e] + K`` of ``logps`` / ``lengths``.
    """

    def __init__(self, ids: list[str], hashes: np.ndarray, offsets: np.ndarray, logps: torch.Tensor,
                 lengths: torch.Tensor, meta: dict | None = None):
        self.ids, self.hashes = list(ids), np.asarray(hashes, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.logps, self.lengths = logps.float(), lengths.float()
        self.meta = meta or {}
        self.index = {i: n for n, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def covers(self, hashes: dict[str, int]) -> bool:
        """Every id of ``hashes`` is in the table with the same token hash."""
        return all((n := self.index.get(i)) is not None and self.hashes[n] == h for i, h in hashes.items())

    def to(self, device) -> "RefTable":
        self.logps, self.lengths = self.logps.to(device), self.lengths.to(device)
        return self

    def lookup(self, ids: list[str], num_choices: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([K·B], [K·B]) in the collators' K-major row order: row k·B + b is completion k of ids[b]."""
        try:
            starts = [int(self.offsets[self.index[i]]) for i in ids]
        except KeyError as e:
            raise KeyError(f"example {e.args[0]!r} has no precomputed reference log-prob: the table holds this "
                           "run's train and eval examples only") from None
        rows = torch.tensor([s + k for k in range(num_choices) for s in starts], device=self.logps.device)
        return self.logps.index_select(0, rows), self.lengths.index_select(0, rows)

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        blob = np.frombuffer("\0".join(self.ids).encode(), dtype=np.uint8)
        tensors = {"logps": self.logps.cpu().contiguous(), "lengths": self.lengths.cpu().contiguous(),
                   "offsets": torch.from_numpy(self.offsets.copy()), "token_hash": torch.from_numpy(self.hashes.copy()),
                   "ids_utf8": torch.from_numpy(blob.copy())}
        tmp = f"{path}.tmp-{os.getpid()}"
        save_file(tensors, tmp, metadata={"format": str(FORMAT), "fingerprint": json.dumps(self.meta, default=str)})
        os.replace(tmp, path)  # atomic: a crash leaves no half-written table

    @classmethod
    def load(cls, path: str) -> "RefTable | None":
        """The table at ``path``; None when it is missing or unreadable (then it is recomputed)."""
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != str(FORMAT):
                    return None
                t = {k: f.get_tensor(k) for k in ("logps", "lengths", "offsets", "token_hash", "ids_utf8")}
        except Exception:  # noqa: BLE001 — missing, truncated or foreign file: recompute
            return None
        text = t["ids_utf8"].numpy().tobytes().decode()
        ids = text.split("\0") if text else []
        return cls(ids, t["token_hash"].numpy(), t["offsets"].numpy(), t["logps"], t["lengths"],
                   json.loads(meta.get("fingerprint", "{}")))


# ---- the pass --------------------------------------------------------------------------------

def _batches(examples: list, batch_size: int) -> list[list[int]]:
    """Indices of examples in batches of one K each, longest first (an out-of-memory shows at once)."""
    def size(i):
        e = examples[i]
        return len(completions(e)), -(len(e["prompt_ids"]) + max(len(c) for c in completions(e)))

    out, cur = [], []
    for i in sorted(range(len(examples)), key=size):
        if cur and (len(cur) == batch_size or len(completions(examples[cur[0]])) != len(completions(examples[i]))):
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


@torch.no_grad()
def compute_table(live: Reference, examples: list, batch_size: int, pad_id: int, strategy,
                  hashes: list[int] | None = None, packed: bool = False) -> RefTable:
    """The reference log-probs of ``examples`` (unique ids), sharded over ranks, gathered to every rank;
    ``packed``: batches in the padding-free layout (--packing_samples), else padded."""
    W, r = strategy.world_size, strategy.rank
    batches = _batches(examples, batch_size)
    mine = batches[r::W]
    per_rank = -(-len(batches) // W)
    dummies = per_rank - len(mine)  # collective forwards: every rank runs per_rank of them
    local_idx, local_lp, local_len = [], [], []
    for j, idx in enumerate(mine + [batches[0]] * dummies):
        rows = [{"id": examples[i]["id"], "prompt_ids": examples[i]["prompt_ids"],
                 "responses": completions(examples[i])} for i in idx]
        batch = collate("scored", rows, pad_id, packed=packed)
        batch = {k: v.to(strategy.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        lp, ln = live.sequence_logps(batch)
        if j >= len(mine):
            continue
        K = batch["num_choices"]
        local_idx.extend(idx)  # example-major: its K completions in a row
        local_lp.append(lp.float().view(K, -1).t().reshape(-1).cpu())
        local_len.append(ln.float().view(K, -1).t().reshape(-1).cpu())
    cat = lambda xs: torch.cat(xs).numpy() if xs else np.zeros(0, np.float32)  # noqa: E731
    gathered = strategy.all_gather_object((np.asarray(local_idx, np.int64), cat(local_lp), cat(local_len)))
    counts = np.array([len(completions(e)) for e in examples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    logps, lengths = np.zeros(offsets[-1], np.float32), np.zeros(offsets[-1], np.float32)
    for idx, lp, ln in gathered:
        pos = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in idx]) if len(idx) else np.zeros(0, np.int64)
        logps[pos], lengths[pos] = lp, ln
    hashes = hashes if hashes is not None else [token_hash(e) for e in examples]
    return RefTable([e["id"] for e in examples], np.asarray(hashes, np.int64), offsets,
                    torch.from_numpy(logps), torch.from_numpy(lengths))


class CachedReference(Reference):
    """A :class:`Reference` whose log-probs come from a :class:`RefTable`; rows the table cannot hold
    (``live_prefixes``, KTO's ``kl_``) go to the live reference kept for them."""

    def __init__(self, table: RefTable, live: Reference | None = None, live_prefixes: tuple = ()):
        self.table, self.live, self.live_prefixes = table, live, tuple(live_prefixes)
        self.model = self.lora_policy = None

    def sequence_logps(self, batch: dict, prefix: str = ""):
        if prefix:
            if self.live is None or prefix not in self.live_prefixes:
                raise ValueError(f"the precomputed reference holds no {prefix!r} rows; declare the prefix in the "
                                 "objective's live_reference_prefixes or run with --no_precompute_ref_log_probs")
            return self.live.sequence_logps(batch, prefix)
        return self.table.lookup(batch["ids"], batch.get("num_choices", 1))


def _release(ref: Reference) -> None:
    """Drop a separate reference model (a DeepSpeed engine: its hooks, ZeRO state and parameters) so its memory
    serves the run."""
    model, ref.model = ref.model, None
    if model is not None and hasattr(model, "destroy"):
        from xright.strategy import release_engine

        release_engine(model)
    del model
    gc.collect()


def unique_examples(sets, log) -> tuple[list, list[int]] | None:
    """Train and eval examples of every reference objective, once per id, with their token hashes.

    None when one id stands for different tokens (two objectives tokenise a record differently,
    e.g. with different max_len): a table keyed by id cannot serve that run.
    """
    seen: dict[str, int] = {}
    out, hashes = [], []
    for examples in sets:
        for e in examples:
            h = token_hash(e)
            prev = seen.get(e["id"])
            if prev is None:
                seen[e["id"]] = h
                out.append(e)
                hashes.append(h)
            elif prev != h:
                log(f"warning: reference log-probs: example {e['id']!r} has different token ids in two objectives; "
                    "the reference stays live (no precompute)")
                return None
    return out, hashes


def cached_reference(build_live, strategy, sets: list[list], live_prefixes: tuple, fp: dict, cache_dir: str,
                     batch_size: int, pad_id: int, packed: bool = False) -> Reference:
    """The run's reference: the table for this fingerprint from ``cache_dir`` if every rank has one that
    covers the examples, else computed now (with ``build_live()``) and saved by rank 0."""
    log = strategy.print
    found = unique_examples(sets, log)
    if found is None:
        return build_live()
    examples, hashes = found
    path = os.path.join(cache_dir, f"ref_logps-{fingerprint_key(fp)}.safetensors")
    start = time.perf_counter()
    table = RefTable.load(path)
    ok = table is not None and table.covers(dict(zip((e["id"] for e in examples), hashes)))
    # every rank must take the same branch: the compute path runs collective forwards
    ok = int(strategy.all_reduce(torch.tensor(float(ok), device=strategy.device))) == strategy.world_size
    live = build_live() if not ok or live_prefixes else None
    if ok:
        log(f"reference log-probs: loaded {len(examples)} examples from {path} in {time.perf_counter() - start:.2f}s "
            "(no reference forward)")
    else:
        table = compute_table(live, examples, batch_size, pad_id, strategy, hashes, packed)
        table.meta = fp
        if strategy.is_rank0:
            os.makedirs(cache_dir, exist_ok=True)
            table.save(path)
        strategy.barrier()
        log(f"reference log-probs: computed {len(examples)} examples ({len(table.logps)} completions) on "
            f"{strategy.world_size} rank(s) in {time.perf_counter() - start:.2f}s; saved to {path}")
    if live is not None and not live_prefixes:
        _release(live)
        live = None
    elif live is not None:
        log(f"reference log-probs: the reference model stays loaded for the {', '.join(live_prefixes)} rows")
    return CachedReference(table.to(strategy.device), live, live_prefixes)
