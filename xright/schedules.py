"""Schedules: which objectives an optimizer step computes, and with what weight (docs/DESIGN.md §1, §2).

Pure Python, seeded, the same on every rank; a plan is one dict name -> weight per optimizer step, and
every schedule's state saves to JSON for an exact resume. `Alright` and `Maxright` are Algorithms 1 and 2
of Fernando et al. 2024, "Mitigating Forgetting in LLM Supervised Fine-Tuning and Preference Learning".
"""

import inspect
import itertools
import math
import random
from dataclasses import dataclass, field


def _check_name(name):
    if not isinstance(name, str) or not name:
        raise ValueError(f"objective name must be a non-empty string, got {name!r}")
    return name


def _check_weights(weights):
    """Validated copy of a name -> weight dict, in the caller's order (that of `names`)."""
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"weights must be a non-empty dict name -> weight, got {weights!r}")
    out = {}
    for name, w in weights.items():
        _check_name(name)
        try:
            w = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"weight of {name!r} must be a number, got {w!r}") from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"weight of {name!r} must be finite and >= 0, got {w}")
        out[name] = w
    if not any(w > 0 for w in out.values()):
        raise ValueError(f"at least one weight must be > 0, got {out}")
    return out


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, int):
        # None would seed from OS entropy: runs would not be reproducible.
        raise ValueError(f"seed must be an int, got {seed!r}")
    return seed


def _check_losses(losses, names, what, require_all):
    """Float copy of `losses`; unknown names always fail, missing ones fail if `require_all`."""
    if not isinstance(losses, dict):
        raise ValueError(f"{what}: losses must be a dict name -> float, got {type(losses).__name__}")
    unknown = [k for k in losses if k not in names]
    if unknown:
        raise ValueError(f"{what}: unknown objective(s) {unknown}; this schedule has {list(names)}")
    if require_all:
        missing = [k for k in names if k not in losses]
        if missing:
            raise ValueError(f"{what}: missing loss for objective(s) {missing}; "
                             f"every objective in {list(names)} is needed")
    out = {k: float(v) for k, v in losses.items()}
    nan = [k for k, v in out.items() if math.isnan(v)]
    if nan:  # a NaN score cannot be compared: the argmax would silently ignore it
        raise ValueError(f"{what}: loss of {nan[0]!r} is NaN")
    return out


@dataclass(frozen=True)
class ScheduleInputs:
    """Everything a schedule may be built from, known once the data is loaded (one set for all schedules)."""

    weights: dict                 # name -> weight w_k, in the objectives' order
    optima: dict                  # name -> optimal loss L*_k (0 if unknown)
    seed: int
    refresh_every: int = 0        # MAXRIGHT: recompute every stale loss every N steps (0: only at the start)
    phase_steps: dict = field(default_factory=dict)  # name -> optimizer steps of its sequential phase
    order: tuple = ()             # sequential: phase order (default: the weights' order)
    only: str | None = None       # single: the objective trained (default: the first)


class Schedule:
    """Interface the training loop uses; the defaults suit schedules without feedback."""

    kind = ""  # key in SCHEDULES; saved in state_dict so a resume into another schedule fails
    names: tuple = ()
    needs_losses = False

    @classmethod
    def build(cls, inputs: ScheduleInputs) -> "Schedule":
        """Each constructor parameter is the :class:`ScheduleInputs` field of its name (ValueError if inconsistent)."""
        return cls(**{k: getattr(inputs, k) for k in inspect.signature(cls).parameters})

    def reseed(self, seed: int) -> None:
        """Re-seed any randomness of the picks (debug: ranks seeded apart, rank 0's broadcast must win)."""

    def plan(self, step):
        raise NotImplementedError

    def wants_refresh(self, step):
        return False

    def refresh(self, losses):
        pass

    def observe(self, step, losses):
        pass

    def info(self):
        return {}

    def state_dict(self):
        return {"schedule": self.kind, "names": list(self.names)}

    def load_state_dict(self, state):
        if state.get("schedule") != self.kind or list(state.get("names", ())) != list(self.names):
            raise ValueError(f"state is for schedule {state.get('schedule')!r} with objectives {state.get('names')}, "
                             f"not {self.kind!r} with {list(self.names)}")


