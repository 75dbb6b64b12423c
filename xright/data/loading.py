"""DataSpec and load_data: sources -> validated, blended, split, tokenised and truncated examples (the blending
and eval-set rules: docs/data.md)."""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field

from . import store
from .kinds import KINDS, canonicalize, get_kind
from .records import BadRecord, DataError, EmptyResponse, Identical, describe, iter_raw, source_id
from .tokenise import NO_TEMPLATE, tokenize

MAX_REASONS = 5
BUILTIN_TRAIN, BUILTIN_EVAL = 2000, 200
DUMMY_FRACTION = 0.03


@dataclass
class DataSpec:
    """What to load for one objective (the exact rules: docs/data.md)."""

    kind: str                      # "sft" | "pairwise" | "binary" | "scored"
    dataset: str | None = None     # comma-separated sources; None -> built-in synthetic data
    dataset_probs: str = "1.0"
    train_split: str = "train"
    eval_split: str = "test"       # "dummy": eval = first 3% of train (overlaps train)
    eval_fraction: float = 0.0     # > 0: disjoint seeded hold-out of train (takes precedence)
    max_samples: int = 100_000_000
    max_len: int = 2048
    truncation: str = "truncate"   # or "drop"
    input_key: str = "input"
    output_key: str = "output"
    prompt_key: str | None = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"
    completion_key: str = "completion"
    label_key: str = "label"
    completions_key: str = "completions"
    rewards_key: str = "rewards"
    margin_key: str | None = None
    messages_key: str = "messages"
    input_template: str | None = "User: {}\nAssistant: "
    apply_chat_template: bool = False
    multiturn: bool = False        # sft messages: train every assistant turn (default: the last message)
    pretrain_mode: bool = False
    sft_from_chosen: bool = False
    skip_bad_records: bool = False
    seed: int = 42
    name: str = "data"
    cache_dir: str | None = None   # tokenised examples on disk, memory-mapped (xright.data.store)

    def check(self) -> None:
        get_kind(self.kind)
        if self.truncation not in ("truncate", "drop"):
            raise ValueError(f"truncation must be 'truncate' or 'drop', got {self.truncation!r}")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        if self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {self.max_samples}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.input_template and "{}" not in self.input_template:
            raise ValueError(f"input_template must contain '{{}}' where the prompt goes: {self.input_template!r}")


@dataclass
class SourceStats:
    """What reading one split of one source found."""

    source: str
    split: str
    read: int = 0            # raw records seen
    bad: int = 0             # skipped (skip_bad_records=True)
    identical: int = 0       # pairs with chosen == rejected, dropped
    differ_early: int = 0    # HH pairs diverging before their own last "\n\nAssistant:"
    empty_response: int = 0  # HH pairs with a blank answer after the shared prompt, dropped
    reasons: list[str] = field(default_factory=list)
    identical_ids: list[str] = field(default_factory=list)
    k: int | None = None     # scored: the number of completions of every record
    k_where: str = ""        # scored: where the first record (which set k) is


def k_mismatch(k: int, first_k: int, first_where: str) -> str:
    return (f"has K={k} completions but the first record ({first_where}) has K={first_k}; every scored "
            "record of a dataset needs the same K (a micro-batch stacks K completions per prompt)")


def read_source(source: str, split: str, spec, required: bool = True,
                label: str | None = None) -> tuple[list[dict], SourceStats] | None:
    """Canonical records of one split of one source, validated, and what reading found; None if an optional
    split is absent. A bad record raises DataError unless ``spec.skip_bad_records`` (then it is counted)."""
    raw = iter_raw(source, split, spec, required, label)
    if raw is None:
        return None
    stats = SourceStats(source, split)
    records: list[dict] = []
    sources: dict[str, str] = {}
    for where, loc, rid, obj, err in raw:
        stats.read += 1
        try:
            if err is not None:
                raise err
            recs, early = canonicalize(spec.kind, obj, rid, spec)
            k = len(KINDS[spec.kind].answers(recs[0], spec)[0])  # the same K everywhere (only scored can differ)
            if stats.k is None:
                stats.k, stats.k_where = k, f"{where} {loc}"
            elif k != stats.k:
                raise BadRecord(k_mismatch(k, stats.k, stats.k_where), spec.completions_key)
        except EmptyResponse:
            stats.empty_response += 1
            continue
        except Identical:
            stats.identical += 1
            if len(stats.identical_ids) < MAX_REASONS:
                stats.identical_ids.append(rid)
            continue
        except BadRecord as e:
            msg = describe(where, loc, e)
            if not spec.skip_bad_records:
                raise DataError(msg + " (skip_bad_records=True skips such records)") from None
            stats.bad += 1
            if len(stats.reasons) < MAX_REASONS:
                stats.reasons.append(msg)
            continue
        stats.differ_early += early
        if where not in sources:  # a file by its resolved path; a hub dataset by name and split
            sources[where] = source_id(f"file:{os.path.realpath(where)}" if os.path.isfile(where)
                                       else f"hub:{where}:{split}")
        for r in recs:
            r["source"], r["where"] = sources[where], f"{where} {loc}"
        records += recs
    return records, stats


