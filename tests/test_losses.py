"""Tests for xright.losses against values computed by hand.

Expected values are written as explicit arithmetic in plain Python ``math`` on small inputs,
never by re-running the torch formula under test. Inputs are float64 so the comparison can
be tight.
"""

import math

import pytest
import torch

from xright import losses as L


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def close(actual, expected, tol=1e-12):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=tol, atol=tol)


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


# ----------------------------------------------------------------------------- SFT


def test_sft_nll_sums_masked_tokens():
    logps = t(-1.0, -2.0, -3.0).unsqueeze(0).repeat(2, 1)
    logps[1] = t(-0.5, -0.25, -4.0)
    mask = [[0, 1, 1], [1, 1, 0]]
    # row 0: prompt token masked out -> -(-2 - 3) = 5
    # row 1: padding token masked out -> -(-0.5 - 0.25) = 0.75
    expected = [5.0, 0.75]
    for m in (torch.tensor(mask), torch.tensor(mask, dtype=torch.bool), t(0, 1, 1).new_tensor(mask)):
        close(L.sft_nll(logps, m), expected)


def test_sft_nll_ignores_inf_at_masked_positions():
    logps = t(-float("inf"), -1.5).unsqueeze(0).requires_grad_()
    out = L.sft_nll(logps, torch.tensor([[False, True]]))
    close(out, [1.5])  # only the unmasked -1.5 counts, no NaN from -inf * 0
    out.sum().backward()
    close(logps.grad, [[0.0, -1.0]])


def test_sft_global_token_mean_under_deepspeed_scaling():
    """The trainer's own loss assembly (``Trainer.train_step``), run once per rank of a 2-rank world, gives the
    gradient of the token mean over the whole step once DeepSpeed averages the ranks' gradients.

    W = 2 ranks x G = 2 micro-steps with different response-token counts. Per-token NLLs (padding masked):
      rank 0, micro 0: [1.0, 3.0]            -> 2 tokens, sum 4.0, mean 2.0
      rank 0, micro 1: [2.0]                 -> 1 token,  sum 2.0, mean 2.0
      rank 1, micro 0: [0.5, 0.5, 0.5, 0.5]  -> 4 tokens, sum 2.0, mean 0.5
      rank 1, micro 1: [6.0]                 -> 1 token,  sum 6.0, mean 6.0
    Global N = 8, token mean over the concatenation = 14 / 8 = 1.75; the mean of per-micro means would be
    (2 + 2 + 0.5 + 6) / 4 = 2.625, a rank-local normaliser (rank 0: 6/3, rank 1: 8/5) gives 1.8.
    Every token log-prob is −θ·nll with θ = 1, so d(loss)/dθ is the loss itself.
    """
    from xright.objectives import Objective
    from xright.schedules import Single
    from xright.trainer import Task, TrainArgs, Trainer

    nll = {(0, 0): [1.0, 3.0, 0.0, 0.0], (0, 1): [2.0, 0.0, 0.0, 0.0],
           (1, 0): [0.5, 0.5, 0.5, 0.5], (1, 1): [6.0, 0.0, 0.0, 0.0]}
    mask = {(0, 0): [1, 1, 0, 0], (0, 1): [1, 0, 0, 0], (1, 0): [1, 1, 1, 1], (1, 1): [1, 0, 0, 0]}
    local_tokens = {r: sum(sum(mask[r, m]) for m in range(2)) for r in range(2)}  # 3 and 5

    class TokenNLL(Objective):
        kind, unit = "sft", "tokens"

        def __init__(self, theta):
            self.theta = theta

        def units(self, batch):
            return batch["loss_mask"].sum().double()

        def __call__(self, model, reference, batch):
            value = L.sft_nll(-self.theta * batch["nll"], batch["loss_mask"]).sum()
            return value, {"loss": value.detach()}

    class Loader:
        seed = 0

        def __init__(self, batches):
            self.batches = iter(batches)

        def next(self):
            return next(self.batches)

        def load_state_dict(self, state):  # the trainer's probe copy is set up, never drawn from
            pass

    class RankStrategy:
        """Rank r of 2; the one collective of a step (the token count) returns both ranks' sum."""
        world_size, device = 2, torch.device("cpu")

        def __init__(self, rank):
            self.rank = rank

        def all_reduce(self, tensor, op="sum"):
            assert op == "sum" and float(tensor) == local_tokens[self.rank]
            return tensor.detach() + local_tokens[1 - self.rank]

    class Engine:
        def __init__(self):
            self.boundaries, self.calls = [], []

        def set_gradient_accumulation_boundary(self, flag):
            self.boundaries.append(flag)

        def backward(self, loss, scale_wrt_gas=True):
            assert scale_wrt_gas is False  # the trainer scales by W / N itself; DeepSpeed must not divide by G
            self.calls.append(float(loss))
            loss.backward()

        def step(self):
            pass

    grads, sums = [], []
    for rank in range(2):
        theta = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
        batches = [{"ids": [f"r{rank}m{m}"], "nll": t(*nll[rank, m]).unsqueeze(0),
                    "loss_mask": torch.tensor([mask[rank, m]]), "attention_mask": torch.tensor([mask[rank, m]])}
                   for m in range(2)]
        engine = Engine()
        task = Task(TokenNLL(theta), Loader(batches), None, micro_batch_size=1, grad_accum=2)
        trainer = Trainer(RankStrategy(rank), engine, None, {"sft": task}, Single("sft"),
                          TrainArgs(total_steps=1, save_path="/nonexistent"), logger=None)
        step_sums, units, _ = trainer.train_step({"sft": 1.0})
        assert float(units["sft"]) == 8 and engine.boundaries == [False, True]
        # each micro-step's loss is its summed NLL × W / N
        assert engine.calls == pytest.approx([sum(nll[rank, m]) * 2 / 8 for m in range(2)], abs=1e-12)
        grads.append(theta.grad.item())
        sums.append(float(step_sums["sft"]["loss"]))
    assert sum(grads) / 2 == pytest.approx(1.75, abs=1e-12)  # DeepSpeed's gradient all-reduce: mean over ranks
    assert sum(sums) / 8 == pytest.approx(1.75, abs=1e-12)   # the logged loss: summed over ranks / N


