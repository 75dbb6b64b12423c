"""Tokenisation: canonical records -> examples of token ids, truncated to ``max_len`` (rules: docs/data.md)."""

from __future__ import annotations

import hashlib
import struct
from collections import Counter

from .chat import NO_TEMPLATE, ChatRenderer
from .kinds import KINDS
from .records import BadRecord, DataError, describe, source_id

STATUS = ("ok", "truncated", "dropped_prompt", "dropped_long")  # what tokenising did to a record


def prompt_text(rec: dict, tokenizer, spec) -> str:
    """A prompt's text: the chat template's generation prompt, else the input template's (HH prefixes: none)."""
    p = rec["prompt"]
    if not is_chat(rec, spec):
        return spec.input_template.format(p) if spec.input_template and not rec.get("raw_prompt") else p
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(NO_TEMPLATE)
    messages = p if isinstance(p, list) else [{"role": "user", "content": p}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _token_at(encoding, pos: int, end: int, n: int) -> int:
    """Index of the token holding character ``pos`` (or the next character that has one), else n."""
    for c in range(pos, end):
        t = encoding.char_to_token(c)
        if t is not None:
            return t
    return n


def _encode_together(tokenizer, prompts: list[str], groups: list[list[str]]):
    """(prompt ids, [K response ids]) per prompt and its K responses, with the ids of the whole texts
    (the boundary and special tokens: docs/data.md)."""
    if not prompts:
        return [], []
    bos = getattr(tokenizer, "bos_token", None)
    # the special tokens the tokenizer adds at the start of a text (e.g. [BOS]); [] if none
    with_, without = (list(tokenizer(["a"], add_special_tokens=special, verbose=False)["input_ids"][0])
                      for special in (True, False))
    head = next((with_[:i] for i in range(len(with_) - len(without) + 1) if with_[i:i + len(without)] == without), [])
    texts = [p + r for p, g in zip(prompts, groups) for r in g]
    enc = tokenizer(texts, add_special_tokens=False, verbose=False)
    wholes = enc["input_ids"]
    fast = getattr(enc, "encodings", None)  # a fast tokenizer's encodings know each character's token
    alone = None if fast else tokenizer(prompts, add_special_tokens=False, verbose=False)["input_ids"]
    out_p, out_r, i = [], [], 0
    for j, (text, g) in enumerate(zip(prompts, groups)):
        ws = [list(w) for w in wholes[i:i + len(g)]]
        if fast:
            p = ws[0]
            b = min(_token_at(fast[i + k], len(text), len(texts[i + k]), len(w)) for k, w in enumerate(ws))
        else:
            p = list(alone[j])
            b = len(p)
        for w in ws:  # one prompt for all K: the tokens every whole text agrees on
            m = min(b, len(p), len(w))
            b = m if p[:m] == w[:m] else next(t for t in range(m) if p[t] != w[t])  # usually equal, at C speed
        i += len(g)
        out_p.append((head if not (bos and text.startswith(bos)) else []) + p[:b])
        out_r.append([w[b:] for w in ws])
    return out_p, out_r


def _token_hash(prompt: list[int], responses: list[list[int]]) -> str:
    """The ``<tokens>`` part of an example id: 8 hex digits of a hash of its token ids."""
    h = hashlib.blake2b(struct.pack(f"<{1 + len(responses)}i", len(prompt), *map(len, responses)), digest_size=4)
    for ids in (prompt, *responses):
        h.update(struct.pack(f"<{len(ids)}i", *ids))
    return h.hexdigest()


def tokenize(records: list[dict], tokenizer, spec) -> tuple[list[dict], dict]:
    """Canonical records -> tokenised examples, truncated by ``spec.truncation``; and the counts."""
    rows = tokenize_rows(records, tokenizer, spec)
    status = Counter(s for _, s in rows)
    return [ex for ex, _ in rows if ex is not None], {k: status[k] for k in STATUS[1:]}


def is_chat(rec: dict, spec) -> bool:
    return isinstance(rec["prompt"], list) or (spec.apply_chat_template and not rec.get("raw_prompt"))


def _encoded(records: list[dict], tokenizer, spec, chunk: int = 1024):
    """(record, prompt ids, [K response ids], [K masks or None]) per record, each response ending with eos or
    the chat template's end of turn; encoded a chunk at a time (so the whole texts' token lists of a big set
    never all exist at once)."""
    eos = tokenizer.eos_token_id
    kind, renderer = KINDS[spec.kind], None
    for start in range(0, len(records), chunk):
        recs = records[start:start + chunk]
        chat = [is_chat(r, spec) for r in recs]
        plain = [r for r, c in zip(recs, chat) if not c]
        prompts, responses = _encode_together(tokenizer, [prompt_text(r, tokenizer, spec) for r in plain],
                                              [kind.answers(r, spec)[0] for r in plain])
        text = iter(zip(prompts, responses))
        for rec, c in zip(recs, chat):
            if not c:
                p, rs = next(text)
                yield rec, p, [r + [eos] for r in rs], [None] * len(rs)
                continue
            answers, fields = kind.answers(rec, spec)
            prompt = rec["prompt"] if isinstance(rec["prompt"], list) else [{"role": "user", "content": rec["prompt"]}]
            answers = [a if isinstance(a, list) else [{"role": "assistant", "content": a}] for a in answers]
            try:
                renderer = renderer or ChatRenderer(tokenizer, fields[0])
                yield rec, *renderer.encode(prompt, answers, fields, mask_roles=kind.mask_roles)
            except BadRecord as e:
                raise DataError(describe(rec.get("where") or rec["id"], None, e)) from None


def tokenize_rows(records: list[dict], tokenizer, spec) -> list[tuple[dict | None, str]]:
    """(example or None, status) per record; status "ok", "truncated", "dropped_prompt" or "dropped_long"."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token id")
    kind = KINDS[spec.kind]
    no_source = source_id("")
    out: list[tuple[dict | None, str]] = []
    for rec, p, rs, masks in _encoded(records, tokenizer, spec):
        p, rs, masks = kind.ids(p, rs, masks, spec)
        room = spec.max_len - len(p)
        status = "ok"
        if any(len(r) > room for r in rs):
            if spec.truncation == "drop":
                out.append((None, "dropped_long"))
                continue
            if room < 1:
                out.append((None, "dropped_prompt"))
                continue
            rs = [r[:room] for r in rs]
            masks = [m if m is None else m[:room] for m in masks]
            status = "truncated"
        extra = {**{k: rec.get(k) for k in kind.columns}, "response_mask": masks[0]}
        out.append((kind.example(f"{rec['id']}@{rec.get('source', no_source)}.{_token_hash(p, rs)}", p, rs, extra,
                                 spec.max_len), status))
    return out
