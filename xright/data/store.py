"""Tokenised examples on disk: Arrow tables (``datasets``), memory-mapped, cached by a fingerprint.

With ``DataSpec.cache_dir``, :func:`xright.data.load_data` returns :class:`ExampleTable` s: the same example
dicts, token ids in int32 Arrow columns memory-mapped from ``<cache_dir>/<name>-<fingerprint>/``, built once
per machine under a file lock (the others wait and map it). The fingerprint, the build and the clean-up of
killed builds: docs/data.md.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
from collections import Counter
from collections.abc import Sequence

from .kinds import KINDS, responses
from .tokenise import STATUS, tokenize_rows

FORMAT = 3  # 2: chat records rendered at token level (xright.data.chat); 3: text prompts ending in the HH cue are raw
META = "meta.json"
PER_PROCESS = 4000  # records per tokenising process (below two processes' worth, no worker is started)


def _features(kind):
    from datasets import Features, List, Value

    extra = {k: List(Value(t[1:-1])) if t.startswith("[") else Value(t) for k, t in kind.columns.items()}
    return Features({"id": Value("string"), "prompt_ids": List(Value("int32")),
                     "responses": List(List(Value("int32"))), **extra})


class ExampleTable(Sequence):
    """The examples of one split, read from a memory-mapped Arrow table; ``table[i]`` is the dict
    :func:`xright.data.tokenise.tokenize` would have made. A slice is a view (no copy)."""

    def __init__(self, ds, kind: str, max_len: int, index: range | None = None):
        self.ds, self.kind, self.max_len = ds, kind, max_len
        self.index = range(len(ds)) if index is None else index

    @classmethod
    def open(cls, path: str, kind: str, max_len: int) -> "ExampleTable":
        import datasets

        return cls(datasets.load_from_disk(path), kind, max_len)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return ExampleTable(self.ds, self.kind, self.max_len, self.index[i])
        return self._example(self.ds[self.index[i]])

    def __iter__(self):
        step = 1024  # rows converted a block at a time: much faster than one by one
        for start in range(0, len(self.index), step):
            block = self.index[start:start + step]
            cols = self.ds[block.start:block.stop] if block.step == 1 else self.ds[list(block)]
            for j in range(len(block)):
                yield self._example({k: v[j] for k, v in cols.items()})

    def lengths(self) -> list[int]:
        """Each example's longest row (prompt + its longest response), from the Arrow offsets."""
        import numpy as np
        import pyarrow.compute as pc

        table = self.ds.data.table
        prompt = pc.list_value_length(table.column("prompt_ids")).to_numpy().astype(np.int64)
        responses = table.column("responses")
        longest = np.zeros(len(prompt), np.int64)
        np.maximum.at(longest, pc.list_parent_indices(responses).to_numpy(),
                      pc.list_value_length(pc.list_flatten(responses)).to_numpy())
        return (prompt + longest)[np.asarray(self.index, dtype=np.int64)].tolist()

    def _example(self, row: dict) -> dict:
        return KINDS[self.kind].example(row["id"], row["prompt_ids"], row["responses"], row, self.max_len)

    def __repr__(self) -> str:
        return f"ExampleTable({len(self)} {self.kind} examples from {self.ds.cache_files[0]['filename']})"


def fingerprint(spec, tokenizer) -> str:
    from xright.fingerprints import data_key

    return data_key(spec, tokenizer, FORMAT)


def _tokenize_batch(batch: dict, tokenizer, spec) -> dict:
    """datasets.map function: canonical records (JSON) -> token columns and a status."""
    kind = KINDS[spec.kind]
    records = [json.loads(r) for r in batch["record"]]
    out = {k: [] for k in [*_features(kind), "status"]}
    for ex, status in tokenize_rows(records, tokenizer, spec):
        out["status"].append(STATUS.index(status))
        ex = ex or {"id": "", "prompt_ids": [], "response_ids": []}
        out["id"].append(ex["id"])
        out["prompt_ids"].append(ex["prompt_ids"])
        out["responses"].append(responses(ex))
        for k in kind.columns:
            out[k].append(ex.get(k))
    return out