def parse_probs(sources: list[str], probs: str) -> list[float]:
    try:
        values = [float(x) for x in str(probs).split(",") if x.strip()]
    except ValueError:
        raise DataError(f"dataset_probs {probs!r} for {','.join(sources)}: not comma-separated numbers") from None
    if len(sources) == 1 and values == [1.0]:
        return values
    if len(values) != len(sources):
        raise DataError(f"{len(sources)} sources ({','.join(sources)}) but {len(values)} dataset_probs ({probs!r})")
    if any(v < 0 or v != v for v in values) or sum(values) <= 0:
        raise DataError(f"dataset_probs {probs!r} for {','.join(sources)}: must be >= 0 with a positive sum")
    return [v / sum(values) for v in values]


def _apportion(total: int, probs: list[float]) -> list[int]:
    """Largest-remainder split of ``total`` by ``probs`` (ties to the earlier source)."""
    raw = [total * p for p in probs]
    counts = [int(x) for x in raw]
    order = sorted(range(len(probs)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def blend_split(parts: list[list[dict]], probs: list[float], max_samples: int, seed: int,
                eval_fraction: float = 0.0) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, held-out eval, per-source contributions) by the blending and eval_fraction rules (docs/data.md);
    a contribution is ``{"draws", "distinct", "held", "valid"}``."""
    single = len(parts) == 1
    if not single:  # an empty source (everything filtered) gets no share; the others keep their relative probs
        probs = [p if part else 0.0 for p, part in zip(probs, parts)]
        if sum(probs) <= 0:
            return [], [], [{"draws": 0, "distinct": 0, "held": 0, "valid": 0} for _ in parts]
        probs = [p / sum(probs) for p in probs]
    total = min(sum(len(p) for p in parts), max_samples)
    shares = [total] if single else _apportion(total, probs)
    used = [min(n, len(part)) for n, part in zip(shares, parts)]
    held_n = [0] * len(parts)
    if eval_fraction > 0 and sum(used):
        held_n = _apportion(max(1, round(sum(used) * eval_fraction)), [u / sum(used) for u in used])
        held_n = [min(h, u - 1) if n > u else h for h, u, n in zip(held_n, used, shares)]
    train, held, contributions = [], [], []
    for i, (part, n, u, k) in enumerate(zip(parts, shares, used, held_n)):
        first = list(range(len(part)))
        if not single:
            random.Random(f"{seed}/blend/{i}/0").shuffle(first)
        out = {first[j] for j in random.Random(f"{seed}/eval_fraction/{i}").sample(range(u), k)}
        held += [part[j] for j in sorted(out)]
        pool = [j for j in first if j not in out]
        draws, rnd = pool[: n - k], 1
        while len(draws) < n - k:
            order = sorted(pool)
            random.Random(f"{seed}/blend/{i}/{rnd}").shuffle(order)
            draws += order[: n - k - len(draws)]
            rnd += 1
        train += [part[j] for j in draws]
        contributions.append({"draws": len(draws), "distinct": min(len(draws), len(pool)), "held": k,
                              "valid": len(part)})
    if not single:
        random.Random(f"{seed}/blend").shuffle(train)
    return train, held, contributions


def number_copies(records: list[dict], keys: tuple = ("id",)) -> list[dict]:
    """The n-th occurrence (n >= 2) of a record id gets ``~n`` on its ``keys``, so ids are unique within a split."""
    seen: Counter = Counter()
    out = []
    for r in records:
        seen[r["id"]] += 1
        out.append(r if seen[r["id"]] == 1 else {**r, **{k: f"{r[k]}~{seen[r['id']]}" for k in keys if k in r}})
    return out


def _builtin(spec: DataSpec, split: str, n: int) -> list[dict]:
    recs = KINDS[spec.kind].builtin(spec, split, n)
    return KINDS[spec.kind].prepare([{**r, "source": source_id(f"builtin:{spec.seed}")} for r in recs], spec)


def source_labels(sources: list[str]) -> list[str]:
    """Id prefixes: each source's basename, or the whole source where two sources share a basename."""
    base = [os.path.basename(os.path.normpath(os.path.expanduser(s))) for s in sources]
    return [s if any(b == base[i] and t != s for b, t in zip(base, sources)) else base[i]
            for i, s in enumerate(sources)]


def _read_split(spec: DataSpec, sources: list[str], split: str, required: bool, log):
    """(records per source (None: no such split), summed stats, each source's stats)."""
    parts, total, each = [], SourceStats(",".join(sources), split), []
    for s, label in zip(sources, source_labels(sources)):
        got = read_source(s, split, spec, required=required, label=label)
        if got is None:
            if len(sources) > 1:
                log(f"{spec.name}: {s} has no {split!r} split")
            parts.append(None)
            continue
        recs, st = got
        extra = [f"{st.bad} skipped: bad records"] + [f"{n} {what}" for n, what in (
            (st.identical, "dropped: chosen == rejected"), (st.empty_response, "dropped: blank HH answer"),
            (st.differ_early, "HH pairs differ early")) if n]
        log(f"{spec.name}: {st.source} [{st.split}]: {st.read} records read, {len(recs)} valid ({', '.join(extra)})")
        if st.bad:
            log(f"{spec.name}: first bad records skipped:\n  " + "\n  ".join(st.reasons))
        if st.identical:
            log(f"warning: {spec.name}: {st.source}: {st.identical} pairs with chosen identical to rejected dropped "
                f"(first: {', '.join(st.identical_ids[:MAX_REASONS])})")
        if st.differ_early:
            log(f"{spec.name}: {st.source}: {st.differ_early} HH pairs diverge before their last "
                "'\\n\\nAssistant:'; their prompt is the shared prefix and each response holds several turns")
        parts.append(KINDS[spec.kind].prepare(recs, spec))
        for name in ("read", "bad", "identical", "differ_early", "empty_response"):  # the split's totals: counts only
            setattr(total, name, getattr(total, name) + getattr(st, name))
        each.append(st)
    return parts, total, each


def _empty_error(spec: DataSpec, where: str, split: str, st: SourceStats | None, why: str = "") -> DataError:
    detail = f" ({st.read} records read, {st.bad} skipped: bad records, {st.identical} dropped: chosen == rejected)" \
        if st is not None else ""
    return DataError(f"{where}: no usable {spec.kind} records in split {split!r}{detail}{why}")


def load_data(spec: DataSpec, tokenizer, log=print) -> tuple[list[dict], list[dict] | None]:
    """(train, eval) tokenised examples for ``spec``; eval is None when there is no eval set. With
    ``spec.cache_dir`` they are memory-mapped :class:`xright.data.store.ExampleTable` s, tokenised once."""
    spec.check()
    if spec.apply_chat_template and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{spec.name}: --apply_chat_template: {NO_TEMPLATE}")
    if spec.cache_dir:
        return store.cached(spec, tokenizer, log, lambda lg, tok: _load(spec, tokenizer, lg, tok))
    return _load(spec, tokenizer, log, lambda records, split: tokenize(records, tokenizer, spec))


def _load(spec: DataSpec, tokenizer, log, tok):
    """load_data's body; ``tok(records, split) -> (examples, counts)`` tokenises one split."""
    train_stats = eval_stats = None
    eval_recs: list[dict] | None = None
    want_split = spec.eval_fraction <= 0 and spec.eval_split and spec.eval_split != "dummy"
    if spec.dataset is None or not str(spec.dataset).strip():
        where, sources = f"builtin:{spec.kind}", [f"builtin:{spec.kind}"]
        parts, probs = [_builtin(spec, "train", min(BUILTIN_TRAIN, spec.max_samples))], [1.0]
        if want_split:
            eval_recs = _builtin(spec, "eval", min(BUILTIN_EVAL, spec.max_samples))[: spec.max_samples]
        log(f"{spec.name}: built-in synthetic {spec.kind} data (seed {spec.seed})")
    else:
        sources = [s.strip() for s in str(spec.dataset).split(",") if s.strip()]
        where = ",".join(sources)
        probs = parse_probs(sources, spec.dataset_probs)
        parts, train_stats, per_source = _read_split(spec, sources, spec.train_split, True, log)
        if want_split:
            eparts, eval_stats, eper_source = _read_split(spec, sources, spec.eval_split, False, log)
            per_source += eper_source
            if all(p is None for p in eparts):
                log(f"{spec.name}: no {spec.eval_split!r} split in {where}: no eval set")
            else:
                eval_recs = [r for p in eparts if p for r in p][: spec.max_samples]
        have = [st for st in per_source if st.k is not None]  # the same K in every source and split
        for st in have[1:]:
            if st.k != have[0].k:
                raise DataError(f"{st.k_where}: field 'completions': {k_mismatch(st.k, have[0].k, have[0].k_where)}")
    train_recs, held, contributions = blend_split(parts, probs, spec.max_samples, spec.seed, spec.eval_fraction)
    if spec.dataset and (len(parts) > 1 or any(c["held"] or c["distinct"] < c["valid"] for c in contributions)):
        for source, c in zip(sources, contributions):
            msg = (f"{spec.name}: {source} contributes {c['draws']} train examples: {c['distinct']} distinct records "
                   f"of {c['valid']} valid")
            if c["draws"] > c["distinct"]:
                msg += f", each used {c['draws'] / c['distinct']:.1f} times on average"
            if c["valid"] - c["distinct"] - c["held"]:
                msg += f", {c['valid'] - c['distinct'] - c['held']} unused"
            log(msg + (f", {c['held']} held out for eval" if spec.eval_fraction > 0 else ""))
    if not train_recs and not held:
        raise _empty_error(spec, where, spec.train_split, train_stats)
    if spec.eval_fraction > 0:
        if not train_recs:
            raise DataError(f"{where}: eval_fraction={spec.eval_fraction} of {len(held)} records leaves no "
                            "training data")
        eval_recs = held
        log(f"{spec.name}: eval = {len(held)} records held out of train at random before blending "
            f"(eval_fraction={spec.eval_fraction}, seed {spec.seed}), disjoint from the {len(train_recs)} train "
            "records")
    elif spec.eval_split == "dummy":
        k = max(1, int(len(train_recs) * DUMMY_FRACTION))
        eval_recs = train_recs[:k]
        log(f"warning: {spec.name}: eval_split=dummy: the eval set is the first {k} train records, which are "
            "also trained on (XRIGHT's behaviour); its losses are optimistic. Use eval_fraction for a disjoint one")
    train_recs = number_copies(train_recs)
    eval_recs = number_copies(eval_recs) if eval_recs is not None else None
    train, counts = tok(train_recs, "train")
    _log_split(spec, "train", len(train), counts, train_stats, log)
    if not train:
        raise _empty_error(spec, where, spec.train_split, train_stats,
                           f"; all {len(train_recs)} examples longer than max_len={spec.max_len} were dropped")
    evaluation = None
    if eval_recs is not None:
        evaluation, ecounts = tok(eval_recs, "eval")
        _log_split(spec, "eval", len(evaluation), ecounts, eval_stats, log)
        if not evaluation:
            log(f"{spec.name}: eval set empty after filtering: no eval set")
            evaluation = None
    return train, evaluation


def _log_split(spec: DataSpec, split: str, n: int, counts: dict, st: SourceStats | None, log) -> None:
    parts = [f"{counts['truncated']} truncated", f"{counts['dropped_prompt']} dropped: prompt too long"] \
        if spec.truncation == "truncate" else [f"{counts['dropped_long']} dropped: too long"]
    parts.append(f"{st.bad if st else 0} skipped: bad records")
    if st and st.identical:
        parts.append(f"{st.identical} dropped: chosen == rejected")
    log(f"{spec.name} {split}: {n} examples ({', '.join(parts)})")
