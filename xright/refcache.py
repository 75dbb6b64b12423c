"""Reference log-probs computed once (``--precompute_ref_log_probs``) in one sharded no-grad pass over every
example a reference objective will see (train and eval, by id), gathered to every rank (loaders reshuffle across
ranks), stored under ``--ref_cache_dir`` named by :func:`xright.fingerprints.reference`, reused only when every id
of the run is in it with the same token hash. Rows that change every epoch (KTO's ``kl_`` pairs prompt i with
completion i+1 of a micro-batch) stay live: an objective lists them in ``live_reference_prefixes``."""

from __future__ import annotations

import gc
import json
import os
import time

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from xright.data import collate
from xright.data.kinds import responses
from xright.fingerprints import digest, token_hash
from xright.objectives import Reference
from xright.sharding import gather_ordered, plan_batches, run_pass

FORMAT = 1


class RefTable:
    """Summed reference log-probs and response lengths of every completion, by example id: example e's K
    completions are entries ``offsets[e] : offsets[e] + K`` of ``logps`` / ``lengths``."""

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


def compute_table(live: Reference, examples: list, batch_size: int, pad_id: int, strategy,
                  hashes: list[int] | None = None, packed: bool = False) -> RefTable:
    """The reference log-probs of ``examples`` (unique ids), sharded over ranks, gathered to every rank;
    ``packed``: batches in the padding-free layout (--packing_samples), else padded."""
    completions = [responses(e) for e in examples]
    ks = [len(c) for c in completions]
    # one K per batch, longest first (an out-of-memory shows at once)
    batches = plan_batches([-len(e["prompt_ids"]) - max(map(len, c)) for e, c in zip(examples, completions)],
                           batch_size, ks)

    def compute(_, idx):
        rows = [{"id": examples[i]["id"], "prompt_ids": examples[i]["prompt_ids"], "responses": completions[i]}
                for i in idx]
        batch = collate("scored", rows, pad_id, packed=packed)
        lp, ln = live.sequence_logps({k: v.to(strategy.device) if torch.is_tensor(v) else v for k, v in batch.items()})
        return [x.float().view(ks[idx[0]], -1).t().cpu().tolist() for x in (lp, ln)]  # example-major

    local = {}
    for _, idx, (lp, ln) in run_pass(compute, batches, strategy.rank, strategy.world_size):
        local.update(zip(idx, zip(lp, ln)))
    rows = gather_ordered(local, len(examples), strategy.all_gather_object)
    logps, lengths = (torch.tensor([x for row in rows for x in row[c]], dtype=torch.float32) for c in (0, 1))
    hashes = hashes if hashes is not None else [token_hash(e) for e in examples]
    return RefTable([e["id"] for e in examples], np.asarray(hashes, np.int64), np.concatenate([[0], np.cumsum(ks)]),
                    logps, lengths)


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


def unique_examples(sets, log) -> tuple[list, list[int]] | None:
    """Train and eval examples of every reference objective, once per id, with their token hashes; None when one
    id stands for different tokens (e.g. two objectives' max_len), which a table keyed by id cannot serve."""
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
    path = os.path.join(cache_dir, f"ref_logps-{digest(fp)}.safetensors")
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
    if live is not None and not live_prefixes:  # free a separate reference model's memory for the run
        model, live.model, live = live.model, None, None
        if model is not None and hasattr(model, "destroy"):  # a DeepSpeed engine: hooks, ZeRO state, parameters
            from xright.strategy import release_engine

            release_engine(model)
        del model
        gc.collect()
    elif live is not None:
        log(f"reference log-probs: the reference model stays loaded for the {', '.join(live_prefixes)} rows")
    table.logps, table.lengths = table.logps.to(strategy.device), table.lengths.to(strategy.device)
    return CachedReference(table, live, live_prefixes)
