"""Collation of tokenised examples into padded or packed tensors, and the per-objective cycling loader."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kinds import get_kind, responses


def collate(kind: str, examples: list[dict], pad_id: int, packed: bool = False) -> dict:
    """A micro-batch of tokenised examples -> tensors: right-padded rows, or with ``packed`` one
    padding-free row (:func:`pack`) holding the same sequences in the same order."""
    out = get_kind(kind).collate(examples, pad_id)
    return pack(out) if packed else out


def pack(batch: dict) -> dict:
    """A padded micro-batch -> the packed layout (docs/data.md): its N sequences concatenated into one row."""
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
    return len(example["prompt_ids"]) + max(len(r) for r in responses(example))


class CyclingLoader:
    """Endless micro-batches of one objective's data for one rank, from one global order of examples that does
    not depend on the rank count (the order, ``group_by_length`` and the global state: docs/data.md)."""

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
        # a memory-mapped table measures its rows from the Arrow offsets, without making each example
        self._lengths = None if not group_by_length else examples.lengths() if hasattr(examples, "lengths") else \
            [example_length(e) for e in examples]
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
        if not self.group_by_length:
            return order
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
