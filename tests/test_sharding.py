"""The sharded no-grad pass (xright.sharding) and the cache keys (xright.fingerprints), in one process."""

import torch

from xright import fingerprints
from xright.data import CyclingLoader, DataSpec, load_data
from xright.models import load_model, tiny_tokenizer
from xright.objectives import SFT
from xright.schedules import Mix
from xright.sharding import plan_batches, rank_batches
from xright.trainer import Task, TrainArgs, Trainer


def test_a_tokenizers_key_ignores_the_truncation_and_padding_its_last_call_left():
    tok = tiny_tokenizer()
    spec = DataSpec(kind="pairwise")
    before = fingerprints.data_key(spec, tok, 1), fingerprints.tokenizer_id(tok)
    tok(["a b c d e f"] * 2, truncation=True, max_length=3, padding=True)  # the fast tokenizer keeps both settings
    assert (fingerprints.data_key(spec, tok, 1), fingerprints.tokenizer_id(tok)) == before
    tok.chat_template = "{{ messages }}"
    assert fingerprints.tokenizer_id(tok) != before[1]


def test_grouped_plan_is_longest_first_one_group_per_batch():
    # refcache's plan: K groups, longest first (negative lengths), ties in input order, at most 2 per batch
    lengths, ks = [-5, -9, -5, -1, -9, -7], [2, 2, 3, 2, 3, 3]
    assert plan_batches(lengths, 2, ks) == [[1, 0], [3], [4, 5], [2]]
    assert plan_batches([3, 1, 2], 2) == [[1, 2], [0]]


def test_a_short_rank_repeats_the_filler_batch():
    batches = [[0], [1], [2]]  # evaluation's plan: rank r's first batch is batch r
    assert rank_batches(batches, 1, 2, synced=True, filler=1) == [(1, [1], True), (1, [1], False)]
    assert rank_batches(batches, 1, 2, synced=False, filler=1) == [(1, [1], True)]


def test_evaluation_counts_every_example_once_and_keeps_the_ranks_forwards_in_step():
    """7 eval examples, micro batch 2, 3 ranks: rank 0 takes examples 0, 3, 6 (two batches), ranks 1 and 2 one batch
    each, which they repeat (their own first batch) and discard; the ranks' unit sums make up the whole set."""
    tok = tiny_tokenizer()
    train, _ = load_data(DataSpec(kind="sft", max_samples=12), tok, log=lambda *a: None)
    model = load_model("tiny", seed=1).eval()  # as from_pretrained returns it
    ev, calls, units = train[:7], {}, {}

    class Recording(SFT):
        def __call__(self, engine, reference, batch):
            calls[rank].append(list(batch["ids"]))
            return super().__call__(engine, reference, batch)

    class Rank:
        world_size, is_rank0, device = 3, True, torch.device("cpu")

        def __init__(self, rank):
            self.rank, self.reduced = rank, []

        def all_reduce(self, t, op="sum"):  # one rank's view: its own sums
            self.reduced.append(t.detach().clone())
            return t.detach().clone()

        def print(self, *a, **k):
            pass

    engine = type("Engine", (), {"module": model, "__call__": lambda self, **kw: model(**kw)})()
    for rank in range(3):
        calls[rank] = []
        task = Task(Recording(), CyclingLoader(train, "sft", 2, tok.pad_token_id, seed=1), ev, 2, 1)
        s = Rank(rank)
        args = TrainArgs(total_steps=1, save_path="/tmp/unused", eval_at_start=False)
        trainer = Trainer(s, engine, None, {"sft": task}, Mix({"sft": 1.0}), args, None)
        assert "eval/sft/loss" in trainer.evaluate()
        units[rank] = float(s.reduced[0])  # the all-reduce of the unit count comes first
    ids = [e["id"] for e in ev]
    assert calls == {0: [[ids[0], ids[3]], [ids[6]]], 1: [[ids[1], ids[4]]] * 2, 2: [[ids[2], ids[5]]] * 2}
    assert sum(units.values()) == sum(len(e["response_ids"]) for e in ev)
    assert model.training  # training goes on in train mode, whatever mode the model was loaded in