# ----------------------------------------------------------------------------- DPO / IPO

# B = 2 pairs shared by the DPO and IPO tests.
PC, PR = t(-1.0, -3.0), t(-2.0, -1.0)
RC, RR = t(-1.5, -2.0), t(-1.5, -2.0)
# h0 = (-1 - -2) - (-1.5 - -1.5) = 1
# h1 = (-3 - -1) - (-2 - -2)     = -2


def test_dpo_plain_matches_hand_formula():
    beta = 0.1
    losses, _, _ = L.dpo(PC, PR, RC, RR, beta)
    # -log sigma(x) = log(1 + exp(-x)); beta*h = [0.1, -0.2]
    close(losses, [math.log(1 + math.exp(-0.1)), math.log(1 + math.exp(0.2))])


def test_cdpo_zero_smoothing_is_plain_dpo_and_positive_smoothing_matches_hand():
    beta, eps = 0.1, 0.2
    plain, _, _ = L.dpo(PC, PR, RC, RR, beta)
    zero, _, _ = L.dpo(PC, PR, RC, RR, beta, label_smoothing=0.0)
    close(zero, plain, tol=0)
    smoothed, _, _ = L.dpo(PC, PR, RC, RR, beta, label_smoothing=eps)
    # -(1-eps) log sigma(bh) - eps log sigma(-bh), bh = [0.1, -0.2]
    expected = [
        0.8 * math.log(1 + math.exp(-0.1)) + 0.2 * math.log(1 + math.exp(0.1)),
        0.8 * math.log(1 + math.exp(0.2)) + 0.2 * math.log(1 + math.exp(-0.2)),
    ]
    close(smoothed, expected)


def test_dpo_rewards_are_beta_logratios_detached():
    pc = PC.clone().requires_grad_()
    _, chosen, rejected = L.dpo(pc, PR, RC, RR, 0.1)
    # chosen: 0.1 * (-1 - -1.5, -3 - -2) = [0.05, -0.1]
    # rejected: 0.1 * (-2 - -1.5, -1 - -2) = [-0.05, 0.1]
    close(chosen, [0.05, -0.1])
    close(rejected, [-0.05, 0.1])
    assert not chosen.requires_grad and not rejected.requires_grad


def test_ipo_and_simpo_rewards_are_detached():
    pc, pr = PC.clone().requires_grad_(), PR.clone().requires_grad_()
    losses, chosen, rejected = L.ipo(pc, pr, RC, RR, 0.1)
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad
    losses, chosen, rejected = L.simpo(pc, pr, t(2.0, 3.0), t(1.0, 4.0))
    assert losses.requires_grad and not chosen.requires_grad and not rejected.requires_grad


