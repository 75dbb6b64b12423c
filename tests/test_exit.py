"""Every exit path ends with the code the run decided, after an ordered teardown.

The 2-rank exit codes are checked where those paths are launched anyway: a finished run exits 0 in
every ``run_cli`` call, a non-finite stop 3 and a crash while checkpointing 9 (test_resume), SIGTERM
143 per rank (test_resume), bad input 2 (test_bad_input). ``benchmarks/exit_codes.py`` repeats launches.
"""

import pytest
import torch

from xright.cli import lifecycle
from xright.trainer import NonFiniteLoss


def _raise(exc):
    def fn():
        raise exc
    return fn


@pytest.mark.parametrize("exc,code", [
    (lifecycle.UsageError("bad flag"), 2), (NonFiniteLoss("nan at step 3"), 3),
    (lifecycle.Terminated("stopped by SIGTERM"), 143), (KeyboardInterrupt(), 130), (RuntimeError("a bug"), 1),
    (SystemExit(0), 0), (SystemExit(2), 2)])
def test_main_guard_exit_codes(capsys, exc, code):
    with pytest.raises(SystemExit) as e:
        lifecycle.main_guard(_raise(exc))
    assert e.value.code == code
    err = capsys.readouterr().err
    if code == 1:
        assert "Traceback" in err and "RuntimeError: a bug" in err  # a bug keeps its traceback
    elif not isinstance(exc, SystemExit) and code in (2, 3):
        assert err.startswith("xright: error: ") and "Traceback" not in err


def live_engines() -> list:
    import gc

    from deepspeed import DeepSpeedEngine

    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, DeepSpeedEngine)]


def test_runs_in_one_process_release_everything_and_the_teardown_the_groups(tmp_path, monkeypatch):
    """Several main(argv) in one process behave as separate launches: a run, finished or failed, leaves no
    engine, parameter or optimizer state alive and puts torch's F.linear back (ZeRO-3's zero.Init swaps it);
    after close_process_group a new run builds its engine on fresh groups (DeepSpeed caches a clone of the
    world group; a stale one fails in deepspeed.initialize)."""
    import json
    import weakref

    from xright import strategy
    from xright.cli import train_dpo, train_sft
    from xright.trainer import Trainer

    built = []  # weak references to every model and optimizer given to DeepSpeed
    prepare, prepare_reference = strategy.Strategy.prepare, strategy.Strategy.prepare_reference

    def watch(*objs):
        built.extend(weakref.ref(o) for o in objs)

    monkeypatch.setattr(strategy.Strategy, "prepare",
                        lambda self, model, opt, sched: watch(model, opt) or prepare(self, model, opt, sched))
    monkeypatch.setattr(strategy.Strategy, "prepare_reference",
                        lambda self, model: watch(model) or prepare_reference(self, model))
    small = ["--train_batch_size", "4", "--micro_train_batch_size", "2", "--max_samples", "16"]
    # ZeRO-3 DPO, 2 steps: policy and live reference are both engines
    train_dpo.main([*small, "--max_steps", "2", "--zero_stage", "3", "--save_path", str(tmp_path / "a")])
    assert len(built) == 3 and not any(r() for r in built) and not live_engines()  # freed by run() itself
    assert not strategy._ENGINES and torch.nn.functional.linear is torch._C._nn.linear
    # the lr logged with each step is the one it applied: the default warmup (ceil(2 × 0.03) = 1 step) gives
    # step 1 a rate of 0, step 2 the peak --learning_rate 1e-5 (cosine from there)
    with open(tmp_path / "a" / "metrics.jsonl") as f:
        assert [r["lr"] for r in map(json.loads, f) if "lr" in r] == [0.0, 1e-5]

    def crash(self):
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(Trainer, "fit", crash)
    with pytest.raises(RuntimeError, match="a bug in the loop") as failed:
        train_sft.main([*small, "--max_steps", "1", "--zero_stage", "3", "--save_path", str(tmp_path / "b")])
    assert not strategy._ENGINES and torch.nn.functional.linear is torch._C._nn.linear
    del failed  # its traceback holds the run's frames (freed by the collection in live_engines)
    assert not live_engines() and len(built) == 5 and not any(r() for r in built)
    monkeypatch.undo()

    strategy.close_process_group()
    from deepspeed.utils import groups

    assert groups._WORLD_GROUP is None
    train_sft.main([*small, "--max_steps", "1", "--zero_stage", "2", "--save_path", str(tmp_path / "c")])
    assert (tmp_path / "c" / "config.json").exists() and not strategy._ENGINES
