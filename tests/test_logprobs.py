"""Per-token / per-sequence log-probs and their masking, on the built-in tiny model."""

import math

import torch

from xright.logprobs import gather_logps, sequence_logps, split_choices, token_logps
from xright.models import load_model


def test_gather_logps_matches_log_softmax():
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(0, 11, (2, 5))
    ref = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(gather_logps(logits, targets), ref)


def test_sequence_logps_counts_only_response_tokens():
    model = load_model("tiny", seed=0).eval()
    # row 0: prompt [5, 6], response [7, 8, 9]; row 1: prompt [5], response [10], then 3 pads
    input_ids = torch.tensor([[5, 6, 7, 8, 9], [5, 10, 256, 256, 256]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    loss_mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)
    batch = {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask}
    with torch.no_grad():
        total, n = sequence_logps(model, batch)
        logits0 = model(input_ids[:1]).logits[0]
        logits1 = model(input_ids[1:, :2]).logits[0]
    # by hand: token t is scored by the logits at position t - 1
    lp = lambda logits, pos, tok: torch.log_softmax(logits[pos - 1], -1)[tok].item()  # noqa: E731
    expect0 = lp(logits0, 2, 7) + lp(logits0, 3, 8) + lp(logits0, 4, 9)
    expect1 = lp(logits1, 1, 10)
    assert n.tolist() == [3.0, 1.0]
    assert math.isclose(total[0].item(), expect0, rel_tol=1e-5)
    assert math.isclose(total[1].item(), expect1, rel_tol=1e-5)  # padding changes nothing (right padding)
    logps, mask = token_logps(model, batch)
    assert logps.shape == mask.shape == (2, 4)
    assert mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]


def test_split_choices_k_major():
    values = torch.tensor([0.0, 1.0, 2.0, 10.0, 11.0, 12.0])  # K=2, B=3: chosen rows then rejected rows
    assert split_choices(values, 2).tolist() == [[0.0, 10.0], [1.0, 11.0], [2.0, 12.0]]


def test_packed_row_gives_the_hand_computed_logps_in_row_order():
    """The same two rows packed into one: position ids restart, the segment sums are the per-row values
    computed by hand above, and token_logps comes back in the padded [N, T−1] layout."""
    from xright.data.collate import pack

    model = load_model("tiny", seed=0, packing=True).eval()
    input_ids = torch.tensor([[5, 6, 7, 8, 9], [5, 10, 256, 256, 256]])
    padded = {"input_ids": input_ids, "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]),
              "loss_mask": torch.tensor([[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]], dtype=torch.bool)}
    packed = pack(padded)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9, 5, 10]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1]]
    assert packed["cu_seqlens"].tolist() == [0, 5, 7] and packed["max_seqlen"] == 5
    with torch.no_grad():
        total, n = sequence_logps(model, packed)
        logits0 = model(input_ids[:1]).logits[0]
        logits1 = model(input_ids[1:, :2]).logits[0]
        logps, mask = token_logps(model, packed)
    lp = lambda logits, pos, tok: torch.log_softmax(logits[pos - 1], -1)[tok].item()  # noqa: E731
    assert n.tolist() == [3.0, 1.0]
    assert math.isclose(total[0].item(), lp(logits0, 2, 7) + lp(logits0, 3, 8) + lp(logits0, 4, 9), rel_tol=1e-5)
    assert math.isclose(total[1].item(), lp(logits1, 1, 10), rel_tol=1e-5)  # not scored from row 0's tokens
    assert logps.shape == mask.shape == (2, 4) and mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    assert math.isclose(logps[1, 0].item(), lp(logits1, 1, 10), rel_tol=1e-5) and logps[1, 1:].tolist() == [0, 0, 0]