def test_ipo_on_summed_logps():
    losses, chosen, rejected = L.ipo(PC, PR, RC, RR, beta=0.1)
    # 1/(2*0.1) = 5: (1 - 5)^2 = 16, (-2 - 5)^2 = 49
    close(losses, [16.0, 49.0])
    close(chosen, [0.05, -0.1])
    close(rejected, [-0.05, 0.1])
    losses, _, _ = L.ipo(PC, PR, RC, RR, beta=0.5)
    # 1/(2*0.5) = 1: (1 - 1)^2 = 0, (-2 - 1)^2 = 9
    close(losses, [0.0, 9.0])


# ----------------------------------------------------------------------------- SLiC / SimPO


def test_slic_hinge_inactive_and_active():
    pc = t(-1.0, -5.0).requires_grad_()
    pr = t(-3.0, -4.5).requires_grad_()
    losses = L.slic(pc, pr, delta=1.0, lambda_reg=0.1)
    # row 0: max(0, 1 - (-1) + (-3)) = max(0, -1) = 0 (inactive); reg -0.1 * -1 = 0.1
    # row 1: max(0, 1 - (-5) + (-4.5)) = 1.5 (active);           reg -0.1 * -5 = 0.5
    close(losses, [0.1, 2.0])
    losses.sum().backward()
    close(pc.grad, [-0.1, -1.1])  # -lambda, and -1 - lambda where the hinge is active
    close(pr.grad, [0.0, 1.0])
    close(L.slic(pc, pr, delta=1.0), [0.0, 1.5])  # lambda_reg defaults to 0


def test_simpo_with_unequal_lengths():
    pc, pr = t(-6.0, -2.0), t(-4.0, -9.0)
    lc, lr = torch.tensor([3, 4]), torch.tensor([1, 3])
    losses, chosen, rejected = L.simpo(pc, pr, lc, lr, beta=2.0, gamma=0.5)
    # chosen rewards 2 * (-6/3, -2/4) = (-4, -1); rejected 2 * (-4/1, -9/3) = (-8, -6)
    close(chosen, [-4.0, -1.0])
    close(rejected, [-8.0, -6.0])
    # arguments: -4 + 8 - 0.5 = 3.5 and -1 + 6 - 0.5 = 4.5
    close(losses, [math.log(1 + math.exp(-3.5)), math.log(1 + math.exp(-4.5))])
    assert not chosen.requires_grad


# ----------------------------------------------------------------------------- KTO


def test_kto_mixed_batch_matches_hand():
    policy = t(-1.0, -2.0, -3.0)
    ref = t(-3.0, -0.5, -3.0)
    desirable = torch.tensor([True, False, True])
    # r = [2, -1.5, 0], z = 0.5, beta = 0.1, lambda_D = 1, lambda_U = 1.5
    losses, rewards = L.kto(policy, ref, desirable, torch.tensor(0.5, dtype=torch.float64),
                            beta=0.1, desirable_weight=1.0, undesirable_weight=1.5)
    expected = [
        1.0 * (1 - sig(0.1 * (2.0 - 0.5))),     # desirable: 1 - sigma(0.15)
        1.5 * (1 - sig(0.1 * (0.5 - -1.5))),    # undesirable: 1.5 (1 - sigma(0.2))
        1.0 * (1 - sig(0.1 * (0.0 - 0.5))),     # desirable: 1 - sigma(-0.05)
    ]
    close(losses, expected)
    close(rewards, [0.2, -0.15, 0.0])
    assert not rewards.requires_grad


def test_kto_negative_kl_is_clamped_to_zero_and_detached():
    policy = t(-1.0, -2.0, -3.0)
    ref = t(-3.0, -0.5, -3.0)
    desirable = torch.tensor([True, False, True])
    kl = torch.tensor(-0.3, dtype=torch.float64, requires_grad=True)
    clamped, _ = L.kto(policy, ref, desirable, kl, beta=0.1, undesirable_weight=1.5)
    at_zero, _ = L.kto(policy, ref, desirable, torch.tensor(0.0, dtype=torch.float64),
                       beta=0.1, undesirable_weight=1.5)
    close(clamped, at_zero, tol=0)
    # z = 0: [1 - sigma(0.2), 1.5 (1 - sigma(0.15)), 1 - sigma(0) = 0.5]
    close(clamped, [1 - sig(0.2), 1.5 * (1 - sig(0.15)), 0.5])
    assert not clamped.requires_grad  # no path back to kl


def test_kto_kl_is_mean_logratio_detached_unclamped():
    p = t(-2.0, -4.0, -1.0).requires_grad_()
    r = t(-3.0, -3.0, -1.5)
    kl = L.kto_kl(p, r)
    # diffs [1, -1, 0.5] -> mean 0.5 / 3
    assert kl.dim() == 0
    assert kl.item() == pytest.approx(0.5 / 3, abs=1e-12)
    assert not kl.requires_grad
    # a negative mean is returned as is (kto clamps after the all-reduce)
    assert L.kto_kl(t(-3.0, -2.0), t(-1.0, -2.0)).item() == pytest.approx(-1.0)  # (-2 + 0)/2


