import gzip
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from xright.data import CyclingLoader, DataError, DataSpec, collate, load_data
from xright.data import synthetic
from xright.data.loading import read_source
from xright.data.records import split_hh
from xright.data.tokenise import tokenize
from xright.models import load_tokenizer

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HH_FILE = SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"
XRIGHT_FILE = SHARED / "xright" / "rm_hh_rlhf_test_subset_formatted.json"
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


class Log(list):
    def __call__(self, msg):
        self.append(str(msg))

    def text(self):
        return "\n".join(self)


def pairs(n, start=0):
    return [{"prompt": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(start, start + n)]


def write_jsonl(path, records):
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def write(path, records):
    """Write records in the format given by the file name."""
    path = str(path)
    name = path[:-3] if path.endswith(".gz") else path
    if name.endswith(".jsonl"):
        return write_jsonl(path, records)
    if name.endswith(".json"):
        text = json.dumps(records, indent=2)
        if path.endswith(".gz"):
            with gzip.open(path, "wt") as f:
                f.write(text)
        else:
            Path(path).write_text(text)
        return path
    if name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)
        return path
    if name.endswith(".csv"):
        import pandas as pd

        rows = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in records]
        pd.DataFrame(rows).to_csv(path, index=False)
        return path
    raise AssertionError(path)


def spec(kind="pairwise", **kw):
    kw.setdefault("eval_split", "")
    return DataSpec(kind=kind, **kw)


def strip_ids(records):
    return [{k: v for k, v in r.items() if k not in ("id", "source", "where")} for r in records]


def rid(e):
    """The readable part of an example id (file and line), without the source and token hashes."""
    return e["id"].split("@")[0]


def rids(examples):
    return [rid(e) for e in examples]


# ------------------------------------------------------------------------------ sources


FORMATS = ["a.json", "a.jsonl", "a.jsonl.gz", "a.json.gz", "a.parquet", "a.csv", "a.csv.gz"]


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_reads_back_the_same_pairwise_records(tmp_path, name):
    recs = pairs(5)
    recs[2]["margin"] = 0.5
    for r in recs:
        r.setdefault("margin", 1.5)
    if name.endswith(".csv.gz"):
        plain = write(tmp_path / "a.csv", recs)
        with open(plain, "rb") as f, gzip.open(tmp_path / name, "wb") as g:
            g.write(f.read())
        path = str(tmp_path / name)
    else:
        path = write(tmp_path / name, recs)
    got, stats = read_source(path, "train", spec(margin_key="margin"))
    assert strip_ids(got) == [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"],
                               "raw_prompt": False, "margin": r["margin"]} for r in recs]
    assert [g["id"] for g in got][0].startswith(os.path.basename(path) + ":")
    assert stats.read == 5 and stats.bad == 0


def test_ids_name_line_or_row(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(pairs(1)[0]) + "\n\n" + json.dumps(pairs(1, 1)[0]) + "\n")
    got, _ = read_source(str(path), "train", spec())
    assert [g["id"] for g in got] == ["d.jsonl:1", "d.jsonl:3"]  # blank line 2 counts
    got, _ = read_source(write(tmp_path / "d.json", pairs(3)), "train", spec())
    assert [g["id"] for g in got] == ["d.json:1", "d.json:2", "d.json:3"]
    got, _ = read_source(write(tmp_path / "d.parquet", pairs(2)), "train", spec())
    assert [g["id"] for g in got] == ["d.parquet:1", "d.parquet:2"]


@pytest.mark.parametrize("name", ["s.jsonl", "s.parquet", "s.csv"])
def test_scored_binary_and_sft_through_files(tmp_path, name):
    scored = [{"prompt": "q", "completions": ["a", "b", "c"], "rewards": [1, 0.5, -2]}]
    got, _ = read_source(write(tmp_path / name, scored), "train", spec("scored"))
    assert strip_ids(got) == [{"prompt": "q", "completions": ["a", "b", "c"], "rewards": [1.0, 0.5, -2.0],
                               "raw_prompt": False}]
    binary = [{"prompt": "q", "completion": "a", "label": True}, {"prompt": "r", "completion": "b", "label": False}]
    got, _ = read_source(write(tmp_path / ("b" + name), binary), "train", spec("binary"))
    assert [(g["completion"], g["label"]) for g in got] == [("a", True), ("b", False)]
    sft = [{"input": "q", "output": "42"}]  # "42" stays a string in csv
    got, _ = read_source(write(tmp_path / ("f" + name), sft), "train", spec("sft"))
    assert strip_ids(got) == [{"prompt": "q", "response": "42", "raw_prompt": False}]


def test_directory_with_split_files(tmp_path, tok):
    d = tmp_path / "ds"
    d.mkdir()
    write(d / "train.jsonl", pairs(6))
    write(d / "test.parquet", pairs(2, 100))
    log = Log()
    train, ev = load_data(spec(dataset=str(d), eval_split="test"), tok, log=log)
    assert rids(train) == [f"ds/train.jsonl:{i}" for i in range(1, 7)]
    assert rids(ev) == ["ds/test.parquet:1", "ds/test.parquet:2"]
    assert "data train: 6 examples" in log.text() and "data eval: 2 examples" in log.text()
    # a directory without split names: its files are the train split, there is no test split
    d2 = tmp_path / "plain"
    d2.mkdir()
    write(d2 / "part-a.jsonl", pairs(2))
    write(d2 / "part-b.jsonl", pairs(3, 10))
    log = Log()
    train, ev = load_data(spec(dataset=str(d2), eval_split="test"), tok, log=log)
    assert len(train) == 5 and ev is None
    assert "no 'test' split" in log.text()


def test_local_file_has_no_eval_split(tmp_path, tok):
    log = Log()
    train, ev = load_data(spec(dataset=write(tmp_path / "x.jsonl", pairs(4)), eval_split="test"), tok, log=log)
    assert len(train) == 4 and ev is None
    assert "no 'test' split" in log.text() and "no eval set" in log.text()


def test_missing_local_path(tmp_path, tok):
    with pytest.raises(DataError, match="no such file"):
        load_data(spec(dataset=str(tmp_path / "nope.jsonl")), tok)


def test_hub_source_through_datasets(monkeypatch, tok):
    import datasets

    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        if split != "train":
            raise ValueError(f'Unknown split "{split}". Should be one of [\'train\'].')
        return datasets.Dataset.from_list(pairs(3))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    log = Log()
    train, ev = load_data(spec(dataset="someone/prefs", eval_split="test"), tok, log=log)
    assert calls == [("someone/prefs", "train"), ("someone/prefs", "test")]
    assert rids(train) == ["someone/prefs:train:0", "someone/prefs:train:1", "someone/prefs:train:2"]
    assert ev is None


# ------------------------------------------------------------------------------ blending, caps, eval


