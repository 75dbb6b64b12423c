"""Raw sources -> raw records with where they come from (file and line, id), and the field validators.
Sources, record ids, locators, CSV conversion and the canonical records the kinds build: docs/data.md.
"""

from __future__ import annotations

import codecs
import difflib
import gzip
import hashlib
import io
import json
import math
import os
import re

HH_MARK = "\n\nAssistant:"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def is_hh(prompt) -> bool:  # a generated HH sample's prompt read back must not be templated a second time
    return isinstance(prompt, str) and prompt.endswith(HH_MARK)


class DataError(ValueError):
    """A data problem. The message names the source, the line/row (1-based) and the field."""


class BadRecord(Exception):
    """One record is unusable; ``field`` is the field at fault (None for the whole record)."""

    def __init__(self, reason: str, field: str | None = None):
        super().__init__(reason)
        self.reason, self.field = reason, field


def source_id(identity: str) -> str:
    """The ``<source>`` part of example ids: 6 hex digits of a hash of a source's identity."""
    return hashlib.blake2b(identity.encode("utf-8", "surrogateescape"), digest_size=3).hexdigest()


def describe(source: str, loc: str | None, err: BadRecord) -> str:
    where = f"{source} {loc}" if loc else source
    return f"{where}: field {err.field!r}: {err.reason}" if err.field else f"{where}: {err.reason}"


def _data_suffix(path: str) -> str | None:
    name = path.lower().removesuffix(".gz")
    return next((s for s in DATA_SUFFIXES if name.endswith(s)), None)


