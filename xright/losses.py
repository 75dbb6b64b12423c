"""Pure tensor loss functions for xright.

Every function here is a pure function of tensors: no model calls, no reductions over the
batch (the caller reduces; see docs/DESIGN.md section 4 for how per-example losses and the SFT
token mean are scaled under DeepSpeed), no ``.item()``.

Notation (docs/DESIGN.md section 1): π = policy log-prob, ρ = reference log-prob of a whole
response, i.e. the sum of its token log-probs unless a docstring says otherwise (computing
those sums/means is ``xright.logprobs``' job, not this module's). B is the batch size,
T the sequence length, K the number of completions per prompt.

Numerics: log σ(x) is always ``F.logsigmoid``, log(1 + eˣ) is ``F.softplus`` and log-softmax
is ``F.log_softmax``, so every loss and its gradient stays finite for |x| in the thousands.
Inputs are used in their own dtype; upcast to float32 before calling if they are bf16.
"""

import math

import torch
import torch.nn.functional as F

__all__ = [
    "sft_nll",
    "dpo",
    "ipo",
    "slic",
    "simpo",
    "kto",
    "kto_kl",
    "exo",
    "dpo_forward_kl",
    "exo_pref_target",
    "exo_rw_target",
    "bradley_terry",
]

# The EXO reference code's log-weight for the dispreferred answer of a pair.
_EXO_LOG_EPSILON = -10.0


def sft_nll(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the response tokens of each example.

    Shapes:
        token_logps: [B, T] float, log p(target token) at each position.
        mask:        [B, T] bool / 0-1 int / 0-1 float; 1 on response tokens, 0 on prompt
                     and padding.
        returns:     [B] float, -Σ_t mask[b, t] · token_logps[b, t].

    Standard maximum-likelihood SFT. The result is a per-example *sum*, not a mean: the SFT
    objective (docs/DESIGN.md section 1) is the token mean over all N response tokens of one
    optimizer step across all ranks and accumulation steps, so the caller divides the sum of
    these values by that global N (under DeepSpeed: each micro-step loss is
    Σ_b sft_nll × W × G / N, because backward divides by G and the gradient all-reduce by W).
    Dividing each micro-batch by its own token count instead would give a mean of
    per-micro-batch means, which weights tokens unequally when micro-batches differ in length.

    Masked positions are selected with ``torch.where`` rather than multiplied by 0, so a
    -inf log-prob at a padded position cannot turn into NaN.
    """
    keep = mask.bool()
    return -torch.where(keep, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)


def dpo(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
):
    """Direct Preference Optimisation, with conservative-DPO label smoothing.

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
    Reward Model", eq. 7; label smoothing as in Mitchell's note "A note on DPO with noisy
    preferences & relationship to IPO" (cDPO).

    Shapes:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: [B] summed log-probs of
            the chosen / rejected responses under the policy (π) and the reference (ρ).
        returns: (losses [B], chosen_rewards [B], rejected_rewards [B]).

    With h = (πc − πr) − (ρc − ρr) and ε = ``label_smoothing``:

        loss = −(1 − ε)·log σ(βh) − ε·log σ(−βh)

    i.e. binary cross-entropy of σ(βh) against the soft label 1 − ε; ε = 0 is plain DPO.
    Variant choice: this is cDPO, *not* the "robust DPO" of Chowdhury et al. 2024 (TRL's
    ``loss_type="robust"``), which flips the sign of the ε term and divides by 1 − 2ε.

    Implicit rewards β(π − ρ) are returned detached, for logging (reward accuracy, margins).
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
    """Identity Preference Optimisation (IPO).

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17 (the empirical IPO loss; β here is the paper's τ).

    Shapes:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: [B] sequence log-probs.
        returns: (losses [B], chosen_rewards [B], rejected_rewards [B]).

        h = (πc − πr) − (ρc − ρr);   loss = (h − 1/(2β))²

    Variant choice (made by the caller through its inputs, not here): the DPO reference
    code and xright's default pass log-probs *summed* over response tokens; with
    ``--ipo_average`` the caller passes log-probs *averaged* over response tokens, as TRL and
    HALOs do. The two differ by a per-sequence length factor, so the useful β differs too.

    Rewards β(π − ρ) are returned detached for logging, as in ``dpo``.
    """
    h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    return losses, *_implicit_rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)


def slic(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    delta: float = 1.0,
    lambda_reg: float = 0.0,
) -> torch.Tensor:
    """SLiC-HF: rank calibration hinge plus an SFT regulariser (reference-free).

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    eq. 1:  max(0, δ − log P(y⁺|x) + log P(y⁻|x)) − λ log P(y_ref|x).

    Shapes:
        policy_chosen, policy_rejected: [B] summed log-probs πc, πr under the policy.
        returns: losses [B] = max(0, δ − πc + πr) − λ_reg·πc.

    Variant choice: the regularisation target y_ref is the chosen response, because a
    pairwise record carries no separate SFT target (the paper allows one).
    ``lambda_reg=0`` gives the pure calibration hinge. Log-probs are
    summed, as in the paper (sequence likelihood).
    """
    return F.relu(delta - policy_chosen + policy_rejected) - lambda_reg * policy_chosen