def test_blending_follows_probs_and_is_deterministic(tmp_path, tok):
    a = write(tmp_path / "a.jsonl", pairs(100))
    b = write(tmp_path / "b.jsonl", pairs(300, 1000))
    s = spec(dataset=f"{a},{b}", dataset_probs="0.5,0.5")
    train, _ = load_data(s, tok, log=Log())
    src = Counter(e["id"].split(":")[0] for e in train)
    assert src == {"a.jsonl": 200, "b.jsonl": 200}  # T = 400 = total records, split by probs
    ids_a = Counter(base_id(e) for e in train if e["id"].startswith("a.jsonl"))
    assert set(ids_a.values()) == {2}  # source a oversampled: two whole passes
    assert len({e["id"] for e in train if e["id"].startswith("b.jsonl")}) == 200  # b: a subset, no repeats
    again, _ = load_data(s, tok, log=Log())
    assert [e["id"] for e in again] == [e["id"] for e in train]
    other, _ = load_data(spec(dataset=f"{a},{b}", dataset_probs="0.5,0.5", seed=7), tok, log=Log())
    assert [e["id"] for e in other] != [e["id"] for e in train]
    capped, _ = load_data(spec(dataset=f"{a},{b}", dataset_probs="1,3", max_samples=40), tok, log=Log())
    assert Counter(e["id"].split(":")[0] for e in capped) == {"a.jsonl": 10, "b.jsonl": 30}
    with pytest.raises(DataError, match="2 sources .* 3 dataset_probs"):
        load_data(spec(dataset=f"{a},{b}", dataset_probs="0.2,0.3,0.5"), tok)


def test_max_samples_single_source_keeps_file_order(tmp_path, tok):
    train, _ = load_data(spec(dataset=write(tmp_path / "m.jsonl", pairs(50)), max_samples=7), tok, log=Log())
    assert rids(train) == [f"m.jsonl:{i}" for i in range(1, 8)]


def test_eval_split_dummy_warns_and_overlaps(tmp_path, tok):
    log = Log()
    train, ev = load_data(spec(dataset=write(tmp_path / "d.jsonl", pairs(200)), eval_split="dummy"), tok, log=log)
    assert len(train) == 200 and len(ev) == 6  # 3 %
    assert [e["id"] for e in ev] == [e["id"] for e in train[:6]]
    assert "warning" in log.text() and "also trained on" in log.text()


def test_eval_fraction_is_disjoint_and_seeded(tmp_path, tok):
    path = write(tmp_path / "f.jsonl", pairs(100))
    s = spec(dataset=path, eval_fraction=0.1, eval_split="dummy")  # eval_fraction wins over eval_split
    train, ev = load_data(s, tok, log=Log())
    tids, eids = {e["id"] for e in train}, {e["id"] for e in ev}
    assert len(ev) == 10 and len(train) == 90 and not tids & eids and len(tids | eids) == 100
    assert {rid(e) for e in ev} != set(f"f.jsonl:{i}" for i in range(1, 11))  # random, not a prefix
    train2, ev2 = load_data(s, tok, log=Log())
    assert [e["id"] for e in ev2] == [e["id"] for e in ev]


# ------------------------------------------------------------------------------ HH style


def test_hh_shared_prefix_split():
    c = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant: Why did the chicken"
    r = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant: Why not go away"
    prompt, cr, rr, early = split_hh(c, r)
    assert prompt == "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: tell me a joke\n\nAssistant:"
    assert (cr, rr, early) == (" Why did the chicken", " Why not go away", False)


def test_hh_early_divergence_and_bad_pairs(tmp_path, tok):
    early_c = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more\n\nAssistant: sure"
    early_r = "\n\nHuman: hi\n\nAssistant: go away\n\nHuman: more\n\nAssistant: no"
    prompt, cr, rr, early = split_hh(early_c, early_r)
    assert prompt == "\n\nHuman: hi\n\nAssistant:" and early
    assert cr == " hello\n\nHuman: more\n\nAssistant: sure"
    recs = [
        {"chosen": "\n\nHuman: a\n\nAssistant: yes", "rejected": "\n\nHuman: a\n\nAssistant: no"},
        {"chosen": early_c, "rejected": early_r},
        {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: z\n\nAssistant: y"},  # no shared turn
        {"chosen": "\n\nHuman: a\n\nAssistant: same", "rejected": "\n\nHuman: a\n\nAssistant: same"},
    ]
    path = write(tmp_path / "hh.jsonl", recs)
    with pytest.raises(DataError) as e:
        load_data(spec(dataset=path), tok)
    assert "hh.jsonl line 3" in str(e.value) and "'chosen'" in str(e.value) and "Assistant:" in str(e.value)
    log = Log()
    train, _ = load_data(spec(dataset=path, skip_bad_records=True), tok, log=log)
    assert rids(train) == ["hh.jsonl:1", "hh.jsonl:2"]
    text = log.text()
    assert "1 skipped: bad records" in text and "1 HH pairs differ early" in text
    assert "1 dropped: chosen == rejected" in text and "hh.jsonl:4" in text
    # no template on dialogue prefixes, even with the default input_template
    assert tok.decode(train[0]["prompt_ids"]) == "\n\nHuman: a\n\nAssistant:"
    assert tok.decode(train[0]["responses"][0]) == " yes" + EOS
    # the same pairs as binary (unpaired) and scored (K=2, chosen first)
    binary, _ = load_data(spec("binary", dataset=path, skip_bad_records=True), tok, log=Log())
    assert sorted((rid(b), b["label"]) for b in binary) == [
        ("hh.jsonl:1#chosen", True), ("hh.jsonl:1#rejected", False),
        ("hh.jsonl:2#chosen", True), ("hh.jsonl:2#rejected", False)]
    scored, _ = load_data(spec("scored", dataset=path, skip_bad_records=True), tok, log=Log())
    assert tok.decode(scored[0]["responses"][0]) == " yes" + EOS and "rewards" not in scored[0]


@pytest.mark.skipif(not HH_FILE.exists(), reason="shared HH data absent")
def test_real_hh_harmless_file(tok):
    # no skip_bad_records: the real file must load as is (its 4 blank-answer pairs are dropped, counted)
    s = spec(dataset=str(HH_FILE), prompt_key=None)
    recs, stats = read_source(str(HH_FILE), "train", s)
    assert recs and all(r["prompt"].endswith("\n\nAssistant:") and r["raw_prompt"] for r in recs)
    assert stats.read == 2312 and stats.bad == 0 and stats.empty_response == 4
    assert len(recs) + stats.empty_response + stats.identical == 2312
    print(f"\nHH harmless-base test: {stats.read} pairs read, {len(recs)} loaded, {stats.differ_early} differ early, "
          f"{stats.empty_response} blank answers, {stats.identical} identical")
    train, _ = load_data(DataSpec(kind="pairwise", dataset=str(HH_FILE), max_len=4096,
                                  eval_split=""), tok, log=Log())
    assert all(tok.decode(e["prompt_ids"]).endswith("\n\nAssistant:") for e in train[:50])


@pytest.mark.skipif(not XRIGHT_FILE.exists(), reason="shared XRIGHT data absent")
def test_real_xright_formatted_sft(tok):
    raw = json.loads(XRIGHT_FILE.read_text())
    log = Log()
    train, ev = load_data(DataSpec(kind="sft", dataset=str(XRIGHT_FILE), input_key="instruction", max_len=100_000,
                                   input_template=None, eval_split="dummy"), tok, log=log)
    assert len(train) == len(raw) == 640 and len(ev) == 19
    assert rid(train[3]) == f"{XRIGHT_FILE.name}:4"
    assert tok.decode(train[3]["prompt_ids"]) == raw[3]["instruction"]
    assert tok.decode(train[3]["response_ids"]) == raw[3]["output"] + EOS


# ------------------------------------------------------------------------------ tokenisation, masks, collation


def decode_masked(tok, ids, mask):
    return tok.decode(ids[mask].tolist())


def test_sft_masks_decode_to_prompt_and_response(tmp_path, tok):
    recs = [{"input": "reverse 'abc'", "output": "cba"}, {"input": "what is 2+2?", "output": "the answer is 4"}]
    train, _ = load_data(spec("sft", dataset=write(tmp_path / "s.jsonl", recs)), tok, log=Log())
    batch = collate("sft", train, tok.pad_token_id)
    assert batch["ids"] == [e["id"] for e in train] and rids(train) == ["s.jsonl:1", "s.jsonl:2"]
    assert batch["input_ids"].dtype == torch.long and batch["loss_mask"].dtype == torch.bool
    for b, r in enumerate(recs):
        ids, lm, am = batch["input_ids"][b], batch["loss_mask"][b], batch["attention_mask"][b].bool()
        assert decode_masked(tok, ids, lm) == r["output"] + EOS  # response + eos trained
        assert decode_masked(tok, ids, am & ~lm) == f"User: {r['input']}\nAssistant: "  # prompt masked
        assert (ids[~am] == tok.pad_token_id).all() and not lm[~am].any()  # padding masked
    assert not batch["attention_mask"][0, -1]  # the shorter row is right-padded


def test_chat_messages_and_chat_template(tmp_path, tok):
    recs = [{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]}]
    train, _ = load_data(spec("sft", dataset=write(tmp_path / "c.jsonl", recs)), tok, log=Log())
    assert tok.decode(train[0]["prompt_ids"]) == "System: be brief\nUser: hi\nAssistant: "
    assert tok.decode(train[0]["response_ids"]) == "hello\n" + EOS  # the rest of the rendered conversation
    train, _ = load_data(spec(dataset=write(tmp_path / "p.jsonl", pairs(1)), apply_chat_template=True), tok, log=Log())
    assert tok.decode(train[0]["prompt_ids"]) == "User: p0\nAssistant: "
    assert [tok.decode(r) for r in train[0]["responses"]] == ["good 0\n" + EOS, "bad 0\n" + EOS]
    train, _ = load_data(spec(dataset=write(tmp_path / "q.jsonl", pairs(1)), input_template=None), tok, log=Log())
    assert tok.decode(train[0]["prompt_ids"]) == "p0"


