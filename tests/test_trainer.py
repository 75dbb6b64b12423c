"""The training loop in one process with a recording engine: loss assembly, data advancement, picks."""

import json
import math
import re

import pytest
import torch

from xright.data import CyclingLoader, DataSpec, load_data
from xright.models import load_model, load_tokenizer
from xright.objectives import SFT, Pairwise, Reference
from xright.schedules import Alright, Maxright, Mix
from xright.trainer import NonFiniteLoss, Task, TrainArgs, Trainer, _poison_nonfinite


class FakeStrategy:
    world_size, rank, is_rank0, device = 1, 0, True, torch.device("cpu")

    def all_reduce(self, t, op="sum"):
        return t.detach().clone()

    def broadcast_object(self, obj):
        return obj

    def all_gather_object(self, obj):
        return [obj]

    def print(self, *a, **k):
        pass


class RecordingEngine:
    """Stands in for a DeepSpeed engine: forwards to the model and records what backward receives."""

    def __init__(self, model):
        self.module = model
        self.losses, self.boundaries, self.steps = [], [], 0
        self._step_losses, self.applied, self.overflow_at = [], [], set()
        self.discards_nonfinite = True  # False: like a plain optimizer at ZeRO stage 0

    def __call__(self, **kw):
        return self.module(**kw)

    def set_gradient_accumulation_boundary(self, flag):
        self.boundaries.append(flag)

    def backward(self, loss, scale_wrt_gas=True):
        assert scale_wrt_gas is False
        self.losses.append(float(loss))
        self._step_losses.append(float(loss))

    def step(self):
        # like DeepSpeed's ZeRO optimizers: a step with non-finite gradients is discarded
        self.steps += 1
        finite = all(map(math.isfinite, self._step_losses)) or not self.discards_nonfinite
        self.applied.append(finite and self.steps not in self.overflow_at)
        self._step_losses = []

    def was_step_applied(self):
        return self.applied[-1]

    def get_lr(self):
        return [0.0]


class NullLogger:
    def __init__(self):
        self.records = []

    def log(self, r):
        self.records.append(json.loads(json.dumps(r)))


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer("tiny")
    sft, _ = load_data(DataSpec(kind="sft", max_samples=12), tok, log=lambda *a: None)
    pref, _ = load_data(DataSpec(kind="pairwise", max_samples=200), tok, log=lambda *a: None)
    model = load_model("tiny", seed=1).eval()
    ref = Reference(model=load_model("tiny", seed=2, trainable=False))
    return tok, sft, pref, model, ref


def make(setup, schedule, sft_mb=2, pref_mb=2, accum=(2, 3), steps=20):
    tok, sft, pref, model, ref = setup
    tasks = {
        "sft": Task(SFT(), CyclingLoader(sft, "sft", sft_mb, tok.pad_token_id, seed=1, accumulation=accum[0]),
                    None, sft_mb, accum[0]),
        "dpo": Task(Pairwise("dpo"), CyclingLoader(pref, "pairwise", pref_mb, tok.pad_token_id, seed=1,
                                                   accumulation=accum[1]), None, pref_mb, accum[1]),
    }
    engine = RecordingEngine(model)
    trainer = Trainer(FakeStrategy(), engine, ref, tasks, schedule,
                      TrainArgs(total_steps=steps, save_path="/tmp/unused", eval_at_start=False), NullLogger())
    return trainer, engine, tasks


def global_mean(objective, model, ref, batches):
    with torch.no_grad():
        total = sum(float(objective(model, ref, b)[0]) for b in batches)
        units = sum(float(objective.units(b)) for b in batches)
    return total / units


def test_mix_loss_is_weighted_sum_of_separate_losses(setup):
    _, _, _, model, ref = setup
    trainer, engine, tasks = make(setup, Mix({"sft": 0.3, "dpo": 0.7}), accum=(2, 3))
    # the same batches, drawn from copies of the loaders
    copies = {k: CyclingLoader(t.loader.examples, t.loader.kind, t.loader.mb, t.loader.pad_id, seed=1)
              for k, t in tasks.items()}
    sft_batches = [copies["sft"].next() for _ in range(2)]
    dpo_batches = [copies["dpo"].next() for _ in range(3)]
    with torch.no_grad():
        trainer.train_step({"sft": 0.3, "dpo": 0.7})
    expected = 0.3 * global_mean(SFT(), model, ref, sft_batches) + 0.7 * global_mean(Pairwise("dpo"), model, ref,
                                                                                     dpo_batches)
    # three micro-steps (max of the accumulations); the losses add up to the weighted global means
    assert len(engine.losses) == 3 and engine.boundaries == [False, False, True] and engine.steps == 1
    assert math.isclose(sum(engine.losses), expected, rel_tol=1e-5)


