"""Objectives on the tiny model, single process: each loss equals the pure loss (xright.losses) applied
to log-probs / scores computed separately, one unpadded row at a time."""

import json

import pytest
import torch

from xright import losses as L
from xright.cli import lifecycle, train_joint, train_kto
from xright.data import DataSpec, collate, load_data
from xright.logprobs import sequence_logps
from xright.models import load_model, tiny_tokenizer
from xright.objectives import EXO, KTO, KTO_MICRO_BATCH_ERROR, Pairwise, Reference, RewardModel, reward_scores

TOK = tiny_tokenizer()
PAD, EOS = TOK.pad_token_id, TOK.eos_token_id
QUIET = dict(log=lambda *a: None)


def examples(kind, n=8, **spec):
    train, _ = load_data(DataSpec(kind=kind, max_samples=n, max_len=512, **spec), TOK, **QUIET)
    return train


def row(batch, i, prefix=""):
    """Row i of a right-padded batch, without its padding, as a batch of one."""
    n = int(batch[prefix + "attention_mask"][i].sum())
    return {k: batch[prefix + k][i:i + 1, :n] for k in ("input_ids", "attention_mask", "loss_mask")}


def row_logps(model, batch, prefix=""):
    rows = len(batch[prefix + "input_ids"])
    with torch.no_grad():
        return torch.stack([sequence_logps(model, row(batch, i, prefix))[0][0] for i in range(rows)])


@pytest.fixture(scope="module")
def policy():
    return load_model("tiny", seed=1).eval()


@pytest.fixture(scope="module")
def reference():
    return Reference(model=load_model("tiny", seed=2, trainable=False))


@pytest.fixture(scope="module")
def rm():
    return load_model("tiny", task="reward", seed=3).eval()


# ---- reward model ---------------------------------------------------------------------------

def test_reward_scores_read_last_real_token(rm):
    seqs = [[5, 6, 7, 8, 9, EOS], [5, 10, EOS], [11, 12, 13, 14, EOS]]  # lengths 6, 3, 5: right-padded
    T = max(map(len, seqs))
    ids = torch.full((3, T), PAD)
    mask = torch.zeros((3, T), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)], mask[b, :len(s)] = torch.tensor(s), 1
    with torch.no_grad():
        alone = torch.stack([rm(input_ids=torch.tensor([s])).logits[0, 0] for s in seqs])
        scores = reward_scores(rm, ids, mask)
        hf = rm(input_ids=ids, attention_mask=mask).logits[:, 0]
        torch.testing.assert_close(scores, alone)
        torch.testing.assert_close(hf, alone)  # pad != eos: HF's pooling agrees, so the saved model does
        # pad == eos (OpenRLHF's default without a pad token): HF pools at the token before the final eos
        eos_padded = ids.masked_fill(mask == 0, EOS)
        rm.config.pad_token_id = EOS
        try:
            hf_eos = rm(input_ids=eos_padded, attention_mask=mask).logits[:, 0]
            torch.testing.assert_close(reward_scores(rm, eos_padded, mask), alone)
        finally:
            rm.config.pad_token_id = PAD
    assert not torch.allclose(hf_eos, alone)


@pytest.mark.parametrize("kind,use_margin", [("sigmoid", False), ("logexp", True)])
def test_reward_model_loss_is_bradley_terry(rm, kind, use_margin):
    exs = examples("pairwise", 4)
    for i, e in enumerate(exs):
        e["margin"] = 0.5 * i
    batch = collate("pairwise", exs, PAD)
    objective = RewardModel(kind, use_margin=use_margin)
    with torch.no_grad():
        total, metrics = objective(rm, None, batch)
        alone = torch.stack([rm(input_ids=row(batch, i)["input_ids"]).logits[0, 0] for i in range(8)])
    sc, sr = alone[:4], alone[4:]
    margin = batch["margin"] if use_margin else None
    torch.testing.assert_close(total, L.bradley_terry(sc, sr, margin, kind).sum())
    assert metrics["acc"].item() == (sc > sr).sum().item()
    torch.testing.assert_close(metrics["margin"], (sc - sr).sum())
    torch.testing.assert_close(metrics["reward_mean"], alone.sum() / 2)
    assert objective.units(batch).item() == 4 and not objective.needs_reference


# ---- KTO --------------------------------------------------------------------------------------

def test_kto_loss_matches_pure_loss(policy, reference):
    batch = collate("binary", examples("binary", 6), PAD)
    assert batch["label"].any() and not batch["label"].all()  # desirable and undesirable in one batch
    objective = KTO(beta=0.5, desirable_weight=1.0, undesirable_weight=1.3)
    pi, rho = row_logps(policy, batch), row_logps(reference.model, batch)
    z = L.kto_kl(row_logps(policy, batch, "kl_"), row_logps(reference.model, batch, "kl_"))
    with torch.no_grad():
        total, metrics = objective(policy, reference, batch)
        expect = L.kto(pi, rho, batch["label"], z, 0.5, 1.0, 1.3)[0].sum()
        torch.testing.assert_close(total, expect)
        torch.testing.assert_close(metrics["kl"] / 6, z)
        # z is what reduce_mean (the mean over ranks) returns, clamped at 0 afterwards
        seen = []
        objective.reduce_mean = lambda t: seen.append(t) or t - 1000.0
        total, _ = objective(policy, reference, batch)
    torch.testing.assert_close(seen[0], z)
    torch.testing.assert_close(total, L.kto(pi, rho, batch["label"], torch.tensor(0.0), 0.5, 1.0, 1.3)[0].sum())


