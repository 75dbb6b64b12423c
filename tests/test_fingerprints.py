"""Cache keys (xright.fingerprints) and the sharded pass's plan (xright.sharding), in one process."""

from xright import fingerprints
from xright.data import DataSpec
from xright.models import tiny_tokenizer
from xright.sharding import plan_batches, rank_batches


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
