"""The one no-grad pass sharded over ranks (plan, shard, run, ordered gather; docs/DESIGN.md): generation,
scoring, the reference log-prob table and evaluation. The plan is the same on every rank whatever their number,
so are the padding and the per-batch seeds; ``synced``: every rank makes the same number of (ZeRO-3 collective)
calls."""

from __future__ import annotations

import math

import torch


def plan_batches(lengths: list[int], micro_batch_size: int, groups: list | None = None) -> list[list[int]]:
    """Indices in batches of at most ``micro_batch_size``, sorted by (group, length, index); a batch holds one
    group. Depends only on the lengths (not on ranks)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro batch size must be >= 1, got {micro_batch_size}")
    groups = groups or [0] * len(lengths)
    out: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: (groups[i], lengths[i], i)):
        if not out or len(out[-1]) == micro_batch_size or groups[out[-1][0]] != groups[i]:
            out.append([])
        out[-1].append(i)
    return out


def rank_batches(batches: list[list[int]], rank: int, world_size: int, synced: bool,
                 filler: int = 0) -> list[tuple[int, list[int], bool]]:
    """(batch index, indices, real?) this rank computes; synced, a rank short of batches repeats batch ``filler``
    (not real: its result is discarded)."""
    mine = [(j, b, True) for j, b in enumerate(batches) if j % world_size == rank]
    if synced and batches:
        mine += [(filler, batches[filler], False)] * (math.ceil(len(batches) / world_size) - len(mine))
    return mine


@torch.no_grad()
def run_pass(compute, batches: list[list[int]], rank: int = 0, world_size: int = 1, synced: bool = True,
             filler: int = 0, model=None):
    """Yield ``(j, indices, compute(j, indices))`` for each real batch of this rank, ``model`` (if given) in eval
    mode meanwhile."""
    training = model is not None and model.training
    if model is not None:
        model.eval()
    try:
        for j, idx, real in rank_batches(batches, rank, world_size, synced, filler):
            out = compute(j, idx)
            if real:
                yield j, idx, out
    finally:
        if model is not None:
            model.train(training)


def gather_ordered(local: dict[int, object], n: int, all_gather_object) -> list:
    """Every rank's ``{index: result}`` merged into one list in input order (on every rank)."""
    merged: dict[int, object] = {}
    for part in all_gather_object(local):
        merged.update(part)
    missing = [i for i in range(n) if i not in merged]
    if missing:
        raise RuntimeError(f"gather: results for {len(missing)} of {n} inputs missing (first {missing[:5]})")
    return [merged[i] for i in range(n)]
