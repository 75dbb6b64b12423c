"""Generation and scoring: the sampling loop, reward labelling (post-processors) and the win-rate judge, with
the trainers' own prompts, templates, tokenisation and reward score (:func:`xright.objectives.reward_scores`).

Prompts are sorted by token length and cut into micro-batches (:mod:`xright.sharding`), the same whatever the
number of ranks, and batch j is sampled under its own seed ``seed + j``: greedy output (and, on this CPU, sampled
output) is identical for any world size and stage. Under ZeRO-3 ``generate`` also runs with ``synced_gpus=True``
(a finished rank keeps stepping until all are done).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, replace

import torch

from xright.data.chat import ChatRenderer
from xright.data.kinds import canonicalize
from xright.data.loading import BUILTIN_TRAIN, DataSpec, blend_split, number_copies, parse_probs, source_labels
from xright.data.records import BadRecord, DataError, describe, generation_prompt, get_field, iter_raw, text_field
from xright.data.tokenise import is_chat, prompt_text, tokenize
from xright.data import synthetic
from xright.files import atomic_write
from xright.sharding import plan_batches, run_pass


def _records(spec: DataSpec, make) -> list[dict]:
    """``make(obj, rid)`` over every record of ``spec.dataset`` (train split), blended; a bad record stops."""
    sources = [s.strip() for s in str(spec.dataset).split(",") if s.strip()]
    probs = parse_probs(sources, spec.dataset_probs)
    parts = []
    for source, label in zip(sources, source_labels(sources)):
        recs = []
        for where, loc, rid, obj, err in iter_raw(source, spec.train_split, spec, True, label):
            try:
                if err is not None:
                    raise err
                if not isinstance(obj, dict):
                    raise BadRecord(f"record is not an object (got {type(obj).__name__})")
                recs.append(make(obj, rid))
            except BadRecord as e:
                raise DataError(describe(where, loc, e)) from None
        parts.append(recs)
    out = blend_split(parts, probs, spec.max_samples, spec.seed)[0]
    if not out:
        raise DataError(f"{spec.dataset}: no records in split {spec.train_split!r}")
    # an oversampled source repeats records: the n-th copy gets "~n" on its ids as in the training data,
    # so that the post-processors do not merge the copies' groups and the judge sees distinct prompts
    return number_copies(out, ("id", "prompt_id"))


def read_prompts(spec: DataSpec, start: int = 0, count: int | None = None) -> list[dict]:
    """Prompt records ``{"id", "prompt", "raw_prompt"}`` (:func:`xright.data.records.generation_prompt`), or
    without a dataset the built-in preference prompts (``train_split`` "train", else the eval pool).
    ``start``/``count`` slice the blended set (XRIGHT's ``--iter`` × ``--rollout_batch_size``): the blend of
    ``max_samples`` prompts is drawn once, whatever the slice, so successive slices partition it."""
    if not spec.dataset:
        split = "train" if spec.train_split == "train" else "eval"
        pairs = synthetic.preference_records(min(BUILTIN_TRAIN, spec.max_samples), spec.seed, split)
        recs = [{"id": r["id"], "prompt": r["prompt"], "raw_prompt": False} for r in pairs]
    else:
        recs = _records(spec, lambda obj, rid: dict(zip(("id", "prompt", "raw_prompt"),
                                                        (rid, *generation_prompt(obj, spec)))))
    if start >= len(recs):
        raise DataError(f"{spec.dataset or 'built-in prompts'}: no prompts from index {start}: the blend has "
                        f"{len(recs)} (max_samples {spec.max_samples})")
    return recs[start:None if count is None else start + count]


def read_answers(spec: DataSpec) -> list[dict]:
    """(prompt, answer) records for scoring: ``{"id", "prompt_id", "prompt", "response", "raw_prompt"}`` from
    fields ``input_key`` / ``output_key``; ``prompt_id`` (else the prompt text) groups one prompt's K answers."""
    def make(obj, rid):
        answer = obj.get(spec.output_key)
        if isinstance(answer, str) and not answer.strip():  # an empty answer is still an answer to score
            prompt = get_field(obj, spec.input_key)
            prompt = prompt if isinstance(prompt, list) else text_field(prompt, spec.input_key)
            rec = {"id": rid, "prompt": prompt, "response": answer, "raw_prompt": False}
        else:
            rec = canonicalize("sft", obj, rid, spec)[0][0]
        rec["id"] = str(obj.get("id", rid))
        rec["prompt_id"] = str(obj.get("prompt_id", rec["prompt"]))
        return rec

    return _records(spec, make)


def encode_prompts(records: list[dict], tokenizer, spec: DataSpec, prompt_max_len: int) -> list[list[int]]:
    """Prompt token ids as the trainers build them. Text: the tokenizer's leading special tokens (none when the
    text starts with the BOS text) + the text's tokens, never trailing specials (an appended eos would end every
    prompt). Messages: :meth:`ChatRenderer.prompt_ids`. A prompt longer than ``prompt_max_len`` (> 0) keeps its
    leading BOS and the last tokens of its text."""
    chat = [is_chat(r, spec) for r in records]
    texts = [prompt_text(r, tokenizer, spec) for r, c in zip(records, chat) if not c]
    with_, without = (list(tokenizer("a", add_special_tokens=flag)["input_ids"]) for flag in (True, False))
    head = next((with_[:i] for i in range(len(with_) - len(without) + 1) if with_[i:i + len(without)] == without), [])
    bos = getattr(tokenizer, "bos_token", None)
    plain = iter(zip(texts, tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []))
    renderer = None
    out = []
    for r, c in zip(records, chat):
        if c:
            try:
                renderer = renderer or ChatRenderer(tokenizer)
                msgs = r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
                x = renderer.prompt_ids(msgs, spec.input_key)
            except BadRecord as e:
                raise DataError(describe(str(r.get("id", "prompt")), None, e)) from None
            lead, x = (x[:1], x[1:]) if bos and x[:1] == [tokenizer.bos_token_id] else ([], x)
        else:
            t, x = next(plain)
            x = list(x)
            if not (bos and t.startswith(bos)):
                lead = head
            else:  # the text's own BOS
                lead, x = (x[:1], x[1:]) if x[:1] == [tokenizer.bos_token_id] else ([], x)
        if 0 < prompt_max_len < len(lead) + len(x):
            x = x[len(x) - max(prompt_max_len - len(lead), 0):]
        out.append(lead + x)
    return out


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for b, s in enumerate(seqs):
        if s:
            ids[b, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[b, T - len(s):] = 1
    return ids, mask


@dataclass
class Sampling:
    max_new_tokens: int = 1024
    greedy: bool = False
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    n: int = 1             # completions per prompt (--best_of_n)
    seed: int = 42


def _module(model):
    return model.module if hasattr(model, "module") else model  # a DeepSpeed engine wraps the model


def eos_ids(tokenizer, model) -> list[int]:
    """The ids generation stops at: the tokenizer's eos and every eos id of the model's generation config
    (an int or a list: Llama-3-Instruct lists ``<|eot_id|>`` beside ``<|end_of_text|>``)."""
    config = getattr(_module(model), "generation_config", None)
    listed = getattr(config, "eos_token_id", None)
    listed = list(listed) if isinstance(listed, (list, tuple)) else [listed]
    return list(dict.fromkeys(int(i) for i in [tokenizer.eos_token_id, *listed] if i is not None))


def cut_at_eos(tokens: list[int], eos_ids: int | list[int]) -> tuple[list[int], bool]:
    """The completion before its first eos (any of ``eos_ids``), and whether it ended there (False: cut by
    max_new_tokens)."""
    stop = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids)
    end = next((i for i, t in enumerate(tokens) if t in stop), None)
    return (tokens, False) if end is None else (tokens[:end], True)


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], sampling: Sampling, *, eos_ids: int | list[int], pad_id: int,
                   seed: int, synced: bool = False, device=None, streamer=None) -> list[list[list[int]]]:
    """K = ``sampling.n`` completions (token ids, eos cut off) for each prompt of one left-padded batch,
    sampled under ``seed`` (the global RNG is restored afterwards)."""
    ids, mask = left_pad(prompts, pad_id)
    K, R = sampling.n, 1 if sampling.greedy else sampling.n  # greedy: one continuation, its K copies identical
    kw = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not sampling.greedy, num_beams=1,
              num_return_sequences=R, repetition_penalty=sampling.repetition_penalty, use_cache=True)
    if not sampling.greedy:
        kw.update(top_p=sampling.top_p, temperature=sampling.temperature)
    device = device or next(_module(model).parameters()).device
    with torch.random.fork_rng(devices=[] if torch.device(device).type == "cpu" else [device]):
        torch.manual_seed(seed)
        out = _module(model).generate(input_ids=ids.to(device), attention_mask=mask.to(device), pad_token_id=pad_id,
                                      eos_token_id=eos_ids, synced_gpus=synced, streamer=streamer, **kw)
    new = out[:, ids.shape[1]:].tolist()
    return [[cut_at_eos(new[b * R + k % R], eos_ids)[0] for k in range(K)] for b in range(len(prompts))]


