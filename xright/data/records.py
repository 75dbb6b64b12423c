"""Raw sources -> validated canonical records.

Sources
    Local ``.json`` (a JSON array, or JSON lines), ``.jsonl``, ``.parquet``, ``.csv``, each optionally
    ``.gz``; a directory; otherwise a hub name read with ``datasets.load_dataset(name, split=...)``, or
    ``name@data_dir`` with ``datasets.load_dataset(name, data_dir=data_dir, split=...)``.
    A directory holds files named by split (``train.jsonl``, ``test.parquet``,
    ``train-00000-of-00002.parquet`` …, also under ``data/``); when no file is named after the
    requested train or eval split, all its data files together are the train split.
    A local file is its own train split; it has no other split.

Where a record comes from
    JSON lines: ``line N`` (1-based, blank lines count); JSON arrays: ``record N (line L)``;
    csv/parquet: ``row N`` (1-based data row, the csv header not counted); hub: ``row N`` (1-based).

Example ids (what a cache, such as the reference log-prob cache, may key on)
    ``<record>[~<copy>]@<source>.<tokens>``, e.g. ``train.jsonl:17@3f9a2c.a1b2c3d4``:

    - ``<record>`` (readable; this module gives it): ``<basename>:<line>`` (JSON lines),
      ``<basename>:<N>`` (N-th element of a JSON array), ``<basename>:<row>`` (csv/parquet),
      ``<hub name>:<split>:<index>`` (0-based dataset index), ``builtin:<kind>:<split>:<i>``. A
      directory's files are ``<dir>/<file>:<line>``; where two sources of one blend share a basename
      the whole source string replaces it. A pairwise record unpaired for kind ``binary`` gives
      ``<record>#chosen`` and ``<record>#rejected``.
    - ``~<copy>``: the n-th occurrence (n >= 2) of one record in one split of a blend (blending
      repeats the records of an oversampled source), so ids are unique within a split; copies
      carry the same tokens.
    - ``<source>``: 6 hex digits of a hash of the source's identity (:func:`source_id`): the
      resolved absolute path of a local file, ``hub:<name>:<split>`` for the hub, the seed for the
      built-in data. Two files both named ``train.jsonl`` give different ids.
    - ``<tokens>``: 8 hex digits of a hash of the example's token ids (prompt and each response,
      their lengths included), added by ``loading.tokenize``: a change of max_len, template or
      tokenizer that changes an example's tokens changes its id.
    Canonical records (below) carry only ``<record>[~<copy>]`` as ``id`` and the source hash as
    ``source``; tokenised examples carry the whole id.

Canonical records (what this module returns; the tokeniser consumes them)
    sft       {"id", "source", "where", "prompt": str | list[message], "response": str | list[message], "raw_prompt"}
    pairwise  {"id", "source", "where", "prompt", "chosen", "rejected", "raw_prompt"[, "margin": float]}
    binary    {"id", "source", "where", "prompt", "completion", "label": bool, "raw_prompt"}
    scored    {"id", "source", "where", "prompt", "completions": [K][, "rewards": [K float]], "raw_prompt"}
    ``where`` is the file and line (``"/data/train.jsonl line 17"``) for errors found later (the chat
    template's). ``raw_prompt`` is True for HH-style dialogue prefixes (an HH pair's shared prefix, or a text
    prompt ending with ``"\n\nAssistant:"``, as generation writes them back), which get no input template or chat
    template. A conversational record has a message-list prompt (``{"role", "content"}`` dicts, ending with
    a non-assistant turn) and each answer is a message list that follows it (starting and ending with the
    assistant's message; several messages for a multi-turn answer); the tokeniser renders them with the
    chat template (:mod:`xright.data.chat`). Which raw layouts are conversational: :func:`chat_answers`;
    SFT ``messages``: the prompt is everything before the last message (``multiturn``: before the first
    assistant message), the response the rest.

CSV cells are text, so fields are converted by the schema: the label field from
``true``/``false`` (any case), margin from a number, list fields (completions, rewards, messages)
from JSON arrays; a prompt/chosen/rejected/completion/input cell that parses as a JSON array of objects
is messages. Everything else stays a string.

Scored records must all have the same K (a micro-batch stacks K completions per prompt): a record
whose K differs from the first record's is a bad record of its file and line; across the sources
and splits of one dataset ``loading.load_data`` checks the same.
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
from dataclasses import dataclass, field

HH_MARK = "\n\nAssistant:"
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
MAX_REASONS = 5


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


def k_mismatch(k: int, first_k: int, first_where: str) -> str:
    return (f"has K={k} completions but the first record ({first_where}) has K={first_k}; every scored "
            "record of a dataset needs the same K (a micro-batch stacks K completions per prompt)")


def describe(source: str, loc: str | None, err: BadRecord) -> str:
    where = f"{source} {loc}" if loc else source
    return f"{where}: field {err.field!r}: {err.reason}" if err.field else f"{where}: {err.reason}"


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

    def add(self, other: "SourceStats") -> None:
        self.read += other.read
        self.bad += other.bad
        self.identical += other.identical
        self.differ_early += other.differ_early
        self.empty_response += other.empty_response
        self.reasons += other.reasons[: MAX_REASONS - len(self.reasons)]
        self.identical_ids += other.identical_ids[: MAX_REASONS - len(self.identical_ids)]


# ------------------------------------------------------------------------------ reading files


def _data_suffix(path: str) -> str | None:
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    return next((s for s in DATA_SUFFIXES if name.endswith(s)), None)


def _stem(path: str) -> str:
    name = os.path.basename(path)
    if name.lower().endswith(".gz"):
        name = name[:-3]
    return name[: -len(_data_suffix(path))] if _data_suffix(path) else name


def _read_bytes(path: str) -> bytes:
    try:
        if path.lower().endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        with open(path, "rb") as f:
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
        pos = None
    except UnicodeDecodeError as e:
        pos = e.start
    what = f"not valid UTF-8 (byte 0x{raw[pos]:02x} at byte {pos + 1} of the line)" if pos is not None \
        else "not valid UTF-8"
    return BadRecord(what, _bad_utf8_field(obj) if obj is not None else None)


def _iter_jsonl(path: str, data: bytes, base: str):
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
            if _SURROGATE.search(text):
                yield loc, rid, None, _utf8_problem(raw, None)
            else:
                yield loc, rid, None, BadRecord(f"malformed JSON ({e.msg} at column {e.colno})")
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
            span = text[i:end]
            err = None
            if _SURROGATE.search(span):
                err = BadRecord("not valid UTF-8", _bad_utf8_field(obj))
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


def _iter_json(path: str, base: str):
    data = _read_bytes(path)
    head = data.lstrip(codecs.BOM_UTF8 + b" \t\r\n")[:1]
    if head == b"[":
        text = data.decode("utf-8", "surrogateescape")
        if text.startswith("\ufeff"):
            text = text[1:]
        yield from _iter_json_array(path, text, base)
    else:
        yield from _iter_jsonl(path, data, base)


def _iter_parquet(path: str, base: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        src = pa.BufferReader(_read_bytes(path)) if path.lower().endswith(".gz") else path
        rows = pq.read_table(src).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path}: cannot read parquet: {e}") from e
    for n, row in enumerate(rows, 1):
        yield f"row {n}", f"{base}:{n}", row, None


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
    """(path, locator, id, raw record or None, BadRecord or None) for each record of one file."""
    suffix = _data_suffix(path)
    if suffix in (".json", ".jsonl"):
        gen = _iter_json(path, base)
    elif suffix == ".parquet":
        gen = _iter_parquet(path, base)
    elif suffix == ".csv":
        gen = _iter_csv(path, spec, base)
    else:
        gen = None
    if gen is not None:
        return ((path, *item) for item in gen)
    raise DataError(f"{path}: unsupported file type (expected one of {', '.join(DATA_SUFFIXES)}, optionally .gz)")


def _dir_files(path: str) -> list[str]:
    found = []
    for d in (path, os.path.join(path, "data")):
        if os.path.isdir(d):
            found += [os.path.join(d, f) for f in sorted(os.listdir(d))
                      if os.path.isfile(os.path.join(d, f)) and _data_suffix(f)]
    return found


def _split_files(files: list[str], split: str) -> list[str]:
    return [f for f in files if re.fullmatch(re.escape(split.lower()) + r"([-_.].*)?", _stem(f).lower())]


def _iter_hub(name: str, split: str, required: bool):
    """A hub dataset's split; ``name@data_dir`` reads one of its folders (``Anthropic/hh-rlhf@harmless-base``),
    as XRIGHT/OpenRLHF address them."""
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


def _looks_local(source: str) -> bool:
    return (source.startswith(("/", "./", "../", "~")) or _data_suffix(source) is not None
            or source.lower().endswith(".gz"))


def iter_raw(source: str, split: str, spec, required: bool = True, label: str | None = None):
    """(path, locator, id, raw record or None, BadRecord or None) for one split of one source.

    None when ``required`` is False and the split does not exist. ``label`` replaces the source's
    basename in ids (load_data passes the full source when two sources share a basename); a
    directory's files get ids ``<label>/<file name>:<line>``.
    """
    path = os.path.expanduser(source)
    label = label or os.path.basename(os.path.normpath(path))
    if os.path.isfile(path):
        if split != spec.train_split:
            if required:
                raise DataError(f"{source}: a single file has only the train split, not {split!r}")
            return None
        return _iter_file(path, spec, label)
    if os.path.isdir(path):
        files = _dir_files(path)
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
    if _looks_local(source):
        raise DataError(f"{source}: no such file or directory")
    return _iter_hub(source, split, required)


# ------------------------------------------------------------------------------ validation


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
    if not isinstance(value, str):
        raise BadRecord(f"must be a string, got {type(value).__name__} {_short(value)}", name)
    if not value.strip():
        raise BadRecord("is empty" if value == "" else "is whitespace-only", name)
    return value


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRecord(f"must be a number, got {type(value).__name__} {_short(value)}", name)
    if not math.isfinite(value):
        raise BadRecord(f"must be finite, got {value}", name)
    return float(value)


def _short(value) -> str:
    r = repr(value)
    return r if len(r) <= 40 else r[:37] + "..."


def split_hh(chosen: str, rejected: str, field: str = "chosen") -> tuple[str, str, str, bool]:
    """HH-RLHF pair -> (prompt, chosen response, rejected response, differ_early).

    The prompt is the longest common prefix of the two dialogues, cut just after the last
    ``"\\n\\nAssistant:"`` that lies wholly inside it. ``differ_early`` is True when that is not
    the last ``"\\n\\nAssistant:"`` of either dialogue (the texts diverge before the final turn, so
    each response carries more than one turn).
    """
    n = len(os.path.commonprefix([chosen, rejected]))
    cut = chosen.rfind(HH_MARK, 0, n)
    if cut < 0:
        raise BadRecord("HH-style pair (no prompt field): chosen and rejected share no prefix ending in "
                        f"{HH_MARK!r}", field)
    end = cut + len(HH_MARK)
    early = chosen.rfind(HH_MARK) != cut or rejected.rfind(HH_MARK) != cut
    return chosen[:end], chosen[end:], rejected[end:], early


class _Identical(Exception):
    pass


class _EmptyResponse(Exception):
    """An HH pair whose fields are fine but whose answer after the shared prompt is blank."""


def _pair(rec: dict, spec, allow_identical: bool = False) -> tuple:
    """(prompt, chosen, rejected, raw_prompt, differ_early) from a pairwise record; conversational records
    (see :func:`chat_answers`) give message lists."""
    chat = chat_answers(rec, spec, [(get_field(rec, spec.chosen_key), spec.chosen_key),
                                    (get_field(rec, spec.rejected_key), spec.rejected_key)])
    if chat is not None:
        prompt, (chosen, rejected) = chat
        if chosen == rejected and not allow_identical:
            raise _Identical()
        return prompt, chosen, rejected, False, False
    chosen = text_field(get_field(rec, spec.chosen_key), spec.chosen_key)
    rejected = text_field(get_field(rec, spec.rejected_key), spec.rejected_key)
    explicit = spec.prompt_key is not None and spec.prompt_key in rec
    prompt = text_field(rec[spec.prompt_key], spec.prompt_key) if explicit else None
    if chosen == rejected and not allow_identical:
        raise _Identical()
    if explicit:
        return prompt, chosen, rejected, is_hh(prompt), False
    prompt, c, r, early = split_hh(chosen, rejected, spec.chosen_key)
    if not c.strip() or not r.strip():
        # a quirk of real HH data (4 of 2312 test pairs), not a malformed record: dropped and counted
        raise _EmptyResponse()
    return prompt, c, r, True, early


def _message_list(value, key: str) -> list[dict]:
    """Validated ``{role, content}`` messages (only those two keys kept). Content is a string; an assistant
    message's content must not be blank (it is what a model is trained or scored on)."""
    if not isinstance(value, list) or not value:
        raise BadRecord(f"must be a non-empty list of {{role, content}} messages, got {_short(value)}", key)
    msgs = []
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise BadRecord(f"must be an object with role and content, got {_short(m)}", where)
        for k in ("role", "content"):
            if k not in m:
                raise BadRecord(f"missing; message has keys {list(m)}", f"{where}.{k}")
        role = text_field(m["role"], f"{where}.role")
        if role == "assistant":
            text_field(m["content"], f"{where}.content")
        elif not isinstance(m["content"], str):  # other turns may be empty strings, never non-strings
            text_field(m["content"], f"{where}.content")
        msgs.append({"role": role, "content": m["content"]})
    return msgs