def simpo(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, chosen_lengths: torch.Tensor,
          rejected_lengths: torch.Tensor, beta: float = 2.0, gamma: float = 0.5):
    """Simple Preference Optimisation (SimPO), reference-free and length-normalised.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    eq. 6.

    Shapes:
        policy_chosen, policy_rejected: [B] log-probs *summed* over response tokens.
        chosen_lengths, rejected_lengths: [B] response token counts |yc|, |yr| (int or float).
        returns: (losses [B], chosen_rewards [B], rejected_rewards [B]).

        loss = −log σ(β·πc/|yc| − β·πr/|yr| − γ)

    γ is the absolute target margin of the paper's equation. (SimPO's code takes
    ``gamma_beta_ratio`` = γ/β and TRL's CPO trainer divides ``simpo_gamma`` by β inside the
    sigmoid argument; both give the same loss for the same γ.) Rewards β·π/|y| are returned
    detached.
    """
    chosen_rewards = beta * policy_chosen / chosen_lengths.to(policy_chosen.dtype)
    rejected_rewards = beta * policy_rejected / rejected_lengths.to(policy_rejected.dtype)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return losses, chosen_rewards.detach(), rejected_rewards.detach()


def kto(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
):
    """Kahneman–Tversky Optimisation (KTO) on unpaired desirable/undesirable completions.

    Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", eq. 8
    (loss = λ_y − v(x, y)).

    Shapes:
        policy_logps, ref_logps: [B] summed log-probs π, ρ of each completion.
        desirable: [B] bool, True for a desirable completion.
        kl: scalar tensor, the reference point z (an estimate of KL(π‖ρ), see ``kto_kl``).
        returns: (losses [B], rewards [B]).

    With r = π − ρ and z = max(kl, 0), detached:

        desirable:    λ_D · (1 − σ(β(r − z)))
        undesirable:  λ_U · (1 − σ(β(z − r)))

    1 − σ(x) is computed as σ(−x), which is exact and stable. Variant choices: z is detached
    and clamped at 0 here, as in the paper and the HALOs/TRL code; the caller estimates it
    from mismatched pairs (x_i, y_{i+1}) of the same micro-batch and averages it over ranks
    *before* passing it in (the clamp comes after the average). Rewards β·r are returned
    detached for logging.
    """
    z = kl.detach().clamp(min=0)
    r = policy_logps - ref_logps
    desirable_losses = desirable_weight * torch.sigmoid(-beta * (r - z))
    undesirable_losses = undesirable_weight * torch.sigmoid(-beta * (z - r))
    losses = torch.where(desirable.bool(), desirable_losses, undesirable_losses)
    return losses, (beta * r).detach()


