"""Objectives: batch → (loss summed over its units, summed metrics), with the facts the loop asks of them
(data kind, reference, flags) and the :data:`OBJECTIVES` registry (docs/DESIGN.md §1, §4, §5)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Callable

import torch

from xright import losses as L
from xright.logprobs import sequence_logps, split_choices, token_logps


class Reference:
    """Frozen reference log-probs: a separate model, or a LoRA policy with its adapters off."""

    def __init__(self, model=None, lora_policy=None):
        if (model is None) == (lora_policy is None):
            raise ValueError("give exactly one of model / lora_policy")
        self.model, self.lora_policy = model, lora_policy

    @torch.no_grad()
    def sequence_logps(self, batch: dict, prefix: str = ""):
        if self.model is not None:
            return sequence_logps(self.model, batch, prefix)
        from xright.models import adapters_disabled

        module = self.lora_policy.module if hasattr(self.lora_policy, "module") else self.lora_policy
        was_training = module.training
        module.eval()
        try:
            with adapters_disabled(module):
                return sequence_logps(self.lora_policy, batch, prefix)
        finally:
            module.train(was_training)


@dataclass(frozen=True)
class Flag:
    """A hyperparameter flag (``--name``). ``own``: one per objective in a joint run (``--dpo_beta``), else one
    for all objectives that read it. ``type`` None: the default's (a bool default makes a switch)."""

    name: str
    default: object = None
    help: str = ""
    own: bool = False
    type: Callable | None = None


REF_PRETRAIN = Flag("ref_pretrain", None, "reference model; default: --pretrain", type=str)
BETA = Flag("beta", 0.1, "β, the objective's temperature (EXO: the policy's β_π; SimPO: its reward scale, ≈ 2)",
            own=True)


class Objective:
    kind: str = ""                # data kind: sft | pairwise | binary | scored
    needs_reference: bool = False
    flags: tuple = ()             # the Flags build() reads
    defaults: dict = {}           # a loss's own defaults for its own flags (train_joint's --NAME_beta)
    # Mean over ranks, for an objective whose loss needs a collective (KTO's z): bind() takes it from the
    # strategy; the default suits one process (unit tests).
    reduce_mean: Callable = staticmethod(lambda t: t)
    min_micro_batch: int = 1
    # batch prefixes of reference rows that depend on the micro-batch's composition, so a table of
    # precomputed log-probs (xright.refcache) cannot hold them: they stay on a live reference
    live_reference_prefixes: tuple = ()

    @classmethod
    def build(cls, loss: str, get: Callable[[str], object]) -> "Objective":
        return cls()  # from its flags' values, get(flag name)

    def bind(self, strategy) -> None:
        """Take the collectives from the run's strategy (objectives import no deepspeed)."""
        self.reduce_mean = lambda t: strategy.all_reduce(t, op="mean")

    def check_data(self, examples: list) -> None:
        """Warn about training data this objective can use but should not (once the data is loaded)."""

    def check_micro_batch(self, micro_batch_size: int) -> None:
        """ValueError, saying why, when micro-batches of this size cannot be computed."""
        if micro_batch_size < self.min_micro_batch:
            raise ValueError(f"needs micro batch size >= {self.min_micro_batch}, got {micro_batch_size}")

    def units(self, batch: dict) -> torch.Tensor:
        return torch.tensor(float(len(batch["ids"])))

    def __call__(self, model, reference: Reference | None, batch: dict):
        raise NotImplementedError


class SFT(Objective):
    """Token-mean NLL of the responses; the prompt is masked (docs/DESIGN.md §1 ``sft``)."""

    kind = "sft"

    def units(self, batch):
        return batch["loss_mask"][:, 1:].sum().float()

    def __call__(self, model, reference, batch):
        logps, mask = token_logps(model, batch)
        nll = L.sft_nll(logps, mask).sum()
        return nll, {"loss": nll.detach()}


@dataclass
class PrefParams:
    beta: float = 0.1
    label_smoothing: float = 0.0
    ipo_average: bool = False
    slic_delta: float = 1.0
    slic_lambda: float = 0.0
    simpo_gamma: float = 0.5
    extra: dict = field(default_factory=dict)  # the values of a table entry's own flags (PairLoss.flags)