def _ends_with_assistant(msgs: list[dict], key: str) -> list[dict]:
    if msgs[-1]["role"] != "assistant":
        raise BadRecord(f"the last message must have role 'assistant', got {msgs[-1]['role']!r}",
                        f"{key}[{len(msgs) - 1}].role")
    return msgs


def _messages(value, key: str) -> list[dict]:
    """A whole conversation: at least one message before the final assistant message."""
    msgs = _ends_with_assistant(_message_list(value, key), key)
    if len(msgs) < 2:
        raise BadRecord("needs at least one prompt message before the final assistant message", key)
    return msgs


def _chat_prompt(value, key: str) -> list[dict]:
    msgs = _message_list(value, key)
    if msgs[-1]["role"] == "assistant":
        raise BadRecord("the prompt's last message is the assistant's; the answer follows the prompt",
                        f"{key}[{len(msgs) - 1}].role")
    return msgs


def chat_answers(rec: dict, spec, answers: list[tuple[object, str]]) -> tuple[list[dict], list[list[dict]]] | None:
    """(prompt messages, [K answer messages]) when a record is conversational, else None (plain text).

    ``answers`` = [(value, field name)]. Conversational when the prompt or an answer is a message list:
    - prompt messages (TRL): each answer is a string (one assistant message) or messages following the
      prompt (a copy of the prompt at their start is dropped), starting and ending with the assistant;
    - answers that are whole conversations (UltraFeedback; a string prompt is then ignored): the prompt is
      their common prefix of messages, which must end just before an assistant message in every answer;
    - a string prompt with assistant-only answers: the prompt becomes one user message.
    """
    key = spec.prompt_key
    p_raw = rec.get(key) if key is not None else None
    if not isinstance(p_raw, list) and not any(isinstance(v, list) for v, _ in answers):
        return None
    for v, name in answers:
        if v is None or not isinstance(v, (str, list)):
            text_field(v, name)  # the usual message for null / a non-string
    if isinstance(p_raw, list):
        prompt = _chat_prompt(p_raw, key)
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
        prompt = [{"role": "user", "content": _prompt(rec, spec, "conversational")}]
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
            raise BadRecord(f"the conversations have different prompts: their common prefix of {n} messages "
                            f"must end just before an assistant message, but here {what} (compared with {others})",
                            name)
    return convs[0][:n], [c[n:] for c in convs]