def test_sft_mean_is_over_tokens_of_the_whole_step(setup):
    _, _, _, model, ref = setup
    trainer, engine, tasks = make(setup, Mix({"sft": 1.0}), accum=(3, 1))
    copy = CyclingLoader(tasks["sft"].loader.examples, "sft", 2, tasks["sft"].loader.pad_id, seed=1)
    batches = [copy.next() for _ in range(3)]
    with torch.no_grad():
        trainer.train_step({"sft": 1.0})
    token_mean = global_mean(SFT(), model, ref, batches)
    with torch.no_grad():
        mean_of_means = sum(float(SFT()(model, None, b)[0] / SFT().units(b)) for b in batches) / 3
    assert math.isclose(sum(engine.losses), token_mean, rel_tol=1e-5)
    assert not math.isclose(token_mean, mean_of_means, rel_tol=1e-4)


def test_only_the_picked_objective_advances_and_loaders_cycle(setup):
    # 12 SFT examples in micro-batches of 2: 6 per epoch, so SFT cycles many times in 60 steps
    trainer, engine, tasks = make(setup, Alright({"sft": 0.5, "dpo": 0.5}, seed=3), accum=(2, 1), steps=60)
    with torch.no_grad():
        trainer.fit()
    picks = [r["objectives"] for r in trainer.logger.records if "objectives" in r]
    assert len(picks) == 60
    n_sft = sum(p == ["sft"] for p in picks)
    n_dpo = sum(p == ["dpo"] for p in picks)
    assert n_sft + n_dpo == 60 and n_sft > 10 and n_dpo > 10
    sft_drawn = n_sft * 2
    assert tasks["sft"].loader.epoch * 6 + tasks["sft"].loader.position == sft_drawn
    assert tasks["sft"].loader.epoch >= 3
    dpo = tasks["dpo"].loader
    assert dpo.epoch * len(dpo) + dpo.position == n_dpo


def test_maxright_refresh_and_picks_follow_logged_stale_values(setup):
    sched = Maxright({"sft": 0.5, "dpo": 0.5}, {"sft": 1.0, "dpo": 0.0}, seed=0, refresh_every=4)
    trainer, engine, tasks = make(setup, sched, accum=(1, 1), steps=12)
    with torch.no_grad():
        trainer.fit()
    recs = [r for r in trainer.logger.records if "objectives" in r]
    refreshes = [r["step"] for r in recs if "refresh/sft" in r]
    assert refreshes == [1, 5, 9]
    for r in recs:
        scores = {k: 0.5 * (r[f"stale/{k}"] - {"sft": 1.0, "dpo": 0.0}[k]) for k in ("sft", "dpo")}
        assert r["objectives"] == [max(("sft", "dpo"), key=lambda k: (scores[k], k == "sft"))]
        assert scores[r["objectives"][0]] == pytest.approx(r[f"score/{r['objectives'][0]}"])


def test_equal_length_reproduces_xright_zip(setup):
    # XRIGHT zips the two loaders: both advance every step, the unpicked batch is discarded, and a
    # joint epoch (the shorter loader: 12 SFT examples / 2 = 6 steps) restarts both.
    trainer, engine, tasks = make(setup, Alright({"sft": 0.5, "dpo": 0.5}, seed=5), accum=(1, 1), steps=9)
    trainer.args.equal_length, trainer.args.steps_per_epoch = True, 6
    with torch.no_grad():
        trainer.fit()
    assert tasks["sft"].loader.state_dict()["epoch"] == tasks["dpo"].loader.state_dict()["epoch"] == 1
    assert tasks["sft"].loader.position == tasks["dpo"].loader.position == 3


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_loss_poisons_every_gradient(value):
    # an inf loss can have finite gradients; DeepSpeed discards a step only on non-finite ones
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = (w * torch.tensor([1.0, value])).sum()
    _poison_nonfinite(loss).backward()
    assert torch.isnan(w.grad).all()


def test_finite_loss_is_bitwise_unchanged_by_the_check():
    w = torch.tensor([0.3, 1.7], requires_grad=True)
    loss = (w.exp() / 3).sum()
    poisoned = _poison_nonfinite(loss)
    assert poisoned.item() == loss.item()
    (g1,) = torch.autograd.grad(loss, w, retain_graph=True)
    (g2,) = torch.autograd.grad(poisoned, w)
    assert torch.equal(g1, g2)


