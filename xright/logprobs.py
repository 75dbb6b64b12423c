"""The one implementation of per-token and per-sequence log-probs.

Batches follow the collators' layout (``xright.data.collate``): ``input_ids``, ``attention_mask`` and
``loss_mask`` [N, T] (response tokens); token t is predicted from position t − 1. K-way batches hold completion
k of example b in row k·B + b, so all K go through the model in one forward. The packed layout (one
padding-free row [1, L] with ``position_ids``, ``cu_seqlens``, ``max_seqlen``) passes the sequence boundaries
to the attention and its log-probs are scattered back to [N, T−1]: callers get the same tensors from either.
The log-probs come from the last hidden states and the output head in chunks of response tokens
(:func:`target_logps`): the ``[tokens, vocab]`` logits never exist whole, unless the head fails its check."""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

CHUNK_SIZE: int | None = None  # tokens per chunk of the output head; None: automatic; 0: the full path
LOGITS_BUDGET = 1 << 24  # floats in one chunk's logits when CHUNK_SIZE is None (64 MB in fp32)
say: Callable[[str], None] = print  # where the one-line fallback notices go (run() sets the rank-0 print)


@dataclass(frozen=True)
class Head:
    """A plain linear output head and what the model does to its logits: ``logits = cap·tanh(scale·(hWᵀ + b) / cap)``
    (``scale``: Cohere's ``logit_scale``, 1 / Granite's ``logits_scaling``; ``cap``: Gemma-2's
    ``final_logit_softcapping``, None without)."""

    module: torch.nn.Linear
    scale: float = 1.0
    cap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [M, H] → fp32 logits [M, V] (the matmul in the weight's dtype, as the model's own head)."""
        z = torch.nn.functional.linear(hidden, self.module.weight, self.module.bias).float()
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.cap is not None:
            z = (z / self.cap).tanh_().mul_(self.cap)
        return z


class _TargetLogps(torch.autograd.Function):
    """log softmax(head(hidden))[targets], chunk by chunk: keeps hidden, targets and one log-sum-exp per token,
    and recomputes each chunk's logits in the backward. Head gradients accumulate over chunks in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, head: Head, chunk: int):
        out = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        with torch.no_grad():
            for s in range(0, targets.numel(), chunk):
                z = head.logits(hidden[s:s + chunk])
                lse[s:s + chunk] = torch.logsumexp(z, -1)
                out[s:s + chunk] = z.gather(1, targets[s:s + chunk, None]).squeeze(1) - lse[s:s + chunk]
                del z
        ctx.save_for_backward(hidden, targets, lse)
        ctx.head, ctx.chunk = head, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, targets, lse = ctx.saved_tensors
        head, chunk = ctx.head, ctx.chunk
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        weight = head.module.weight
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = grad_b = None
        for s in range(0, targets.numel(), chunk):
            h, t, g = hidden[s:s + chunk], targets[s:s + chunk], grad_out[s:s + chunk].float()
            z = head.logits(h)
            # d logp / d z = onehot(t) − softmax(z); through the cap, dz/da = scale·(1 − (z/cap)²)
            dcap = (z / head.cap).square_().neg_().add_(1) if head.cap is not None else None
            gz = z.sub_(lse[s:s + chunk, None]).exp_().mul_(-g[:, None])
            gz.scatter_add_(1, t[:, None], g[:, None])
            if dcap is not None:
                gz.mul_(dcap)
                del dcap
            if head.scale != 1.0:
                gz.mul_(head.scale)
            ga = gz.to(weight.dtype)
            del z, gz
            if need_h:
                grad_h[s:s + chunk] = ga @ weight
            if need_w:  # in fp32 across chunks, without a [V, H] temporary in fp32
                if grad_w is None:
                    grad_w = (ga.t() @ h).float()
                elif ga.dtype == grad_w.dtype:
                    grad_w.addmm_(ga.t(), h)
                else:
                    grad_w.add_(ga.t() @ h)
            if need_b:
                grad_b = ga.float().sum(0) if grad_b is None else grad_b.add_(ga.float().sum(0))
            del ga
        if targets.numel() == 0:  # no response token: zero gradients, as the full path gives
            grad_w = torch.zeros_like(weight) if need_w else None
            grad_b = torch.zeros_like(head.module.bias) if need_b else None
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(weight.dtype), None, None, None)


def target_logps(hidden: torch.Tensor, targets: torch.Tensor, head: Head, chunk: int) -> torch.Tensor:
    """log p(targets) [M] (float32) from the last hidden states [M, H] and the output head, ``chunk`` tokens at a
    time: no [M, V] tensor exists, forward or backward. Gradients reach the hidden states and the head."""
    m = head.module
    return _call_as(m, lambda h: _TargetLogps.apply(h, m.weight, m.bias, targets, head, max(1, chunk)), hidden)


