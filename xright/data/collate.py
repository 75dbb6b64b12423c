"""Collation of tokenised examples into padded or packed tensors, and the per-objective cycling loader."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _pad(pairs: list[tuple[list[int], list[int]]], pad_id: int, masks: list | None = None) -> dict:
    """Right-padded input_ids / attention_mask / loss_mask for (prompt_ids, response_ids) pairs.

    ``loss_mask[b, t]`` is True when token t is a response token (the model predicts it from
    position t-1; the log-prob code does the shift) that ``masks[b]`` (a 0/1 list over the response,
    multi-turn SFT) does not exclude.
    """
    T = max(len(p) + len(r) for p, r in pairs)
    B = len(pairs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    for b, (p, r) in enumerate(pairs):
        n = len(p) + len(r)
        input_ids[b, :n] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attention_mask[b, :n] = 1
        m = masks[b] if masks else None
        loss_mask[b, len(p):n] = True if m is None else torch.tensor(list(m), dtype=torch.bool)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def collate(kind: str, examples: list[dict], pad_id: int, packed: bool = False) -> dict:
    """A micro-batch of tokenised examples -> tensors: right-padded rows, or with ``packed`` one
    padding-free row (:func:`pack`) holding the same sequences in the same order."""
    out = _padded(kind, examples, pad_id)
    return pack(out) if packed else out


def pack(batch: dict) -> dict:
    """A padded micro-batch -> the packed layout: its N sequences concatenated into one row.

    For each prefix ("" and KTO's "kl_"), ``attention_mask`` [N,T] is replaced by ``position_ids``
    [1,L] (restarting at 0 per sequence), ``cu_seqlens`` [N+1] int32 (sequence n is row tokens
    cu[n]:cu[n+1]) and ``max_seqlen`` (int = T); ``input_ids`` / ``loss_mask`` become [1,L], L the
    number of real tokens. A sequence's first token is never scored (in the padded layout the shift
    drops it; in a packed row it would be "predicted" by the previous sequence), so its loss_mask is
    False. Every other field (ids, label, rewards, num_choices, margin) is unchanged.
    """
    out = dict(batch)
    for prefix in [k[: -len("attention_mask")] for k in batch if k.endswith("attention_mask")]:
        real = out.pop(prefix + "attention_mask").bool()
        lengths = real.sum(1)
        positions = torch.arange(real.shape[1]).expand_as(real)
        out[prefix + "input_ids"] = out[prefix + "input_ids"][real].unsqueeze(0)
        out[prefix + "loss_mask"] = (out[prefix + "loss_mask"] & (positions > 0))[real].unsqueeze(0)
        out[prefix + "position_ids"] = positions[real].unsqueeze(0)
        out[prefix + "cu_seqlens"] = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        out[prefix + "max_seqlen"] = int(lengths.max())
    return out


def example_length(example: dict) -> int:
    """Tokens of an example's longest row (prompt + its longest completion): its padded row length."""
    responses = example["responses"] if "responses" in example else [example["response_ids"]]
    return len(example["prompt_ids"]) + max(len(r) for r in responses)