def _prompt(rec: dict, spec, kind: str) -> str:
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
            return _chat_prompt(value, spec.input_key), False
        text = text_field(value, spec.input_key)
        return text, is_hh(text)
    if spec.messages_key in rec:
        msgs = _message_list(rec[spec.messages_key], spec.messages_key)
        while msgs and msgs[-1]["role"] == "assistant":
            msgs = msgs[:-1]
        if not msgs:
            raise BadRecord("holds no prompt: every message is the assistant's", spec.messages_key)
        return msgs, False
    prompt, _, _, raw, _ = _pair(rec, spec, allow_identical=True)
    return prompt, raw


def canonicalize(kind: str, rec, rid: str, spec) -> tuple[list[dict], bool]:
    """Validated canonical records from one raw record, and whether it is an HH pair that differs early.

    Raises BadRecord for an unusable record and _Identical for a pair with chosen == rejected.
    """
    if not isinstance(rec, dict):
        raise BadRecord(f"record is not an object (got {type(rec).__name__} {_short(rec)})")
    has_pair = spec.chosen_key in rec or spec.rejected_key in rec
    if kind == "sft":
        if spec.sft_from_chosen:
            # chosen == rejected does not matter when only chosen is trained on
            prompt, chosen, _, raw, early = _pair(rec, spec, allow_identical=True)
            return [{"id": rid, "prompt": prompt, "response": chosen, "raw_prompt": raw}], early
        if spec.messages_key in rec and spec.input_key not in rec:
            msgs = _messages(rec[spec.messages_key], spec.messages_key)
            # the answer: the last assistant message, or (multiturn) everything from the first assistant turn
            cut = next(i for i, m in enumerate(msgs) if m["role"] == "assistant") if spec.multiturn else -1
            if cut == 0:
                raise BadRecord("the first message is the assistant's: the conversation has no prompt",
                                f"{spec.messages_key}[0].role")
            return [{"id": rid, "prompt": msgs[:cut], "response": msgs[cut:], "raw_prompt": False}], False
        if isinstance(rec.get(spec.input_key), list):  # prompt messages + the answer as text
            return [{"id": rid, "prompt": _chat_prompt(rec[spec.input_key], spec.input_key),
                     "response": text_field(get_field(rec, spec.output_key), spec.output_key),
                     "raw_prompt": False}], False
        prompt = text_field(get_field(rec, spec.input_key), spec.input_key)
        if spec.pretrain_mode and spec.output_key not in rec:
            response = ""
        else:
            response = get_field(rec, spec.output_key)
            response = text_field(response, spec.output_key) if not spec.pretrain_mode or response != "" else ""
        return [{"id": rid, "prompt": prompt, "response": response, "raw_prompt": is_hh(prompt)}], False
    if kind == "pairwise":
        prompt, chosen, rejected, raw, early = _pair(rec, spec)
        out = {"id": rid, "prompt": prompt, "chosen": chosen, "rejected": rejected, "raw_prompt": raw}
        if spec.margin_key:
            out["margin"] = _number(get_field(rec, spec.margin_key), spec.margin_key)
        return [out], early
    if kind == "binary":
        if has_pair and spec.completion_key not in rec and spec.label_key not in rec:
            prompt, chosen, rejected, raw, early = _pair(rec, spec)
            return [{"id": f"{rid}#chosen", "prompt": prompt, "completion": chosen, "label": True, "raw_prompt": raw},
                    {"id": f"{rid}#rejected", "prompt": prompt, "completion": rejected, "label": False,
                     "raw_prompt": raw}], early
        completion = get_field(rec, spec.completion_key)
        chat = chat_answers(rec, spec, [(completion, spec.completion_key)])
        if chat is not None:
            prompt, (completion,) = chat
        else:
            prompt = _prompt(rec, spec, kind)
            completion = text_field(completion, spec.completion_key)
        label = get_field(rec, spec.label_key)
        if not isinstance(label, bool):
            raise BadRecord(f"must be a boolean (JSON true/false), got {type(label).__name__} {_short(label)}",
                            spec.label_key)
        return [{"id": rid, "prompt": prompt, "completion": completion, "label": label,
                 "raw_prompt": is_hh(prompt)}], False
    if kind == "scored":
        if has_pair and spec.completions_key not in rec:
            prompt, chosen, rejected, raw, early = _pair(rec, spec)
            return [{"id": rid, "prompt": prompt, "completions": [chosen, rejected], "raw_prompt": raw}], early
        comps = get_field(rec, spec.completions_key)
        if not isinstance(comps, list):
            raise BadRecord(f"must be a list of strings, got {type(comps).__name__} {_short(comps)}",
                            spec.completions_key)
        if len(comps) < 2:
            raise BadRecord(f"needs K >= 2 completions, got K={len(comps)}", spec.completions_key)
        chat = chat_answers(rec, spec, [(c, f"{spec.completions_key}[{i}]") for i, c in enumerate(comps)])
        if chat is not None:
            prompt, comps = chat
        else:
            prompt = _prompt(rec, spec, kind)
            comps = [text_field(c, f"{spec.completions_key}[{i}]") for i, c in enumerate(comps)]
        rewards = get_field(rec, spec.rewards_key)
        if not isinstance(rewards, list):
            raise BadRecord(f"must be a list of numbers, got {type(rewards).__name__} {_short(rewards)}",
                            spec.rewards_key)
        if len(rewards) != len(comps):
            raise BadRecord(f"has {len(rewards)} values but {spec.completions_key!r} has K={len(comps)}",
                            spec.rewards_key)
        rewards = [_number(r, f"{spec.rewards_key}[{i}]") for i, r in enumerate(rewards)]
        return [{"id": rid, "prompt": prompt, "completions": comps, "rewards": rewards,
                 "raw_prompt": is_hh(prompt)}], False
    raise ValueError(f"unknown data kind {kind!r}")


def read_source(source: str, split: str, spec, required: bool = True,
                label: str | None = None) -> tuple[list[dict], SourceStats] | None:
    """Canonical records of one split of one source, validated; None if an optional split is absent.

    A bad record raises DataError, unless ``spec.skip_bad_records`` (then it is counted in the stats
    with its reason). Pairs with chosen == rejected are dropped and counted.
    """
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
            if spec.kind == "scored":
                k = len(recs[0]["completions"])
                if stats.k is None:
                    stats.k, stats.k_where = k, f"{where} {loc}"
                elif k != stats.k:
                    raise BadRecord(k_mismatch(k, stats.k, stats.k_where), spec.completions_key)
        except _EmptyResponse:
            stats.empty_response += 1
            continue
        except _Identical:
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