def test_kto_micro_batch_one_is_refused_before_training(tmp_path, capsys):
    with pytest.raises(ValueError, match="KTO needs micro batch size >= 2"):
        collate("binary", examples("binary", 1), PAD)
    with pytest.raises(ValueError, match="KTO needs micro batch size >= 2"):
        KTO().check_micro_batch(1)
    KTO().check_micro_batch(2)
    # the CLI stops in common.run before any process group, model or data is set up
    with pytest.raises(SystemExit) as e:
        lifecycle.main_guard(lambda: train_kto.main(["--micro_train_batch_size", "1", "--save_path", str(tmp_path)]))
    assert e.value.code == 2
    assert KTO_MICRO_BATCH_ERROR in capsys.readouterr().err


# ---- EXO --------------------------------------------------------------------------------------

def scored_file(path, n=4, K=3):
    with open(path, "w") as f:
        for i in range(n):
            comps = [f"answer {i} {'x' * k}" for k in range(K)]
            f.write(json.dumps({"prompt": f"question {i}?", "completions": comps,
                                "rewards": [float(k + i) % 3 for k in range(K)]}) + "\n")
    return str(path)


@pytest.mark.parametrize("loss", ["exo-rw", "dpo-rw"])
def test_exo_rw_k3_matches_pure_loss(tmp_path, policy, reference, loss):
    exs = examples("scored", 4, dataset=scored_file(tmp_path / "scored.jsonl"))
    batch = collate("scored", exs, PAD)
    assert batch["num_choices"] == 3 and batch["input_ids"].shape[0] == 12  # K-major, whole groups
    objective = EXO(loss, beta=0.7, beta_r=0.5)
    assert objective.kind == "scored" and objective.needs_reference
    pi = row_logps(policy, batch).view(3, 4).T  # row k*B + b is completion k of example b
    rho = row_logps(reference.model, batch).view(3, 4).T
    target = L.exo_rw_target(batch["rewards"], 0.5)
    fn = L.exo if loss == "exo-rw" else L.dpo_forward_kl
    with torch.no_grad():
        total, metrics = objective(policy, reference, batch)
    torch.testing.assert_close(total, fn(pi, rho, target, 0.7).sum())
    assert 0 <= metrics["acc"].item() <= 4


@pytest.mark.parametrize("loss,eps", [("exo-pref", None), ("dpo-pref", 1e-3)])
def test_exo_pref_matches_pure_loss(policy, reference, loss, eps):
    batch = collate("pairwise", examples("pairwise", 4), PAD)
    objective = EXO(loss, beta=0.3, epsilon=eps)
    assert objective.kind == "pairwise"
    # The loss is compared on the padded batch's own log-probs: EXO's log-weight (log ε ≈ −10 for the
    # pref target) magnifies float32 padding-vs-unpadded rounding past the default tolerance on some
    # CPUs. That the padded log-probs equal row-by-row ones is checked on the log-probs themselves.
    with torch.no_grad():
        padded = sequence_logps(policy, batch)[0], sequence_logps(reference.model, batch)[0]
    torch.testing.assert_close(padded[0], row_logps(policy, batch), atol=1e-5, rtol=1e-5)
    pi, rho = padded[0].view(2, 4).T, padded[1].view(2, 4).T
    fn = L.exo if loss == "exo-pref" else L.dpo_forward_kl
    with torch.no_grad():
        total, _ = objective(policy, reference, batch)
    expected = fn(pi.double(), rho.double(), L.exo_pref_target(4, eps).double(), 0.3).sum()
    torch.testing.assert_close(total.double(), expected, atol=1e-5, rtol=1e-5)


def test_exo_rw_without_rewards_is_an_error(policy, reference):
    batch = collate("pairwise", examples("pairwise", 2), PAD)  # no rewards field
    with pytest.raises(ValueError, match="needs rewards"):
        EXO("exo-rw")(policy, reference, batch)
    with pytest.raises(ValueError, match="epsilon"):
        EXO("exo-pref", epsilon=0.0)


def test_reference_free_losses_need_no_reference(policy):
    assert not Pairwise("slic").needs_reference and not Pairwise("simpo").needs_reference
    batch = collate("pairwise", examples("pairwise", 2), PAD)
    with torch.no_grad():
        total, _ = Pairwise("simpo")(policy, None, batch)  # no reference passed: none used
    assert torch.isfinite(total)


# ---- train_joint's flags ------------------------------------------------------------------------

def test_joint_flags():
    objectives = train_joint.parse_objectives("sft,dpo,kto,hh:dpo,exo-rw")
    assert objectives == {"sft": "sft", "dpo": "dpo", "kto": "kto", "hh": "dpo", "exo-rw": "exo-rw"}
    args = train_joint.parser(objectives).parse_args([
        "--objectives", "sft,dpo,kto,hh:dpo,exo-rw", "--kto_micro_train_batch_size", "4", "--dpo_weight", "0.3",
        "--hh_dataset", "x.jsonl", "--exo_rw_beta", "0.2", "--sft_opt", "0.9"])
    assert (args.kto_micro_train_batch_size, args.dpo_weight, args.hh_dataset) == (4, 0.3, "x.jsonl")
    assert (args.exo_rw_beta, args.sft_opt, args.dpo_beta, args.sft_micro_train_batch_size) == (0.2, 0.9, 0.1, None)
    for bad in ("sft,rm", "sft,sft", "Sft", ""):
        with pytest.raises(lifecycle.UsageError):
            train_joint.parse_objectives(bad)
