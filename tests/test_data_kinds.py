"""A data kind is one definition: a toy kind defined here, registered in ``xright.data.KINDS`` and nothing else,
loads (in memory and through the on-disk store), validates and collates a JSONL file."""

import ast
import json
from pathlib import Path

import pytest
import torch

import xright.data
from xright.data import KINDS, DataError, DataKind, DataSpec, collate, load_data
from xright.data.records import get_field, number, text_field
from xright.models import load_tokenizer


class Rated(DataKind):
    """``{"question", "answer", "score"}``: one answer with a number, collated as ``score`` [B]."""

    columns = {"score": "float64"}

    def records(self, rec, rid, spec):
        return [{"id": rid, "prompt": text_field(get_field(rec, "question"), "question"),
                 "answer": text_field(get_field(rec, "answer"), "answer"),
                 "score": number(get_field(rec, "score"), "score"), "raw_prompt": False}], False

    def answers(self, rec, spec):
        return [rec["answer"]], ["answer"]

    def collate(self, examples, pad_id):
        return {**super().collate(examples, pad_id), "score": torch.tensor([e["score"] for e in examples])}


ROWS = [{"question": "2+2?", "answer": "4", "score": 1.5}, {"question": "sky?", "answer": "blue", "score": -2},
        {"question": "abc reversed?", "answer": "cba", "score": 0.25}]


@pytest.fixture
def rated(monkeypatch, tmp_path):
    monkeypatch.setitem(KINDS, "rated", Rated())
    path = tmp_path / "rated.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


@pytest.mark.parametrize("cached", [False, True])
def test_a_toy_kind_loads_and_collates_through_its_one_definition(rated, tmp_path, cached):
    tok = load_tokenizer("tiny")
    spec = DataSpec(kind="rated", dataset=str(rated), eval_split="", input_template="Q: {}\nA: ",
                    cache_dir=str(tmp_path / "cache") if cached else None)
    train, evaluation = load_data(spec, tok, log=lambda m: None)
    assert evaluation is None and len(train) == 3
    enc = lambda t: tok(t, add_special_tokens=False).input_ids  # noqa: E731 (byte-level: no merges)
    for ex, row, line in zip(train, ROWS, (1, 2, 3)):
        assert ex["id"].startswith(f"rated.jsonl:{line}@")
        assert list(ex["prompt_ids"]) == enc(f"Q: {row['question']}\nA: ")
        assert list(ex["response_ids"]) == enc(row["answer"]) + [tok.eos_token_id]
        assert ex["score"] == float(row["score"])
    batch = collate("rated", list(train), pad_id=0)
    assert batch["score"].tolist() == [1.5, -2.0, 0.25]
    assert batch["input_ids"].shape == (3, max(len(e["prompt_ids"]) + len(e["response_ids"]) for e in train))
    assert batch["loss_mask"].sum(1).tolist() == [len(r["answer"]) + 1 for r in ROWS]
    assert batch["ids"] == [e["id"] for e in train]


def test_a_toy_kind_refuses_a_bad_record_with_its_line_and_field(rated):
    rated.write_text(rated.read_text() + json.dumps({"question": "q", "answer": "a", "score": "high"}) + "\n")
    with pytest.raises(DataError, match=r"rated.jsonl line 4: field 'score': must be a number"):
        load_data(DataSpec(kind="rated", dataset=str(rated), eval_split=""), load_tokenizer("tiny"), log=lambda m: None)


def test_data_modules_import_one_way():
    """records -> kinds -> tokenise -> store -> loading, at module level and inside functions: no cycle."""
    order = ["records", "chat", "synthetic", "kinds", "tokenise", "store", "loading", "collate"]
    for name in order:
        tree = ast.parse(Path(xright.data.__file__).with_name(f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                for target in [node.module] if node.module else [a.name for a in node.names]:
                    assert order.index(target) < order.index(name), f"data/{name}.py imports .{target}"
