"""Reference log-probs computed once (--precompute_ref_log_probs, xright.refcache).

In-process runs (world size 1): a run with the precomputed reference logs the same losses as one
with a live reference, for DPO, KTO (its KL rows stay live), EXO and a joint ALRIGHT run; a second
run loads the table without any reference forward (the reference model is not even loaded); a
change of model or max_len recomputes it. One 2-rank ZeRO-3 launch checks that the sharded pass
gives the single-process table and the same losses as a live-reference run.
"""

import json
import math
import os

import pytest
import torch

from launch import metrics, run_cli
from xright import fingerprints, refcache
from xright.cli import joint, train_dpo, train_exo, train_kto
from xright.data import DataSpec, collate, load_data
from xright.models import load_model, tiny_tokenizer
from xright.objectives import Reference

COMMON = ["--zero_stage", "2", "--train_batch_size", "8", "--micro_train_batch_size", "4", "--learning_rate", "1e-3",
          "--lr_scheduler", "constant", "--max_epochs", "2", "--eval_steps", "2"]
N16 = ["--max_samples", "16"]


def losses(save_path: str) -> list[tuple]:
    """Every logged loss: (step, key, value)."""
    return [(r["step"], k, v) for r in metrics(save_path) for k, v in sorted(r.items())
            if k.endswith("/loss") and isinstance(v, float)]


def run(main, tmp_path, name, *extra, capsys=None):
    out = str(tmp_path / name)
    main(["--save_path", out, "--ckpt_path", str(tmp_path / "ckpt"), *COMMON, *extra])
    printed = capsys.readouterr().out if capsys else ""
    return out, printed


@pytest.mark.parametrize("main,extra", [
    (train_dpo.main, [*N16, "--label_smoothing", "0.1"]),
    (train_dpo.main, [*N16, "--packing_samples", "--group_by_length"]),
    (train_kto.main, [*N16, "--beta", "0.1"]),
    (train_exo.main, [*N16, "--loss", "exo-pref"]),
    (lambda argv: joint.main(argv, schedule="alright"), ["--sft_max_samples", "16", "--rlhf_max_samples", "16",
                                  "--sft_micro_train_batch_size", "4", "--rlhf_micro_train_batch_size", "4"]),
], ids=["dpo", "dpo-packed", "kto", "exo", "alright"])
def test_precomputed_reference_logs_the_live_losses(tmp_path, capsys, main, extra):
    cached, printed = run(main, tmp_path, "cached", *extra, capsys=capsys)
    assert "reference log-probs: computed" in printed
    live, printed = run(main, tmp_path, "live", *extra, "--no_precompute_ref_log_probs", capsys=capsys)
    assert "reference log-probs" not in printed
    a, b = losses(cached), losses(live)
    assert len(a) == len(b) > 4 and [x[:2] for x in a] == [x[:2] for x in b]
    for (step, key, x), (_, _, y) in zip(a, b):
        assert x == pytest.approx(y, abs=1e-5), (step, key)
    by_key = {}
    for _, key, x in a:
        by_key.setdefault(key, []).append(x)
    assert any(v[-1] < v[0] - 0.01 for k, v in by_key.items() if k.startswith("eval/")), by_key  # it trained


def test_cache_is_reused_and_recomputed_on_a_change(tmp_path, capsys, monkeypatch):
    run(train_dpo.main, tmp_path, "first", *N16, capsys=capsys)
    files = os.listdir(tmp_path / "ckpt" / "ref_cache")
    assert len(files) == 1 and files[0].endswith(".safetensors")

    # second run, same fingerprint: no reference forward, the reference model is never loaded
    loads = []
    real_load = load_model
    monkeypatch.setattr("xright.models.load_model",
                        lambda *a, **k: loads.append(k.get("trainable", True)) or real_load(*a, **k))
    monkeypatch.setattr(refcache, "compute_table", lambda *a, **k: pytest.fail("reference recomputed"))
    second, printed = run(train_dpo.main, tmp_path, "second", *N16, capsys=capsys)
    assert "reference log-probs: loaded 32 examples" in printed and "no reference forward" in printed
    assert loads == [True]  # the policy only
    assert losses(second) == losses(str(tmp_path / "first"))
    monkeypatch.undo()

    # another max_len (some responses now cut) or another tiny model (seed) recomputes
    for extra in (["--max_len", "40"], ["--seed", "7"]):
        _, printed = run(train_dpo.main, tmp_path, "changed", *N16, *extra, capsys=capsys)
        assert "reference log-probs: computed" in printed, extra
    assert len(os.listdir(tmp_path / "ckpt" / "ref_cache")) == 3