# ----------------------------------------------------------------------------- EXO


def test_exo_rw_reverse_kl_k3_by_hand():
    e = math.e
    beta, beta_r = 1.0, 2.0
    policy = t(1.0, 0.0, -1.0).unsqueeze(0)
    ref = t(0.0, 0.0, 0.0).unsqueeze(0)
    rewards = t(2.0, 0.0, 0.0).unsqueeze(0)
    # q = softmax(1 * [1, 0, -1]) = [e, 1, 1/e] / (e + 1 + 1/e)
    zq = e + 1 + 1 / e
    q = [e / zq, 1 / zq, (1 / e) / zq]
    # p = softmax([2, 0, 0] / 2) = [e, 1, 1] / (e + 2)
    zp = e + 2
    p = [e / zp, 1 / zp, 1 / zp]
    target = L.exo_rw_target(rewards, beta_r)
    close(target, [[math.log(pk) for pk in p]])
    kl = q[0] * math.log(q[0] / p[0]) + q[1] * math.log(q[1] / p[1]) + q[2] * math.log(q[2] / p[2])
    close(L.exo(policy, ref, target, beta), [kl])


def test_exo_pref_reverse_kl_k3_by_hand():
    # K = 3 with an explicit preference target p = [0.7, 0.2, 0.1], beta = 0.5.
    # Row 0: pi - rho = [2, 0, -2] -> beta * = [1, 0, -1]; row 1: policy == ref -> q uniform.
    e = math.e
    policy = t(0.0, -1.0, -2.0, -1.0, -1.0, -1.0).view(2, 3)
    ref = t(-2.0, -1.0, 0.0, -1.0, -1.0, -1.0).view(2, 3)
    p = [0.7, 0.2, 0.1]
    target = t(*[math.log(x) for x in p]).expand(2, 3)
    zq = e + 1 + 1 / e
    q0 = [e / zq, 1 / zq, (1 / e) / zq]
    kl0 = sum(qk * math.log(qk / pk) for qk, pk in zip(q0, p))
    # uniform q: (1/3)(log(1/3 / 0.7) + log(1/3 / 0.2) + log(1/3 / 0.1))
    kl1 = (math.log((1 / 3) / 0.7) + math.log((1 / 3) / 0.2) + math.log((1 / 3) / 0.1)) / 3
    close(L.exo(policy, ref, target, beta=0.5), [kl0, kl1])


def test_exo_pref_target_default_is_reference_minus_ten_log_weight():
    target = L.exo_pref_target(3, None, torch.float64, "cpu")
    assert target.shape == (3, 2) and target.dtype == torch.float64
    # log-weights [0, -10] normalised: subtract log(1 + e^-10)
    c = math.log(1 + math.exp(-10))
    close(target, [[-c, -10 - c]] * 3)

    # K = 2, beta = 0.5, pi - rho = [0.5, -0.5] -> beta*h = 0.5, q = [sigma(0.5), sigma(-0.5)]
    policy, ref = t(-1.0, -2.0).unsqueeze(0), t(-1.5, -1.5).unsqueeze(0)
    qc, qr = sig(0.5), sig(-0.5)
    pc, pr = 1 / (1 + math.exp(-10)), math.exp(-10) / (1 + math.exp(-10))
    expected = qc * math.log(qc / pc) + qr * math.log(qr / pr)
    loss = L.exo(policy, ref, target[:1], beta=0.5)
    close(loss, [expected])
    # the reference code's unnormalised form qc (log qc - 0) + qr (log qr + 10) is ours - c
    unnormalised = qc * math.log(qc) + qr * (math.log(qr) + 10)
    close(loss, [unnormalised + c])


def test_exo_pref_target_epsilon_variant():
    eps = 1e-3
    target = L.exo_pref_target(1, eps, torch.float64, None)
    close(target, [[math.log(1 - eps), math.log(eps)]])
    policy, ref = t(-1.0, -2.0).unsqueeze(0), t(-1.5, -1.5).unsqueeze(0)
    # EXO paper eq. 16 / TRL exo_pair: sigma(bh)(log sigma(bh) - log(1-eps))
    #                                 + sigma(-bh)(log sigma(-bh) - log eps), bh = 0.5
    qc, qr = sig(0.5), sig(-0.5)
    expected = qc * (math.log(qc) - math.log(1 - eps)) + qr * (math.log(qr) - math.log(eps))
    close(L.exo(policy, ref, target, beta=0.5), [expected])
    for bad in (0.0, 1.0, 1.5, -0.1):  # the check's own message, not a math domain error further on
        with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
            L.exo_pref_target(1, bad, torch.float64, None)


