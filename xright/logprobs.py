"""The one implementation of per-token and per-sequence log-probs.

Batches follow the collators' layout (``xright.data.collate``): ``input_ids``, ``attention_mask``
and ``loss_mask`` [N, T], where ``loss_mask[n, t]`` marks token t as a response token. Token t is
predicted from position t − 1, so the first position never carries a log-prob. Pairwise and
K-way batches put all K completions of every prompt in the N = K·B rows (row k·B + b is
completion k of example b), so chosen and rejected go through the model in one forward.
"""

from __future__ import annotations

import torch


def gather_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[targets] without materialising the full log-softmax.

    logits [N, T, V], targets [N, T] → [N, T] (float32).
    """
    logits = logits.float()
    picked = torch.gather(logits, -1, targets.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logps(model, batch: dict, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of every target token and the response mask, both [N, T−1]."""
    input_ids = batch[prefix + "input_ids"]
    out = model(input_ids=input_ids, attention_mask=batch[prefix + "attention_mask"], use_cache=False)
    logps = gather_logps(out.logits[:, :-1], input_ids[:, 1:])
    mask = batch[prefix + "loss_mask"][:, 1:].to(logps.dtype)
    return logps, mask


def sequence_logps(model, batch: dict, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-prob and response length per row: ([N], [N]).

    Divide the first by the second for the length-averaged variants (IPO-average, SimPO).
    """
    logps, mask = token_logps(model, batch, prefix)
    return (logps * mask).sum(-1), mask.sum(-1)


def split_choices(values: torch.Tensor, num_choices: int) -> torch.Tensor:
    """[K·B] in K-major row order → [B, K]."""
    return values.view(num_choices, -1).transpose(0, 1)
