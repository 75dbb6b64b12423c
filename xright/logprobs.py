"""The one implementation of per-token and per-sequence log-probs.

Batches follow the collators' layout (``xright.data.collate``): ``input_ids``, ``attention_mask``
and ``loss_mask`` [N, T], where ``loss_mask[n, t]`` marks token t as a response token. Token t is
predicted from position t − 1, so the first position never carries a log-prob. Pairwise and
K-way batches put all K completions of every prompt in the N = K·B rows (row k·B + b is
completion k of example b), so chosen and rejected go through the model in one forward.

The packed layout (``collate(..., packed=True)``, ``--packing_samples``) holds the same N rows as
one padding-free row [1, L] with ``position_ids``, ``cu_seqlens`` and ``max_seqlen`` and no
``attention_mask``. Its forward passes the sequence boundaries explicitly (``cu_seq_lens_*``,
``max_length_*``: flash-attention-2's variable-length kernel and xright's per-sequence SDPA read
them; plain SDPA/eager fall back to transformers' block-diagonal mask built from the position ids)
and its log-probs are scattered back to [N, T−1], so callers get the same tensors from either layout.
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


def is_packed(batch: dict, prefix: str = "") -> bool:
    return prefix + "cu_seqlens" in batch


def model_inputs(batch: dict, prefix: str = "") -> dict:
    """Forward kwargs for either layout. ``use_cache=False`` always: with a cache transformers stops
    detecting the sequences of a packed row (and a training forward has no use for one)."""
    if not is_packed(batch, prefix):
        return {"input_ids": batch[prefix + "input_ids"], "attention_mask": batch[prefix + "attention_mask"],
                "use_cache": False}
    cu, longest = batch[prefix + "cu_seqlens"], batch[prefix + "max_seqlen"]
    return {"input_ids": batch[prefix + "input_ids"], "position_ids": batch[prefix + "position_ids"],
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest,
            "use_cache": False}


def unpack(values: torch.Tensor, batch: dict, prefix: str = "") -> torch.Tensor:
    """Per-target-token values of a packed row [1, L−1] → the padded layout's [N, T−1] (0 at pads).

    Target token j of the row (predicted at j−1) is token ``position_ids[j]`` of sequence n, i.e.
    column position − 1 of row n; each sequence's first token (position 0) has no prediction of its own
    and is dropped, as the padded layout's shift drops it.
    """
    cu = batch[prefix + "cu_seqlens"].to(values.device, torch.long)
    pos = batch[prefix + "position_ids"][0, 1:].to(values.device)
    seq = torch.searchsorted(cu[1:], torch.arange(1, pos.numel() + 1, device=values.device), right=True)
    keep = pos > 0
    out = values.new_zeros(cu.numel() - 1, batch[prefix + "max_seqlen"] - 1)
    return out.index_put((seq[keep], pos[keep] - 1), values[0, keep])


def token_logps(model, batch: dict, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of every target token and the response mask, both [N, T−1], from either layout."""
    inputs = model_inputs(batch, prefix)
    out = model(**inputs)
    logps = gather_logps(out.logits[:, :-1], inputs["input_ids"][:, 1:])
    mask = batch[prefix + "loss_mask"][:, 1:].to(logps.dtype)
    if is_packed(batch, prefix):
        logps, mask = unpack(logps, batch, prefix), unpack(mask, batch, prefix)
    return logps, mask


def num_tokens(batch: dict) -> torch.Tensor:
    """Real (non-pad) tokens of a micro-batch's main rows, in either layout (throughput logging)."""
    return batch["input_ids"].new_tensor(batch["input_ids"].numel()) if is_packed(batch) \
        else batch["attention_mask"].sum()


def sequence_logps(model, batch: dict, prefix: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-prob and response length per row: ([N], [N]).

    Divide the first by the second for the length-averaged variants (IPO-average, SimPO). For a packed
    row this is a segment sum of the row's token log-probs.
    """
    logps, mask = token_logps(model, batch, prefix)
    return (logps * mask).sum(-1), mask.sum(-1)


def split_choices(values: torch.Tensor, num_choices: int) -> torch.Tensor:
    """[K·B] in K-major row order → [B, K]."""
    return values.view(num_choices, -1).transpose(0, 1)