class Progress:
    """tqdm on rank 0 with prompts/s and generated tokens/s of this rank's shard."""

    def __init__(self, total: int, enabled: bool, desc: str, unit: str = "prompts"):
        from tqdm import tqdm

        self.bar = tqdm(total=total, disable=not enabled, desc=desc, unit=unit, dynamic_ncols=True)
        self.start, self.tokens = time.perf_counter(), 0

    def update(self, items: int, tokens: int = 0) -> None:
        self.tokens += tokens
        dt = max(time.perf_counter() - self.start, 1e-9)
        if self.tokens:  # tqdm shows prompts/s itself
            self.bar.set_postfix({"tok/s": f"{self.tokens / dt:.1f}"}, refresh=False)
        self.bar.update(items)

    def expect(self, total: int) -> None:
        self.bar.reset(total=total)
        self.start = time.perf_counter()

    def close(self) -> None:
        self.bar.close()


def generate(model, prompts: list[list[int]], sampling: Sampling, micro_batch_size: int, *, eos_ids: int | list[int],
             pad_id: int, rank: int = 0, world_size: int = 1, synced: bool = False, device=None,
             progress: Progress | None = None) -> dict[int, list[list[int]]]:
    """This rank's share of the completions: ``{prompt index: [K token lists]}`` (see the module docstring)."""
    batches = plan_batches([len(p) for p in prompts], micro_batch_size)
    if progress is not None:
        progress.expect(sum(map(len, batches[rank::world_size])))

    def compute(j, idx):
        return generate_batch(model, [prompts[i] for i in idx], sampling, eos_ids=eos_ids, pad_id=pad_id,
                              seed=sampling.seed + j, synced=synced, device=device)

    local: dict[int, list[list[int]]] = {}
    for _, idx, outs in run_pass(compute, batches, rank, world_size, synced, model=model):
        local.update(zip(idx, outs))
        if progress is not None:
            # + 1 per completion that ended at its eos: the eos was generated too
            progress.update(len(idx), sum(len(c) + (len(c) < sampling.max_new_tokens) for cs in outs for c in cs))
    return local


