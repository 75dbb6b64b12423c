"""Bad input never trains: each case exits non-zero, names the problem (file, line, field), and
leaves no final model behind."""

import json
import os

import pytest

from launch import run_cli

SMALL = ["--train_batch_size", "4", "--micro_train_batch_size", "2", "--max_steps", "2", "--zero_stage", "0"]


def jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def sft_file(tmp_path, bad_line):
    good = json.dumps({"input": "2+2", "output": "4"})
    return jsonl(tmp_path / "sft.jsonl", [good, good, bad_line, good])


CASES = {
    "malformed json": (lambda t: ["--dataset", sft_file(t, '{"input": "x", "output": }')], ["sft.jsonl", "line 3"]),
    "missing key": (lambda t: ["--dataset", sft_file(t, json.dumps({"input": "x", "outptu": "y"}))],
                    ["sft.jsonl", "line 3", "'output'", "outptu"]),
    "empty field": (lambda t: ["--dataset", sft_file(t, json.dumps({"input": "x", "output": ""}))],
                    ["sft.jsonl", "line 3", "'output'", "empty"]),
    "null field": (lambda t: ["--dataset", sft_file(t, json.dumps({"input": None, "output": "y"}))],
                   ["sft.jsonl", "line 3", "'input'"]),
    "non-string field": (lambda t: ["--dataset", sft_file(t, json.dumps({"input": "x", "output": 42}))],
                         ["sft.jsonl", "line 3", "'output'"]),
    "non-utf8": (lambda t: ["--dataset", _bytes(t)], ["bad.jsonl", "line 2", "UTF-8"]),
    "missing model": (lambda t: ["--pretrain", str(t / "no" / "such" / "model")], ["does not exist"]),
    "unreadable ds_config": (lambda t: ["--deepspeed", str(t / "nope.json")], ["cannot read DeepSpeed config", "nope.json"]),
    "contradictory ds_config": (lambda t: ["--deepspeed", _ds(t), "--zero_stage", "0"],
                                ["--zero_stage 0 contradicts zero_optimization.stage = 3"]),
    "batch does not divide": (lambda t: ["--train_batch_size", "6", "--micro_train_batch_size", "4"],
                              ["--train_batch_size 6 must be a positive multiple"]),
    "empty after filtering": (lambda t: ["--dataset", sft_file(t, json.dumps({"input": "x", "output": "y"})),
                                         "--max_len", "4", "--truncation", "drop"], ["sft.jsonl", "no usable sft records"]),
    "save_path not writable": (lambda t: ["--save_path", "/proc/xright-run"], ["--save_path", "/proc/xright-run"]),
    "negative chunk size": (lambda t: ["--logprob_chunk_size", "-1"], ["--logprob_chunk_size -1: must be >= 0"]),
}


def _bytes(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"input": "a", "output": "b"}\n{"input": "\xff\xfe", "output": "b"}\n')
    return str(path)


def _ds(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    return str(path)


# Through the launcher's process path too (exit code, no traceback) for a few; the rest in-process
# through the same entry point (main_guard), which is what decides the exit code.
SUBPROCESS = {"malformed json", "missing model", "contradictory ds_config"}


def run_train_sft(args, capsys, subprocess_run):
    if subprocess_run:
        proc = run_cli("train_sft", args, nproc=1, check=False)
        return proc.returncode, proc.stdout + proc.stderr
    from xright.cli import lifecycle, train_sft

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        lifecycle.main_guard(lambda: train_sft.main(args))
    out = capsys.readouterr()
    return e.value.code, out.out + out.err


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_clearly_before_training(tmp_path, capsys, case):
    make, needles = CASES[case]
    out = tmp_path / "out"
    args = [*SMALL, "--save_path", str(out), *make(tmp_path)]
    if "--save_path" in make(tmp_path):
        args = [*SMALL, *make(tmp_path)]
    code, text = run_train_sft(args, capsys, case in SUBPROCESS)
    assert code == 2, text[-3000:]
    for needle in needles:
        assert needle in text, f"{needle!r} not in output:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    assert not os.path.exists(out / "config.json") and not os.path.exists(out / "model.safetensors")
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()


def test_unknown_loss_is_rejected(tmp_path):
    proc = run_cli("train_dpo", ["--loss", "dpoo", "--save_path", str(tmp_path)], nproc=1, check=False)
    assert proc.returncode == 2 and "invalid choice: 'dpoo'" in proc.stderr


def test_skip_bad_records_counts_and_trains(tmp_path):
    path = sft_file(tmp_path, '{"input": "x", "output": }')
    lines = [json.dumps({"input": f"{i}+1", "output": str(i + 1)}) for i in range(12)]
    with open(path, "a") as f:
        f.write("\n".join(lines) + "\n")
    proc = run_cli("train_sft", [*SMALL, "--dataset", path, "--skip_bad_records", "--save_path", str(tmp_path / "o")],
                   nproc=1)
    assert "1 skipped: bad records" in proc.stdout and "line 3" in proc.stdout


def test_scored_records_with_different_k_stop_before_training(tmp_path, capsys):
    """In-process (world size 1): EXO data whose records have different K stops at load with the file,
    line and field, instead of crashing at the first mixed micro-batch."""
    from xright.cli import lifecycle, train_exo

    recs = [{"prompt": f"q{i}", "completions": ["a", "b"], "rewards": [1, 0]} for i in range(6)]
    recs[4] = {"prompt": "q4", "completions": ["a", "b", "c"], "rewards": [1, 0, 2]}
    path = jsonl(tmp_path / "scored.jsonl", [json.dumps(r) for r in recs])
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        lifecycle.main_guard(lambda: train_exo.main(["--loss", "exo-rw", "--dataset", path, *SMALL,
                                                  "--save_path", str(out)]))
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert (f"xright: error: {path} line 5: field 'completions': has K=3 completions but the first record "
            f"({path} line 1) has K=2") in err, err
    assert not (out / "model.safetensors").exists()