def _read_bytes(path: str) -> bytes:
    try:
        with (gzip.open if path.lower().endswith(".gz") else open)(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read: {e}") from e


_SURROGATE = re.compile("[\udc80-\udcff]")


def _bad_utf8_field(obj, prefix="") -> str | None:
    """The (dotted) field of a record decoded with surrogateescape that holds undecodable bytes."""
    if isinstance(obj, str):
        return prefix or None if _SURROGATE.search(obj) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        name = f"{prefix}[{k}]" if isinstance(k, int) else (f"{prefix}.{k}" if prefix else str(k))
        if isinstance(v, (str, dict, list)) and (hit := _bad_utf8_field(v, name)):
            return hit
        if isinstance(k, str) and _SURROGATE.search(k):
            return name
    return None


def _utf8_problem(raw: bytes, obj) -> BadRecord:
    try:
        raw.decode("utf-8")
        what = "not valid UTF-8"
    except UnicodeDecodeError as e:
        what = f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"
    return BadRecord(what, _bad_utf8_field(obj) if obj is not None else None)


def _iter_jsonl(data: bytes, base: str):
    for n, raw in enumerate(data.split(b"\n"), 1):
        if n == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        if not raw.strip():
            continue
        loc, rid = f"line {n}", f"{base}:{n}"
        text = raw.decode("utf-8", "surrogateescape")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            yield loc, rid, None, (_utf8_problem(raw, None) if _SURROGATE.search(text)
                                   else BadRecord(f"malformed JSON ({e.msg} at column {e.colno})"))
            continue
        yield loc, rid, obj, (_utf8_problem(raw, obj) if _SURROGATE.search(text) else None)


def _iter_json_array(path: str, text: str, base: str):
    """Elements of a top-level JSON array with their line numbers (json.load keeps none)."""
    dec = json.JSONDecoder()
    ws = re.compile(r"\s*")
    i = ws.match(text, 0).end() + 1  # past "["
    line, last, n = 1, 0, 0

    def fail(pos: int, msg: str):
        ln = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        return DataError(f"{path} line {ln}: malformed JSON ({msg} at column {col}); "
                         "a broken JSON array cannot be resynchronised, so no record of it is usable")

    i = ws.match(text, i).end()
    if text.startswith("]", i):
        i += 1
    else:
        while True:
            i = ws.match(text, i).end()
            try:
                obj, end = dec.raw_decode(text, i)
            except json.JSONDecodeError as e:
                raise fail(e.pos, e.msg) from None
            line += text.count("\n", last, i)
            last = i
            n += 1
            err = BadRecord("not valid UTF-8", _bad_utf8_field(obj)) if _SURROGATE.search(text, i, end) else None
            yield f"record {n} (line {line})", f"{base}:{n}", obj, err
            i = ws.match(text, end).end()
            if text.startswith(",", i):
                i += 1
            elif text.startswith("]", i):
                i += 1
                break
            else:
                raise fail(i, "expected ',' or ']'" if i < len(text) else "unterminated array")
    if ws.match(text, i).end() != len(text):
        raise fail(ws.match(text, i).end(), "extra data after the array")


def _iter_parquet(path: str, base: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        src = pa.BufferReader(_read_bytes(path)) if path.lower().endswith(".gz") else path
        rows = pq.read_table(src).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read parquet: {e}") from e
    return ((f"row {n}", f"{base}:{n}", row, None) for n, row in enumerate(rows, 1))


def _iter_csv(path: str, spec, base: str):
    import pandas as pd

    try:
        df = pd.read_csv(io.BytesIO(_read_bytes(path)), dtype=str, keep_default_na=False)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as e:
        raise DataError(f"{path}: cannot read csv: {e}") from e
    lists = {spec.completions_key, spec.rewards_key, spec.messages_key}
    # text fields that may hold messages: a cell that parses as a JSON list of objects is messages, else text
    chat = {spec.prompt_key, spec.chosen_key, spec.rejected_key, spec.completion_key, spec.input_key} - lists
    for n, row in enumerate(df.to_dict("records"), 1):
        loc, err = f"row {n}", None
        for k, v in list(row.items()):
            if not isinstance(v, str):
                continue
            if k in chat and v.lstrip().startswith("[{"):
                try:
                    parsed = json.loads(v)
                except json.JSONDecodeError:
                    parsed = None
                if isinstance(parsed, list) and all(isinstance(m, dict) for m in parsed):
                    row[k] = parsed
                continue
            if k == spec.label_key and v.strip().lower() in ("true", "false"):
                row[k] = v.strip().lower() == "true"
            elif k == spec.margin_key and v.strip():
                try:
                    row[k] = float(v)
                except ValueError:
                    pass
            elif k in lists and v.strip().startswith("["):
                try:
                    row[k] = json.loads(v)
                except json.JSONDecodeError as e:
                    err = BadRecord(f"not a JSON array ({e.msg})", k)
        yield loc, f"{base}:{n}", row, err


def _iter_file(path: str, spec, base: str):
    suffix = _data_suffix(path)
    if suffix in (".json", ".jsonl"):
        data = _read_bytes(path)
        if data.lstrip(codecs.BOM_UTF8 + b" \t\r\n")[:1] == b"[":
            text = data.decode("utf-8", "surrogateescape")
            gen = _iter_json_array(path, text[1:] if text.startswith("\ufeff") else text, base)
        else:
            gen = _iter_jsonl(data, base)
        return ((path, *item) for item in gen)
    if suffix in (".parquet", ".csv"):
        return ((path, *item) for item in (_iter_parquet(path, base) if suffix == ".parquet"
                                           else _iter_csv(path, spec, base)))
    raise DataError(f"{path}: unsupported file type (expected one of {', '.join(DATA_SUFFIXES)}, optionally .gz)")


def _split_files(files: list[str], split: str) -> list[str]:
    """The files named after ``split`` (``train.jsonl``, ``train-00000-of-00002.parquet`` …)."""
    stems = [re.sub(r"\.gz$", "", os.path.basename(f), flags=re.I)[: -len(_data_suffix(f))] for f in files]
    return [f for f, stem in zip(files, stems) if re.fullmatch(re.escape(split.lower()) + r"([-_.].*)?", stem.lower())]


def _iter_hub(name: str, split: str, required: bool):
    """A hub dataset's split; ``name@data_dir`` reads one of its folders (``Anthropic/hh-rlhf@harmless-base``)."""
    import datasets

    repo, _, data_dir = name.partition("@")
    try:
        ds = datasets.load_dataset(repo, split=split, **({"data_dir": data_dir} if data_dir else {}))
    except ValueError as e:
        if not required and "split" in str(e).lower():
            return None
        raise DataError(f"{name}: cannot load split {split!r} from the hub: {e}") from e
    except Exception as e:  # network, missing repo, bad config: say which source
        raise DataError(f"{name}: cannot load split {split!r} from the hub: {type(e).__name__}: {e}") from e
    return ((name, f"row {i + 1}", f"{name}:{split}:{i}", row, None) for i, row in enumerate(ds))


def iter_raw(source: str, split: str, spec, required: bool = True, label: str | None = None):
    """(path, locator, id, raw record or None, BadRecord or None) for one split of one source; None when
    ``required`` is False and the split does not exist. ``label`` replaces the source's basename in ids."""
    path = os.path.expanduser(source)
    label = label or os.path.basename(os.path.normpath(path))
    if os.path.isfile(path):
        if split != spec.train_split:
            if required:
                raise DataError(f"{source}: a single file has only the train split, not {split!r}")
            return None
        return _iter_file(path, spec, label)
    if os.path.isdir(path):
        files = [os.path.join(d, f) for d in (path, os.path.join(path, "data")) if os.path.isdir(d)
                 for f in sorted(os.listdir(d)) if os.path.isfile(os.path.join(d, f)) and _data_suffix(f)]
        if not files:
            raise DataError(f"{source}: directory holds no data files ({', '.join(DATA_SUFFIXES)}, optionally .gz)")
        chosen = _split_files(files, split)
        if not chosen and split == spec.train_split and not _split_files(files, spec.eval_split or "\0"):
            chosen = files  # no split naming at all: everything is train
        if not chosen:
            if required:
                raise DataError(f"{source}: no file for split {split!r} among {[os.path.basename(f) for f in files]}")
            return None
        return (item for f in chosen for item in _iter_file(f, spec, f"{label}/{os.path.relpath(f, path)}"))
    if source.startswith(("/", "./", "../", "~")) or _data_suffix(source) or source.lower().endswith(".gz"):
        raise DataError(f"{source}: no such file or directory")
    return _iter_hub(source, split, required)


def get_field(rec: dict, key: str):
    """``rec[key]``, or a BadRecord naming the field (and the closest key the record has)."""
    if key not in rec:
        keys = list(rec)
        close = difflib.get_close_matches(key, [str(k) for k in keys], n=1, cutoff=0.5)
        hint = f" — did you mean {close[0]!r}?" if close else ""
        raise BadRecord(f"missing; record has keys {keys}{hint}", key)
    return rec[key]


def text_field(value, name: str) -> str:
    """``value`` if it is a non-blank string, else a BadRecord naming field ``name``."""
    if value is None:
        raise BadRecord("is None (null)", name)
    if not of_type(value, str, "a string", name).strip():
        raise BadRecord("is empty" if value == "" else "is whitespace-only", name)
    return value


def of_type(value, kind, what: str, name: str):
    """``value`` if it is a ``kind``, else a BadRecord: field ``name`` must be ``what``."""
    if not isinstance(value, kind):
        raise BadRecord(f"must be {what}, got {type(value).__name__} {short(value)}", name)
    return value


def number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRecord(f"must be a number, got {type(value).__name__} {short(value)}", name)
    if not math.isfinite(value):
        raise BadRecord(f"must be finite, got {value}", name)
    return float(value)


def short(value) -> str:
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


def split_hh(chosen: str, rejected: str, field: str = "chosen") -> tuple[str, str, str, bool]:
    """HH-RLHF pair -> (prompt, chosen response, rejected response, differ_early) (the rule: docs/data.md)."""
    n = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(HH_MARK, 0, n)
    if cut < 0:
        raise BadRecord("HH-style pair (no prompt field): chosen and rejected share no prefix ending in "
                        f"{HH_MARK!r}", field)
    end = cut + len(HH_MARK)
    early = chosen.rfind(HH_MARK) != cut or rejected.rfind(HH_MARK) != cut
    return chosen[:end], chosen[end:], rejected[end:], early


class Identical(Exception):
    """A pair whose chosen and rejected answers are the same (dropped and counted)."""


class EmptyResponse(Exception):
    """An HH pair whose fields are fine but whose answer after the shared prompt is blank."""


def pair(rec: dict, spec, allow_identical: bool = False) -> tuple:
    """(prompt, chosen, rejected, raw_prompt, differ_early) from a pairwise record; conversational records
    (see :func:`chat_answers`) give message lists."""
    chat = chat_answers(rec, spec, [(get_field(rec, spec.chosen_key), spec.chosen_key),
                                    (get_field(rec, spec.rejected_key), spec.rejected_key)])
    if chat is not None:
        prompt, (chosen, rejected) = chat
        if chosen == rejected and not allow_identical:
            raise Identical()
        return prompt, chosen, rejected, False, False
    chosen = text_field(get_field(rec, spec.chosen_key), spec.chosen_key)
    rejected = text_field(get_field(rec, spec.rejected_key), spec.rejected_key)
    explicit = spec.prompt_key is not None and spec.prompt_key in rec
    prompt = text_field(rec[spec.prompt_key], spec.prompt_key) if explicit else None
    if chosen == rejected and not allow_identical:
        raise Identical()
    if explicit:
        return prompt, chosen, rejected, is_hh(prompt), False
    prompt, c, r, early = split_hh(chosen, rejected, spec.chosen_key)
    if not c.strip() or not r.strip():
        # a quirk of real HH data (4 of 2312 test pairs), not a malformed record: dropped and counted
        raise EmptyResponse()
    return prompt, c, r, True, early


def _message_list(value, key: str) -> list[dict]:
    """Validated ``{role, content}`` messages (only those two keys kept). Content is a string; an assistant
    message's content must not be blank (it is what a model is trained or scored on)."""
    if not isinstance(value, list) or not value:
        raise BadRecord(f"must be a non-empty list of {{role, content}} messages, got {short(value)}", key)
    msgs = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise BadRecord(f"must be an object with role and content, got {short(m)}", where)
        for k in ("role", "content"):
            if k not in m:
                raise BadRecord(f"missing; message has keys {list(m)}", f"{where}.{k}")
        role = text_field(m["role"], f"{where}.role")
        if role == "assistant" or not isinstance(m["content"], str):  # others may be empty, never non-strings
            text_field(m["content"], f"{where}.content")
        msgs.append({"role": role, "content": m["content"]})
    return msgs


def _ends_with_assistant(msgs: list[dict], key: str) -> list[dict]:
    if msgs[-1]["role"] != "assistant":
        raise BadRecord(f"the last message must have role 'assistant', got {msgs[-1]['role']!r}",
                        f"{key}[{len(msgs) - 1}].role")
    return msgs


def conversation(value, key: str) -> list[dict]:
    """A whole conversation: at least one message before the final assistant message."""
    msgs = _ends_with_assistant(_message_list(value, key), key)
    if len(msgs) < 2:
        raise BadRecord("needs at least one prompt message before the final assistant message", key)
    return msgs


def chat_prompt(value, key: str) -> list[dict]:
    msgs = _message_list(value, key)
    if msgs[-1]["role"] == "assistant":
        raise BadRecord("the prompt's last message is the assistant's; the answer follows the prompt",
                        f"{key}[{len(msgs) - 1}].role")
    return msgs


def chat_answers(rec: dict, spec, answers: list[tuple[object, str]]) -> tuple[list[dict], list[list[dict]]] | None:
    """(prompt messages, [K answer messages]) when a record is conversational (its prompt or an answer is a
    message list: the TRL and UltraFeedback layouts of docs/data.md), else None; ``answers`` = [(value, field)]."""
    key = spec.prompt_key
    p_raw = rec.get(key) if key is not None else None
    if not isinstance(p_raw, list) and not any(isinstance(v, list) for v, _ in answers):
        return None
    for v, name in answers:
        if v is None or not isinstance(v, (str, list)):
            text_field(v, name)  # the usual message for null / a non-string
    if isinstance(p_raw, list):
        prompt = chat_prompt(p_raw, key)
        out = []
        for v, name in answers:
            if isinstance(v, str):
                out.append([{"role": "assistant", "content": text_field(v, name)}])
                continue
            msgs = _ends_with_assistant(_message_list(v, name), name)
            if len(msgs) > len(prompt) and msgs[:len(prompt)] == prompt:
                msgs = msgs[len(prompt):]
            if msgs[0]["role"] != "assistant":
                raise BadRecord(f"must start with the assistant's message (it follows the prompt in {key!r}), "
                                f"got role {msgs[0]['role']!r}", f"{name}[0].role")
            out.append(msgs)
        return prompt, out
    lists = [(_ends_with_assistant(_message_list(v, name), name) if isinstance(v, list) else v, name)
             for v, name in answers]
    whole = [m for m, _ in lists if isinstance(m, list) and m[0]["role"] != "assistant"]
    if not whole:  # completions only: the string prompt is the user's turn
        if key is None:
            raise BadRecord("the answers are assistant messages only and need the record's prompt, but prompt_key "
                            "is None (train_rm's default, as OpenRLHF): pass --prompt_key prompt", answers[0][1])
        prompt = [{"role": "user", "content": prompt_field(rec, spec, "conversational")}]
        return prompt, [m if isinstance(m, list) else [{"role": "assistant", "content": text_field(m, name)}]
                        for m, name in lists]
    for m, name in lists:
        if not isinstance(m, list):
            raise BadRecord("is a string but another answer is a whole conversation; give every answer as "
                            "messages", name)
    convs = [m for m, _ in lists]
    if len(convs) == 1:
        n = len(convs[0]) - 1
    else:
        n = 0
        while all(len(c) > n for c in convs) and all(c[n] == convs[0][n] for c in convs):
            n += 1
    for c, name in lists:
        if n >= len(c) or c[n]["role"] != "assistant" or n == 0 or c[n - 1]["role"] == "assistant":
            others = ", ".join(nm for _, nm in lists if nm != name)
            what = f"message {n} has role {c[n]['role']!r}" if n < len(c) else f"it has only {len(c)} messages"
            raise BadRecord(f"the conversations have different prompts: their common prefix of {n} messages must "
                            f"end just before an assistant message, but here {what} (compared with {others})", name)
    return convs[0][:n], [c[n:] for c in convs]


def prompt_and_answers(rec: dict, spec, answers: list[tuple[object, str]], kind: str) -> tuple:
    """(prompt, [K answers]) of a record with a prompt field: message lists when it is conversational
    (:func:`chat_answers`), else the prompt field's text and the answers' texts."""
    chat = chat_answers(rec, spec, answers)
    if chat is not None:
        return chat
    return prompt_field(rec, spec, kind), [text_field(v, name) for v, name in answers]


def prompt_field(rec: dict, spec, kind: str) -> str:
    if spec.prompt_key is None:
        raise BadRecord(f"prompt_key is None, which only suits HH-style pairwise records; {kind} records "
                        "need a prompt field")
    return text_field(get_field(rec, spec.prompt_key), spec.prompt_key)


def generation_prompt(rec: dict, spec) -> tuple[str | list[dict], bool]:
    """(prompt, raw_prompt) of a raw record for generation. The ``input_key`` field: messages (ending with
    a non-assistant turn), or text (an HH-style dialogue ending with ``"\n\nAssistant:"`` is raw: no
    template); else a ``messages_key`` conversation without its final assistant answer; else a pairwise
    record's prompt (HH dialogues: their shared prefix; conversations: their common prefix)."""
    if spec.input_key in rec or not ({spec.messages_key, spec.chosen_key, spec.rejected_key} & set(rec)):
        value = get_field(rec, spec.input_key)
        if isinstance(value, list):
            return chat_prompt(value, spec.input_key), False
        text = text_field(value, spec.input_key)
        return text, is_hh(text)
    if spec.messages_key in rec:
        msgs = _message_list(rec[spec.messages_key], spec.messages_key)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise BadRecord("holds no prompt: every message is the assistant's", spec.messages_key)
        return msgs, False
    prompt, _, _, raw, _ = pair(rec, spec, allow_identical=True)
    return prompt, raw
