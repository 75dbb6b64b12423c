import json
import math
import random

import pytest

from xright.schedules import (SCHEDULES, Alright, Maxright, Mix, Sequential, Single,
                              paper_weights)


# ---------------------------------------------------------------- helpers

def scripted_loss(step, name):
    """Deterministic pseudo-loss, coarse (multiples of 0.25) so that score ties happen."""
    return random.Random(f"{step}/{name}").randint(0, 8) * 0.25


def drive(schedule, steps, start=0):
    """Run the loop's protocol for `steps` steps; return the plans."""
    plans = []
    for step in range(start, start + steps):
        if schedule.wants_refresh(step):
            schedule.refresh({k: scripted_loss(-step - 1, k) for k in schedule.names})
        plan = schedule.plan(step)
        plans.append(plan)
        schedule.observe(step, {k: scripted_loss(step, k) for k in plan})
    return plans


def roundtrip(state):
    return json.loads(json.dumps(state))


FACTORIES = {
    "single": lambda: Single("sft"),
    "sequential": lambda: Sequential([("sft", 7), ("dpo", 5), ("sft", 3)]),
    "mix": lambda: Mix({"sft": 0.3, "dpo": 0.7, "kto": 0.0}),
    "alright": lambda: Alright({"sft": 0.4, "dpo": 0.6, "ipo": 0.2}, seed=3),
    "maxright": lambda: Maxright({"sft": 0.5, "dpo": 0.5, "kto": 1.0}, {"dpo": 0.25}, seed=3,
                                 refresh_every=4),
}


# ---------------------------------------------------------------- single / sequential / mix

def test_single_every_step():
    s = Single("dpo")
    assert s.names == ("dpo",) and not s.needs_losses and not s.wants_refresh(0)
    assert all(s.plan(i) == {"dpo": 1.0} for i in range(50))
    assert s.info() == {}


def test_sequential_boundaries_and_phases():
    s = Sequential([("sft", 3), ("dpo", 2), ("sft", 4)])
    assert s.boundaries == (3, 5, 9)
    assert s.names == ("sft", "dpo")
    expected = ["sft"] * 3 + ["dpo"] * 2 + ["sft"] * 4 + ["sft"] * 5  # stays in the last phase
    assert [next(iter(s.plan(i))) for i in range(14)] == expected
    assert [s.phase(i) for i in range(11)] == [0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2]
    assert all(list(s.plan(i).values()) == [1.0] for i in range(14))
    with pytest.raises(ValueError):
        s.phase(-1)


def test_mix_all_weights_every_step():
    m = Mix({"sft": 0.25, "dpo": 0.75, "kto": 0.0})
    assert m.names == ("sft", "dpo", "kto")
    for i in range(20):
        assert m.plan(i) == {"sft": 0.25, "dpo": 0.75}  # zero weight absent, no normalisation
    assert Mix({"a": 2.0, "b": 3.0}).plan(0) == {"a": 2.0, "b": 3.0}


# ---------------------------------------------------------------- alright

N_DRAWS = 20_000


def within_binomial(count, n, p, sigmas=4.5):
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("lambd", [0.25, 0.5, 0.75])
def test_alright_frequency_two_objectives(lambd):
    s = Alright(paper_weights(lambd), seed=1234)
    picks = []
    for i in range(N_DRAWS):
        plan = s.plan(i)
        assert len(plan) == 1 and list(plan.values()) == [1.0]  # picked loss unweighted
        picks.append(next(iter(plan)))
    assert set(picks) == {"sft", "dpo"}
    assert within_binomial(picks.count("dpo"), N_DRAWS, lambd), picks.count("dpo") / N_DRAWS


def test_alright_frequency_three_objectives():
    weights = {"sft": 1.0, "dpo": 2.0, "kto": 5.0}
    s = Alright(weights, seed=7)
    picks = [next(iter(s.plan(i))) for i in range(N_DRAWS)]
    for name, w in weights.items():
        assert within_binomial(picks.count(name), N_DRAWS, w / 8.0), (name, picks.count(name))


