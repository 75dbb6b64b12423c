"""Every objective against numbers known without the code under test.

The "models" here are bigram tables: the logits at position t are a fixed row chosen by token t, each
row already a log-distribution, so log p(token t+1 | token t) is a number we pick. A sequence's
log-prob is then a sum we compute from the raw token lists in float64 — no collate, no log-prob code,
no objective involved. Each objective, run on a batch built by ``xright.data.collate``, must equal
the pure loss of ``xright.losses`` on those numbers and a float64 formula written out here. A swap of
chosen and rejected, a prompt or padding token counted, a wrong length or a flipped sign changes
the value.
"""

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from xright import losses as L
from xright.data import collate
from xright.objectives import EXO, KTO, SFT, Pairwise, PrefParams, Reference, RewardModel

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

V, PAD = 12, 11


def log_table(seed: int) -> torch.Tensor:
    """[V, V] float64: row a is log p(· | previous token a); p(PAD | PAD) tiny so counted padding shows."""
    g = torch.Generator().manual_seed(seed)
    t = torch.log_softmax(2.0 * torch.randn(V, V, generator=g, dtype=torch.float64), dim=-1)
    t[PAD] = torch.log_softmax(torch.cat([torch.zeros(V - 1, dtype=torch.float64),
                                          torch.tensor([-30.0], dtype=torch.float64)]), dim=-1)
    return t