def test_pretrain_mode_trains_everything(tmp_path, tok):
    train, _ = load_data(spec("sft", dataset=write(tmp_path / "t.jsonl", [{"input": "some text"}]),
                              pretrain_mode=True, input_template=None), tok, log=Log())
    assert train[0]["prompt_ids"] == [] and tok.decode(train[0]["response_ids"]) == "some text" + EOS
    batch = collate("sft", train, tok.pad_token_id)
    assert batch["loss_mask"].all()


def test_pairwise_and_scored_k_major_layout(tmp_path, tok):
    train, _ = load_data(spec(dataset=write(tmp_path / "p.jsonl", pairs(3)), input_template=None), tok, log=Log())
    batch = collate("pairwise", train, tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 6 and batch["num_choices"] == 2
    rows = [decode_masked(tok, batch["input_ids"][i], batch["loss_mask"][i]) for i in range(6)]
    assert rows == [f"good {b}{EOS}" for b in range(3)] + [f"bad {b}{EOS}" for b in range(3)]
    assert "rewards" not in batch and "margin" not in batch
    scored = [{"prompt": f"q{b}", "completions": [f"c{b}{k}" for k in range(3)], "rewards": [b, b + 0.5, -1.0]}
              for b in range(2)]
    train, _ = load_data(spec("scored", dataset=write(tmp_path / "s.jsonl", scored), input_template=None), tok,
                         log=Log())
    batch = collate("scored", train, tok.pad_token_id)
    assert batch["num_choices"] == 3 and batch["input_ids"].shape[0] == 6
    for k in range(3):
        for b in range(2):
            row = k * 2 + b
            assert decode_masked(tok, batch["input_ids"][row], batch["loss_mask"][row]) == f"c{b}{k}{EOS}"
            assert tok.decode(batch["input_ids"][row][batch["attention_mask"][row].bool() & ~batch["loss_mask"][row]]
                              .tolist()) == f"q{b}"
    assert batch["rewards"].dtype == torch.float32
    assert batch["rewards"].tolist() == [[0.0, 0.5, -1.0], [1.0, 1.5, -1.0]]
    margins = [dict(p, m=0.25 * i) for i, p in enumerate(pairs(2))]
    train, _ = load_data(spec(dataset=write(tmp_path / "m.jsonl", margins), margin_key="m"), tok, log=Log())
    assert collate("pairwise", train, 0)["margin"].tolist() == [0.0, 0.25]
    mixed = [{"id": "a", "prompt_ids": [1], "responses": [[2], [3]]},
             {"id": "b", "prompt_ids": [1], "responses": [[2], [3], [4]]}]
    with pytest.raises(ValueError, match="same number of completions"):
        collate("scored", mixed, 0)


def test_binary_kl_mismatched_rows(tok):
    ex = [{"id": str(i), "prompt_ids": list(tok(f"P{i}:").input_ids),
           "response_ids": list(tok(f"R{i}" * (i + 1)).input_ids) + [tok.eos_token_id], "label": i % 2 == 0}
          for i in range(3)]
    batch = collate("binary", ex, tok.pad_token_id)
    assert batch["label"].tolist() == [True, False, True] and batch["label"].dtype == torch.bool
    for i in range(3):
        j = (i + 1) % 3
        ids, lm = batch["kl_input_ids"][i], batch["kl_loss_mask"][i]
        assert tok.decode(ids[batch["kl_attention_mask"][i].bool()].tolist()) == f"P{i}:" + f"R{j}" * (j + 1) + EOS
        assert decode_masked(tok, ids, lm) == f"R{j}" * (j + 1) + EOS
    with pytest.raises(ValueError, match="micro batch size >= 2"):
        collate("binary", ex[:1], tok.pad_token_id)


def test_label_from_binary_records(tmp_path, tok):
    recs = [{"prompt": "q", "completion": "yes", "label": True}, {"prompt": "q", "completion": "no", "label": False}]
    train, _ = load_data(spec("binary", dataset=write(tmp_path / "b.jsonl", recs)), tok, log=Log())
    assert [(rid(e), e["label"]) for e in train] == [("b.jsonl:1", True), ("b.jsonl:2", False)]


def test_truncation_policies_and_counts(tmp_path, tok):
    recs = [{"input": "ab", "output": "cd"},          # 2 + 3 = 5 tokens: fits
            {"input": "ab", "output": "cdefghij"},    # 2 + 9: truncated to 8 / dropped
            {"input": "abcdefghij", "output": "x"}]   # prompt 10 > 8: dropped
    path = write(tmp_path / "t.jsonl", recs)
    log = Log()
    train, _ = load_data(spec("sft", dataset=path, max_len=8, input_template=None), tok, log=log)
    assert rids(train) == ["t.jsonl:1", "t.jsonl:2"]
    assert tok.decode(train[1]["response_ids"]) == "cdefgh"  # cut on the right, eos lost
    assert all(len(e["prompt_ids"]) + len(e["response_ids"]) <= 8 for e in train)
    assert "data train: 2 examples (1 truncated, 1 dropped: prompt too long, 0 skipped: bad records)" in log
    log = Log()
    train, _ = load_data(spec("sft", dataset=path, max_len=8, input_template=None, truncation="drop",
                              name="sft"), tok, log=log)
    assert rids(train) == ["t.jsonl:1"]
    assert "sft train: 1 examples (2 dropped: too long, 0 skipped: bad records)" in log
    # pairwise: every response fits with the prompt
    long_pairs = [{"prompt": "pp", "chosen": "c" * 20, "rejected": "r"}]
    train, _ = load_data(spec(dataset=write(tmp_path / "lp.jsonl", long_pairs), max_len=10, input_template=None),
                         tok, log=Log())
    assert [len(r) for r in train[0]["responses"]] == [8, 2]
    with pytest.raises(DataError, match="no usable"):
        load_data(spec("sft", dataset=path, max_len=3, input_template=None, truncation="drop"), tok, log=Log())


# ------------------------------------------------------------------------------ CyclingLoader


def fake_examples(n):
    return [{"id": f"e{i}", "prompt_ids": [1, 2], "response_ids": [3, 4 + i % 5]} for i in range(n)]


def test_loader_ranks_partition_each_epoch():
    ex = fake_examples(23)
    W, mb = 3, 2
    loaders = [CyclingLoader(ex, "sft", mb, 0, rank=r, world_size=W, seed=5) for r in range(W)]
    assert all(len(ld) == 3 for ld in loaders)  # 23 -> 18 usable -> 3 micro-batches per rank
    epochs = []
    for e in range(3):
        per_rank = [[i for _ in range(3) for i in next(ld)["ids"]] for ld in loaders]
        flat = [i for r in per_rank for i in r]
        assert len(flat) == len(set(flat)) == 18  # disjoint across ranks, nothing repeated
        perm = torch.randperm(23, generator=torch.Generator().manual_seed(5 + e)).tolist()[:18]
        assert per_rank[1] == [f"e{i}" for i in perm[1::3]]
        epochs.append(flat)
        assert all(ld.epoch == e and ld.state_dict()["examples"] == 18 for ld in loaders)
    assert epochs[0] != epochs[1]  # a new order every epoch


def test_loader_state_dict_roundtrip():
    ex = fake_examples(10)
    a = CyclingLoader(ex, "sft", 3, 0, seed=1)
    for _ in range(5):  # crosses an epoch boundary (3 batches per epoch)
        next(a)
    state = json.loads(json.dumps(a.state_dict()))
    assert state == {"epoch": 1, "examples": 6, "seed": 1}  # global counts: 2 micro-batches of 3 examples
    b = CyclingLoader(ex, "sft", 3, 0, seed=1)
    b.load_state_dict(state)
    for _ in range(7):
        x, y = a.next(), next(b)
        assert x["ids"] == y["ids"] and torch.equal(x["input_ids"], y["input_ids"])


def test_loaders_of_different_lengths_never_stop():
    short = CyclingLoader(fake_examples(4), "sft", 2, 0)
    long = CyclingLoader(fake_examples(900), "sft", 2, 0)
    for _ in range(1000):
        assert len(next(short)["ids"]) == 2 and len(next(long)["ids"]) == 2
    assert short.epoch == 499 and long.epoch == 2


def test_loader_too_small():
    with pytest.raises(ValueError, match="fewer than one optimizer step's world_size"):
        CyclingLoader(fake_examples(3), "sft", 2, 0, world_size=2)


# ------------------------------------------------------------------------------ bad input


BAD = [
    # (case, kind, lines or bytes, spec overrides, expected line, expected field or message fragment)
    ("malformed json", "pairwise", [pairs(1)[0], b'{"prompt": "a", "chosen": "b",'], {}, 2, "malformed JSON"),
    ("non-utf8", "pairwise", [pairs(1)[0], pairs(1)[0], b'{"prompt": "a", "chosen": "b\xff\xfe", "rejected": "c"}'],
     {}, 3, "'chosen'"),
    ("missing key", "pairwise", [{"prompt": "a", "chosen_text": "b", "rejected": "c"}], {}, 1,
     "did you mean 'chosen_text'"),
    ("none", "pairwise", [pairs(1)[0], {"prompt": "a", "chosen": None, "rejected": "c"}], {}, 2, "'chosen'"),
    ("non-string", "pairwise", [{"prompt": "a", "chosen": "b", "rejected": 5}], {}, 1, "'rejected'"),
    ("empty", "pairwise", [{"prompt": "", "chosen": "b", "rejected": "c"}], {}, 1, "'prompt'"),
    ("whitespace", "sft", [{"input": "a", "output": "  \n"}], {}, 1, "'output'"),
    ("not an object", "pairwise", [pairs(1)[0], ["a", "b"]], {}, 2, "not an object"),
    ("label string", "binary", [{"prompt": "a", "completion": "b", "label": "true"}], {}, 1, "'label'"),
    ("label int", "binary", [{"prompt": "a", "completion": "b", "label": 1}], {}, 1, "'label'"),
    ("K mismatch", "scored", [{"prompt": "a", "completions": ["x", "y", "z"], "rewards": [1, 2]}], {}, 1,
     "'rewards'"),
    ("K < 2", "scored", [{"prompt": "a", "completions": ["x"], "rewards": [1]}], {}, 1, "'completions'"),
    ("reward not finite", "scored", [b'{"prompt": "a", "completions": ["x", "y"], "rewards": [1, NaN]}'], {}, 1,
     "'rewards[1]'"),
    ("bad message", "sft", [{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}], {},
     1, "'messages[1].role'"),
    ("margin", "pairwise", [{"prompt": "a", "chosen": "b", "rejected": "c", "m": "big"}], {"margin_key": "m"}, 1,
     "'m'"),
]


def write_lines(path, lines):
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else json.dumps(line).encode())
            f.write(b"\n")
    return str(path)