def test_alright_zero_weight_never_picked():
    s = Alright({"sft": 0.0, "dpo": 1.0, "kto": 0.0}, seed=0)
    assert all(s.plan(i) == {"dpo": 1.0} for i in range(2000))
    s = Alright(paper_weights(0.0), seed=0)
    assert all(s.plan(i) == {"sft": 1.0} for i in range(2000))


def test_alright_seed_determinism():
    def picks(seed):
        s = Alright(paper_weights(0.5), seed=seed)
        return [next(iter(s.plan(i))) for i in range(200)]

    assert picks(11) == picks(11)
    assert picks(11) != picks(12)


def test_alright_independent_of_global_rng():
    s1, s2 = Alright(paper_weights(0.5), seed=5), Alright(paper_weights(0.5), seed=5)
    a = []
    for i in range(100):
        random.random()
        a.append(s1.plan(i))
    assert a == [s2.plan(i) for i in range(100)]


# ---------------------------------------------------------------- maxright

def expected_pick(names, weights, optima, stale):
    best, best_score = None, None
    for k in names:
        if weights[k] == 0:
            continue
        score = weights[k] * (stale[k] - optima.get(k, 0.0))
        if best is None or score > best_score:
            best, best_score = k, score
    return best


@pytest.mark.parametrize("refresh_every", [0, 1, 3])
def test_maxright_matches_argmax_rule(refresh_every):
    weights = {"sft": 0.5, "dpo": 0.5, "kto": 0.25, "ipo": 0.0}
    optima = {"sft": 0.5, "kto": -0.5}
    m = Maxright(weights, optima, seed=0, refresh_every=refresh_every)
    assert m.needs_losses
    stale, refreshes, ties, picked = {}, [], 0, set()
    for step in range(300):
        want = (not stale) or (refresh_every > 0 and step > 0 and step % refresh_every == 0)
        assert m.wants_refresh(step) == want
        if want:
            refreshes.append(step)
            stale = {k: scripted_loss(-step - 1, k) for k in weights}
            m.refresh(dict(stale))
        plan = m.plan(step)
        k = expected_pick(tuple(weights), weights, optima, stale)
        assert plan == {k: 1.0}, (step, stale)
        scores = [weights[n] * (stale[n] - optima.get(n, 0.0)) for n in weights if weights[n]]
        ties += scores.count(max(scores)) > 1
        picked.add(k)
        info = m.info()
        for n in weights:
            assert info[f"stale/{n}"] == stale[n]
        assert info[f"score/{k}"] == max(scores)
        loss = scripted_loss(step, k)
        m.observe(step, {k: loss})
        stale[k] = loss
    assert ties > 0  # the script did exercise the tie rule
    assert len(picked) >= 2 and "ipo" not in picked  # zero weight never picked
    if refresh_every:
        assert refreshes == list(range(0, 300, refresh_every))
    else:
        assert refreshes == [0]


def test_maxright_ties_first_name_wins():
    m = Maxright({"dpo": 1.0, "sft": 1.0}, {}, seed=0, refresh_every=0)
    m.refresh({"sft": 2.0, "dpo": 2.0})
    assert m.plan(0) == {"dpo": 1.0}
    m.observe(0, {"dpo": 1.0})
    assert m.plan(1) == {"sft": 1.0}
    # weights and optima enter the score: 2·(1.5−0.5) = 2 = 1·(2−0) → tie → first name
    m = Maxright({"sft": 1.0, "dpo": 2.0}, {"dpo": 0.5}, seed=0, refresh_every=0)
    m.refresh({"sft": 2.0, "dpo": 1.5})
    assert m.plan(0) == {"sft": 1.0}
    assert m.info() == {"stale/sft": 2.0, "stale/dpo": 1.5, "score/sft": 2.0, "score/dpo": 2.0}