class Single(Schedule):
    """One objective, every step (plain SFT or plain DPO)."""

    kind = "single"

    def __init__(self, name):
        self.names = (_check_name(name),)

    @classmethod
    def build(cls, inputs):
        return cls(inputs.only or next(iter(inputs.weights)))

    def plan(self, step):
        return {self.names[0]: 1.0}


class Sequential(Schedule):
    """Objective A for its steps, then B, ... (SFT→DPO), the forgetting-prone baseline. `phases`: a list of
    (name, num_steps); after the last phase the schedule stays in it (a longer loop keeps training it)."""

    kind = "sequential"

    def __init__(self, phases):
        phases = list(phases) if phases is not None else []
        if not phases:
            raise ValueError("phases must be a non-empty list of (name, num_steps)")
        self.phases = []
        for i, phase in enumerate(phases):
            try:
                name, n = phase
            except (TypeError, ValueError):
                raise ValueError(f"phase {i} must be (name, num_steps), got {phase!r}") from None
            _check_name(name)
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"phase {i} ({name!r}): num_steps must be an int > 0, got {n!r}")
            self.phases.append((name, n))
        # cumulative ends: phase i covers [boundaries[i-1], boundaries[i])
        self.boundaries = tuple(itertools.accumulate(n for _, n in self.phases))
        self.names = tuple(dict.fromkeys(name for name, _ in self.phases))

    @classmethod
    def build(cls, inputs):
        order, names = list(inputs.order or inputs.weights), list(inputs.weights)
        if sorted(order) != sorted(names):
            raise ValueError(f"--order must name {names}, got {order}")
        return cls([(n, inputs.phase_steps[n]) for n in order])

    def phase(self, step):
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        for i, end in enumerate(self.boundaries):
            if step < end:
                return i
        return len(self.boundaries) - 1

    def plan(self, step):
        return {self.phases[self.phase(step)][0]: 1.0}


class Mix(Schedule):
    """loss = Σ w_k·L_k, every objective of w_k > 0 computed every step: the costly baseline."""

    kind = "mix"

    def __init__(self, weights):
        self.weights = _check_weights(weights)
        self.names = tuple(self.weights)

    def plan(self, step):
        return {k: w for k, w in self.weights.items() if w > 0}