def tokenize_answers(records: list[dict], tokenizer, spec: DataSpec) -> tuple[list[dict], dict]:
    """(prompt, answer) records -> the examples ``train_rm`` scores (the trainers' tokenisation and ``max_len``
    rule), each with ``"index"`` into ``records``; records that rule drops are missing (see the counts)."""
    examples, counts = tokenize([{**r, "id": str(i)} for i, r in enumerate(records)], tokenizer, replace(spec, kind="sft"))
    for e in examples:
        e["index"] = int(str(e["id"]).split("@", 1)[0])  # tokenize may decorate the record id
    return examples, counts


def score(model, examples: list[dict], micro_batch_size: int, pad_id: int, *, rank: int = 0, world_size: int = 1,
          synced: bool = False, device=None, progress: Progress | None = None) -> dict[int, float]:
    """Reward of each tokenised example (``{"index": int, "prompt_ids", "response_ids"}``) read at its last real
    token by :func:`xright.objectives.reward_scores`: ``{index: score}`` for this rank's share."""
    from xright.data import collate
    from xright.objectives import reward_scores

    batches = plan_batches([len(e["prompt_ids"]) + len(e["response_ids"]) for e in examples], micro_batch_size)
    if progress is not None:
        progress.expect(sum(map(len, batches[rank::world_size])))

    def compute(_, idx):
        batch = collate("sft", [examples[i] for i in idx], pad_id)
        dev = device or next(_module(model).parameters()).device
        return reward_scores(model, batch["input_ids"].to(dev), batch["attention_mask"].to(dev)).float().tolist()

    local: dict[int, float] = {}
    for _, idx, values in run_pass(compute, batches, rank, world_size, synced, model=model):
        local.update({examples[i]["index"]: v for i, v in zip(idx, values)})
        if progress is not None:
            progress.update(len(idx))
    return local


