"""Pure tensor loss functions: per-example losses, no model calls, no reduction over the batch (the
caller reduces: docs/DESIGN.md §4), no ``.item()``.

π and ρ are the policy's and the reference's log-probs of a whole response, summed over its tokens
unless a docstring says otherwise (``xright.logprobs`` computes them); B is the batch size, T the
sequence length, K the number of completions per prompt. log σ is ``F.logsigmoid``, log(1 + eˣ)
``F.softplus``: every loss and its gradient stay finite for |x| in the thousands. Inputs are used in
their own dtype (upcast bf16 before calling).
"""

import math

import torch
import torch.nn.functional as F


def sft_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the response tokens of each example (maximum-likelihood SFT).

    Shapes: token_logps [B, T] float, log p(target token); mask [B, T] bool / 0-1, 1 on response tokens;
    returns [B], −Σ_t mask[b, t]·token_logps[b, t]. A per-example *sum*: the caller divides by the
    response tokens of the whole optimizer step (docs/DESIGN.md §4). Masked positions are selected with
    ``torch.where``, not multiplied by 0, so a −inf log-prob at a padded position cannot become NaN.
    """
    return -torch.where(mask.bool(), token_logps, torch.zeros_like(token_logps)).sum(dim=-1)


def dpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor, beta: float, label_smoothing: float = 0.0):
    """Direct Preference Optimisation (Rafailov et al. 2023, eq. 7), with the label smoothing of Mitchell's
    note "A note on DPO with noisy preferences & relationship to IPO" (cDPO).

    Shapes: the four log-probs [B] (π, ρ of the chosen and rejected responses); returns (losses [B],
    chosen_rewards [B], rejected_rewards [B]). With h = (πc − πr) − (ρc − ρr) and ε = ``label_smoothing``:

        loss = −(1 − ε)·log σ(βh) − ε·log σ(−βh)

    the cross-entropy of σ(βh) against the soft label 1 − ε; ε = 0 is plain DPO. Not the "robust DPO" of
    Chowdhury et al. 2024 (TRL's ``loss_type="robust"``), which flips the sign of the ε term and divides by
    1 − 2ε. The implicit rewards β(π − ρ) are returned detached, for logging.
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h)
    if label_smoothing != 0.0:
        losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    return losses, *_implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def _implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """DPO's implicit rewards β(π − ρ) of the chosen and rejected responses, detached (for logging)."""
    return (beta * (policy_chosen - ref_chosen)).detach(), (beta * (policy_rejected - ref_rejected)).detach()


def ipo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
        ref_rejected: torch.Tensor, beta: float):
    """Identity Preference Optimisation (Azar et al. 2023, eq. 17, the empirical IPO loss; β is their τ).

    Shapes and rewards as ``dpo``.  h = (πc − πr) − (ρc − ρr);   loss = (h − 1/(2β))²

    Variant (chosen by the caller's inputs): log-probs *summed* over response tokens, as the DPO reference
    code (xright's default), or *averaged* (``--ipo_average``), as TRL and HALOs; the useful β differs.
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return losses, *_implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def slic(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, delta: float = 1.0,
         lambda_reg: float = 0.0) -> torch.Tensor:
    """SLiC-HF (Zhao et al. 2023, eq. 1): a rank calibration hinge plus an SFT regulariser, reference-free.

    Shapes: πc, πr [B] (summed, as the paper's sequence likelihood); returns losses [B]
    = max(0, δ − πc + πr) − λ_reg·πc. The regulariser's target y_ref is the chosen response (a pairwise
    record has no other SFT target); ``lambda_reg=0`` is the pure hinge.
    """
    return F.relu(delta - policy_chosen + policy_rejected) - lambda_reg * policy_chosen


def simpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_lengths: torch.Tensor,
          rejected_lengths: torch.Tensor, beta: float = 2.0, gamma: float = 0.5):
    """SimPO (Meng et al. 2024, eq. 6): reference-free and length-normalised.

    Shapes: πc, πr [B] summed; chosen_lengths, rejected_lengths [B] token counts |yc|, |yr|; returns
    (losses [B], chosen_rewards [B], rejected_rewards [B]).   loss = −log σ(β·πc/|yc| − β·πr/|yr| − γ)

    γ is the paper's absolute margin (SimPO's code takes γ/β as ``gamma_beta_ratio``, TRL's CPO trainer
    divides ``simpo_gamma`` by β inside the sigmoid: the same loss). Rewards β·π/|y|, detached.
    """
    chosen_rewards = beta * policy_chosen / chosen_lengths.to(policy_chosen.dtype)
    rejected_rewards = beta * policy_rejected / rejected_lengths.to(policy_rejected.dtype)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def kto(policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl: torch.Tensor,
        beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
    """Kahneman–Tversky Optimisation on unpaired desirable / undesirable completions (Ethayarajh et al. 2024,
    eq. 8: loss = λ_y − v(x, y)).

    Shapes: π, ρ [B]; desirable [B] bool; kl a scalar, the reference point (``kto_kl``); returns (losses [B],
    rewards [B]). With r = π − ρ and z = max(kl, 0), detached:

        desirable:    λ_D · (1 − σ(β(r − z)))        undesirable:  λ_U · (1 − σ(β(z − r)))

    1 − σ(x) is computed as σ(−x). z is detached and clamped here, as in the paper and the HALOs/TRL code,
    after the caller's mean over ranks. Rewards β·r, detached.
    """
    z = kl.detach().clamp(min=0)
    r = policy_logps - ref_logps
    desirable_losses = desirable_weight * torch.sigmoid(-beta * (r - z))
    undesirable_losses = undesirable_weight * torch.sigmoid(-beta * (z - r))
    losses = torch.where(desirable.bool(), desirable_losses, undesirable_losses)
    return losses, (beta * r).detach()


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z₀ of eq. 8, KL(π‖ρ), estimated as in the paper's code on the mismatched pairs
    (x_i, y_{i+1}) of the batch. Shapes: π, ρ of those pairs [B]; returns mean_b(π − ρ), a detached scalar.
    Not clamped: the caller averages it over ranks first and ``kto`` clamps the average (clamping per rank
    would bias it upward)."""
    return (policy_kl_logps - ref_kl_logps).mean().detach()