def to_disk(records: list[dict], tokenizer, spec, path: str) -> tuple[ExampleTable, dict]:
    """Tokenise ``records`` (as tokenise.tokenize) into an Arrow table at ``path``; (table, counts)."""
    import datasets

    if not records:  # (an empty table cannot be saved; load_data treats an empty split as none)
        return [], {name: 0 for name in STATUS[1:]}
    work = path + ".work"
    os.makedirs(work, exist_ok=True)
    # one JSON column: text and conversational records alike are tokenised by tokenise.tokenize_rows
    source = datasets.Dataset.from_dict({"record": [json.dumps(r) for r in records]})
    features = _features(KINDS[spec.kind]).copy()
    features["status"] = datasets.Value("int8")
    num_proc = min(os.cpu_count() or 1, len(records) // PER_PROCESS)
    num_proc = num_proc if num_proc > 1 else None  # (num_proc=1 would still start a worker process)
    mapped = source.map(_tokenize_batch, batched=True, batch_size=500, remove_columns=source.column_names,
                        features=features, fn_kwargs={"tokenizer": tokenizer, "spec": spec}, num_proc=num_proc,
                        cache_file_name=os.path.join(work, "tokens.arrow"), new_fingerprint=os.path.basename(path),
                        load_from_cache_file=False)
    status = Counter(mapped.data.column("status").to_numpy().tolist())
    kept = mapped.filter(lambda s: [x < 2 for x in s], input_columns="status", batched=True,
                         cache_file_name=os.path.join(work, "kept.arrow"), load_from_cache_file=False)
    counts = {name: status.get(i, 0) for i, name in enumerate(STATUS) if name != "ok"}
    if len(kept):
        kept.remove_columns("status").save_to_disk(path)
    del source, mapped, kept
    shutil.rmtree(work, ignore_errors=True)
    return (ExampleTable.open(path, spec.kind, spec.max_len) if os.path.exists(path) else []), counts


def _remove_stale_builds(cache_dir: str, root: str) -> None:
    """Remove the temporary directories (``<root>.tmp-<pid>-<tid>``, each a whole tokenised copy) of builds whose
    process died. A build holds ``<root>.lock`` while it runs and the kernel drops the lock when its process dies,
    so the lock, not a pid (meaningless across machines sharing the directory), says whether a build is alive.
    The caller holds ``root``'s lock; a lock of another root that is held is a live build, left alone."""
    stale: dict[str, list[str]] = {}
    for name in os.listdir(cache_dir):
        base, sep, owner = name.rpartition(".tmp-")
        if sep and base and owner.replace("-", "").isdigit() and owner.count("-") == 1:
            stale.setdefault(os.path.join(cache_dir, base), []).append(os.path.join(cache_dir, name))
    for other, dirs in stale.items():
        with open(other + ".lock", "a") as lock:
            try:
                if other != root:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # building now
            for d in dirs:
                shutil.rmtree(d, ignore_errors=True)


def cached(spec, tokenizer, log, load) -> tuple[ExampleTable, ExampleTable | None]:
    """(train, eval) tables for ``spec`` from its cache directory, built first if absent by ``load(log, tok)``,
    load_data's reading path, with ``tok(records, split) -> (examples, counts)``."""
    import datasets

    root = os.path.join(spec.cache_dir, f"{spec.name}-{fingerprint(spec, tokenizer)}")
    os.makedirs(spec.cache_dir, exist_ok=True)
    built = False
    with open(root + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the build fails
        _remove_stale_builds(spec.cache_dir, root)
        if not os.path.exists(os.path.join(root, META)):
            tmp = f"{root}.tmp-{os.getpid()}-{threading.get_ident()}"
            shutil.rmtree(tmp, ignore_errors=True)
            lines: list[str] = []

            def both(msg):
                lines.append(str(msg))
                log(msg)

            bars = datasets.is_progress_bar_enabled()
            datasets.disable_progress_bars()
            try:
                _, evaluation = load(both, lambda recs, split: to_disk(recs, tokenizer, spec, os.path.join(tmp, split)))
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            finally:
                if bars:
                    datasets.enable_progress_bars()
            with open(os.path.join(tmp, META), "w") as f:
                json.dump({"format": FORMAT, "log": lines, "eval": evaluation is not None}, f)
            os.rename(tmp, root)
            built = True
    with open(os.path.join(root, META)) as f:
        meta = json.load(f)
    if not built:
        for line in meta["log"]:
            log(line)
    log(f"{spec.name}: tokenised examples {'written to' if built else 'memory-mapped from'} {root}")
    evaluation = ExampleTable.open(os.path.join(root, "eval"), spec.kind, spec.max_len) if meta["eval"] else None
    return ExampleTable.open(os.path.join(root, "train"), spec.kind, spec.max_len), evaluation