def test_dpo_forward_kl_k3_by_hand():
    e = math.e
    policy = t(1.0, 0.0, -1.0).unsqueeze(0)
    ref = t(0.0, 0.0, 0.0).unsqueeze(0)
    p = [0.5, 0.3, 0.2]
    target = t(*[math.log(x) for x in p]).unsqueeze(0)
    # log q = [1, 0, -1] - log(e + 1 + 1/e)
    lz = math.log(e + 1 + 1 / e)
    expected = -(0.5 * (1 - lz) + 0.3 * (0 - lz) + 0.2 * (-1 - lz))
    close(L.dpo_forward_kl(policy, ref, target, beta=1.0), [expected])


def test_dpo_forward_kl_k2_is_cdpo_and_dpo():
    # pairs of the DPO tests as [B, 2] (chosen first); beta h = [0.1, -0.2]
    policy = torch.stack([PC, PR], dim=1)
    ref = torch.stack([RC, RR], dim=1)
    cdpo = L.dpo_forward_kl(policy, ref, L.exo_pref_target(2, 0.2, torch.float64, None), 0.1)
    close(cdpo, [
        0.8 * math.log(1 + math.exp(-0.1)) + 0.2 * math.log(1 + math.exp(0.1)),
        0.8 * math.log(1 + math.exp(0.2)) + 0.2 * math.log(1 + math.exp(-0.2)),
    ])
    one_hot = t(0.0, -float("inf")).expand(2, 2)
    close(L.dpo_forward_kl(policy, ref, one_hot, 0.1),
          [math.log(1 + math.exp(-0.1)), math.log(1 + math.exp(0.2))])


# ----------------------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_sigmoid_equals_logexp_with_and_without_margin():
    sc, sr = t(1.0, -2.0), t(0.5, 1.0)
    # s_c - s_r = [0.5, -3]
    no_margin = [math.log(1 + math.exp(-0.5)), math.log(1 + math.exp(3))]
    # margin 1.0: [-0.5, -4]
    float_margin = [math.log(1 + math.exp(0.5)), math.log(1 + math.exp(4))]
    # margin [0.5, -1]: [0, -2]
    tensor_margin = [math.log(2), math.log(1 + math.exp(2))]
    for kind in ("sigmoid", "logexp"):
        close(L.bradley_terry(sc, sr, kind=kind), no_margin)
        close(L.bradley_terry(sc, sr, margin=1.0, kind=kind), float_margin)
        close(L.bradley_terry(sc, sr, margin=t(0.5, -1.0), kind=kind), tensor_margin)
    with pytest.raises(ValueError):
        L.bradley_terry(sc, sr, kind="hinge")


# ----------------------------------------------------------------------------- extremes


def test_gradients_finite_for_extreme_inputs():
    big = 1e4
    # float32 on purpose: the dtype a caller is most likely to pass
    pc = torch.tensor([big, -big], requires_grad=True)
    zeros = torch.zeros(2)

    losses, _, _ = L.dpo(pc, zeros, zeros, zeros, beta=1.0, label_smoothing=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
    # h = -1e4: 0.9 * -log sigma(-1e4) + 0.1 * -log sigma(1e4) ~ 0.9e4
    assert losses[1].item() == pytest.approx(0.9 * big, rel=1e-6)
    # d/dh at h = +1e4: -(0.9 sigma(-h)) + 0.1 sigma(h) ~ 0.1; at h = -1e4: ~ -0.9
    close(pc.grad, [0.1, -0.9], tol=1e-6)

    pc.grad = None
    losses, _ = L.kto(pc, zeros, torch.tensor([True, False]), torch.tensor(0.0), beta=1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
    close(losses, [0.0, 0.0], tol=1e-6)  # both far on the right side of the reference point

    pc.grad = None
    losses = L.bradley_terry(pc, zeros, kind="logexp") + L.bradley_terry(pc, zeros)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
    assert losses[1].item() == pytest.approx(2 * big, rel=1e-6)

    pc.grad = None
    policy = torch.stack([pc, -pc], dim=1)
    zeros2 = torch.zeros(2, 2)
    target = L.exo_pref_target(2, None, torch.float32, None)
    losses = L.exo(policy, zeros2, target, 1.0) + L.dpo_forward_kl(policy, zeros2, target, 1.0)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all()