PAIR_FLAGS = (
    BETA, Flag("label_smoothing", PrefParams.label_smoothing, "conservative DPO ε"),
    Flag("ipo_average", PrefParams.ipo_average, "IPO on length-averaged log-probs (TRL/HALOs); default summed "
         "(DPO reference code)"),
    Flag("slic_delta", PrefParams.slic_delta, "SLiC hinge margin δ"),
    Flag("slic_lambda", PrefParams.slic_lambda, "SLiC weight of the chosen NLL regulariser"),
    Flag("simpo_gamma", PrefParams.simpo_gamma, "SimPO target margin γ (use --beta ≈ 2)"), REF_PRETRAIN)


@dataclass(frozen=True)
class PairLoss:
    """A pairwise loss in :data:`OBJECTIVES`: fn(params, π_c, π_r, ρ_c, ρ_r, |y_c|, |y_r|) → (losses,
    chosen_rewards, rejected_rewards). ``own_flags``: hyperparameters only this loss reads (in
    ``params.extra``); ``defaults``: its defaults for the per-objective flags (β) of a joint run."""

    fn: Callable
    needs_reference: bool
    own_flags: tuple = ()
    defaults: dict = field(default_factory=dict)

    @property
    def flags(self) -> tuple:
        return PAIR_FLAGS + self.own_flags

    def build(self, loss: str, get: Callable[[str], object]) -> "Pairwise":
        return Pairwise(loss, PrefParams(**{f.name: get(f.name) for f in fields(PrefParams) if f.name != "extra"},
                                         extra={f.name: get(f.name) for f in self.own_flags}))


def _ipo(p, pc, pr, rc, rr, lc, lr):
    if p.ipo_average:
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    return L.ipo(pc, pr, rc, rr, p.beta)


def _slic(p, pc, pr, rc, rr, lc, lr):
    return L.slic(pc, pr, p.slic_delta, p.slic_lambda), pc.detach(), pr.detach()


def pairwise_losses() -> list[str]:
    """The names of the pairwise losses registered in :data:`OBJECTIVES` (``--loss`` of train_dpo)."""
    return [name for name, entry in OBJECTIVES.items() if isinstance(entry, PairLoss)]


class Pairwise(Objective):
    """A pairwise preference loss (dpo, ipo, slic, simpo, …: :data:`OBJECTIVES`) on chosen/rejected in one forward."""

    kind = "pairwise"

    def __init__(self, loss: str = "dpo", params: PrefParams | None = None):
        if not isinstance(OBJECTIVES.get(loss), PairLoss):
            raise ValueError(f"unknown pairwise loss {loss!r}; choose from {sorted(pairwise_losses())}")
        self.loss, self.params, self.entry = loss, params or PrefParams(), OBJECTIVES[loss]
        self.needs_reference = self.entry.needs_reference

    def __call__(self, model, reference, batch):
        pi, lengths = sequence_logps(model, batch)
        pi, lengths = split_choices(pi, 2), split_choices(lengths, 2)
        if self.needs_reference:
            rho = split_choices(reference.sequence_logps(batch)[0], 2)
        else:
            rho = torch.zeros_like(pi)
        losses, rc, rr = self.entry.fn(self.params, pi[:, 0], pi[:, 1], rho[:, 0], rho[:, 1], lengths[:, 0],
                                       lengths[:, 1])
        total = losses.sum()
        return total, {"loss": total.detach(), "acc": (rc > rr).float().sum(), "reward_chosen": rc.sum(),
                       "reward_rejected": rr.sum(), "margin": (rc - rr).sum(),
                       "logp_chosen": pi[:, 0].detach().sum(), "logp_rejected": pi[:, 1].detach().sum()}


# ---- reward model ---------------------------------------------------------------------------