def normalize(rewards: list[float], mean: float | None, std: float | None) -> tuple[list[float], str]:
    """(r − mean) / std with the reward model's saved statistics (XRIGHT's ``--normalize_reward``);
    without them, the batch's own mean and standard deviation. Returns the rewards and what was used."""
    if mean is None or not std:
        t = torch.tensor(rewards, dtype=torch.float64)
        mean, std = t.mean().item(), (t.std().item() if len(rewards) > 1 else 0.0)
        how = f"batch statistics (mean {mean:.4f}, std {std:.4f}): the reward model saved none"
    else:
        how = f"the reward model's statistics (mean {mean:.4f}, std {std:.4f})"
    std = std or 1.0
    return [(r - mean) / std for r in rewards], how


def write_records(path: str, records: list[dict], json_list: bool = False) -> None:
    """JSON lines (or one JSON array), written to a temporary file and renamed: never half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, json.dumps(records, indent=2, ensure_ascii=False) if json_list else
                 "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


@dataclass
class PostOptions:
    kto_threshold: float | None = None  # kto: reward > t is desirable (default: relative to the prompt's median)
    reward_template: str | None = None  # csft: how the reward is written into the prompt


def _groups(records: list[dict]) -> list[list[dict]]:
    """Records grouped by ``prompt_id``, groups and members in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["prompt_id"], []).append(r)
    return list(groups.values())


def _answer(record, text):
    """A completion as its record's layout wants it: after prompt messages, one assistant message (TRL's
    conversational layout, which the trainers read with the chat template); after a text prompt, text."""
    return [{"role": "assistant", "content": text}] if isinstance(record["input"], list) else text


def _reward(record):  # max/min take the first of equal rewards: ties resolve in input order
    return record["reward"]


def rs(records, opts: PostOptions | None = None) -> list[dict]:
    """Rejection sampling (Touvron et al. 2023): the best completion of each prompt -> SFT records."""
    return [{"id": g[0]["prompt_id"], "input": (b := max(g, key=_reward))["input"], "output": b["output"],
             "reward": b["reward"]} for g in _groups(records)]


def iter_dpo(records, opts: PostOptions | None = None) -> list[dict]:
    """Iterative DPO (RLHFlow): best vs worst completion -> pairwise records. Prompts whose best and
    worst texts are equal (K = 1, or identical samples) give no pair and are left out."""
    out = []
    for g in _groups(records):
        b, w = max(g, key=_reward), min(g, key=_reward)
        if b["output"] != w["output"]:
            out.append({"id": g[0]["prompt_id"], "prompt": b["input"], "chosen": _answer(b, b["output"]),
                        "rejected": _answer(w, w["output"]),
                        "chosen_reward": b["reward"], "rejected_reward": w["reward"]})
    return out


def exo(records, opts: PostOptions | None = None) -> list[dict]:
    """K completions and their rewards -> scored records (``train_exo --loss exo-rw``). A micro-batch needs
    the same K for every prompt, so prompts with fewer completions than the most common K are left out."""
    groups = [g for g in _groups(records) if len(g) >= 2]
    if not groups:
        return []
    sizes = [len(g) for g in groups]
    K = max(set(sizes), key=lambda k: (sizes.count(k), k))
    return [{"id": g[0]["prompt_id"], "prompt": g[0]["input"], "completions": [_answer(r, r["output"]) for r in g],
             "rewards": [r["reward"] for r in g]} for g in groups if len(g) == K]