def exo(policy_logps: torch.Tensor, ref_logps: torch.Tensor, target_logprobs: torch.Tensor,
        beta: float) -> torch.Tensor:
    """EXO (Ji et al., ICML 2024, arXiv:2402.00856): the reverse KL from the policy's distribution over K
    completions to a target; for K = 2 and a preference target, the paper's eq. 16 (TRL's ``exo_pair``).

    Shapes: π, ρ [B, K]; target_logprobs [B, K], normalised finite log p (``exo_pref_target`` /
    ``exo_rw_target``, a detached constant); β is β_π; returns losses [B].

        log q = log_softmax_k(β(π_k − ρ_k));   loss = KL(q‖p) = Σ_k q_k (log q_k − log p_k)

    A p_k = 0 would make it infinite: the pairwise target keeps a small mass on the rejected answer.
    """
    log_q = F.log_softmax(beta * (policy_logps - ref_logps), dim=-1)
    log_p = target_logprobs.detach()
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1)


def dpo_forward_kl(policy_logps: torch.Tensor, ref_logps: torch.Tensor, target_logprobs: torch.Tensor,
                   beta: float) -> torch.Tensor:
    """EXO's forward-KL counterpart ("dpo-rw" / "dpo-pref" in the EXO paper and code): DPO for K completions,
    the cross-entropy of the target p and the policy's q. Shapes as ``exo``.

        log q = log_softmax_k(β(π_k − ρ_k));   loss = −Σ_k p_k log q_k

    KL(p‖q) minus the target's entropy, a constant. For K = 2 and p = [1 − ε, ε] it equals ``dpo`` with
    ``label_smoothing=ε`` (log q = [log σ(βh), log σ(−βh)]); p = [1, 0] is plain DPO.
    """
    log_q = F.log_softmax(beta * (policy_logps - ref_logps), dim=-1)
    p = target_logprobs.detach().exp()
    return -(p * log_q).sum(dim=-1)


def exo_pref_target(batch_size: int, epsilon: float | None = None, dtype: torch.dtype = torch.float32,
                    device: torch.device | str | None = None) -> torch.Tensor:
    """EXO's log target for pairwise data: [batch_size, 2], rows [log p_chosen, log p_rejected].

    ``epsilon=None``: the EXO reference code's (haozheji/exact-optimization, ``exact_loss`` in
    src/align_stage/loss.py, "exo-pref") log-weights 0 and −10, normalised here with log_softmax, so
    p ≈ [1 − 4.54e-5, 4.54e-5] and the loss is a proper KL (≥ 0, 0 at q = p); the reference code's loss is
    this one minus the constant log(1 + e⁻¹⁰), with the same gradients. A float ε in (0, 1): log p =
    [log(1 − ε), log ε], eq. 16 as TRL's ``loss_type="exo_pair"`` (ε = 1e-3 there). ε = 0 would make the
    reverse KL infinite.
    """
    if epsilon is None:
        row = F.log_softmax(torch.tensor([0.0, -10.0], dtype=torch.float64), dim=-1)  # the reference code's log-weights
    else:
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"EXO preference epsilon must be in (0, 1), got {epsilon}")
        row = torch.tensor([math.log1p(-epsilon), math.log(epsilon)], dtype=torch.float64)
    return row.to(dtype=dtype, device=device).expand(batch_size, 2).clone()


def exo_rw_target(rewards: torch.Tensor, beta_r: float) -> torch.Tensor:
    """EXO's / dpo-rw's log target from the rewards of K completions (Ji et al. 2024): p_k = softmax_k(r_k / β_r),
    the optimal policy of the rewards at temperature β_r. Shapes: rewards [B, K]; returns [B, K]."""
    return F.log_softmax(rewards / beta_r, dim=-1)


def bradley_terry(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin=None,
                  kind: str = "sigmoid") -> torch.Tensor:
    """Bradley–Terry reward-model loss (Ouyang et al. 2022, eq. 1), with the margin of Touvron et al. 2023, eq. 2.

    Shapes: s_c, s_r [B] reward-head scores; margin None, a float or [B], subtracted from s_c − s_r;
    returns losses [B]. ``kind`` "sigmoid": −log σ(s_c − s_r − m); "logexp": log(1 + exp(s_r − s_c + m))
    (OpenRLHF's LogExpLoss): the same function under OpenRLHF's two names.
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    if kind == "sigmoid":
        return -F.logsigmoid(diff)
    if kind == "logexp":
        return F.softplus(-diff)
    raise ValueError(f"unknown Bradley-Terry loss kind {kind!r}; expected 'sigmoid' or 'logexp'")