def test_nonfinite_step_stops_by_default(setup, monkeypatch):
    monkeypatch.setenv("XRIGHT_DEBUG_NAN_AT_STEP", "3")
    trainer, engine, _ = make(setup, Alright({"sft": 0.5, "dpo": 0.5}, seed=3), accum=(1, 1), steps=8)
    with torch.no_grad(), pytest.raises(NonFiniteLoss, match=r"non-finite (sft|dpo) loss \(nan\) at step 3.*stopping "
                                                             r"\(--skip_nonfinite skips such steps\)\. The weights "
                                                             r"are those of step 2"):
        trainer.fit()
    assert engine.applied == [True, True, False]  # the step was discarded, not applied
    assert max(r["step"] for r in trainer.logger.records if "objectives" in r) == 2  # step 3 is not logged


def test_nonfinite_loss_applied_by_a_plain_optimizer_still_stops(setup, monkeypatch):
    # ZeRO stage 0: nothing discards the step, the loop's own check on the reduced losses stops the run
    monkeypatch.setenv("XRIGHT_DEBUG_NAN_AT_STEP", "3")
    trainer, engine, _ = make(setup, Alright({"sft": 0.5, "dpo": 0.5}, seed=3), accum=(1, 1), steps=8)
    engine.discards_nonfinite = False
    with torch.no_grad(), pytest.raises(NonFiniteLoss, match=r"loss \(nan\) at step 3, from the batch of rank 0 "
                                                             r"\(examples builtin:.*; stopping\. The last checkpoint"):
        trainer.fit()
    assert engine.applied == [True, True, True]
    assert max(r["step"] for r in trainer.logger.records if "objectives" in r) == 2


def test_skip_nonfinite_skips_counts_and_keeps_schedule_state_finite(setup, monkeypatch):
    monkeypatch.setenv("XRIGHT_DEBUG_NAN_AT_STEP", "3")
    sched = Maxright({"sft": 0.5, "dpo": 0.5}, {"sft": 1.0, "dpo": 0.0}, seed=0, refresh_every=0)
    trainer, engine, _ = make(setup, sched, accum=(1, 1), steps=8)
    trainer.args.skip_nonfinite = True
    engine.overflow_at = {6}  # finite losses, but gradients that overflow
    with torch.no_grad():
        trainer.fit()
    recs = {r["step"]: r for r in trainer.logger.records if "objectives" in r}
    assert sorted(recs) == list(range(1, 9)) and engine.applied.count(False) == 2
    assert re.match(r"non-finite (sft|dpo) loss \(nan\) at step 3, from the batch of rank 0 \(examples builtin:",
                    recs[3]["skipped"])
    assert recs[6]["skipped"].startswith("non-finite gradients at step 6")
    assert [recs[s].get("skipped_nonfinite") for s in (3, 6)] == [1, 2]
    # a skipped step logs no losses and MAXRIGHT never observes them: every stale loss stays finite
    assert not any(k.startswith("train/") for k in recs[3])
    assert all(math.isfinite(v) for r in recs.values() for k, v in r.items() if k.startswith(("stale/", "train/")))
    assert trainer.state_dict()["skipped_nonfinite"] == 2
    assert [r for r in trainer.logger.records if r.get("done")][0]["skipped_nonfinite"] == 2


def test_eval_set_smaller_than_the_world_is_skipped_not_divided_by_zero(setup):
    trainer, _, tasks = make(setup, Mix({"sft": 1.0}), accum=(1, 1))
    tasks["sft"].eval_examples = tasks["sft"].loader.examples[:1]
    trainer.s = type("TwoRanks", (FakeStrategy,), {"world_size": 2})()
    assert trainer.evaluate() == {}
    trainer.s = FakeStrategy()
    assert set(trainer.evaluate()) >= {"eval/sft/loss"}


def test_kto_eval_share_of_one_example_is_skipped_with_a_warning(setup):
    # --eval_split dummy on a small set: 2 eval examples on 2 ranks leave each rank one, and KTO's KL
    # estimate needs two examples per batch (min_micro_batch)
    from xright.objectives import KTO

    tok, _, _, model, ref = setup
    binary, _ = load_data(DataSpec(kind="binary", max_samples=20), tok, log=lambda *a: None)
    printed = []
    two = type("TwoRanks", (FakeStrategy,), {"world_size": 2, "print": lambda self, *a, **k: printed.append(a[0])})()
    for n_eval, evaluated in ((2, False), (3, False), (4, True)):
        task = Task(KTO(), CyclingLoader(binary, "binary", 2, tok.pad_token_id, seed=1), binary[:n_eval], 2, 1)
        printed.clear()
        trainer = Trainer(two, RecordingEngine(model), ref, {"kto": task}, Mix({"kto": 1.0}),
                          TrainArgs(total_steps=1, save_path="/tmp/unused", eval_at_start=False), NullLogger())
        ev = trainer.evaluate()
        assert ("eval/kto/loss" in ev) == evaluated
        warned = [p for p in printed if p.startswith("warning: kto:")]
        assert warned == ([] if evaluated else [
            f"warning: kto: {n_eval} eval examples give each of the 2 ranks 1, fewer than the 2 a kto batch needs: "
            "kto is not evaluated"])