def _padded(kind: str, examples: list[dict], pad_id: int) -> dict:
    """A micro-batch of tokenised examples -> tensors (right padding).

    sft / binary: ``input_ids`` [B,T] long, ``attention_mask`` [B,T] long, ``loss_mask`` [B,T]
    bool (response tokens incl. eos), ``ids`` list[str]. binary adds ``label`` [B] bool and the
    KTO mismatched pairs ``kl_input_ids`` / ``kl_attention_mask`` / ``kl_loss_mask`` built from
    (prompt_i, response_{(i+1) mod B}), the response cut on the right to the example's ``max_len``
    (binary examples carry it); it needs B >= 2.

    pairwise / scored: the K completions of each prompt laid out K-major, row ``k*B + b`` is
    completion k of example b (for pairs: rows [0,B) chosen, [B,2B) rejected), so one forward
    covers all. ``input_ids`` / ``attention_mask`` / ``loss_mask`` [K*B,T], ``ids`` (B),
    ``num_choices`` = K, ``rewards`` [B,K] float32 and ``margin`` [B] float32 when the examples
    have them (all or none).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    B = len(examples)
    ids = [e["id"] for e in examples]
    if kind in ("sft", "binary"):
        out = _pad([(e["prompt_ids"], e["response_ids"]) for e in examples], pad_id,
                   [e.get("response_mask") for e in examples])
        out["ids"] = ids
        if kind == "binary":
            if B < 2:
                raise ValueError("KTO needs micro batch size >= 2: its KL estimate pairs each prompt with "
                                 "the next example's completion in the same micro-batch")
            out["label"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
            # truncated as loading.tokenize truncates: the response cut on the right to fit max_len
            kl = _pad([(e["prompt_ids"], examples[(i + 1) % B]["response_ids"][: e.get("max_len", 1 << 62)
                                                                               - len(e["prompt_ids"])])
                       for i, e in enumerate(examples)], pad_id)
            out.update({f"kl_{k}": v for k, v in kl.items()})
        return out
    if kind in ("pairwise", "scored"):
        K = len(examples[0]["responses"])
        if any(len(e["responses"]) != K for e in examples):
            raise ValueError(f"all examples of a micro-batch must have the same number of completions; got "
                             f"{sorted({len(e['responses']) for e in examples})} in {ids}")
        out = _pad([(e["prompt_ids"], e["responses"][k]) for k in range(K) for e in examples], pad_id)
        out["ids"] = ids
        out["num_choices"] = K
        for key, shape in (("rewards", (B, K)), ("margin", (B,))):
            have = [key in e for e in examples]
            if any(have) and not all(have):
                raise ValueError(f"some examples of the micro-batch have {key!r} and some do not: {ids}")
            if all(have):
                out[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32).reshape(shape)
        return out
    raise ValueError(f"unknown data kind {kind!r}")


class CyclingLoader:
    """Endless micro-batches of one objective's data for one rank, from one global order of examples.

    The global order does not depend on the rank count: epoch e is the permutation
    ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))`` (identity when
    ``shuffle=False``) cut to a multiple of the optimizer step's examples, ``G = world_size ×
    micro_batch_size × accumulation`` (the global batch), so an epoch is ``n // G`` optimizer steps on any
    number of ranks. Optimizer step s takes the next G examples, ``order[s*G:(s+1)*G]``; its micro-step m
    takes the next ``world_size × micro_batch_size`` of them and rank r every world_size-th of those
    (``[r::world_size]``). Two runs with the same G therefore see the same examples at every step, whatever
    ``world_size × micro_batch_size × accumulation`` decomposition they use: their losses differ only by the
    order of summation. At the end of an epoch the loader moves on to the next one by itself: ``next()``
    never raises StopIteration.

    ``group_by_length``: the epoch's usable prefix is cut into windows of ``group_window`` global batches;
    each window is sorted by length (longest first, ties in the shuffled order) and cut into global batches,
    and the order of the epoch's global batches is then shuffled with the same generator. A micro-batch,
    a slice of a sorted global batch, holds examples of similar lengths (little padding); the order stays
    random and is a pure function of (seed, epoch, G).

    ``packed``: micro-batches come in the packed layout (:func:`pack`) instead of padded rows.

    ``epoch`` is the epoch of the last batch drawn and ``examples`` the number of its examples drawn by all
    ranks together: global counts, so :meth:`state_dict` means the same on any number of ranks and
    :meth:`load_state_dict` accepts it under another ``world_size × micro_batch_size`` at the same G (resume
    with the same ``group_by_length``: it changes what a position means).

    A loader over fewer than G examples is an error. (Evaluation does not use loaders: the trainer walks
    the eval set in a fixed order, see ``Trainer.evaluate``.)
    """

    def __init__(self, examples: list[dict], kind: str, micro_batch_size: int, pad_id: int, rank: int = 0,
                 world_size: int = 1, seed: int = 42, shuffle: bool = True, packed: bool = False,
                 group_by_length: bool = False, group_window: int = 64, accumulation: int = 1):
        if micro_batch_size < 1 or world_size < 1 or accumulation < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader geometry: micro_batch_size={micro_batch_size}, rank={rank}, "
                             f"world_size={world_size}, accumulation={accumulation}")
        if not examples:
            raise ValueError("CyclingLoader needs at least one example")
        self.examples, self.kind, self.mb, self.pad_id = examples, kind, micro_batch_size, pad_id
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.accumulation = accumulation
        self.packed, self.group_by_length, self.group_window = packed, group_by_length, group_window
        self._lengths = [example_length(e) for e in examples] if group_by_length else None
        self.epoch, self.position = 0, 0  # position: micro-batches of the epoch drawn by this rank
        self._cache: tuple[int, list[int]] | None = None
        self._check_size()

    @property
    def global_batch(self) -> int:
        """Examples per optimizer step over all ranks (G)."""
        return self.world_size * self.mb * self.accumulation

    def _check_size(self) -> None:
        need = self.global_batch
        if len(self.examples) < need:
            raise ValueError(f"{len(self.examples)} examples are fewer than one optimizer step's world_size × "
                             f"micro_batch_size × accumulation = {self.world_size} × {self.mb} × "
                             f"{self.accumulation} = {need}: use a smaller batch or more data")

    def _order(self, epoch: int) -> list[int]:
        """The epoch's usable examples in their global order."""
        n = len(self.examples)
        g = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        order = order[: n // self.global_batch * self.global_batch]
        return self._grouped(order, g) if self.group_by_length else order

    def _grouped(self, order: list[int], g: torch.Generator) -> list[int]:
        step = self.global_batch
        window = step * self.group_window
        batches = []
        for w in range(0, len(order), window):
            part = sorted(order[w:w + window], key=lambda i: -self._lengths[i])  # stable
            batches += [part[j:j + step] for j in range(0, len(part), step)]
        shuffled = torch.randperm(len(batches), generator=g).tolist() if self.shuffle else range(len(batches))
        return [i for b in shuffled for i in batches[b]]

    def _rank_indices(self, epoch: int) -> list[int]:
        # global micro-batch k is order[k*W*mb:(k+1)*W*mb]; this rank's share of it is [rank::W]
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._order(epoch)[self.rank::self.world_size])
        return self._cache[1]

    def collate(self, examples: list[dict]) -> dict:
        """A micro-batch of these examples in this loader's layout (the trainer's eval batches)."""
        return collate(self.kind, examples, self.pad_id, packed=self.packed)

    def __len__(self) -> int:
        """Micro-batches per rank per epoch (``accumulation`` × the epoch's optimizer steps)."""
        self._check_size()
        return len(self.examples) // self.global_batch * self.accumulation

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
        idx = self._rank_indices(self.epoch)[self.position * self.mb:(self.position + 1) * self.mb]
        self.position += 1
        return self.collate([self.examples[i] for i in idx])

    next = __next__

    def state_dict(self) -> dict:
        """Global counts: the epoch and how many of its examples all ranks together have drawn."""
        return {"epoch": self.epoch, "examples": self.position * self.world_size * self.mb, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        per_micro = self.world_size * self.mb
        if int(state["examples"]) % per_micro:
            raise ValueError(f"a loader position of {state['examples']} examples is not a whole number of "
                             f"micro-batches of world_size × micro_batch_size = {per_micro}")
        self.epoch, self.seed = int(state["epoch"]), int(state["seed"])
        self.position = int(state["examples"]) // per_micro
        self._cache = None
