"""The registries are the only thing a new loss or schedule touches: a toy pairwise loss with its own
hyperparameter and a toy schedule, added here through ``OBJECTIVES`` and ``SCHEDULES`` alone, train
through the CLIs (in-process, one rank, a few steps); objectives are built once from their flags."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from xright import strategy as S
from xright.cli import flags, joint, lifecycle, train_dpo, train_joint
from xright.objectives import KTO, OBJECTIVES, EXO, Flag, PairLoss, Pairwise
from xright.schedules import SCHEDULES, Alright, Schedule

MARGIN = 0.7
SMALL = ["--zero_stage", "2", "--max_steps", "4", "--train_batch_size", "2", "--micro_train_batch_size", "2",
         "--eval_steps", "1000", "--no_precompute_ref_log_probs"]


def toy_loss(p, pc, pr, rc, rr, lc, lr):
    """DPO with a target margin m (its own flag): −log σ(β·h − m)."""
    h = (pc - pr) - (rc - rr)
    return -F.logsigmoid(p.beta * h - p.extra["toy_margin"]), (p.beta * (pc - rc)).detach(), (p.beta * (pr - rr)).detach()


class Reverse(Schedule):
    """The objectives in reverse order, one a step."""

    kind = "reverse"

    def __init__(self, names):
        self.names = tuple(names)

    @classmethod
    def build(cls, inputs):
        return cls(list(inputs.weights)[::-1])

    def plan(self, step):
        return {self.names[step % len(self.names)]: 1.0}


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(OBJECTIVES, "toy", PairLoss(toy_loss, True, own_flags=(Flag("toy_margin", 0.0, "m"),)))
    monkeypatch.setitem(SCHEDULES, "reverse", Reverse)


@pytest.fixture(scope="module", autouse=True)
def _no_process_group_after_this_module():
    yield
    S.close_process_group()


def records(out):
    with open(out / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if "weights" in r]


def run(main, argv):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert lifecycle.guarded(lambda: main(argv)) == 0
    finally:
        torch.set_num_threads(threads)


def test_toy_loss_and_schedule_through_the_clis(registered, tmp_path):
    # train_dpo: --loss toy, its own flag; at step 1 the policy is the reference (h = 0): loss = softplus(m)
    out = tmp_path / "dpo"
    run(train_dpo.main, [*SMALL, "--loss", "toy", "--toy_margin", str(MARGIN), "--save_path", str(out),
                         "--ckpt_path", str(out / "ckpt")])
    recs = records(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[0]["objectives"] == ["toy"]
    assert recs[0]["train/toy/loss"] == pytest.approx(math.log1p(math.exp(MARGIN)), abs=1e-5)

    # train_joint: the toy loss beside SFT under the toy schedule (reverse order: toy first)
    out = tmp_path / "joint"
    run(train_joint.main, [*SMALL, "--objectives", "sft,toy", "--schedule", "reverse", "--toy_margin", str(MARGIN),
                           "--toy_beta", "0.5", "--save_path", str(out), "--ckpt_path", str(out / "ckpt")])
    recs = records(out)
    assert [r["objectives"] for r in recs] == [["toy"], ["sft"], ["toy"], ["sft"]]
    assert recs[0]["train/toy/loss"] == pytest.approx(math.log1p(math.exp(MARGIN)), abs=1e-5)
    assert "train/sft/loss" in recs[1] and "train/toy/loss" not in recs[1]


def test_the_toy_loss_is_a_choice_only_once_registered(registered, monkeypatch):
    assert "toy" in train_joint.parse_objectives("sft,toy")
    monkeypatch.delitem(OBJECTIVES, "toy")
    with pytest.raises(lifecycle.UsageError, match="unknown loss 'toy'"):
        train_joint.parse_objectives("sft,toy")


def test_joint_objectives_read_their_own_and_the_shared_flags():
    objectives = {"a": "simpo", "b": "kto", "c-d": "exo-rw", "e": "dpo"}
    args = flags.parse(train_joint.parser(objectives), [
        "--objectives", "a:simpo,b:kto,c-d:exo-rw,e:dpo", "--e_beta", "0.3", "--label_smoothing", "0.2",
        "--desirable_loss_weight", "1.5", "--beta_r", "2.0"])
    a, b, c, e = (flags.build_objective(args, loss, name) for name, loss in objectives.items())
    assert isinstance(a, Pairwise) and (a.loss, a.params.beta, a.params.label_smoothing) == ("simpo", 2.0, 0.2)
    assert isinstance(b, KTO) and (b.beta, b.desirable_weight) == (0.1, 1.5)
    assert isinstance(c, EXO) and (c.loss, c.beta, c.beta_r) == ("exo-rw", 0.1, 2.0)
    assert (e.params.beta, e.params.label_smoothing) == (0.3, 0.2)
    assert not hasattr(args, "beta")  # a joint run has no unprefixed β


def test_paper_cli_aliases_and_ipo_switch_reach_the_objective():
    args = flags.parse(joint.parser("", "alright"), ["--rlhf_beta", "0.25", "--rlhf_label_smoothing", "0.1",
                                                      "--rlhf_ipo"])
    objective = flags.build_objective(args)
    assert (objective.loss, objective.params.beta, objective.params.label_smoothing) == ("ipo", 0.25, 0.1)
    with pytest.raises(lifecycle.UsageError, match="hh: beta_r must be > 0"):
        flags.build_objective(flags.parse(train_joint.parser({"hh": "exo-rw"}),
                                            ["--objectives", "hh:exo-rw", "--beta_r", "0"]), "exo-rw", "hh")


def test_bind_gives_the_strategy_collective_and_reseed_reaches_the_draw():
    class Strategy:
        def all_reduce(self, t, op):
            return t + 100.0 if op == "mean" else t

    kto = KTO()
    kto.bind(Strategy())
    assert float(kto.reduce_mean(torch.tensor(1.0))) == 101.0
    a, b = Alright({"x": 1.0, "y": 1.0}, seed=0), Alright({"x": 1.0, "y": 1.0}, seed=0)
    b.reseed(1)
    assert [a.plan(i) for i in range(20)] != [b.plan(i) for i in range(20)]
    b.reseed(0)
    fresh = Alright({"x": 1.0, "y": 1.0}, seed=0)
    assert [fresh.plan(i) for i in range(20)] == [b.plan(i) for i in range(20)]


def test_train_joint_stops_at_the_optima_it_was_given(tmp_path):
    # every eval loss is within --eps = 100 of its optimum at the first evaluation (step 0): no step is trained
    out = tmp_path / "joint"
    run(train_joint.main, [*SMALL, "--objectives", "sft,dpo", "--schedule", "mix", "--sft_opt", "0.5", "--eps", "100",
                           "--save_path", str(out), "--ckpt_path", str(out / "ckpt")])
    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert not [r for r in rows if "weights" in r] and "within --eps" in rows[-1]["stopped_early"]