def test_tokens_count_every_step_between_log_records(setup):
    # logging every 3 steps: each record's tokens are those of the 3 steps since the last record
    trainer, engine, tasks = make(setup, Mix({"sft": 1.0}), accum=(2, 1), steps=7)
    trainer.args.logging_steps = 3
    copy = CyclingLoader(tasks["sft"].loader.examples, "sft", 2, tasks["sft"].loader.pad_id, seed=1)
    per_step = [sum(int(copy.next()["attention_mask"].sum()) for _ in range(2)) for _ in range(7)]
    with torch.no_grad():
        trainer.fit()
    logged = {r["step"]: r["tokens"] for r in trainer.logger.records if "tokens" in r}
    assert logged == {3: sum(per_step[:3]), 6: sum(per_step[3:6]), 7: per_step[6]}
    assert len(set(per_step)) > 1  # the steps differ, so a count of one step per record would be caught


def test_maxright_probes_draw_no_training_batch(setup):
    # every refresh probes each objective; the training steps must still consume each loader's exact
    # sequence of batches, with nothing drawn and thrown away in between
    sched = Maxright({"sft": 0.5, "dpo": 0.5}, {"sft": 4.9, "dpo": 0.0}, seed=0, refresh_every=3)
    trainer, engine, tasks = make(setup, sched, accum=(2, 1), steps=12)
    consumed = {"sft": [], "dpo": []}
    step = trainer.train_step

    def recording_step(plan):
        out = step(plan)
        for k, ids in trainer._last_ids.items():
            consumed[k].append(ids)
        return out

    trainer.train_step = recording_step
    with torch.no_grad():
        trainer.fit()
    refreshes = [r["step"] for r in trainer.logger.records if "refresh/sft" in r]
    assert refreshes == [1, 4, 7, 10]
    for k, t in tasks.items():
        copy = CyclingLoader(t.loader.examples, t.loader.kind, t.loader.mb, t.loader.pad_id, seed=1)
        expected = [[i for _ in range(t.grad_accum) for i in copy.next()["ids"]] for _ in consumed[k]]
        assert consumed[k] == expected, k
        assert t.loader.epoch * len(t.loader) + t.loader.position == len(consumed[k]) * t.grad_accum
    assert consumed["sft"] and consumed["dpo"]
    # the probes' own position is part of the resumable state (global examples); each of the 4 probes takes
    # a whole optimizer step's examples: sft 2 micro-batches of 2, dpo 1 of 2
    probes = trainer.state_dict()["probe_loaders"]
    assert {k: v["epoch"] * len(tasks[k].loader) * tasks[k].loader.mb + v["examples"]
            for k, v in probes.items()} == {"sft": 16, "dpo": 8}


def test_logged_lr_is_the_rate_the_step_applied(setup):
    # an engine whose optimizer step applies the scheduler's current rate, then moves it on (as DeepSpeed's)
    from transformers import get_scheduler

    def scheduler():
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        return opt, get_scheduler("cosine_with_min_lr", opt, num_warmup_steps=2, num_training_steps=6,
                                  scheduler_specific_kwargs={"min_lr": 1e-4})

    trainer, engine, _ = make(setup, Mix({"sft": 1.0}), accum=(1, 1), steps=6)
    opt, sched = scheduler()
    applied, plain_step = [], engine.step

    def step():
        applied.append(opt.param_groups[0]["lr"])
        plain_step()
        opt.step()
        sched.step()

    engine.step, engine.get_lr = step, lambda: [g["lr"] for g in opt.param_groups]
    with torch.no_grad():
        trainer.fit()
    logged = [r["lr"] for r in trainer.logger.records if "lr" in r]
    assert logged == applied and len(logged) == 6
    own_opt, own = scheduler()  # the scheduler's own rates, one per step: 0 in the first step of the warmup
    rates = []
    for _ in range(6):
        rates.append(own.get_last_lr()[0])
        own_opt.step()
        own.step()
    assert logged == rates and logged[:3] == [0.0, 5e-4, 1e-3] and logged[-1] > 1e-4