def test_maxright_stepped_objective_gets_observed_loss():
    m = Maxright(paper_weights(0.5), {}, seed=0, refresh_every=0)
    m.refresh({"sft": 3.0, "dpo": 1.0})
    assert m.plan(0) == {"sft": 1.0}
    m.observe(0, {"sft": 0.5})
    assert m.plan(1) == {"dpo": 1.0}
    m.observe(1, {"dpo": 0.75})
    assert m.plan(2) == {"dpo": 1.0}
    assert m.info()["stale/dpo"] == 0.75 and m.info()["stale/sft"] == 0.5


def test_maxright_errors():
    m = Maxright(paper_weights(0.5), {}, seed=0, refresh_every=2)
    assert m.info() == {}
    with pytest.raises(RuntimeError, match="refresh"):
        m.plan(0)
    with pytest.raises(ValueError, match="missing"):
        m.refresh({"sft": 1.0})
    with pytest.raises(ValueError, match="unknown"):
        m.refresh({"sft": 1.0, "dpo": 1.0, "kto": 1.0})
    with pytest.raises(ValueError, match="NaN"):
        m.refresh({"sft": 1.0, "dpo": float("nan")})
    m.refresh({"sft": 1.0, "dpo": 1.0})
    with pytest.raises(ValueError, match="unknown"):
        m.observe(0, {"ipo": 1.0})


# ---------------------------------------------------------------- state round trip

@pytest.mark.parametrize("kind", sorted(FACTORIES))
@pytest.mark.parametrize("k", [0, 1, 13])
def test_state_dict_roundtrip(kind, k):
    straight = FACTORIES[kind]()
    assert isinstance(straight, SCHEDULES[kind])
    drive(straight, k)
    state = roundtrip(straight.state_dict())
    expected = drive(straight, 100, start=k)

    resumed = FACTORIES[kind]()
    resumed.load_state_dict(state)
    assert drive(resumed, 100, start=k) == expected
    assert resumed.info() == straight.info()


def test_state_dict_rejects_other_schedule():
    a = Alright(paper_weights(0.5), seed=0)
    with pytest.raises(ValueError):
        Mix(paper_weights(0.5)).load_state_dict(roundtrip(a.state_dict()))
    with pytest.raises(ValueError):
        Alright({"sft": 1.0, "ipo": 1.0}, seed=0).load_state_dict(roundtrip(a.state_dict()))


def test_schedules_registry():
    assert set(SCHEDULES) == {"single", "sequential", "mix", "alright", "maxright"}


# ---------------------------------------------------------------- construction errors

@pytest.mark.parametrize("make", [
    lambda: Single(""),
    lambda: Single(None),
    lambda: Sequential([]),
    lambda: Sequential([("sft", 0)]),
    lambda: Sequential([("sft", 2.5)]),
    lambda: Sequential([("", 3)]),
    lambda: Sequential([("sft",)]),
    lambda: Mix({}),
    lambda: Mix({"sft": -0.1, "dpo": 1.0}),
    lambda: Mix({"sft": 0.0, "dpo": 0.0}),
    lambda: Mix({"sft": float("nan")}),
    lambda: Mix({"": 1.0}),
    lambda: Mix({"sft": "x"}),
    lambda: Alright({"sft": 0.0}, seed=0),
    lambda: Alright({"sft": 1.0}, seed=None),
    lambda: Maxright({"sft": 1.0}, {"dpo": 0.0}, seed=0, refresh_every=0),
    lambda: Maxright({"sft": 1.0}, {}, seed=0, refresh_every=-1),
    lambda: Maxright({"sft": -1.0, "dpo": 1.0}, {}, seed=0, refresh_every=0),
    lambda: paper_weights(-0.1),
    lambda: paper_weights(1.5),
    lambda: paper_weights(float("nan")),
    lambda: paper_weights(0.5, sft="x", pref="x"),
])
def test_constructor_errors(make):
    with pytest.raises(ValueError):
        make()


def test_paper_weights():
    assert paper_weights(0.25) == {"sft": 0.75, "dpo": 0.25}
    assert list(paper_weights(0.3, sft="sft", pref="kto")) == ["sft", "kto"]
    assert paper_weights(1) == {"sft": 0.0, "dpo": 1.0}
