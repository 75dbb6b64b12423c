"""Built-in synthetic data: small tasks with a real conflict between SFT and preference training.

SFT records answer tersely and exactly; preference records, on other prompts, prefer a wordy hedged answer
over the terse one. Four disjoint prompt pools (SFT/preference × train/eval), seeded: docs/data.md.
"""

from __future__ import annotations

import hashlib
import random
import string

SFT_TRAIN, SFT_EVAL, PREF_TRAIN, PREF_EVAL = range(4)
HEDGES = (
    "I believe the answer is probably {}, though you may want to check.",
    "Hmm, I think it might be {}, but I'm not entirely sure.",
    "If I'm not mistaken, it should be {}, more or less.",
    "My best guess would be {}, though I could be wrong.",
)


def _word(rng: random.Random, lo: int, hi: int, letters: str = string.ascii_lowercase) -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(lo, hi)))


def task(rng: random.Random) -> tuple[str, str]:
    """One (prompt, exact terse answer)."""
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"what is {a}+{b}?", str(a + b)
    if kind == 1:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        return f"what is {a}-{b}?", str(a - b)
    if kind == 2:
        w = _word(rng, 3, 6)
        return f"reverse '{w}'", w[::-1]
    if kind == 3:
        digits = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5))]
        return f"sort {' '.join(digits)}", " ".join(sorted(digits))
    if kind == 4:
        w = _word(rng, 3, 6)
        return f"upper-case '{w}'", w.upper()
    w = _word(rng, 4, 8, "abcde")
    c = rng.choice("abcde")
    return f"count '{c}' in '{w}'", str(w.count(c))


def _draw(n: int, seed: int, pool: int):
    rng = random.Random(f"xright-synthetic/{seed}/{pool}")
    seen: set[str] = set()
    for _ in range(200 * n + 1000):
        if len(seen) == n:
            return
        prompt, answer = task(rng)
        h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")  # the pools never share a prompt
        if h % 4 == pool and prompt not in seen:
            seen.add(prompt)
            yield prompt, answer, rng
    raise RuntimeError(f"could not draw {n} distinct synthetic prompts")


def sft_records(n: int = 2000, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` SFT records ``{"id": "builtin:sft:<split>:<i>", "prompt", "response"}``, terse and exact."""
    pool = {"train": SFT_TRAIN, "eval": SFT_EVAL}[split]
    return [{"id": f"builtin:sft:{split}:{i}", "prompt": p, "response": a}
            for i, (p, a, _) in enumerate(_draw(n, seed, pool))]


def preference_records(n: int = 2000, seed: int = 0, split: str = "train") -> list[dict]:
    """``n`` pairs ``{"id": "builtin:pairwise:<split>:<i>", "prompt", "chosen", "rejected"}``: chosen hedged
    and wordy, rejected terse."""
    pool = {"train": PREF_TRAIN, "eval": PREF_EVAL}[split]
    return [{"id": f"builtin:pairwise:{split}:{i}", "prompt": p, "chosen": rng.choice(HEDGES).format(a),
             "rejected": a}
            for i, (p, a, rng) in enumerate(_draw(n, seed, pool))]
