"""Every exit path ends with the code the run decided, after an ordered teardown.

The 2-rank exit codes are checked where those paths are launched anyway: a finished run exits 0 in
every ``run_cli`` call, a non-finite stop 3 and a crash while checkpointing 9 (test_resume), SIGTERM
143 per rank (test_resume), bad input 2 (test_bad_input). ``benchmarks/exit_codes.py`` repeats launches.
"""

import pytest
import torch

from xright.cli import common
from xright.trainer import NonFiniteLoss


def _raise(exc):
    def fn():
        raise exc
    return fn


@pytest.mark.parametrize("exc,code", [
    (common.UsageError("bad flag"), 2), (NonFiniteLoss("nan at step 3"), 3),
    (common.Terminated("stopped by SIGTERM"), 143), (KeyboardInterrupt(), 130), (RuntimeError("a bug"), 1),
    (SystemExit(0), 0), (SystemExit(2), 2)])
def test_main_guard_exit_codes(capsys, exc, code):
    with pytest.raises(SystemExit) as e:
        common.main_guard(_raise(exc))
    assert e.value.code == code
    err = capsys.readouterr().err
    if code == 1:
        assert "Traceback" in err and "RuntimeError: a bug" in err  # a bug keeps its traceback
    elif not isinstance(exc, SystemExit) and code in (2, 3):
        assert err.startswith("xright: error: ") and "Traceback" not in err


def test_teardown_releases_deepspeed_groups_for_the_next_run(tmp_path):
    """After close_process_group a new run in the same process builds its engine on fresh groups
    (DeepSpeed caches a clone of the world group; a stale one fails in deepspeed.initialize)."""
    from xright.cli import train_dpo, train_sft
    from xright.strategy import _ENGINES, close_process_group

    small = ["--max_steps", "1", "--train_batch_size", "4", "--micro_train_batch_size", "2", "--max_samples", "16"]
    train_sft.main([*small, "--zero_stage", "2", "--save_path", str(tmp_path / "a")])
    assert len(_ENGINES) == 1
    close_process_group()
    assert not _ENGINES
    from deepspeed.utils import groups

    assert groups._WORLD_GROUP is None
    train_dpo.main([*small, "--zero_stage", "3", "--save_path", str(tmp_path / "b")])
    assert torch.nn.functional.linear is not torch._C._nn.linear  # ZeRO-3's zero.Init swapped it in
    close_process_group()
    assert torch.nn.functional.linear is torch._C._nn.linear  # and the teardown put torch's back
    assert (tmp_path / "b" / "config.json").exists()