@pytest.mark.parametrize("case,kind,lines,over,line,fragment", BAD, ids=[b[0] for b in BAD])
def test_bad_records_name_file_line_and_field(tmp_path, tok, case, kind, lines, over, line, fragment):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as e:
        load_data(spec(kind, dataset=path, **over), tok, log=Log())
    msg = str(e.value)
    assert path in msg and f"line {line}:" in msg and fragment in msg, msg
    if case == "missing key":
        assert "record has keys ['prompt', 'chosen_text', 'rejected']" in msg
    if case in ("none", "non-string", "empty", "whitespace", "label string", "K mismatch", "K < 2"):
        assert "field '" in msg


def test_bad_records_in_json_array_and_csv(tmp_path, tok):
    recs = pairs(3)
    recs[1]["chosen"] = ""
    with pytest.raises(DataError) as e:
        load_data(spec(dataset=write(tmp_path / "arr.json", recs)), tok)
    assert "arr.json record 2 (line 7): field 'chosen': is empty" in str(e.value)
    with pytest.raises(DataError) as e:
        load_data(spec(dataset=write(tmp_path / "c.csv", recs)), tok)
    assert "c.csv row 2: field 'chosen': is empty" in str(e.value)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"prompt": "a", "chosen": "b", "rejected": "c"},\n{"prompt": "a" "chosen": 1}\n]')
    with pytest.raises(DataError, match="broken.json line 3: malformed JSON"):
        load_data(spec(dataset=str(broken)), tok)


def test_skip_bad_records_counts_and_reports(tmp_path, tok):
    lines = pairs(10) + [b"{oops", {"prompt": "a", "chosen": None, "rejected": "c"}, {"prompt": "a"}]
    lines += [{"prompt": "s", "chosen": "same", "rejected": "same"}] * 2
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    log = Log()
    train, _ = load_data(spec(dataset=path, skip_bad_records=True), tok, log=log)
    assert len(train) == 10
    text = log.text()
    assert "data train: 10 examples (0 truncated, 0 dropped: prompt too long, 3 skipped: bad records" in text
    assert "mixed.jsonl line 11: malformed JSON" in text and "mixed.jsonl line 12: field 'chosen'" in text
    assert "2 pairs with chosen identical to rejected dropped" in text and "mixed.jsonl:14" in text


