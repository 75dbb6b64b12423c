"""Data kinds: each kind defined once, a :class:`DataKind` registered by name in :data:`KINDS`: validation of
its records, the answers to tokenise, the extra fields (and stored columns) of its examples, its batch layout
and its built-in records. Layouts and fields: docs/data.md.
"""

from __future__ import annotations

import random

import torch

from . import synthetic
from .records import (BadRecord, chat_prompt, conversation, get_field, is_hh, number, of_type, pair,
                      prompt_and_answers, short, text_field)


def pad(pairs: list[tuple[list[int], list[int]]], pad_id: int, masks: list | None = None) -> dict:
    """Right-padded input_ids / attention_mask / loss_mask for (prompt_ids, response_ids) pairs; ``loss_mask``
    marks the response tokens (the log-prob code shifts) that ``masks[b]`` (0/1 over the response) keeps."""
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


def responses(example: dict) -> list:
    """A tokenised example's completions: K for pairwise/scored, 1 otherwise."""
    return example["responses"] if "responses" in example else [example["response_ids"]]


class DataKind:
    """One kind of data. A subclass defines ``records(rec, rid, spec)`` (a raw record, a dict -> its canonical
    records and whether it is an HH pair that differs early), ``answers(rec, spec)`` (a canonical record -> its K
    answers and their field names, for errors) and ``builtin(spec, split, n)`` (the canonical records of the
    built-in data, ``dataset=None``); the rest has defaults."""

    single = True       # one answer per example ("response_ids"), else K of them ("responses")
    mask_roles = False  # a chat answer of several turns trains only the assistant's ("response_mask")
    columns: dict[str, str] = {}  # extra example fields, stored as Arrow columns: name -> "bool", "[float64]" (a list)

    def prepare(self, records: list[dict], spec) -> list[dict]:
        """The canonical records of one source (or the built-in ones) before blending."""
        return records

    def ids(self, prompt: list[int], answers: list[list[int]], masks: list, spec) -> tuple:
        """(prompt ids, answer ids, masks) as tokenised, before truncation."""
        return prompt, answers, masks

    def example(self, eid: str, prompt: list[int], answers: list[list[int]], extra: dict, max_len: int) -> dict:
        """A tokenised example; ``extra`` holds the values of ``columns`` (None: absent)."""
        ex = {"id": eid, "prompt_ids": prompt}
        if self.single:
            ex["response_ids"] = answers[0]
        else:
            ex["responses"] = answers
        ex.update((k, extra[k]) for k in self.columns if extra.get(k) is not None)
        return ex

    def collate(self, examples: list[dict], pad_id: int) -> dict:
        """A micro-batch -> right-padded rows; K answers lie K-major (the batch layout: docs/data.md)."""
        if not examples:
            raise ValueError("collate needs at least one example")
        ids = [e["id"] for e in examples]
        if self.single:
            out = pad([(e["prompt_ids"], e["response_ids"]) for e in examples], pad_id,
                      [e.get("response_mask") for e in examples])
            out["ids"] = ids
            return out
        K = len(examples[0]["responses"])
        if any(len(e["responses"]) != K for e in examples):
            raise ValueError(f"all examples of a micro-batch must have the same number of completions; got "
                             f"{sorted({len(e['responses']) for e in examples})} in {ids}")
        out = pad([(e["prompt_ids"], e["responses"][k]) for k in range(K) for e in examples], pad_id)
        out["ids"] = ids
        out["num_choices"] = K
        for key in self.columns:  # all or none: rewards [B,K], margin [B] (float32)
            have = [key in e for e in examples]
            if any(have) and not all(have):
                raise ValueError(f"some examples of the micro-batch have {key!r} and some do not: {ids}")
            if all(have):
                out[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
        return out


class SFT(DataKind):
    """``{"prompt", "response"}``: input/output fields, ``messages``, or a pair's chosen (``sft_from_chosen``)."""

    mask_roles = True
    columns = {"response_mask": "[int8]"}  # multi-turn chat answers only

    def records(self, rec, rid, spec):
        if spec.sft_from_chosen:
            # chosen == rejected does not matter when only chosen is trained on
            prompt, chosen, _, raw, early = pair(rec, spec, allow_identical=True)
            return [{"id": rid, "prompt": prompt, "response": chosen, "raw_prompt": raw}], early
        if spec.messages_key in rec and spec.input_key not in rec:
            msgs = conversation(rec[spec.messages_key], spec.messages_key)
            # the answer: the last assistant message, or (multiturn) everything from the first assistant turn
            cut = next(i for i, m in enumerate(msgs) if m["role"] == "assistant") if spec.multiturn else -1
            if cut == 0:
                raise BadRecord("the first message is the assistant's: the conversation has no prompt",
                                f"{spec.messages_key}[0].role")
            return [{"id": rid, "prompt": msgs[:cut], "response": msgs[cut:], "raw_prompt": False}], False
        if isinstance(rec.get(spec.input_key), list):  # prompt messages + the answer as text
            return [{"id": rid, "prompt": chat_prompt(rec[spec.input_key], spec.input_key),
                     "response": text_field(get_field(rec, spec.output_key), spec.output_key),
                     "raw_prompt": False}], False
        prompt = text_field(get_field(rec, spec.input_key), spec.input_key)
        response = rec.get(spec.output_key, "") if spec.pretrain_mode else get_field(rec, spec.output_key)
        if not spec.pretrain_mode or response != "":  # pretraining: a missing or empty output is none
            response = text_field(response, spec.output_key)
        return [{"id": rid, "prompt": prompt, "response": response, "raw_prompt": is_hh(prompt)}], False

    def answers(self, rec, spec):
        return [rec["response"]], [spec.messages_key if isinstance(rec["response"], list) else spec.output_key]

    def builtin(self, spec, split, n):
        if not spec.sft_from_chosen:
            return [{**r, "raw_prompt": False} for r in synthetic.sft_records(n, spec.seed, split)]
        return [{"id": r["id"], "prompt": r["prompt"], "response": r["chosen"], "raw_prompt": False}
                for r in synthetic.preference_records(n, spec.seed, split)]

    def ids(self, prompt, answers, masks, spec):
        # pretrain_mode: prompt + response all trained
        return ([], [prompt + answers[0]], [None]) if spec.pretrain_mode else (prompt, answers, masks)


class Binary(DataKind):
    """``{"prompt", "completion", "label"}`` (KTO); a pair gives two records, chosen desirable.

    KTO's KL rows ``kl_*`` pair prompt i with the completion of example i+1 of the same micro-batch (docs/data.md).
    Records unpaired from pairs come as (chosen, rejected) neighbours: :meth:`prepare` shuffles them so that
    these pairs rarely share a prompt.
    """

    columns = {"label": "bool"}

    def records(self, rec, rid, spec):
        if (spec.chosen_key in rec or spec.rejected_key in rec) and spec.completion_key not in rec \
                and spec.label_key not in rec:
            prompt, chosen, rejected, raw, early = pair(rec, spec)
            return [{"id": f"{rid}#{which}", "prompt": prompt, "completion": text, "label": label, "raw_prompt": raw}
                    for which, text, label in (("chosen", chosen, True), ("rejected", rejected, False))], early
        prompt, (completion,) = prompt_and_answers(rec, spec, [(get_field(rec, spec.completion_key),
                                                                spec.completion_key)], "binary")
        label = of_type(get_field(rec, spec.label_key), bool, "a boolean (JSON true/false)", spec.label_key)
        return [{"id": rid, "prompt": prompt, "completion": completion, "label": label,
                 "raw_prompt": is_hh(prompt)}], False

    def answers(self, rec, spec):
        return [rec["completion"]], [spec.completion_key]

    def builtin(self, spec, split, n):
        return [{"id": f"{r['id']}#{which}", "prompt": r["prompt"], "completion": r[which], "label": label,
                 "raw_prompt": False}
                for r in synthetic.preference_records(n, spec.seed, split)
                for which, label in (("chosen", True), ("rejected", False))]

    def prepare(self, records, spec):
        if any("#" in r["id"] for r in records):
            records = list(records)
            random.Random(f"{spec.seed}/unpair").shuffle(records)
        return records

    def example(self, eid, prompt, answers, extra, max_len):
        return {**super().example(eid, prompt, answers, extra, max_len), "max_len": max_len}

    def collate(self, examples, pad_id):
        out = super().collate(examples, pad_id)
        B = len(examples)
        if B < 2:
            raise ValueError("KTO needs micro batch size >= 2: its KL estimate pairs each prompt with "
                             "the next example's completion in the same micro-batch")
        out["label"] = torch.tensor([bool(e["label"]) for e in examples], dtype=torch.bool)
        kl = pad([(e["prompt_ids"], examples[(i + 1) % B]["response_ids"][: e.get("max_len", 1 << 62)
                                                                          - len(e["prompt_ids"])])
                  for i, e in enumerate(examples)], pad_id)
        out.update({f"kl_{k}": v for k, v in kl.items()})
        return out


class Pairwise(DataKind):
    """``{"prompt", "chosen", "rejected"[, "margin"]}``: explicit prompt, HH dialogues or conversations."""

    single = False
    columns = {"rewards": "[float64]", "margin": "float64"}

    def records(self, rec, rid, spec):
        prompt, chosen, rejected, raw, early = pair(rec, spec)
        out = {"id": rid, "prompt": prompt, "chosen": chosen, "rejected": rejected, "raw_prompt": raw}
        if spec.margin_key:
            out["margin"] = number(get_field(rec, spec.margin_key), spec.margin_key)
        return [out], early

    def answers(self, rec, spec):
        return [rec["chosen"], rec["rejected"]], [spec.chosen_key, spec.rejected_key]

    def builtin(self, spec, split, n):
        return [{**r, "raw_prompt": False} for r in synthetic.preference_records(n, spec.seed, split)]


class Scored(Pairwise):
    """``{"prompt", "completions": [K][, "rewards": [K]]}``, the same K in every record; a pair gives K=2."""

    def records(self, rec, rid, spec):
        if (spec.chosen_key in rec or spec.rejected_key in rec) and spec.completions_key not in rec:
            prompt, chosen, rejected, raw, early = pair(rec, spec)
            return [{"id": rid, "prompt": prompt, "completions": [chosen, rejected], "raw_prompt": raw}], early
        comps = of_type(get_field(rec, spec.completions_key), list, "a list of strings", spec.completions_key)
        if len(comps) < 2:
            raise BadRecord(f"needs K >= 2 completions, got K={len(comps)}", spec.completions_key)
        fields = [f"{spec.completions_key}[{i}]" for i in range(len(comps))]
        prompt, comps = prompt_and_answers(rec, spec, list(zip(comps, fields)), "scored")
        rewards = of_type(get_field(rec, spec.rewards_key), list, "a list of numbers", spec.rewards_key)
        if len(rewards) != len(comps):
            raise BadRecord(f"has {len(rewards)} values but {spec.completions_key!r} has K={len(comps)}",
                            spec.rewards_key)
        rewards = [number(r, f"{spec.rewards_key}[{i}]") for i, r in enumerate(rewards)]
        return [{"id": rid, "prompt": prompt, "completions": comps, "rewards": rewards,
                 "raw_prompt": is_hh(prompt)}], False

    def answers(self, rec, spec):
        return rec["completions"], [f"{spec.completions_key}[{k}]" for k in range(len(rec["completions"]))]

    def builtin(self, spec, split, n):
        # Rewards so that exo-rw / dpo-rw run on the default data: hedged 1, terse 0.
        return [{"id": r["id"], "prompt": r["prompt"], "completions": [r["chosen"], r["rejected"]],
                 "rewards": [1.0, 0.0], "raw_prompt": False} for r in synthetic.preference_records(n, spec.seed, split)]


KINDS: dict[str, DataKind] = {"sft": SFT(), "pairwise": Pairwise(), "binary": Binary(), "scored": Scored()}


def get_kind(name: str) -> DataKind:
    if name not in KINDS:
        raise ValueError(f"unknown data kind {name!r}; expected one of {tuple(KINDS)}")
    return KINDS[name]


def canonicalize(name: str, rec, rid: str, spec) -> tuple[list[dict], bool]:
    """Validated canonical records from one raw record, and whether it is an HH pair that differs early; raises
    BadRecord for an unusable record and ``records.Identical`` for a pair with chosen == rejected."""
    if not isinstance(rec, dict):
        raise BadRecord(f"record is not an object (got {type(rec).__name__} {short(rec)})")
    return get_kind(name).records(rec, rid, spec)