class Alright(Schedule):
    """ALRIGHT: each step, one objective k drawn with probability w_k / Σw, its loss unweighted (the weights
    set how often: the weighted mix in expectation, at one objective's cost). The draw comes from the
    schedule's own `random.Random(seed)`, apart from the global RNGs of data loading and dropout."""

    kind = "alright"

    def __init__(self, weights, seed):
        self.weights = _check_weights(weights)
        self.names = tuple(self.weights)
        self.seed = _check_seed(seed)
        self.rng = random.Random(seed)
        self._total = sum(self.weights.values())

    def reseed(self, seed):
        self.rng.seed(seed)

    def plan(self, step):
        # One uniform draw per step, so the pick sequence depends only on the seed.
        u = self.rng.random() * self._total
        cum, pick = 0.0, None
        for name, w in self.weights.items():
            if w <= 0:
                continue
            pick = name  # also the fallback if rounding puts u at exactly the total
            cum += w
            if u < cum:
                break
        return {pick: 1.0}

    def state_dict(self):
        version, internal, gauss = self.rng.getstate()
        return {**super().state_dict(), "seed": self.seed, "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.seed = state["seed"]


class Maxright(Schedule):
    """MAXRIGHT: each step, the objective furthest from its optimum, k = argmax_k w_k·(L̃_k − L*_k).

    L̃_k are stale losses: the stepped objective's is the loss it just had (`observe`); all are recomputed
    without grad on one batch each before the first step and every `refresh_every` steps (0: only before
    the first). L*_k = optima.get(k, 0.0). Ties go to the first of `names` (the same on every rank and
    resume); weight-0 objectives are never picked. The pick is deterministic: `seed` is only saved."""

    kind = "maxright"
    needs_losses = True

    def __init__(self, weights, optima, seed, refresh_every):
        self.weights = _check_weights(weights)
        self.names = tuple(self.weights)
        optima = {} if optima is None else optima
        if not isinstance(optima, dict):
            raise ValueError(f"optima must be a dict name -> optimal loss, got {optima!r}")
        unknown = [k for k in optima if k not in self.names]
        if unknown:
            raise ValueError(f"optima for unknown objective(s) {unknown}; objectives are {list(self.names)}")
        self.optima = {k: float(optima.get(k, 0.0)) for k in self.names}
        for k, v in self.optima.items():
            if not math.isfinite(v):
                raise ValueError(f"optimum of {k!r} must be finite, got {v}")
        self.seed = _check_seed(seed)
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 0:
            raise ValueError(f"refresh_every must be an int >= 0 (0 = never after the first), got {refresh_every!r}")
        self.refresh_every = refresh_every
        self.stale, self._last = {}, {}

    def wants_refresh(self, step):
        if any(k not in self.stale for k in self.names):
            return True
        return self.refresh_every > 0 and step > 0 and step % self.refresh_every == 0

    def refresh(self, losses):
        self.stale = _check_losses(losses, self.names, "Maxright.refresh", require_all=True)

    def observe(self, step, losses):
        self.stale.update(_check_losses(losses, self.names, "Maxright.observe", require_all=False))

    def plan(self, step):
        missing = [k for k in self.names if k not in self.stale]
        if missing:
            raise RuntimeError(f"Maxright.plan({step}): no stale loss for {missing}; call refresh() with every "
                               "objective's loss first (the loop does so when wants_refresh(step) is True)")
        best, best_score, info = None, -math.inf, {}
        for k in self.names:
            info[f"stale/{k}"] = self.stale[k]
            if self.weights[k] <= 0:
                continue
            score = self.weights[k] * (self.stale[k] - self.optima[k])
            info[f"score/{k}"] = score
            if best is None or score > best_score:  # strict: the first of equal scores wins
                best, best_score = k, score
        self._last = info
        return {best: 1.0}

    def info(self):
        return dict(self._last)

    def state_dict(self):
        return {**super().state_dict(), "seed": self.seed, "stale": dict(self.stale), "last": dict(self._last)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.seed = state["seed"]
        self.stale = {k: float(v) for k, v in state["stale"].items()}
        self._last = {k: float(v) for k, v in state.get("last", {}).items()}


SCHEDULES = {s.kind: s for s in (Single, Sequential, Mix, Alright, Maxright)}


@dataclass(frozen=True)
class Stopping:
    """When a joint run stops early, as in the paper's code: every eval loss within ``eps`` of its optimum
    (``at_optimum``), or a point of a reference Pareto front (``front``: name -> losses) dominated."""

    eps: float = 0.0
    at_optimum: bool = False
    front: dict = field(default_factory=dict)

    def reason(self, losses, optima):
        """Why to stop given every objective's eval loss (``losses``) and optimum, or None."""
        if self.at_optimum and all(abs(losses[k] - optima[k]) <= self.eps for k in losses):
            return "every eval loss within --eps of its optimum"
        for i in range(len(next(iter(self.front.values()), ()))):
            if all(losses[k] <= self.front[k][i] for k in self.front):
                return f"dominates reference Pareto point {i}: " + ", ".join(
                    f"{k}={self.front[k][i]:.4f}" for k in self.front)
        return None


def paper_weights(lambd, sft="sft", pref="dpo"):
    """The paper's two-objective weights w_pref = λ, w_sft = 1 − λ; SFT first (it wins MAXRIGHT's ties)."""
    try:
        lambd = float(lambd)
    except (TypeError, ValueError):
        raise ValueError(f"lambda must be a number in [0, 1], got {lambd!r}") from None
    if not 0.0 <= lambd <= 1.0:  # also rejects NaN
        raise ValueError(f"lambda must be in [0, 1], got {lambd}")
    _check_name(sft)
    _check_name(pref)
    if sft == pref:
        raise ValueError(f"the SFT and preference objectives need different names, got {sft!r} twice")
    return {sft: 1.0 - lambd, pref: lambd}