def _call_as(module: torch.nn.Module, forward: Callable, *args):
    """``module(*args)`` with ``forward`` in place of its forward, so that its hooks run around it: ZeRO-3 gathers
    the head's weight for the forward and for the backward (while the gradient reaches it), once per call."""
    saved = module.__dict__.get("forward")
    module.forward = forward
    try:
        return module(*args)
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def gather_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[targets] without the full log-softmax: [N, T, V], [N, T] → [N, T] (float32)."""
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
    """Per-target-token values of a packed row [1, L−1] → the padded layout's [N, T−1] (0 at pads): target j of
    the row is token ``position_ids[j]`` of its sequence n, column position − 1 of row n (positions 0 dropped)."""
    cu = batch[prefix + "cu_seqlens"].to(values.device, torch.long)
    pos = batch[prefix + "position_ids"][0, 1:].to(values.device)
    seq = torch.searchsorted(cu[1:], torch.arange(1, pos.numel() + 1, device=values.device), right=True)
    keep = pos > 0
    out = values.new_zeros(cu.numel() - 1, batch[prefix + "max_seqlen"] - 1)
    return out.index_put((seq[keep], pos[keep] - 1), values[0, keep])


def token_logps(model, batch: dict, prefix: str = "", chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the response tokens (0 elsewhere) and the response mask, both [N, T−1], from either layout;
    ``chunk_size``: tokens per chunk of the output head (default :data:`CHUNK_SIZE`; 0: the full logits)."""
    inputs = model_inputs(batch, prefix)
    targets = inputs["input_ids"][:, 1:]
    mask = batch[prefix + "loss_mask"][:, 1:]
    n = CHUNK_SIZE if chunk_size is None else chunk_size
    head = output_head(model) if n != 0 else None
    if head is None:
        logps = gather_logps(model(**inputs).logits[:, :-1], targets)
    else:
        # the model's own forward (a DeepSpeed engine's hooks see its outputs), its head applied to no position
        out = model(**inputs, output_hidden_states=True, logits_to_keep=targets.new_zeros(0))
        keep = mask.bool()
        chunk = n if n is not None else max(64, LOGITS_BUDGET // head.module.out_features)
        picked = target_logps(out.hidden_states[-1][:, :-1][keep], targets[keep], head, chunk)
        logps = picked.new_zeros(keep.shape).masked_scatter(keep, picked)
    mask = mask.to(logps.dtype)
    if is_packed(batch, prefix):
        logps, mask = unpack(logps, batch, prefix), unpack(mask, batch, prefix)
    return logps, mask


# model → its head's (scale, cap), or None (checked once). Not the Head itself: its module refers back to the
# model (ZeRO-3 links every submodule to its parent), which would keep a weak key alive forever
_HEADS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def output_head(model) -> Head | None:
    """The chunkable output head of ``model`` (a DeepSpeed engine, a peft model or a transformers model), or
    None when the full path must be taken (said once per model)."""
    module = getattr(model, "module", model)  # a DeepSpeed engine
    root = module.get_base_model() if hasattr(module, "get_base_model") else module  # peft
    if root not in _HEADS:
        head, why = _find_head(model, root)
        if why:
            say(f"xright: log-probs of {type(root).__name__} take the full [tokens, vocab] path: {why}")
        _HEADS[root] = None if head is None else (head.scale, head.cap)
    found = _HEADS[root]
    return None if found is None else Head(root.get_output_embeddings(), *found)


def _find_head(model, root) -> tuple[Head | None, str]:
    get = getattr(root, "get_output_embeddings", None)
    linear = get() if callable(get) else None
    if type(linear) is not torch.nn.Linear:  # a LoRA-adapted or quantised head, or none
        return None, f"its output head is {type(linear).__name__}, not a plain linear layer"
    config = root.config
    scale = getattr(root, "logit_scale", None)  # Cohere multiplies its logits by it
    scale = 1.0 if scale is None else scale
    if not isinstance(scale, (int, float)):
        return None, f"its logit_scale is a {type(scale).__name__}"
    if getattr(config, "logits_scaling", None):  # Granite divides by it
        scale = scale / config.logits_scaling
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma-2
    head = Head(linear, float(scale), float(cap) if cap else None)
    # the check: on a short fixed input (the same on every rank), the head must give the model's own logits
    ids = (torch.arange(1, 17, device=linear.weight.device) * 7919 % linear.out_features)[None]
    kw = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    try:
        with evaluating(root), torch.no_grad():
            full = model(**kw).logits[0].float()
            out = model(**kw, output_hidden_states=True, logits_to_keep=ids.new_zeros(0))
            if out.logits is not None and out.logits.numel():
                return None, "its forward ignores logits_to_keep"
            if not out.hidden_states:
                return None, "its forward returns no hidden states"
            ours = _call_as(linear, head.logits, out.hidden_states[-1][0])
    except (TypeError, ValueError, AttributeError, IndexError) as e:
        return None, f"its forward refuses (output_hidden_states, logits_to_keep): {e}"
    tol = 1e-4 if linear.weight.dtype == torch.float32 else 3e-2  # relative; bf16 logits carry 8 bits
    err = (ours - full).abs().max().item() if ours.shape == full.shape else float("inf")
    if not err <= tol * full.abs().max().clamp_min(1.0).item():
        return None, f"its logits are not scale·cap·tanh(head(last hidden state)/cap) (max difference {err:.3g})"
    return head, ""


@contextlib.contextmanager
def evaluating(model):
    """``model`` in eval mode inside, each submodule's own mode restored after (the probes run mid-training)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def num_tokens(batch: dict) -> torch.Tensor:
    """Real (non-pad) tokens of a micro-batch's main rows, in either layout (throughput logging)."""
    return batch["input_ids"].new_tensor(batch["input_ids"].numel()) if is_packed(batch) \
        else batch["attention_mask"].sum()


def sequence_logps(model, batch: dict, prefix: str = "", chunk_size: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-prob and response length per row: ([N], [N]) (their ratio: IPO-average, SimPO)."""
    logps, mask = token_logps(model, batch, prefix, chunk_size)
    return (logps * mask).sum(-1), mask.sum(-1)


def split_choices(values: torch.Tensor, num_choices: int) -> torch.Tensor:
    """[K·B] in K-major row order → [B, K]."""
    return values.view(num_choices, -1).transpose(0, 1)