def test_empty_after_filtering(tmp_path, tok):
    path = write_lines(tmp_path / "same.jsonl", [{"prompt": "s", "chosen": "x", "rejected": "x"}] * 3)
    with pytest.raises(DataError) as e:
        load_data(spec(dataset=path), tok, log=Log())
    assert path in str(e.value) and "no usable pairwise records" in str(e.value)
    path = write_lines(tmp_path / "allbad.jsonl", [{"prompt": "s"}] * 2)
    with pytest.raises(DataError, match="allbad.jsonl.*2 skipped: bad records"):
        load_data(spec(dataset=path, skip_bad_records=True), tok, log=Log())


# ------------------------------------------------------------------------------ built-in synthetic data


def test_synthetic_data_is_deterministic_disjoint_and_short():
    sft = synthetic.sft_records(300, seed=1)
    assert sft == synthetic.sft_records(300, seed=1) and sft[:50] == synthetic.sft_records(50, seed=1)
    pref = synthetic.preference_records(300, seed=1)
    sft_eval, pref_eval = synthetic.sft_records(100, 1, "eval"), synthetic.preference_records(100, 1, "eval")
    prompt_sets = [{r["prompt"] for r in x} for x in (sft, pref, sft_eval, pref_eval)]
    assert [len(s) for s in prompt_sets] == [300, 300, 100, 100]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not prompt_sets[i] & prompt_sets[j]
    assert {r["prompt"] for r in synthetic.sft_records(300, seed=2)} != prompt_sets[0]
    for r in pref:
        assert len((r["prompt"] + r["chosen"]).encode()) < 100
        assert r["rejected"] in r["chosen"] and len(r["chosen"]) > len(r["rejected"]) + 20
    assert all(len((r["prompt"] + r["response"]).encode()) < 100 for r in sft)
    kinds = Counter(r["prompt"].split()[0] for r in sft)
    assert {"what", "reverse", "sort", "upper-case", "count"} <= set(kinds)
    for r in sft:  # terse and exact
        p = r["prompt"]
        if p.startswith("reverse"):
            assert r["response"] == p.split("'")[1][::-1]
        if p.startswith("what is"):
            assert int(r["response"]) == eval(p[len("what is "):-1])


@pytest.mark.parametrize("kind", ["sft", "pairwise", "binary", "scored"])
def test_builtin_data_for_every_kind(tok, kind):
    log = Log()
    train, ev = load_data(DataSpec(kind=kind, max_samples=100), tok, log=log)
    assert len(train) == len(ev) == 100  # max_samples caps examples (binary: unpaired halves of pairs)
    assert not {e["id"] for e in train} & {e["id"] for e in ev}
    assert train[0]["id"].startswith("builtin:")
    if kind == "scored":
        assert train[0]["rewards"] == [1.0, 0.0]
    if kind == "binary":
        assert set(Counter(e["label"] for e in train)) == {True, False}
    assert "data train: 100 examples" in log.text()
    loader = CyclingLoader(train, kind, 4, tok.pad_token_id)
    batch = next(loader)
    assert batch["input_ids"].shape[0] == (8 if kind in ("pairwise", "scored") else 4)


def test_tokenize_prompt_special_tokens_not_doubled(tok):
    class BosTok:
        """Wraps the tiny tokenizer, adding a BOS on add_special_tokens=True like Llama's."""

        bos_token, eos_token_id, chat_template = "<s>", tok.eos_token_id, None

        def __call__(self, texts, add_special_tokens=True, verbose=True):
            ids = [([999] if add_special_tokens else []) + [1000] * (3 if t.startswith("<s>") else 0)
                   + tok(t.removeprefix("<s>"), add_special_tokens=False).input_ids for t in texts]
            return {"input_ids": ids}

    recs = [{"id": "a", "prompt": "<s>hi", "response": "x", "raw_prompt": True},
            {"id": "b", "prompt": "hi", "response": "x", "raw_prompt": True}]
    out, _ = tokenize(recs, BosTok(), spec("sft"))
    assert out[0]["prompt_ids"][0] == 1000 and out[1]["prompt_ids"][0] == 999


def test_sft_from_chosen_pairs(tmp_path, tok):
    recs = pairs(2) + [{"chosen": "\n\nHuman: a\n\nAssistant: same", "rejected": "\n\nHuman: a\n\nAssistant: same"}]
    train, _ = load_data(spec("sft", dataset=write(tmp_path / "p.jsonl", recs), sft_from_chosen=True), tok, log=Log())
    assert [tok.decode(e["prompt_ids"]) for e in train] == ["User: p0\nAssistant: ", "User: p1\nAssistant: ",
                                                             "\n\nHuman: a\n\nAssistant:"]
    assert [tok.decode(e["response_ids"]) for e in train] == ["good 0" + EOS, "good 1" + EOS, " same" + EOS]