def test_a_resumed_run_finds_the_table(tmp_path, capsys):
    steps = ["--max_steps", "4", "--save_steps", "2"]
    _, printed = run(train_dpo.main, tmp_path, "run", *N16, *steps, capsys=capsys)
    assert "reference log-probs: computed" in printed
    _, printed = run(train_dpo.main, tmp_path, "run", *N16, *steps, "--load_checkpoint", capsys=capsys)
    assert "reference log-probs: loaded 32 examples" in printed and "at step 4" in printed


def test_short_runs_keep_the_live_reference_unless_asked(tmp_path, capsys):
    _, printed = run(train_dpo.main, tmp_path, "short", *N16, "--max_steps", "1", capsys=capsys)
    assert "reference log-probs: live (1 steps draw at most 8 of the 16 dpo examples" in printed
    _, printed = run(train_dpo.main, tmp_path, "forced", *N16, "--max_steps", "1", "--precompute_ref_log_probs",
                     capsys=capsys)
    assert "reference log-probs: computed" in printed


def test_the_table_is_keyed_by_the_precision_the_config_resolves_to(tmp_path, capsys, monkeypatch):
    """A --deepspeed file enabling bf16 (no --bf16 flag) loads policy and reference in bf16 and keys its table
    so; an fp32 run with the same cache computes its own and starts from the DPO loss log 2, margin 0."""
    ds = tmp_path / "bf16.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    dtypes = []

    def recording_load(*a, **k):
        model = load_model(*a, **k)
        dtypes.append(next(model.parameters()).dtype)
        return model

    monkeypatch.setattr("xright.models.load_model", recording_load)
    steps = ["--max_steps", "2", "--precompute_ref_log_probs"]
    _, printed = run(train_dpo.main, tmp_path, "bf16", *N16, *steps, "--deepspeed", str(ds), capsys=capsys)
    assert "reference log-probs: computed" in printed and dtypes == [torch.bfloat16] * 2  # policy, reference
    dtypes.clear()
    out, printed = run(train_dpo.main, tmp_path, "fp32", *N16, *steps, capsys=capsys)
    assert "reference log-probs: computed" in printed and dtypes == [torch.float32] * 2
    assert len(os.listdir(tmp_path / "ckpt" / "ref_cache")) == 2
    start = next(r for r in metrics(out) if "eval/dpo/loss" in r)
    assert start["step"] == 0 and start["eval/dpo/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert start["eval/dpo/margin"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("extra", [["--zero_stage", "3"], ["--ref_offload"]], ids=["zero3", "ref_offload"])
def test_the_precomputed_reference_is_freed(tmp_path, capsys, monkeypatch, extra):
    """Under ZeRO-3 and with --ref_offload the reference is a DeepSpeed engine: after the precompute neither
    it, its module nor its parameters are alive when training starts."""
    import weakref

    from xright import strategy
    from xright.trainer import Trainer

    held, seen = [], {}
    prepare_reference, fit = strategy.Strategy.prepare_reference, Trainer.fit

    def watched(self, model):
        engine = prepare_reference(self, model)
        held.extend(weakref.ref(o) for o in (engine, model, next(model.parameters())))
        return engine

    def fit_and_look(self):
        seen.update(alive=[r() is not None for r in held], engines=len(strategy._ENGINES))
        return fit(self)

    monkeypatch.setattr(strategy.Strategy, "prepare_reference", watched)
    monkeypatch.setattr(Trainer, "fit", fit_and_look)
    _, printed = run(train_dpo.main, tmp_path, "run", *N16, "--max_steps", "2", "--precompute_ref_log_probs", *extra,
                     capsys=capsys)
    assert "reference log-probs: computed" in printed
    assert seen == {"alive": [False] * 3, "engines": 1}  # the policy's only


def test_model_fingerprint_follows_the_files(tmp_path):
    model = load_model("tiny", seed=1, trainable=False)
    model.save_pretrained(tmp_path / "m")
    before = fingerprints.model(str(tmp_path / "m"), seed=0, vocab_size=258)
    assert before == fingerprints.model(str(tmp_path / "m"), seed=0, vocab_size=258)
    load_model("tiny", seed=2, trainable=False).save_pretrained(tmp_path / "m")  # new weights, same config
    after = fingerprints.model(str(tmp_path / "m"), seed=0, vocab_size=258)
    assert after != before and after["config_sha256"] == before["config_sha256"]
    assert fingerprints.model("tiny", 1, 258) != fingerprints.model("tiny", 2, 258)


# every module whose code reaches a reference log-prob (listed here, not read from fingerprints.LOGP_MODULES,
# so that a module dropped from that list fails)
@pytest.mark.parametrize("module", ["xright.logprobs", "xright.models", "xright.objectives", "xright.strategy",
                                    "xright.data.collate", "xright.data.kinds", "xright.sharding", "xright.refcache"])
def test_code_fingerprint_follows_every_log_prob_source(tmp_path, monkeypatch, module):
    import importlib

    tok = tiny_tokenizer()
    key = lambda: fingerprints.digest(fingerprints.reference(None, 1, "fp32", False, False, tok, {}))  # noqa: E731
    before = key()
    mod = importlib.import_module(module)
    changed = tmp_path / os.path.basename(mod.__file__)
    changed.write_text(open(mod.__file__).read() + "\n# a fix\n")
    monkeypatch.setattr(mod, "__file__", str(changed))
    assert key() != before
    monkeypatch.undo()
    assert key() == before


class OneRank:
    world_size, rank, device, is_rank0 = 1, 0, torch.device("cpu"), True

    def all_gather_object(self, obj):
        return [obj]


@pytest.mark.parametrize("kind,k", [("pairwise", 2), ("binary", 1), ("scored", 3)])
def test_table_rows_are_the_live_rows_in_k_major_order(tmp_path, kind, k):
    tok = tiny_tokenizer()
    examples, _ = load_data(DataSpec(kind="pairwise" if kind != "binary" else "binary", max_samples=10, max_len=64),
                            tok, log=lambda *a: None)
    if kind == "scored":  # three completions per prompt
        examples = [{**e, "responses": [*e["responses"], e["responses"][0][:3]]} for e in examples]
    live = Reference(model=load_model("tiny", seed=3, trainable=False))
    table = refcache.compute_table(live, examples, 3, tok.pad_token_id, OneRank())
    assert len(table) == len(examples) and len(table.logps) == k * len(examples)
    batch = collate("scored" if kind == "scored" else kind, examples[2:7], tok.pad_token_id)
    cached = refcache.CachedReference(table).sequence_logps(batch)
    want = live.sequence_logps(batch)
    for c, w in zip(cached, want):
        assert c.shape == w.shape == (k * 5,)
        torch.testing.assert_close(c, w, atol=1e-5, rtol=0)
    packed = refcache.compute_table(live, examples, 3, tok.pad_token_id, OneRank(), packed=True)  # --packing_samples
    # sums of up to 64 fp32 log-probs (|value| up to ~150): 1e-5 absolute is one ulp there; allow 1e-7 relative
    torch.testing.assert_close(packed.logps, table.logps, atol=1e-5, rtol=1e-7)
    assert torch.equal(packed.lengths, table.lengths)
    if kind == "binary":  # KL rows: live reference, or a clear error without one
        with pytest.raises(ValueError, match="no 'kl_' rows"):
            refcache.CachedReference(table).sequence_logps(batch, "kl_")
        kl = refcache.CachedReference(table, live, ("kl_",)).sequence_logps(batch, "kl_")[0]
        torch.testing.assert_close(kl, live.sequence_logps(batch, "kl_")[0])
    table.save(str(tmp_path / "t.safetensors"))
    saved = refcache.RefTable.load(str(tmp_path / "t.safetensors"))
    assert saved.ids == table.ids and torch.equal(saved.logps, table.logps)
    assert saved.covers({e["id"]: refcache.token_hash(e) for e in examples})
    changed = {**examples[0], "prompt_ids": examples[0]["prompt_ids"][1:]}
    assert not saved.covers({changed["id"]: refcache.token_hash(changed)})


# ---- 2 ranks, ZeRO-3 -----------------------------------------------------------------------------

LAUNCH = ["--zero_stage", "3", "--train_batch_size", "8", "--micro_train_batch_size", "4", "--learning_rate", "1e-3",
          "--lr_scheduler", "constant", "--max_samples", "18", "--max_epochs", "3", "--eval_steps", "2"]


def test_two_ranks_zero3_precompute_is_the_single_process_table(tmp_path, capsys):
    out, cache = str(tmp_path / "two"), str(tmp_path / "cache2")
    proc = run_cli("train_dpo", ["--save_path", out, "--ref_cache_dir", cache, *LAUNCH])
    # 18 train + 18 eval examples in batches of 4: 9 batches, so rank 1 runs one padding forward
    assert "reference log-probs: computed 36 examples (72 completions) on 2 rank(s)" in proc.stdout
    [name] = os.listdir(cache)
    sharded = refcache.RefTable.load(os.path.join(cache, name))

    tok = tiny_tokenizer()
    spec = DataSpec(kind="pairwise", max_samples=18, max_len=512)
    train, ev = load_data(spec, tok, log=lambda *a: None)
    live = Reference(model=load_model("tiny", seed=42, trainable=False))
    single = refcache.compute_table(live, [*train, *ev], 4, tok.pad_token_id, OneRank())
    assert sorted(sharded.ids) == sorted(single.ids)
    order = [sharded.index[i] for i in single.ids]
    assert [int(sharded.offsets[n + 1] - sharded.offsets[n]) for n in order] == [2] * len(order)
    rows = torch.tensor([int(sharded.offsets[n]) + k for n in order for k in range(2)])
    torch.testing.assert_close(sharded.logps[rows], single.logps, atol=1e-5, rtol=0)
    torch.testing.assert_close(sharded.lengths[rows], single.lengths, atol=0, rtol=0)

    # the same run with a live reference, as one process with the same global batches (micro 8)
    live_out = str(tmp_path / "live")
    train_dpo.main(["--save_path", live_out, "--ckpt_path", str(tmp_path / "ck"), *LAUNCH,
                    "--zero_stage", "2", "--micro_train_batch_size", "8", "--no_precompute_ref_log_probs"])
    a, b = losses(out), losses(live_out)
    assert [x[:2] for x in a] == [x[:2] for x in b] and len(a) > 4
    for (step, key, x), (_, _, y) in zip(a, b):
        assert x == pytest.approx(y, abs=1e-5), (step, key)


def test_one_id_with_two_tokenisations_keeps_the_reference_live():
    a = {"id": "train.jsonl:3", "prompt_ids": [1, 2], "responses": [[3], [4]]}
    same, other = dict(a), {**a, "responses": [[3, 5], [4]]}  # e.g. two objectives with different max_len
    logs = []
    assert refcache.unique_examples([[a], [same]], logs.append) == ([a], [refcache.token_hash(a)])
    assert refcache.unique_examples([[a], [other]], logs.append) is None
    assert logs == ["warning: reference log-probs: example 'train.jsonl:3' has different token ids in two "
                    "objectives; the reference stays live (no precompute)"]