def kto_kl(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO reference point: mean log-ratio on mismatched completions, detached.

    Ethayarajh et al. 2024, the reference point z₀ of eq. 8, KL(π‖ρ), estimated as in their
    code on pairs (x_i, y_j) whose completion belongs to another prompt of the batch.

    Shapes:
        policy_kl_logps, ref_kl_logps: [B] summed log-probs of the mismatched completions
            (x_i, y_{i+1}) under the policy and the reference.
        returns: scalar tensor, mean_b(π − ρ), detached.

    Not clamped here: the caller all-reduces (averages) it over ranks first, then ``kto``
    clamps the average at 0. Clamping per rank would bias the estimate upward.
    """
    return (policy_kl_logps - ref_kl_logps).mean().detach()


def exo(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    target_logprobs: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Efficient Exact Optimisation (EXO): reverse KL between policy and target distributions.

    Ji et al., ICML 2024, "Towards Efficient and Exact Optimization of Language Model
    Alignment" (arXiv:2402.00856): the EXO loss over K completions per prompt; for K = 2
    with a preference target it is the paper's eq. 16 (the equation TRL's ``exo_pair``
    implements).

    Shapes:
        policy_logps, ref_logps: [B, K] summed log-probs of K completions of each prompt.
        target_logprobs: [B, K] log p of the target distribution over the K completions
            (``exo_pref_target`` or ``exo_rw_target``); rows must be normalised and finite.
        beta: β_π, the policy-side temperature.
        returns: losses [B].

        log q = log_softmax_k(β(π_k − ρ_k));   loss = KL(q‖p) = Σ_k q_k (log q_k − log p_k)

    The target is a constant (detached). A target with p_k = 0 makes the reverse KL infinite,
    which is why the pairwise target keeps a small mass on the rejected answer.
    """
    log_q = F.log_softmax(beta * (policy_logps - ref_logps), dim=-1)
    log_p = target_logprobs.detach()
    return (log_q.exp() * (log_q - log_p)).sum(dim=-1)


def dpo_forward_kl(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    target_logprobs: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Forward-KL counterpart of EXO ("dpo-rw" / "dpo-pref" in the EXO paper and code).

    Ji et al., ICML 2024 (arXiv:2402.00856): DPO generalised to K completions is the cross
    entropy between the target p and the policy's softmax q.

    Shapes: as ``exo``; returns losses [B].

        log q = log_softmax_k(β(π_k − ρ_k));   loss = −Σ_k p_k log q_k

    This differs from KL(p‖q) by the target's entropy, a constant. For K = 2 and
    p = [1 − ε, ε] it equals cDPO (``dpo`` with ``label_smoothing=ε``), since
    log q_chosen = log σ(βh) and log q_rejected = log σ(−βh); with p = [1, 0] (log-probs
    [0, −inf]) it is plain DPO. The target is a constant (detached).
    """
    log_q = F.log_softmax(beta * (policy_logps - ref_logps), dim=-1)
    p = target_logprobs.detach().exp()
    return -(p * log_q).sum(dim=-1)


def exo_pref_target(
    batch_size: int,
    epsilon: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Log target distribution for pairwise preference data (chosen first), for EXO.

    Shapes: returns [batch_size, 2], each row log p = [log p_chosen, log p_rejected].

    ``epsilon=None`` (default) follows the EXO reference code (github haozheji/
    exact-optimization, ``exact_loss`` in src/align_stage/loss.py, loss_type "exo-pref"):
    it gives the preferred answer a log-weight of 0 and the other one ``log_epsilon = -10``.
    Here those log-weights are normalised with log_softmax, so p = [1/(1+e⁻¹⁰), e⁻¹⁰/(1+e⁻¹⁰)]
    ≈ [1 − 4.54e-5, 4.54e-5] and the loss is a proper KL (≥ 0, zero at q = p). The reference
    code uses the unnormalised [0, −10] directly as log p, so its loss equals this one minus
    the constant log(1 + e⁻¹⁰) ≈ 4.54e-5, with identical gradients. (It also orders the pair
    by its labels; here the chosen answer is always column 0.)

    A float ``epsilon`` in (0, 1) gives log p = [log(1 − ε), log ε], the form of the paper's
    pairwise eq. 16 as implemented by TRL's ``loss_type="exo_pair"`` (which uses ε = 1e-3
    when ``label_smoothing`` is 0). ε = 0 is rejected: the reverse KL would be infinite.
    """
    if epsilon is None:
        weights = torch.tensor([0.0, _EXO_LOG_EPSILON], dtype=torch.float64)
        row = F.log_softmax(weights, dim=-1)
    else:
        if not 0.0 < epsilon < 1.0:
            raise ValueError(f"EXO preference epsilon must be in (0, 1), got {epsilon}")
        row = torch.tensor([math.log1p(-epsilon), math.log(epsilon)], dtype=torch.float64)
    return row.to(dtype=dtype, device=device).expand(batch_size, 2).clone()


def exo_rw_target(rewards: torch.Tensor, beta_r: float) -> torch.Tensor:
    """Log target distribution from scalar rewards of K completions, for EXO / dpo-rw.

    Ji et al., ICML 2024: p_k = softmax_k(r_k / β_r), the reward model's optimal-policy
    distribution over the K completions at temperature β_r (``beta_r`` in the reference
    code's scripts).

    Shapes: rewards [B, K] float; returns [B, K] = log_softmax_k(r / β_r).
    """
    return F.log_softmax(rewards / beta_r, dim=-1)


def bradley_terry(
    chosen_scores: torch.Tensor,
    rejected_scores: torch.Tensor,
    margin=None,
    kind: str = "sigmoid",
) -> torch.Tensor:
    """Bradley–Terry pairwise reward-model loss.

    Bradley & Terry 1952; as the reward-model loss of Ouyang et al. 2022 (InstructGPT) eq. 1,
    with the optional margin of Touvron et al. 2023 (Llama 2) eq. 2.

    Shapes:
        chosen_scores, rejected_scores: [B] scalar reward-head outputs s_c, s_r.
        margin: None, a float, or [B] tensor m (subtracted from s_c − s_r).
        kind: "sigmoid" → −log σ(s_c − s_r − m); "logexp" → log(1 + exp(s_r − s_c + m))
              (OpenRLHF's LogExpLoss). The two are the same function; both names are
              accepted so OpenRLHF-style flags map across. Both use stable primitives
              (logsigmoid / softplus).
        returns: losses [B].
    """
    diff = chosen_scores - rejected_scores
    if margin is not None:
        diff = diff - margin
    if kind == "sigmoid":
        return -F.logsigmoid(diff)
    if kind == "logexp":
        return F.softplus(-diff)
    raise ValueError(f"unknown Bradley-Terry loss kind {kind!r}; expected 'sigmoid' or 'logexp'")