def test_eval_splits_of_several_sources_are_concatenated(tmp_path, tok):
    for name, n in (("a", 4), ("b", 6)):
        d = tmp_path / name
        d.mkdir()
        write(d / "train.jsonl", pairs(n))
        write(d / "test.jsonl", pairs(n // 2, 50))
    log = Log()
    train, ev = load_data(spec(dataset=f"{tmp_path / 'a'},{tmp_path / 'b'}", dataset_probs="0.5,0.5",
                               eval_split="test"), tok, log=log)
    assert len(train) == 10 and len(ev) == 5
    assert rids(ev) == ["a/test.jsonl:1", "a/test.jsonl:2", "b/test.jsonl:1", "b/test.jsonl:2", "b/test.jsonl:3"]
    # two different sources with one basename: ids use the whole source string, so they stay unique
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    xa, ya = write(tmp_path / "x" / "p.jsonl", pairs(3)), write(tmp_path / "y" / "p.jsonl", pairs(3, 9))
    train, _ = load_data(spec(dataset=f"{xa},{ya}", dataset_probs="1,1"), tok, log=Log())
    assert len({e["id"] for e in train}) == 6 and {rid(e).rsplit(":", 1)[0] for e in train} == {xa, ya}


# ------------------------------------------------------------------------------ issue 8: B4, B5, B7, B12, B14


def base_id(e):
    """The readable record part of an id without the copy suffix."""
    return rid(e).split("~")[0]


def test_eval_fraction_of_a_blend_holds_out_unique_records(tmp_path, tok):
    a = write(tmp_path / "a.jsonl", pairs(100))
    b = write(tmp_path / "b.jsonl", pairs(5, 1000))
    log = Log()
    s = spec(dataset=f"{a},{b}", dataset_probs="0.5,0.5", eval_fraction=0.1)
    train, ev = load_data(s, tok, log=log)
    # T = 105 draws: a 53, b 52; 58 distinct records used (53 of a, all 5 of b), 10 % of them held out
    # by record before blending: round(5.8) = 6, a 5 and b 1 (largest remainder)
    assert len(ev) == 6 and len(train) == 99
    assert not {base_id(e) for e in train} & {base_id(e) for e in ev}  # no copy of an eval record in train
    assert Counter(base_id(e).split(":")[0] for e in ev) == {"a.jsonl": 5, "b.jsonl": 1}
    assert Counter(base_id(e).split(":")[0] for e in train) == {"a.jsonl": 48, "b.jsonl": 51}
    text = log.text()
    assert f"{a} [train]: 100 records read, 100 valid" in text
    assert (f"data: {a} contributes 48 train examples: 48 distinct records of 100 valid, 47 unused, "
            "5 held out for eval") in text
    assert (f"data: {b} contributes 51 train examples: 4 distinct records of 5 valid, each used 12.8 times on "
            "average, 1 held out for eval") in text
    assert "eval = 6 records held out of train at random" in text and "disjoint from the 99 train" in text
    again = load_data(s, tok, log=Log())
    assert [e["id"] for e in again[1]] == [e["id"] for e in ev] and [e["id"] for e in again[0]] == [
        e["id"] for e in train]


def test_blend_log_names_unused_records_without_eval(tmp_path, tok):
    a = write(tmp_path / "a.jsonl", pairs(100))
    b = write(tmp_path / "b.jsonl", pairs(5, 1000))
    log = Log()
    load_data(spec(dataset=f"{a},{b}", dataset_probs="0.5,0.5"), tok, log=log)
    assert f"data: {a} contributes 53 train examples: 53 distinct records of 100 valid, 47 unused" in log.text()
    assert (f"data: {b} contributes 52 train examples: 5 distinct records of 5 valid, each used 10.4 times "
            "on average") in log.text()


def test_kto_kl_rows_respect_max_len(tmp_path, tok):
    recs = [{"prompt": "p" * 20, "completion": "c", "label": True},
            {"prompt": "q", "completion": "d" * 20, "label": False}]
    train, _ = load_data(spec("binary", dataset=write(tmp_path / "k.jsonl", recs), max_len=24, input_template=None),
                         tok, log=Log())
    assert [len(e["prompt_ids"]) + len(e["response_ids"]) for e in train] == [22, 22]
    batch = collate("binary", train, tok.pad_token_id)
    # KL row 0 = prompt 0 (20 tokens) + completion 1 (21 tokens) -> cut on the right to max_len, as tokenize cuts
    assert batch["kl_attention_mask"].sum(1).tolist() == [24, 3]
    assert decode_masked(tok, batch["kl_input_ids"][0], batch["kl_loss_mask"][0]) == "dddd"
    assert decode_masked(tok, batch["kl_input_ids"][1], batch["kl_loss_mask"][1]) == "c" + EOS
    assert batch["kl_input_ids"].shape[1] == 24


def test_scored_records_with_different_k_fail_at_load(tmp_path, tok):
    recs = [{"prompt": "a", "completions": ["x", "y"], "rewards": [1, 0]},
            {"prompt": "b", "completions": ["x", "y"], "rewards": [1, 0]},
            {"prompt": "c", "completions": ["x", "y", "z"], "rewards": [1, 0, 2]}]
    path = write(tmp_path / "k.jsonl", recs)
    with pytest.raises(DataError) as e:
        load_data(spec("scored", dataset=path), tok, log=Log())
    assert str(e.value).startswith(f"{path} line 3: field 'completions': has K=3 completions but the first "
                                   f"record ({path} line 1) has K=2")
    log = Log()
    train, _ = load_data(spec("scored", dataset=path, skip_bad_records=True), tok, log=log)
    assert len(train) == 2 and "1 skipped: bad records" in log.text()
    # across the sources of a blend
    other = write(tmp_path / "k3.jsonl", [recs[2], recs[2]])
    with pytest.raises(DataError) as e:
        load_data(spec("scored", dataset=f"{write(tmp_path / 'k2.jsonl', recs[:2])},{other}",
                       dataset_probs="1,1"), tok, log=Log())
    assert f"{other} line 1: field 'completions': has K=3 completions but" in str(e.value)
    assert "k2.jsonl line 1) has K=2" in str(e.value)
    # between the train and eval splits of a directory
    d = tmp_path / "ds"
    d.mkdir()
    write(d / "train.jsonl", recs[:2])
    write(d / "test.jsonl", recs[2:])
    with pytest.raises(DataError, match=r"test.jsonl line 1: field 'completions': has K=3"):
        load_data(spec("scored", dataset=str(d), eval_split="test"), tok, log=Log())


def sentencepiece_tokenizer():
    """A Llama-2-style tokenizer trained in memory: "▁" for spaces and a "▁" prepended to every text,
    a BOS added, BPE pieces that start at a "▁"."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["User: what is the capital of France?\nAssistant: The capital of France is Paris.",
              "\n\nHuman: tell me a joke\n\nAssistant: Sure, why did the chicken cross the road?",
              "Hello world, this is a small corpus for a tiny tokenizer.", "I am sorry, I cannot help with that.",
              "Assistant: Sure, here it is. Sure thing."]
    t = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    t.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    t.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="</s>")


def test_sentencepiece_prompt_and_response_tokenised_together(tmp_path):
    sp = sentencepiece_tokenizer()
    eos = sp.eos_token_id
    hh = [{"chosen": "\n\nHuman: tell me a joke\n\nAssistant: Sure, why not",
           "rejected": "\n\nHuman: tell me a joke\n\nAssistant: I cannot"}]
    train, _ = load_data(spec(dataset=write(tmp_path / "hh.jsonl", hh)), sp, log=Log())
    for k, text in enumerate((hh[0]["chosen"], hh[0]["rejected"])):
        ex = train[0]
        assert ex["prompt_ids"] + ex["responses"][k] == sp(text).input_ids + [eos]  # same ids as the whole text
        assert sp.convert_ids_to_tokens(ex["responses"][k][0]) != "▁"  # no lone "▁" opening the answer
    assert sp.convert_ids_to_tokens(train[0]["responses"][0][:2]) == ["▁Sure,", "▁why"]
    # a template ending in a space: the "▁" it ends with belongs to the answer's first piece
    sft = [{"input": "what is it?", "output": "Sure thing"}]
    train, _ = load_data(spec("sft", dataset=write(tmp_path / "s.jsonl", sft)), sp, log=Log())
    whole = "User: what is it?\nAssistant: Sure thing"
    assert train[0]["prompt_ids"] + train[0]["response_ids"] == sp(whole).input_ids + [eos]
    assert sp.convert_ids_to_tokens(train[0]["prompt_ids"])[-1] == "?\nAssistant:"
    assert sp.convert_ids_to_tokens(train[0]["response_ids"])[0] == "▁Sure"
    assert train[0]["prompt_ids"][0] == sp.bos_token_id and sp.bos_token_id not in train[0]["response_ids"]


def test_boundary_by_offsets_and_by_prompt_alone_agree():
    """A fast tokenizer places the boundary by character offsets, a slow one (no offsets) by agreement
    with the prompt tokenised alone: the same examples, the straddling token in the response."""
    sp = sentencepiece_tokenizer()

    class Slow:
        bos_token, eos_token_id, chat_template = sp.bos_token, sp.eos_token_id, None

        def __call__(self, texts, add_special_tokens=True, verbose=True):
            return {"input_ids": sp(texts, add_special_tokens=add_special_tokens)["input_ids"]}

    recs = [{"id": "a", "prompt": "\n\nHuman: tell me a joke\n\nAssistant:", "chosen": " Sure, why not",
             "rejected": " I cannot", "raw_prompt": True},
            {"id": "b", "prompt": "what is it?", "chosen": "Sure thing", "rejected": "No", "raw_prompt": False},
            {"id": "c", "prompt": "User: what is it?\nAssistant: Su", "chosen": "re thing", "rejected": "re",
             "raw_prompt": True}]  # the boundary inside the word "Sure"
    fast, _ = tokenize(recs, sp, spec())
    slow, _ = tokenize(recs, Slow(), spec())
    assert fast == slow
    for rec, ex in zip(recs, fast):
        prompt = rec["prompt"] if rec["raw_prompt"] else f"User: {rec['prompt']}\nAssistant: "
        for k, key in enumerate(("chosen", "rejected")):
            assert ex["prompt_ids"] + ex["responses"][k] == sp(prompt + rec[key]).input_ids + [sp.eos_token_id]
    assert sp.convert_ids_to_tokens(fast[2]["responses"][0])[0] == "▁Sure"  # straddles: in the response
    assert sp.convert_ids_to_tokens(fast[2]["prompt_ids"])[-1] == "?\nAssistant:"


def test_byte_level_tokenisation_unchanged(tmp_path, tok):
    """The built-in tokenizer has no merges: tokenising together gives the ids of separate tokenisation."""
    hh = [{"chosen": "\n\nHuman: hi\n\nAssistant: yes sir", "rejected": "\n\nHuman: hi\n\nAssistant: no"}]
    train, _ = load_data(spec(dataset=write(tmp_path / "hh.jsonl", hh)), tok, log=Log())
    enc = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731
    assert train[0]["prompt_ids"] == enc("\n\nHuman: hi\n\nAssistant:")
    assert train[0]["responses"] == [enc(" yes sir") + [tok.eos_token_id], enc(" no") + [tok.eos_token_id]]
    assert train[0]["prompt_ids"][:3] == [198, 198, 39] and train[0]["responses"][0][:3] == [220, 88, 68]


ID = r"@[0-9a-f]{6}\.[0-9a-f]{8}$"


def test_ids_name_source_record_and_tokens(tmp_path, tok):
    import re

    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    one = write(tmp_path / "x" / "train.jsonl", pairs(3))
    two = write(tmp_path / "y" / "train.jsonl", pairs(3))  # same basename, same records
    ids_one = [e["id"] for e in load_data(spec(dataset=one), tok, log=Log())[0]]
    ids_two = [e["id"] for e in load_data(spec(dataset=two), tok, log=Log())[0]]
    assert all(re.fullmatch(r"train\.jsonl:\d" + ID, i) for i in ids_one + ids_two), ids_one + ids_two
    assert [i.split("@")[0] for i in ids_one] == ["train.jsonl:1", "train.jsonl:2", "train.jsonl:3"]
    assert not set(ids_one) & set(ids_two)  # another file: another source hash
    assert [i.rsplit(".", 1)[1] for i in ids_one] == [i.rsplit(".", 1)[1] for i in ids_two]  # same tokens
    assert [e["id"] for e in load_data(spec(dataset=one), tok, log=Log())[0]] == ids_one  # stable
    # other tokens (a template, max_len) -> another id; a record whose tokens did not change keeps its id
    templ = [e["id"] for e in load_data(spec(dataset=one, input_template="Q: {}\nA: "), tok, log=Log())[0]]
    assert not set(templ) & set(ids_one)
    longer = write(tmp_path / "l.jsonl", [{"prompt": "p", "chosen": "c" * 30, "rejected": "r"},
                                           {"prompt": "a", "chosen": "b", "rejected": "c"}])
    full = [e["id"] for e in load_data(spec(dataset=longer), tok, log=Log())[0]]
    cut = [e["id"] for e in load_data(spec(dataset=longer, max_len=24), tok, log=Log())[0]]
    assert full[0] != cut[0] and full[1] == cut[1]


def test_blended_copies_get_distinct_ids(tmp_path, tok):
    a = write(tmp_path / "a.jsonl", pairs(3))
    b = write(tmp_path / "b.jsonl", pairs(9, 100))
    for kind in ("pairwise", "binary", "sft", "scored"):
        train, _ = load_data(spec(kind, dataset=f"{a},{b}", dataset_probs="1,1", sft_from_chosen=kind == "sft"),
                             tok, log=Log())
        ids = [e["id"] for e in train]
        assert len(ids) == len(set(ids)), kind  # a cache keyed by id sees every example once
        copies = Counter(i.split("@")[0] for i in ids if i.startswith("a.jsonl"))
        assert len(copies) == (12 if kind == "binary" else 6) and set(copies.values()) == {1}  # 2 passes
        assert any("~2@" in i for i in ids) and not any("~1@" in i for i in ids)
        if kind == "binary":
            assert any(i.split("@")[0].endswith("#rejected~2") for i in ids)


# ------------------------------------------------------------------------------ tokenised data on disk (issue 10.5)


def cache_cases(tmp_path):
    a = write(tmp_path / "a.jsonl", [dict(p, m=-1.0) for p in pairs(30)])
    b = write(tmp_path / "b.jsonl", [dict(p, m=0.5 * i) for i, p in enumerate(pairs(7, 100))])
    scored = write(tmp_path / "s.jsonl", [{"prompt": f"q{i}", "completions": ["x" * (i + 1), "y", "z"],
                                           "rewards": [1.0, 0.5 * i, -1.0]} for i in range(12)])
    chat = write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": f"hi {i}"},
                                                      {"role": "assistant", "content": "hello " * i}]}
                                        for i in range(1, 9)])
    return [
        spec(dataset=f"{a},{b}", dataset_probs="1,1", margin_key="m", eval_fraction=0.2, max_len=24),
        spec("binary", dataset=f"{a},{b}", dataset_probs="2,1", max_len=24),
        spec("sft", dataset=a, sft_from_chosen=True, eval_split="dummy", truncation="drop", max_len=28),
        spec("scored", dataset=scored, max_len=22),
        spec("sft", dataset=chat),
        spec("sft"),  # built-in data with its eval split
    ]


def test_disk_cache_gives_the_in_memory_examples(tmp_path, tok, monkeypatch):
    from xright.data.store import ExampleTable

    pair_tables = []
    for i, s in enumerate(cache_cases(tmp_path)):
        mem_log, disk_log = Log(), Log()
        want = load_data(s, tok, log=mem_log)
        s.cache_dir = str(tmp_path / "cache")
        got = load_data(s, tok, log=disk_log)
        assert isinstance(got[0], ExampleTable) and type(got[0].ds.data).__name__ == "MemoryMappedTable"
        for w, g in zip(want, got):
            assert (w is None) == (g is None), i
            if w is not None:
                assert list(g) == w, i  # same dicts: ids, token ids, labels, rewards, margins, max_len
        assert disk_log[:-1] == mem_log, i  # the same log, then where the tables are
        assert "tokenised examples written to" in disk_log[-1]
        if s.kind == "scored":
            pair_tables = (want[0], got[0])
        # KTO's loader and collate read a table as they read a list
        if s.kind == "binary":
            a, b = (CyclingLoader(x, "binary", 4, tok.pad_token_id, seed=3) for x in (want[0], got[0]))
            for _ in range(len(a) + 2):
                x, y = next(a), next(b)
                assert x["ids"] == y["ids"] and all(torch.equal(x[k], y[k]) for k in x if k != "ids")
            assert a.state_dict() == b.state_dict()
    view = got[0][2:9][::3]  # slices are views
    assert isinstance(view, ExampleTable) and list(view) == want[0][2:9][::3]
    assert [view[i] for i in range(len(view))] == list(view) and view[-1] == want[0][8]
    longest = lambda e: len(e["prompt_ids"]) + max(map(len, e.get("responses", [e.get("response_ids")])))  # noqa
    assert got[0].lengths() == [longest(e) for e in want[0]]  # for length grouping, from the Arrow offsets
    assert view.lengths() == [longest(e) for e in want[0][2:9][::3]]
    assert pair_tables[1].lengths() == [longest(e) for e in pair_tables[0]]  # K = 3 completions
    # length grouping reads them: the loader makes no example to measure it, and orders as from the list
    made, make = [], ExampleTable._example
    monkeypatch.setattr(ExampleTable, "_example", lambda self, row: made.append(row) or make(self, row))
    grouped = CyclingLoader(pair_tables[1], "scored", 2, tok.pad_token_id, seed=5, group_by_length=True)
    monkeypatch.undo()
    listed = CyclingLoader(pair_tables[0], "scored", 2, tok.pad_token_id, seed=5, group_by_length=True)
    assert made == [] and grouped._lengths == listed._lengths
    assert [next(grouped)["ids"] for _ in range(6)] == [next(listed)["ids"] for _ in range(6)]


def test_disk_cache_is_reused_and_rebuilt_on_a_change(tmp_path, tok, monkeypatch):
    from xright.data import records, store

    path = write(tmp_path / "d.jsonl", pairs(20))
    s = spec(dataset=path, cache_dir=str(tmp_path / "cache"), eval_fraction=0.25)
    first = load_data(s, tok, log=Log())
    log = Log()
    with monkeypatch.context() as m:  # a hit reads no record and tokenises nothing
        m.setattr(records, "iter_raw", lambda *a, **k: pytest.fail("records read on a cache hit"))
        m.setattr(store, "to_disk", lambda *a, **k: pytest.fail("tokenised on a cache hit"))
        again = load_data(s, tok, log=log)
    assert [list(x) for x in again] == [list(x) for x in first]
    assert "data train: 15 examples" in log.text() and "memory-mapped from" in log[-1]
    dirs = lambda: sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir())  # noqa: E731
    assert len(dirs()) == 1
    for change in (dict(max_len=24), dict(input_template="Q: {}\nA: ")):
        load_data(spec(dataset=path, cache_dir=str(tmp_path / "cache"), eval_fraction=0.25, **change), tok, log=Log())
    assert len(dirs()) == 3
    write(path, pairs(21))  # the file changed: size and mtime
    rebuilt = load_data(s, tok, log=Log())
    assert len(rebuilt[0]) + len(rebuilt[1]) == 21 and len(dirs()) == 4
    # another tokenizer (the SentencePiece-style one) gets its own tables
    load_data(s, sentencepiece_tokenizer(), log=Log())
    assert len(dirs()) == 5 and not [p for p in (tmp_path / "cache").iterdir() if ".tmp" in p.name]


def test_disk_cache_one_builder_while_others_wait(tmp_path, tok, monkeypatch):
    import threading

    from xright.data import store

    path = write(tmp_path / "d.jsonl", pairs(40))
    builds = []
    real = store.to_disk

    def slow_to_disk(*a, **k):
        builds.append(threading.get_ident())
        import time
        time.sleep(0.5)  # the others reach the lock while this one builds
        return real(*a, **k)

    monkeypatch.setattr(store, "to_disk", slow_to_disk)
    results, errors = {}, []

    def rank(r):
        try:
            results[r] = load_data(spec(dataset=path, cache_dir=str(tmp_path / "cache")), tok, log=Log())[0]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(builds)) == 1  # one thread tokenised; train only (no eval split)
    assert [list(results[r]) for r in range(3)] == [list(results[0])] * 3 and len(results[0]) == 40


def test_disk_cache_removes_the_copies_of_killed_builds_only(tmp_path, tok):
    """A build killed with SIGKILL leaves its <root>.tmp-<pid>-<tid> copy; the next load removes it, and
    another root's stale copy, but never the copy of a build that is running (it holds the root's lock)."""
    import fcntl
    import subprocess

    from xright.data import store

    path = write(tmp_path / "d.jsonl", pairs(8))
    s = spec(dataset=path, cache_dir=str(tmp_path / "cache"))
    cache = tmp_path / "cache"
    cache.mkdir()
    dead = subprocess.Popen(["true"])  # a pid whose process is gone
    dead.wait()
    root = cache / f"{s.name}-{store.fingerprint(s, tok)}"
    copies = {"mine": Path(f"{root}.tmp-{dead.pid}-1"), "other": cache / f"dpo-00ff.tmp-{dead.pid}-7",
              "live": cache / f"sft-0a0a.tmp-{os.getpid()}-3"}
    for d in copies.values():
        (d / "train").mkdir(parents=True)
        (d / "train" / "data-00000-of-00001.arrow").write_bytes(b"x" * 1000)
    with open(cache / "sft-0a0a.lock", "a") as held:  # a builder of sft-0a0a at work
        fcntl.flock(held, fcntl.LOCK_EX)
        train, _ = load_data(s, tok, log=Log())
        assert len(train) == 8
        assert {k: d.exists() for k, d in copies.items()} == {"mine": False, "other": False, "live": True}
    load_data(s, tok, log=Log())  # that builder died: the lock is free, its copy goes at the next load
    assert not copies["live"].exists()
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == [root.name]


def test_disk_cache_keeps_bad_record_errors_and_counts(tmp_path, tok):
    path = write_lines(tmp_path / "bad.jsonl", pairs(6) + [{"prompt": "a", "chosen": None, "rejected": "c"}])
    cache = str(tmp_path / "cache")
    with pytest.raises(DataError, match=r"bad.jsonl line 7: field 'chosen'"):
        load_data(spec(dataset=path, cache_dir=cache), tok, log=Log())
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # nothing half-built left
    for _ in range(2):
        log = Log()
        train, _ = load_data(spec(dataset=path, cache_dir=cache, skip_bad_records=True), tok, log=log)
        assert len(train) == 6 and "data train: 6 examples (0 truncated, 0 dropped: prompt too long, " \
                                   "1 skipped: bad records)" in log


def test_data_cache_dir_flag_in_process(tmp_path, capsys):
    """--data_cache_dir through a CLI (in process, world size 1): the second run maps the first run's tables."""
    from xright.cli import train_sft

    data = write(tmp_path / "s.jsonl", [{"input": f"{i}+1", "output": str(i + 1)} for i in range(8)])
    argv = ["--dataset", data, "--data_cache_dir", str(tmp_path / "cache"), "--max_steps", "1", "--zero_stage", "0",
            "--train_batch_size", "2", "--micro_train_batch_size", "2", "--eval_split", ""]
    outs = []
    for run in ("a", "b"):
        train_sft.main([*argv, "--save_path", str(tmp_path / run)])
        outs.append(capsys.readouterr().out)
    assert "tokenised examples written to" in outs[0] and "memory-mapped from" in outs[1]
    assert "sft train: 8 examples (0 truncated" in outs[1]  # the first run's counts, replayed


def test_disk_cache_empty_eval_split(tmp_path, tok):
    d = tmp_path / "ds"
    d.mkdir()
    write(d / "train.jsonl", pairs(4))
    write(d / "test.jsonl", [{"prompt": "p" * 40, "chosen": "a", "rejected": "b"}])  # dropped: prompt too long
    for _ in range(2):
        log = Log()
        train, ev = load_data(spec(dataset=str(d), eval_split="test", max_len=30, cache_dir=str(tmp_path / "c")), tok,
                              log=log)
        assert len(train) == 4 and ev is None and "eval set empty after filtering" in log.text()


def test_disk_cache_parallel_build_keeps_order(tmp_path, tok, monkeypatch):
    from xright.data import store

    monkeypatch.setattr(store, "PER_PROCESS", 10)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)  # two tokenising processes for 60 records
    import datasets

    procs, real_map = [], datasets.Dataset.map
    monkeypatch.setattr(datasets.Dataset, "map", lambda self, *a, **k: procs.append(k.get("num_proc"))
                        or real_map(self, *a, **k))
    s = spec("binary", dataset=write(tmp_path / "p.jsonl", pairs(30)), max_len=24)
    want = load_data(s, tok, log=Log())[0]
    s.cache_dir = str(tmp_path / "cache")
    assert list(load_data(s, tok, log=Log())[0]) == want and procs[0] == 2
