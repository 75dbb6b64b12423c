"""Collation of tokenised examples into padded tensors, and the per-objective cycling loader."""

from __future__ import annotations

import torch


def _pad(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """Right-padded input_ids / attention_mask / loss_mask for (prompt_ids, response_ids) pairs.

    ``loss_mask[b, t]`` is True when token t is a response token (the model predicts it from
    position t-1; the log-prob code does the shift).
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
        loss_mask[b, len(p):n] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def collate(kind: str, examples: list[dict], pad_id: int) -> dict:
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
        out = _pad([(e["prompt_ids"], e["response_ids"]) for e in examples], pad_id)
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
    """Endless micro-batches of one objective's data for one rank.

    Epoch e uses the permutation ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))``
    (identity when ``shuffle=False``), the same on every rank. Its usable prefix is cut to a
    multiple of ``world_size * micro_batch_size``, so every rank has ``len(loader)`` micro-batches
    per epoch; rank r takes ``perm[:usable][r::world_size]`` in consecutive micro-batches. At the end
    of an epoch the loader moves on to the next one by itself: ``next()`` never raises StopIteration.

    ``epoch`` is the epoch of the last batch drawn and ``position`` the number of micro-batches drawn
    from it; :meth:`state_dict` / :meth:`load_state_dict` save and restore them exactly.

    A loader over fewer than ``world_size * micro_batch_size`` examples is an error. (Evaluation
    does not use loaders: the trainer walks the eval set in a fixed order, see ``Trainer.evaluate``.)
    """

    def __init__(self, examples: list[dict], kind: str, micro_batch_size: int, pad_id: int, rank: int = 0,
                 world_size: int = 1, seed: int = 42, shuffle: bool = True):
        if micro_batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad loader geometry: micro_batch_size={micro_batch_size}, rank={rank}, "
                             f"world_size={world_size}")
        if not examples:
            raise ValueError("CyclingLoader needs at least one example")
        self.examples, self.kind, self.mb, self.pad_id = examples, kind, micro_batch_size, pad_id
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._cache: tuple[int, list[int]] | None = None
        self._check_size()

    def _check_size(self) -> None:
        need = self.world_size * self.mb
        if len(self.examples) < need:
            raise ValueError(f"{len(self.examples)} examples are fewer than world_size × micro_batch_size = "
                             f"{self.world_size} × {self.mb} = {need}: every rank needs a full micro-batch; "
                             "use a smaller micro batch size or more data")

    def _order(self, epoch: int) -> list[int]:
        n = len(self.examples)
        if not self.shuffle:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def _rank_indices(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            usable = len(self) * self.world_size * self.mb
            self._cache = (epoch, self._order(epoch)[:usable][self.rank::self.world_size])
        return self._cache[1]

    def __len__(self) -> int:
        self._check_size()
        return len(self.examples) // (self.world_size * self.mb)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.position >= len(self):
            self.epoch += 1
            self.position = 0
        idx = self._rank_indices(self.epoch)[self.position * self.mb:(self.position + 1) * self.mb]
        self.position += 1
        return collate(self.kind, [self.examples[i] for i in idx], self.pad_id)

    next = __next__

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self.seed = int(state["epoch"]), int(state["position"]), int(state["seed"])
        self._cache = None