def reward_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar reward of each row, read at its last real token (the last 1 of ``attention_mask``): [N].

    HF's ``*ForSequenceClassification`` pools at the rightmost token other than ``pad_token_id``: with
    pad == eos (OpenRLHF's default) that skips the response's final eos, so the head's per-token output is
    captured with a hook and indexed by the mask. Where pad != eos both agree (the saved model's plain HF
    forward gives the same scores); where pad == eos, score a loaded model with this function.
    """
    # the head: HF's ``score`` (``classifier`` in some architectures); under LoRA the ``modules_to_save``
    # wrapper around it, i.e. the shortest match
    module = model.module if hasattr(model, "module") else model  # a DeepSpeed engine wraps the model
    heads = {n: m for n, m in module.named_modules() if n.rsplit(".", 1)[-1] in ("score", "classifier")}
    if not heads:
        raise ValueError(f"{type(module).__name__} has no 'score' or 'classifier' head: not a sequence-"
                         "classification model (load it with load_model(task='reward'))")
    captured = []
    handle = heads[min(heads, key=len)].register_forward_hook(lambda mod, args, out: captured.append(out))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    values = captured[-1]  # [N, T, 1]
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask.to(positions.dtype)).argmax(-1)
    return values[torch.arange(values.shape[0], device=values.device), last, 0]


class RewardModel(Objective):
    """Bradley–Terry reward model −log σ(s_c − s_r − m) on the head of a ``load_model(task="reward")`` model
    (:func:`reward_scores`). ``m``: the batch's per-pair ``margin`` with ``use_margin``; ``fp32`` upcasts the
    scores for the loss. ``reward_mean`` / ``reward_sq``: mean and second moment of all 2B scores (the saved
    normalisation)."""

    kind = "pairwise"

    def __init__(self, loss: str = "sigmoid", use_margin: bool = True, fp32: bool = False):
        if loss not in ("sigmoid", "logexp"):
            raise ValueError(f"unknown reward-model loss {loss!r}; choose sigmoid or logexp")
        self.loss, self.use_margin, self.fp32 = loss, use_margin, fp32

    def __call__(self, model, reference, batch):
        scores = reward_scores(model, batch["input_ids"], batch["attention_mask"])
        if self.fp32:
            scores = scores.float()
        scores = split_choices(scores, 2)
        sc, sr = scores[:, 0], scores[:, 1]
        margin = batch.get("margin") if self.use_margin else None
        total = L.bradley_terry(sc, sr, margin, self.loss).sum()
        sc, sr = sc.detach().float(), sr.detach().float()
        return total, {"loss": total.detach(), "acc": (sc > sr).float().sum(), "margin": (sc - sr).sum(),
                       "reward_chosen": sc.sum(), "reward_rejected": sr.sum(), "reward_mean": (sc + sr).sum() / 2,
                       "reward_sq": (sc ** 2 + sr ** 2).sum() / 2}


# ---- KTO --------------------------------------------------------------------------------------

KTO_MICRO_BATCH_ERROR = ("KTO needs micro batch size >= 2: its KL estimate pairs each prompt with the next "
                         "example's completion in the same micro-batch")


class KTO(Objective):
    """KTO on binary feedback (docs/DESIGN.md §1 ``kto``). z is ``losses.kto_kl`` on the collator's mismatched
    rows (x_i, y_{i+1}) of the micro-batch (policy forward without grad), averaged over ranks by
    ``reduce_mean`` before ``losses.kto`` clamps it; micro batch size 1 is refused."""

    kind, needs_reference, min_micro_batch = "binary", True, 2
    live_reference_prefixes = ("kl_",)  # (x_i, y_{i+1}) changes with every epoch's shuffle
    flags = (BETA, Flag("desirable_loss_weight", 1.0, "λ_D"), Flag("undesirable_loss_weight", 1.0, "λ_U"),
             REF_PRETRAIN)

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight

    @classmethod
    def build(cls, loss, get):
        return cls(get("beta"), get("desirable_loss_weight"), get("undesirable_loss_weight"))

    def check_data(self, examples):
        """The KTO paper advises λ_D·n_D / (λ_U·n_U) in [1, 4/3]; say so (rank 0) when outside."""
        n_d = sum(bool(e["label"]) for e in examples)
        n_u = len(examples) - n_d
        num, den = self.desirable_weight * n_d, self.undesirable_weight * n_u
        ratio = num / den if den else float("inf")
        if not 1.0 <= ratio <= 4 / 3 and os.environ.get("RANK", "0") == "0":
            print(f"warning: KTO: λ_D·n_D / (λ_U·n_U) = {self.desirable_weight}·{n_d} / "
                  f"({self.undesirable_weight}·{n_u}) = {ratio:.3f} is outside [1, 4/3], the range the KTO paper "
                  "advises; adjust --desirable_loss_weight / --undesirable_loss_weight", flush=True)

    def check_micro_batch(self, micro_batch_size: int) -> None:
        if micro_batch_size < self.min_micro_batch:
            raise ValueError(f"{KTO_MICRO_BATCH_ERROR} (got micro batch size {micro_batch_size})")

    def __call__(self, model, reference, batch):
        pi = sequence_logps(model, batch)[0]
        with torch.no_grad():
            pi_kl = sequence_logps(model, batch, "kl_")[0]
        rho = reference.sequence_logps(batch)[0]
        rho_kl = reference.sequence_logps(batch, "kl_")[0]
        z = self.reduce_mean(L.kto_kl(pi_kl, rho_kl))
        desirable = batch["label"]
        losses, rewards = L.kto(pi, rho, desirable, z, self.beta, self.desirable_weight, self.undesirable_weight)
        total = losses.sum()
        right = torch.where(desirable, rewards > self.beta * z.clamp(min=0), rewards < self.beta * z.clamp(min=0))
        return total, {
            "loss": total.detach(),
            "acc": right.float().sum(),           # reward on the side of z its label asks for
            "kl": z.detach() * len(desirable),     # the micro-batch's z (before the clamp), as a mean
            "reward": rewards.sum(),
            "logp": pi.detach().sum(),
        }


# ---- EXO ----------------------------------------------------------------------------------------

EXO_LOSSES = {"exo-pref": (L.exo, "pairwise"), "exo-rw": (L.exo, "scored"),  # name -> (loss function, data kind)
              "dpo-pref": (L.dpo_forward_kl, "pairwise"), "dpo-rw": (L.dpo_forward_kl, "scored")}


class EXO(Objective):
    """EXO (reverse KL) and its forward-KL DPO counterpart over the K completions of a prompt, all rows of one
    micro-batch (Ji et al. 2024). ``*-pref``: pairwise data, target ``losses.exo_pref_target(epsilon)``;
    ``*-rw``: scored data, target softmax(r / β_r). ``beta`` is β_π."""

    needs_reference = True
    flags = (BETA, Flag("beta_r", 1.0, "reward temperature β_r of the *-rw target softmax(r/β_r)"),
             Flag("exo_epsilon", None, "*-pref target [1−ε, ε]; default: the EXO reference code's log-weight −10 for "
                  "the rejected answer (p ≈ [1−4.5e-5, 4.5e-5]); TRL's exo_pair uses ε = 1e-3", type=float),
             REF_PRETRAIN)

    @classmethod
    def build(cls, loss, get):
        return cls(loss, get("beta"), get("beta_r"), get("exo_epsilon"))

    def __init__(self, loss: str = "exo-pref", beta: float = 0.1, beta_r: float = 1.0, epsilon: float | None = None):
        if loss not in EXO_LOSSES:
            raise ValueError(f"unknown EXO loss {loss!r}; choose from {sorted(EXO_LOSSES)}")
        if epsilon is not None:
            L.exo_pref_target(1, epsilon)  # validates ε now rather than at the first batch
        if beta_r <= 0:
            raise ValueError(f"beta_r must be > 0, got {beta_r}")
        self.loss, self.beta, self.beta_r, self.epsilon = loss, beta, beta_r, epsilon
        self.fn, self.kind = EXO_LOSSES[loss]

    def __call__(self, model, reference, batch):
        K = batch["num_choices"]
        pi = split_choices(sequence_logps(model, batch)[0], K)
        rho = split_choices(reference.sequence_logps(batch)[0], K)
        if self.kind == "pairwise":
            target = L.exo_pref_target(pi.shape[0], self.epsilon, dtype=pi.dtype, device=pi.device)
        elif "rewards" in batch:
            target = L.exo_rw_target(batch["rewards"].to(pi.dtype), self.beta_r)
        else:
            raise ValueError(f"{self.loss} needs rewards: scored records with a rewards field (examples {batch['ids']})")
        total = self.fn(pi, rho, target, self.beta).sum()
        implicit = (self.beta * (pi - rho)).detach()
        return total, {
            "loss": total.detach(),
            "acc": (implicit.argmax(-1) == target.argmax(-1)).float().sum(),  # policy's top = target's top
            "margin": (implicit.max(-1).values - implicit.min(-1).values).sum(),
            "logp": pi.detach().mean(-1).sum(),
        }


# ---- the registry: one plain name -> factory (.flags, .build(name, get)) ------------------------------

OBJECTIVES = {
    "sft": SFT,
    "dpo": PairLoss(lambda p, pc, pr, rc, rr, lc, lr: L.dpo(pc, pr, rc, rr, p.beta, p.label_smoothing), True),
    "ipo": PairLoss(_ipo, True),
    "slic": PairLoss(_slic, False),
    "simpo": PairLoss(lambda p, pc, pr, rc, rr, lc, lr: L.simpo(pc, pr, lc, lr, p.beta, p.simpo_gamma), False,
                      defaults={"beta": 2.0}),
    "kto": KTO,
    **{name: EXO for name in EXO_LOSSES},
}