def kto(records, opts: PostOptions | None = None) -> list[dict]:
    """Completions labelled desirable / undesirable -> binary records (``train_kto``): with
    ``opts.kto_threshold`` t, reward > t is desirable; else above the prompt's median reward is, below is not,
    and equal to it (ties, or the middle of an odd K) carries no preference and is left out."""
    t = getattr(opts, "kto_threshold", None)
    out = []
    for g in _groups(records):
        cut = t
        if t is None:
            rewards = sorted(r["reward"] for r in g)
            mid = len(rewards) // 2
            cut = rewards[mid] if len(rewards) % 2 else (rewards[mid - 1] + rewards[mid]) / 2
        for r in g:
            if t is None and r["reward"] == cut:
                continue
            label = r["reward"] > cut
            out.append({"id": r["id"], "prompt": r["input"], "completion": _answer(r, r["output"]), "label": label,
                        "reward": r["reward"]})
    return out


def csft(records, opts: PostOptions | None = None) -> list[dict]:
    """Conditional SFT (Wang et al. 2023, XRIGHT's csft): the reward written into the prompt -> SFT records."""
    template = getattr(opts, "reward_template", None) or "{input} <rm_score>: {reward} "
    if "{input}" not in template or "{reward}" not in template:
        raise ValueError(f"--reward_template must contain {{input}} and {{reward}}: {template!r}")
    def condition(prompt, reward):  # messages: the reward goes into the last (user) turn
        fill = lambda text: template.replace("{reward}", f"{reward:.2f}").replace("{input}", text)
        if isinstance(prompt, list):
            return prompt[:-1] + [{**prompt[-1], "content": fill(prompt[-1]["content"])}]
        return fill(prompt)

    return [{"id": r["id"], "input": condition(r["input"], r["reward"]), "output": r["output"], "reward": r["reward"]}
            for r in records]


# name -> (function, the data kind its records are for, the trainer that reads them)
POST_PROCESSORS = {
    "rs": (rs, "sft", "train_sft"),
    "csft": (csft, "sft", "train_sft"),
    "iter_dpo": (iter_dpo, "pairwise", "train_dpo"),
    "exo": (exo, "scored", "train_exo --loss exo-rw"),
    "kto": (kto, "binary", "train_kto"),
}


def win_rate(a: list[float], b: list[float], n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Win rate of A over B on paired scores (ties count half), with a percentile bootstrap interval
    over prompts, and the mean score difference with its own interval."""
    import numpy as np

    if len(a) != len(b) or not a:
        raise ValueError(f"need the same positive number of scores for A and B, got {len(a)} and {len(b)}")
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    outcome = np.where(a > b, 1.0, np.where(a < b, 0.0, 0.5))
    diff = a - b
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    boot_wr, boot_diff = outcome[idx].mean(1), diff[idx].mean(1)
    return {"n": int(len(a)), "wins": int((a > b).sum()), "ties": int((a == b).sum()), "losses": int((a < b).sum()),
            "win_rate": float(outcome.mean()), "ci_low": float(np.percentile(boot_wr, lo)),
            "ci_high": float(np.percentile(boot_wr, hi)), "mean_score_diff": float(diff.mean()),
            "diff_ci_low": float(np.percentile(boot_diff, lo)), "diff_ci_high": float(np.percentile(boot_diff, hi)),
            "level": level}


def markdown_table(rows: list[dict], baseline: str) -> str:
    head = (f"| model | win rate vs {baseline} | 95 % CI | W / T / L | mean score diff | mean length (tokens) | "
            f"{baseline} mean length |\n| --- | --- | --- | --- | --- | --- | --- |\n")
    return head + "".join(
        f"| {r['name']} | {r['win_rate']:.3f} | [{r['ci_low']:.3f}, {r['ci_high']:.3f}] | "
        f"{r['wins']} / {r['ties']} / {r['losses']} | {r['mean_score_diff']:+.3f} | {r['mean_len']:.1f} | "
        f"{r['baseline_mean_len']:.1f} |\n" for r in rows)


def post_process(name: str, records: list[dict], opts: PostOptions | None = None) -> tuple[list[dict], int]:
    """``POST_PROCESSORS[name]`` on scored records, after leaving out blank answers (no trainer accepts
    an empty response); returns the training records and how many answers were left out."""
    if name not in POST_PROCESSORS:
        raise ValueError(f"unknown post-processor {name!r}; choose from {sorted(POST_PROCESSORS)}")
    usable = [r for r in records if r["output"].strip()]
    return POST_PROCESSORS[name][0](usable, opts), len(records) - len(usable)