class Bigram(nn.Module):
    """logits[n, t] = table[input_ids[n, t]]: the log-prob of the next token depends on this one only."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.float())
        self.calls = []

    def forward(self, input_ids, attention_mask=None, use_cache=None, position_ids=None, **packing):
        # a cache would stop transformers from seeing a packed row's sequence boundaries
        assert use_cache is False
        assert (attention_mask is not None) != (position_ids is not None)  # padded rows xor one packed row
        self.calls.append(input_ids.shape)
        return SimpleNamespace(logits=self.table[input_ids])


POLICY_T, REF_T = log_table(1), log_table(16)  # seeds where every case below is non-degenerate


def token_logps(table, prompt, response) -> list[float]:
    """log p of each response token under a bigram table (float64, from the token lists)."""
    seq = list(prompt) + list(response)
    return [float(table[seq[i - 1], seq[i]]) for i in range(len(prompt), len(seq))]


def seq(table, prompt, response) -> float:
    return math.fsum(token_logps(table, prompt, response))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


# prompts and responses of different lengths; chosen and rejected lengths differ within a pair
PAIRS = [
    {"id": "a", "prompt_ids": [1, 2, 3], "responses": [[4, 5, 6, 7], [8, 9]]},
    {"id": "b", "prompt_ids": [5], "responses": [[2, 2], [3, 1, 4, 1, 5]]},
    {"id": "c", "prompt_ids": [7, 8, 9, 10, 0], "responses": [[1, 3, 5], [6]]},
]


@pytest.fixture
def models():
    return Bigram(POLICY_T), Reference(model=Bigram(REF_T))


def hand_pairs(ref=True):
    """[(πc, πr, ρc, ρr, |yc|, |yr|)] per pair, from the token lists."""
    out = []
    for e in PAIRS:
        (c, r), p = e["responses"], e["prompt_ids"]
        out.append((seq(POLICY_T, p, c), seq(POLICY_T, p, r),
                    seq(REF_T, p, c) if ref else 0.0, seq(REF_T, p, r) if ref else 0.0, len(c), len(r)))
    return out


def as_tensors(rows):
    return [torch.tensor(col, dtype=torch.float64) for col in zip(*rows)]


# ---- SFT -------------------------------------------------------------------------------------

@pytest.mark.parametrize("packed", [False, True])
def test_sft_sums_response_nll_and_counts_response_tokens(models, packed):
    policy, _ = models
    examples = [{"id": e["id"], "prompt_ids": e["prompt_ids"], "response_ids": e["responses"][0]} for e in PAIRS]
    batch = collate("sft", examples, PAD, packed=packed)
    value, metrics = SFT()(policy, None, batch)
    per_token = [token_logps(POLICY_T, e["prompt_ids"], e["response_ids"]) for e in examples]
    hand = -math.fsum(v for row in per_token for v in row)
    pure = sum(float(L.sft_nll(torch.tensor([row]), torch.ones(1, len(row)))) for row in per_token)
    assert float(value) == pytest.approx(hand, rel=1e-6)
    assert float(value) == pytest.approx(pure, rel=1e-6)
    assert float(metrics["loss"]) == pytest.approx(hand, rel=1e-6)
    assert float(SFT().units(batch)) == sum(len(e["response_ids"]) for e in examples) == 9


def test_sft_pretrain_mode_batch_counts_every_token_but_the_first(models):
    # a prompt-less example (pretrain mode) is all response: the unmasked count is len − 1
    policy, _ = models
    batch = collate("sft", [{"id": "x", "prompt_ids": [], "response_ids": [3, 4, 5, 6]}], PAD)
    value, _ = SFT()(policy, None, batch)
    assert float(SFT().units(batch)) == 3
    assert float(value) == pytest.approx(-seq(POLICY_T, [3], [4, 5, 6]), rel=1e-6)


# ---- pairwise --------------------------------------------------------------------------------

def _dpo(eps):
    def hand(pc, pr, rc, rr, lc, lr, beta=0.5):
        h = (pc - pr) - (rc - rr)
        return -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)
    return hand


def _ipo(average):
    def hand(pc, pr, rc, rr, lc, lr, beta=0.5):
        if average:
            pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
        return ((pc - pr) - (rc - rr) - 1 / (2 * beta)) ** 2
    return hand


def _slic(pc, pr, rc, rr, lc, lr, delta=4.0, lam=0.3):
    return max(0.0, delta - pc + pr) - lam * pc


def _simpo(pc, pr, rc, rr, lc, lr, beta=0.5, gamma=0.7):
    return -logsig(beta * pc / lc - beta * pr / lr - gamma)


PAIR_CASES = {
    # name: (loss, params, float64 hand formula, pure loss on the hand numbers)
    "dpo": ("dpo", PrefParams(beta=0.5), _dpo(0.0),
            lambda pc, pr, rc, rr, lc, lr: L.dpo(pc, pr, rc, rr, 0.5)[0]),
    "cdpo": ("dpo", PrefParams(beta=0.5, label_smoothing=0.2), _dpo(0.2),
             lambda pc, pr, rc, rr, lc, lr: L.dpo(pc, pr, rc, rr, 0.5, 0.2)[0]),
    "ipo": ("ipo", PrefParams(beta=0.5), _ipo(False),
            lambda pc, pr, rc, rr, lc, lr: L.ipo(pc, pr, rc, rr, 0.5)[0]),
    "ipo_average": ("ipo", PrefParams(beta=0.5, ipo_average=True), _ipo(True),
                    lambda pc, pr, rc, rr, lc, lr: L.ipo(pc / lc, pr / lr, rc / lc, rr / lr, 0.5)[0]),
    "slic": ("slic", PrefParams(slic_delta=4.0, slic_lambda=0.3), _slic,
             lambda pc, pr, rc, rr, lc, lr: L.slic(pc, pr, 4.0, 0.3)),
    "simpo": ("simpo", PrefParams(beta=0.5, simpo_gamma=0.7), _simpo,
              lambda pc, pr, rc, rr, lc, lr: L.simpo(pc, pr, lc, lr, 0.5, 0.7)[0]),
}


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("case", list(PAIR_CASES))
def test_pairwise_objective_equals_pure_loss_and_hand_value(models, case, packed):
    loss, params, hand, pure = PAIR_CASES[case]
    policy, reference = models
    objective = Pairwise(loss, params)
    batch = collate("pairwise", PAIRS, PAD, packed=packed)
    value, metrics = objective(policy, reference, batch)
    rows = hand_pairs(ref=objective.needs_reference)
    expect_hand = math.fsum(hand(*r) for r in rows)
    expect_pure = float(pure(*as_tensors(rows)).sum())
    assert float(value) == pytest.approx(expect_hand, rel=1e-5, abs=1e-6)
    assert float(value) == pytest.approx(expect_pure, rel=1e-5, abs=1e-6)
    assert float(metrics["logp_chosen"]) == pytest.approx(math.fsum(r[0] for r in rows), rel=1e-6)
    assert float(metrics["logp_rejected"]) == pytest.approx(math.fsum(r[1] for r in rows), rel=1e-6)
    # the hinge, margin and average must be exercised in both directions, or a flip could hide
    per_pair = [hand(*r) for r in rows]
    assert len(set(round(v, 6) for v in per_pair)) == len(rows)


def test_pairwise_inputs_are_not_symmetric():
    # the numbers above would not reveal a chosen/rejected swap if the pairs were symmetric
    for pc, pr, rc, rr, lc, lr in hand_pairs():
        assert abs((pc - pr) - (rc - rr)) > 0.5 and lc != lr


def test_dpo_rewards_accuracy_and_margin_by_hand(models):
    policy, reference = models
    value, m = Pairwise("dpo", PrefParams(beta=0.5))(policy, reference, collate("pairwise", PAIRS, PAD))
    rows = hand_pairs()
    rc = [0.5 * (pc - c) for pc, _, c, _, _, _ in rows]
    rr = [0.5 * (pr - r) for _, pr, _, r, _, _ in rows]
    assert float(m["reward_chosen"]) == pytest.approx(sum(rc), rel=1e-5)
    assert float(m["reward_rejected"]) == pytest.approx(sum(rr), rel=1e-5)
    assert float(m["margin"]) == pytest.approx(sum(rc) - sum(rr), rel=1e-5)
    assert float(m["acc"]) == sum(a > b for a, b in zip(rc, rr))
    assert 0 < float(m["acc"]) < 3  # both outcomes occur, so a swap changes acc too


def test_reference_free_pair_losses_never_call_the_reference(models):
    policy, _ = models
    never = Reference(model=Bigram(torch.full((V, V), float("nan"), dtype=torch.float64)))
    for loss in ("slic", "simpo"):
        value, _ = Pairwise(loss)(policy, never, collate("pairwise", PAIRS, PAD))
        assert math.isfinite(float(value))
        assert not never.model.calls


def test_one_forward_for_chosen_and_rejected(models):
    policy, reference = models
    Pairwise("dpo")(policy, reference, collate("pairwise", PAIRS, PAD))
    assert [s[0] for s in policy.calls] == [6] and [s[0] for s in reference.model.calls] == [6]


# ---- KTO -------------------------------------------------------------------------------------

BINARY = [
    {"id": "k0", "prompt_ids": [1, 2], "response_ids": [3, 4, 5], "label": True},
    {"id": "k1", "prompt_ids": [6, 7, 8], "response_ids": [9], "label": False},
    {"id": "k2", "prompt_ids": [0], "response_ids": [2, 4, 6, 8], "label": True},
    {"id": "k3", "prompt_ids": [10, 3], "response_ids": [5, 5], "label": False},
]


def kto_hand(z, beta=0.5, wd=1.3, wu=0.7):
    z = max(z, 0.0)
    total = 0.0
    for e in BINARY:
        r = seq(POLICY_T, e["prompt_ids"], e["response_ids"]) - seq(REF_T, e["prompt_ids"], e["response_ids"])
        total += wd * (1 - 1 / (1 + math.exp(-beta * (r - z)))) if e["label"] else \
            wu * (1 - 1 / (1 + math.exp(-beta * (z - r))))
    return total


def kto_local_z():
    """Mean log-ratio of the mismatched pairs (x_i, y_{i+1 mod B}), from the token lists."""
    B = len(BINARY)
    vals = []
    for i, e in enumerate(BINARY):
        y = BINARY[(i + 1) % B]["response_ids"]
        vals.append(seq(POLICY_T, e["prompt_ids"], y) - seq(REF_T, e["prompt_ids"], y))
    return sum(vals) / B


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("other_rank_z", [None, 3.0, -40.0])
def test_kto_equals_hand_value_with_mismatched_pair_reference_point(models, other_rank_z, packed):
    """z is the mean log-ratio of (x_i, y_{i+1}); with a second rank, the mean of both ranks' z, then
    clamped at 0 (the −40 case: a negative mean gives z = 0)."""
    policy, reference = models
    objective = KTO(beta=0.5, desirable_weight=1.3, undesirable_weight=0.7)
    if other_rank_z is not None:
        objective.reduce_mean = lambda t: (t + other_rank_z) / 2
    batch = collate("binary", BINARY, PAD, packed=packed)
    value, m = objective(policy, reference, batch)
    z = kto_local_z() if other_rank_z is None else (kto_local_z() + other_rank_z) / 2
    assert kto_local_z() > 0.5  # z matters in these numbers (positive: not clamped away)
    assert float(value) == pytest.approx(kto_hand(z), rel=1e-5)
    pi = torch.tensor([seq(POLICY_T, e["prompt_ids"], e["response_ids"]) for e in BINARY], dtype=torch.float64)
    rho = torch.tensor([seq(REF_T, e["prompt_ids"], e["response_ids"]) for e in BINARY], dtype=torch.float64)
    labels = torch.tensor([e["label"] for e in BINARY])
    pure, _ = L.kto(pi, rho, labels, torch.tensor(z, dtype=torch.float64), 0.5, 1.3, 0.7)
    assert float(value) == pytest.approx(float(pure.sum()), rel=1e-5)
    assert float(m["kl"]) == pytest.approx(z * len(BINARY), rel=1e-5)  # logged before the clamp


def test_kto_with_wrong_labels_differs(models):
    # the labels are read from the batch: flipping them must change the loss
    policy, reference = models
    flipped = [{**e, "label": not e["label"]} for e in BINARY]
    a, _ = KTO(beta=0.5)(policy, reference, collate("binary", BINARY, PAD))
    b, _ = KTO(beta=0.5)(policy, reference, collate("binary", flipped, PAD))
    assert abs(float(a) - float(b)) > 1e-3


# ---- EXO / dpo-pref / dpo-rw -----------------------------------------------------------------

SCORED = [
    {"id": "s0", "prompt_ids": [1, 2], "responses": [[3, 4], [5, 6, 7], [8]], "rewards": [1.0, -0.5, 0.2]},
    {"id": "s1", "prompt_ids": [9], "responses": [[0, 1, 2], [3], [4, 4]], "rewards": [-1.0, 0.3, 2.0]},
]


def exo_hand(examples, log_p_rows, beta, reverse):
    total = 0.0
    for e, log_p in zip(examples, log_p_rows):
        p = e["prompt_ids"]
        u = [beta * (seq(POLICY_T, p, y) - seq(REF_T, p, y)) for y in e["responses"]]
        q = softmax(u)
        if reverse:
            total += sum(qk * (math.log(qk) - lp) for qk, lp in zip(q, log_p))
        else:
            total -= sum(math.exp(lp) * math.log(qk) for qk, lp in zip(q, log_p))
    return total


@pytest.mark.parametrize("loss,eps", [("exo-pref", None), ("exo-pref", 0.1), ("dpo-pref", 0.1),
                                      ("dpo-pref", None)])
def test_exo_pref_equals_hand_value(models, loss, eps):
    policy, reference = models
    value, _ = EXO(loss, beta=0.5, epsilon=eps)(policy, reference, collate("pairwise", PAIRS, PAD))
    if eps is None:
        z = math.log1p(math.exp(-10.0))
        row = [-z, -10.0 - z]
    else:
        row = [math.log1p(-eps), math.log(eps)]
    hand = exo_hand(PAIRS, [row] * len(PAIRS), 0.5, reverse=loss.startswith("exo"))
    assert float(value) == pytest.approx(hand, rel=1e-5, abs=1e-6)
    rows = hand_pairs()
    pi = torch.tensor([[r[0], r[1]] for r in rows], dtype=torch.float64)
    rho = torch.tensor([[r[2], r[3]] for r in rows], dtype=torch.float64)
    fn = L.exo if loss.startswith("exo") else L.dpo_forward_kl
    pure = fn(pi, rho, L.exo_pref_target(len(rows), eps, dtype=torch.float64), 0.5).sum()
    assert float(value) == pytest.approx(float(pure), rel=1e-5, abs=1e-6)


def test_dpo_pref_with_epsilon_is_cdpo(models):
    policy, reference = models
    batch = collate("pairwise", PAIRS, PAD)
    a, _ = EXO("dpo-pref", beta=0.5, epsilon=0.2)(policy, reference, batch)
    b, _ = Pairwise("dpo", PrefParams(beta=0.5, label_smoothing=0.2))(policy, reference, batch)
    assert float(a) == pytest.approx(float(b), rel=1e-5)


@pytest.mark.parametrize("loss", ["exo-rw", "dpo-rw"])
def test_exo_rw_k3_equals_hand_value(models, loss):
    policy, reference = models
    value, m = EXO(loss, beta=0.5, beta_r=0.8)(policy, reference, collate("scored", SCORED, PAD))
    log_p = [[math.log(v) for v in softmax([r / 0.8 for r in e["rewards"]])] for e in SCORED]
    hand = exo_hand(SCORED, log_p, 0.5, reverse=loss == "exo-rw")
    assert float(value) == pytest.approx(hand, rel=1e-5)
    pi = torch.tensor([[seq(POLICY_T, e["prompt_ids"], y) for y in e["responses"]] for e in SCORED],
                      dtype=torch.float64)
    rho = torch.tensor([[seq(REF_T, e["prompt_ids"], y) for y in e["responses"]] for e in SCORED],
                       dtype=torch.float64)
    target = L.exo_rw_target(torch.tensor([e["rewards"] for e in SCORED], dtype=torch.float64), 0.8)
    fn = L.exo if loss == "exo-rw" else L.dpo_forward_kl
    assert float(value) == pytest.approx(float(fn(pi, rho, target, 0.5).sum()), rel=1e-5)
    assert float(m["logp"]) == pytest.approx(float(pi.mean(-1).sum()), rel=1e-5)


# ---- reward model ----------------------------------------------------------------------------

class CumulativeScorer(nn.Module):
    """A 'reward model' whose head output at position t is the sum of token values up to t; read at the
    last real token it is the sum over the whole sequence. PAD has a large value, so reading at a
    padded position shows."""

    VALUES = torch.tensor([0.3, -0.2, 0.5, 0.1, -0.4, 0.25, 0.05, -0.15, 0.6, -0.3, 0.2, 7.0])

    def __init__(self):
        super().__init__()
        self.value = nn.Parameter(self.VALUES.clone())
        self.score = nn.Identity()

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.score(self.value[input_ids].cumsum(-1).unsqueeze(-1)))


def rm_hand(margins, use_margin, kind):
    total = 0.0
    for e, m in zip(PAIRS, margins):
        c, r = (float(CumulativeScorer.VALUES[e["prompt_ids"] + y].double().sum()) for y in e["responses"])
        d = c - r - (m if use_margin else 0.0)
        total += -logsig(d)
    return total


@pytest.mark.parametrize("kind", ["sigmoid", "logexp"])
@pytest.mark.parametrize("use_margin", [True, False])
def test_reward_model_equals_bradley_terry_by_hand(kind, use_margin):
    margins = [0.5, -0.25, 1.0]
    examples = [{**e, "margin": m} for e, m in zip(PAIRS, margins)]
    value, m = RewardModel(kind, use_margin=use_margin)(CumulativeScorer(), None, collate("pairwise", examples, PAD))
    assert float(value) == pytest.approx(rm_hand(margins, use_margin, kind), rel=1e-5)
    chosen = [float(CumulativeScorer.VALUES[e["prompt_ids"] + e["responses"][0]].sum()) for e in PAIRS]
    rejected = [float(CumulativeScorer.VALUES[e["prompt_ids"] + e["responses"][1]].sum()) for e in PAIRS]
    assert float(m["reward_chosen"]) == pytest.approx(sum(chosen), rel=1e-5)
    assert float(m["reward_rejected"]) == pytest.approx(sum(rejected), rel=1e-5)
    assert float(m["acc"]) == sum(a > b for a, b in zip(chosen, rejected))
    assert float(m["reward_sq"]) == pytest.approx(sum(v * v for v in chosen + rejected) / 2, rel=1e-5)
    pure = L.bradley_terry(torch.tensor(chosen), torch.tensor(rejected),
                           torch.tensor(margins) if use_margin else None, kind).sum()
    assert float(value) == pytest.approx(float(pure), rel=1e-5)


# ---- log-prob plumbing ---------------------------------------------------------------------------

def test_gather_logps_upcasts_low_precision_logits():
    logits = (POLICY_T[[1, 2, 3]] * 1.37).unsqueeze(0).to(torch.bfloat16)  # [1, 3, V]
    targets = torch.tensor([[4, 5, 6]])
    from xright.logprobs import gather_logps, num_tokens

    out = gather_logps(logits, targets)
    assert out.dtype == torch.float32
    exact = torch.log_softmax(logits.double(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=1e-5)  # bf16 arithmetic would be ~1e-2 off
    for packed in (False, True):
        batch = collate("pairwise", PAIRS, PAD, packed=packed)
        assert int(num_tokens(batch)) == sum(len(e["prompt_ids"]) * 2 + sum(map(len, e["responses"]))
                                             for e in PAIRS)


# ---- facts, defaults and metrics the loop relies on (mutation survivors) -----------------------------------

def test_objective_facts_and_defaults():
    from xright.cli import train_dpo, train_kto
    from xright.cli.flags import parse

    assert Pairwise("dpo").needs_reference and Pairwise("ipo").needs_reference and KTO().needs_reference
    assert EXO("exo-pref").needs_reference and not Pairwise("slic").needs_reference
    assert not Pairwise("simpo").needs_reference and not RewardModel().needs_reference
    # the library's defaults are the CLIs' (one default per hyperparameter)
    dpo_args = parse(_parser(train_dpo), [])
    assert PrefParams() == PrefParams(beta=dpo_args.beta, label_smoothing=dpo_args.label_smoothing,
                                      ipo_average=dpo_args.ipo_average, slic_delta=dpo_args.slic_delta,
                                      slic_lambda=dpo_args.slic_lambda, simpo_gamma=dpo_args.simpo_gamma)
    kto = KTO()
    kto_args = parse(_parser(train_kto), [])
    assert (kto.desirable_weight, kto.undesirable_weight) == (kto_args.desirable_loss_weight,
                                                              kto_args.undesirable_loss_weight)
    assert RewardModel().use_margin  # a batch's margin is used unless switched off


def _parser(cli):
    """The CLI's parser, built the way its main() builds it (captured from a dry call)."""
    import argparse

    captured = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, args=None, namespace=None):
        captured["p"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab
    try:
        cli.main([])
    except SystemExit:
        pass
    finally:
        argparse.ArgumentParser.parse_args = real
    return captured["p"]


def test_metrics_are_detached_float_sums(models):
    policy, reference = models
    margins = [{**e, "margin": 0.5} for e in PAIRS]
    cases = [(Pairwise("dpo"), "pairwise", PAIRS), (KTO(), "binary", BINARY), (EXO("exo-rw"), "scored", SCORED),
             (EXO("dpo-pref"), "pairwise", PAIRS)]
    for objective, kind, examples in cases:
        _, m = objective(policy, reference, collate(kind, examples, PAD))
        for name, v in m.items():
            assert not v.requires_grad and v.dtype.is_floating_point, (type(objective).__name__, name)
    _, m = RewardModel()(CumulativeScorer(), None, collate("pairwise", margins, PAD))
    assert all(not v.requires_grad and v.dtype.is_floating_point for v in m.values())


def test_kto_accuracy_by_hand(models):
    policy, reference = models
    # reward on the side of max(z, 0) its label asks for; with policy = reference every r = 0 = z: no side
    same = Reference(model=Bigram(POLICY_T))
    _, m = KTO(beta=0.5)(policy, same, collate("binary", BINARY, PAD))
    assert float(m["acc"]) == 0 and float(m["kl"]) == 0
    for other in (None, -40.0):
        objective = KTO(beta=0.5)
        if other is not None:
            objective.reduce_mean = lambda t, o=other: (t + o) / 2
        z = kto_local_z() if other is None else (kto_local_z() + other) / 2
        _, m = objective(policy, reference, collate("binary", BINARY, PAD))
        r = [seq(POLICY_T, e["prompt_ids"], e["response_ids"]) - seq(REF_T, e["prompt_ids"], e["response_ids"])
             for e in BINARY]
        right = [(ri > max(z, 0)) if e["label"] else (ri < max(z, 0)) for ri, e in zip(r, BINARY)]
        assert float(m["acc"]) == sum(right), other
        assert float(m["reward"]) == pytest.approx(0.5 * sum(r), rel=1e-5)


def test_exo_accuracy_and_margin_by_hand(models):
    policy, reference = models
    _, m = EXO("exo-rw", beta=0.5)(policy, reference, collate("scored", SCORED, PAD))
    acc = margin = 0.0
    for e in SCORED:
        u = [0.5 * (seq(POLICY_T, e["prompt_ids"], y) - seq(REF_T, e["prompt_ids"], y)) for y in e["responses"]]
        acc += u.index(max(u)) == e["rewards"].index(max(e["rewards"]))
        margin += max(u) - min(u)
    assert float(m["acc"]) == acc and float(m["margin"]) == pytest.approx(margin, rel=1e-5)


def test_loader_geometry_and_default_seed():
    from xright.cli.flags import base_parser
    from xright.data import CyclingLoader

    examples = [{"id": str(i), "prompt_ids": [1], "response_ids": [2]} for i in range(8)]
    for rank, world in ((2, 2), (-1, 2)):
        with pytest.raises(ValueError, match="bad loader geometry"):
            CyclingLoader(examples, "sft", 2, PAD, rank=rank, world_size=world)
    assert CyclingLoader(examples, "sft", 2, PAD).seed == base_parser("").get_default("seed") == 42


def test_maxright_never_picks_a_zero_weight_objective():
    from xright.schedules import Maxright

    # b's score w·(L̃ − L*) is negative (below its optimum); a has weight 0 and must still not be picked
    m = Maxright({"a": 0.0, "b": 1.0}, {"b": 2.0}, seed=0, refresh_every=0)
    m.refresh({"a": 5.0, "b": 1.0})
    assert m.plan(0) == {"b": 1.0}
