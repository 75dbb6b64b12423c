"""Objectives: one class per kind of training signal, batch → (summed loss, summed metrics).

An objective returns *sums* over its normalisation units (response tokens for SFT, examples for
the preference losses) and reports how many units a micro-batch holds; the trainer divides by
the units of the whole optimizer step across ranks, so every loss is a true global mean however
the step is split into micro-batches and ranks (DESIGN.md §4). Facts the loop needs (data kind,
whether a reference model is needed) live here, never as ``if name == ...`` in the loop.
"""

from __future__ import annotations

from dataclasses import dataclass
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


class Objective:
    kind: str = ""                # data kind: sft | pairwise | binary | scored
    needs_reference: bool = False
    unit: str = "examples"        # what the loss is averaged over

    def units(self, batch: dict) -> torch.Tensor:
        return torch.tensor(float(len(batch["ids"])))

    def __call__(self, model, reference: Reference | None, batch: dict):
        raise NotImplementedError


class SFT(Objective):
    """Token-mean NLL of the responses; the prompt is masked (DESIGN.md §1 ``sft``)."""

    kind, unit = "sft", "tokens"

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


@dataclass
class PairLoss:
    """fn(params, π_c, π_r, ρ_c, ρ_r, |y_c|, |y_r|) → (losses, chosen_rewards, rejected_rewards)."""

    fn: Callable
    needs_reference: bool


def _ipo(p, pc, pr, rc, rr, lc, lr):
    if p.ipo_average:
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    return L.ipo(pc, pr, rc, rr, p.beta)


def _slic(p, pc, pr, rc, rr, lc, lr):
    return L.slic(pc, pr, p.slic_delta, p.slic_lambda), pc.detach(), pr.detach()


PAIR_LOSSES = {
    "dpo": PairLoss(lambda p, pc, pr, rc, rr, lc, lr: L.dpo(pc, pr, rc, rr, p.beta, p.label_smoothing), True),
    "ipo": PairLoss(_ipo, True),
    "slic": PairLoss(_slic, False),
    "simpo": PairLoss(lambda p, pc, pr, rc, rr, lc, lr: L.simpo(pc, pr, lc, lr, p.beta, p.simpo_gamma), False),
}


class Pairwise(Objective):
    """A pairwise preference loss (dpo, ipo, slic, simpo) on chosen/rejected in one forward."""

    kind = "pairwise"

    def __init__(self, loss: str = "dpo", params: PrefParams | None = None):
        if loss not in PAIR_LOSSES:
            raise ValueError(f"unknown pairwise loss {loss!r}; choose from {sorted(PAIR_LOSSES)}")
        self.loss, self.params = loss, params or PrefParams()
        self.needs_reference = PAIR_LOSSES[loss].needs_reference

    def __call__(self, model, reference, batch):
        pi, lengths = sequence_logps(model, batch)
        pi, lengths = split_choices(pi, 2), split_choices(lengths, 2)
        if self.needs_reference:
            rho = split_choices(reference.sequence_logps(batch)[0], 2)
        else:
            rho = torch.zeros_like(pi)
        losses, rc, rr = PAIR_LOSSES[self.loss].fn(
            self.params, pi[:, 0], pi[:, 1], rho[:, 0], rho[:, 1], lengths[:, 0], lengths[:, 1])
        total = losses.sum()
        return total, {
            "loss": total.detach(),
            "acc": (rc > rr).float().sum(),
            "reward_chosen": rc.sum(),
            "reward_rejected": rr.sum(),
            "margin": (rc - rr).sum(),
            "logp_chosen": pi[:, 0].detach().sum(),
            "logp_rejected": pi[:, 1].detach().sum(),
        }


OBJECTIVES = {
    "sft": SFT,
    "pairwise": Pairwise,
}
