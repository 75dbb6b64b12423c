"""The reward-model, KTO, EXO, SimPO and N-objective joint CLIs: 2 CPU ranks under ZeRO-3, tiny model.

Each run trains a few steps on fixed data and the loss must go down; the reward model must rank
held-out pairs and reload with identical scores; MAXRIGHT over three objectives must pick by its
rule on every rank; bad records must stop a run with an error naming the file and line.
"""

import json
import math
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from launch import launch_named, metrics, train_records
from xright import losses as L
from xright.data import CyclingLoader, DataSpec, collate, load_data
from xright.data.synthetic import preference_records
from xright.logprobs import sequence_logps, split_choices
from xright.models import load_model, load_tokenizer
from xright.objectives import KTO, Reference, RewardModel, reward_scores

COMMON = ["--zero_stage", "3", "--train_batch_size", "8", "--micro_train_batch_size", "2", "--learning_rate", "1e-3",
          "--lr_scheduler", "constant", "--eval_steps", "1000"]
FIXED = [*COMMON, "--max_samples", "16", "--max_epochs", "6"]  # 2 steps per epoch, 12 steps


def steps_equal(two, one, name, what=("loss",), evals=True):
    """2 ranks = 1 process: every step's metrics and (``evals``) every eval of the two runs agree (fp32)."""
    a, b = train_records(two), train_records(one)
    assert len(a) == len(b) == 12
    for m in what:
        assert [r[f"train/{name}/{m}"] for r in a] == pytest.approx([r[f"train/{name}/{m}"] for r in b],
                                                                    rel=2e-5, abs=1e-6), m
    if not evals:
        return
    ev = lambda out: [(r["step"], r[f"eval/{name}/loss"]) for r in metrics(out) if f"eval/{name}/loss" in r]  # noqa
    assert [s for s, _ in ev(two)] == [s for s, _ in ev(one)] == [0, 12]
    assert [v for _, v in ev(two)] == pytest.approx([v for _, v in ev(one)], rel=2e-5, abs=1e-6)


def train_loss_drops(out, name, k=2):
    losses = [r[f"train/{name}/loss"] for r in train_records(out)]
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    assert last < first - 0.02, (name, losses)
    return first, last


def bad_records(root):
    """Three files with one bad record each: (module, args, the error's location)."""
    def jsonl(name, rows):
        path = root / name
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(path)

    good = {"prompt": "p", "completions": ["a", "b", "c"], "rewards": [1.0, 0.0, 0.5]}
    k_mismatch = jsonl("k.jsonl", [good, {**good, "rewards": [1.0, 0.0]}])
    small_group = jsonl("group.jsonl", [good, good, {**good, "completions": ["a"], "rewards": [1.0]}])
    label = jsonl("label.jsonl", [{"prompt": "p", "completion": "c", "label": True},
                                  {"prompt": "p", "completion": "d", "label": "yes"}])
    return [("train_exo", ["--loss", "exo-rw", "--dataset", k_mismatch], "k.jsonl line 2: field 'rewards'"),
            ("train_exo", ["--loss", "exo-rw", "--dataset", small_group], "group.jsonl line 3: field 'completions'"),
            ("train_kto", ["--dataset", label], "label.jsonl line 2: field 'label'")]


def scored_file(root):
    data = root / "scored.jsonl"
    with open(data, "w") as f:
        for r in preference_records(16, seed=0):
            f.write(json.dumps({"prompt": r["prompt"], "completions": [r["chosen"], r["rejected"], "no idea"],
                                "rewards": [1.0, 0.0, -1.0]}) + "\n")
    return str(data)


# MAXRIGHT over three objectives, chosen so that each objective leads at some step: the initial scores are
# dpo 0.693 (log 2), kto 0.5 (1 − σ(0)) and sft 0.2 × (≈5.51 − 3.2) ≈ 0.46, so dpo leads, then kto once dpo's
# loss falls, then sft once kto's has fallen too
WEIGHTS = {"sft": 0.2, "dpo": 1.0, "kto": 1.0}
OPTS = {"sft": 3.2, "dpo": 0.0, "kto": 0.0}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (save_path, process) for every run of this file: the 2-rank ones in one launch, the one-process
    ones in one process (``run_many``), each run a CLI's own ``main``."""
    root = tmp_path_factory.mktemp("objectives")
    binary, scored, bad = one_prompt_binary(root), scored_file(root), bad_records(root)
    kto = [*FIXED, "--dataset", binary, "--beta", "0.1", "--desirable_loss_weight", "2"]
    exo_rw = [*FIXED, "--zero_stage", "2", "--loss", "exo-rw", "--dataset", scored, "--beta", "0.1",
              "--beta_r", "0.5"]  # ZeRO-2 (the pairwise run is ZeRO-3)
    joint = [f for n in WEIGHTS for f in (f"--{n}_weight", str(WEIGHTS[n]), f"--{n}_opt", str(OPTS[n]),
                                          f"--{n}_max_samples", "32")]
    two = {
        "rm": ("train_rm", [*COMMON, "--max_samples", "64", "--max_steps", "16"]),
        # LoRA + bf16 + DeepSpeedCPUAdam (compiled on first use) under ZeRO-2
        "rm-lora": ("train_rm", ["--zero_stage", "2", "--bf16", "--adam_offload", "--lora_rank", "4",
                                 "--lora_alpha", "8", "--merge_lora", "--train_batch_size", "8",
                                 "--micro_train_batch_size", "2", "--learning_rate", "1e-3", "--lr_scheduler",
                                 "constant", "--max_samples", "64", "--max_steps", "8", "--eval_steps", "1000"]),
        "kto": ("train_kto", kto),
        "kto-full-logits": ("train_kto", [*kto, "--logprob_chunk_size", "0"]),  # vs the default chunked head
        "exo": ("train_exo", [*FIXED, "--loss", "exo-pref", "--beta", "0.1"]),
        "exo-rw": ("train_exo", exo_rw),
        # a reference model would be loaded from --ref_pretrain and fail: SimPO must load none
        "simpo": ("train_dpo", [*FIXED, "--loss", "simpo", "--beta", "2.0", "--ref_pretrain",
                                str(root / "no-such-model")]),
        "joint": ("train_joint", ["--objectives", "sft,dpo,kto", "--schedule", "maxright", *COMMON,
                                  "--max_steps", "8", "--max_eval_steps", "4", "--kto_beta", "0.1",
                                  "--debug_log_picks", "--eps", "0", *joint]),
    }
    one = {
        "kto1": ("train_kto", [*kto, "--micro_train_batch_size", "4"]),
        "exo1": ("train_exo", [*FIXED, "--loss", "exo-pref", "--beta", "0.1"]),
        "exo-rw1": ("train_exo", exo_rw),
        **{f"bad{i}": (module, [*args, "--max_steps", "1"]) for i, (module, args, _) in enumerate(bad)},
    }
    runs = launch_named(root, {2: two, 1: one})
    runs.root, runs.bad = root, bad
    return runs


def test_reward_model_ranks_held_out_pairs_and_reloads(runs):
    out, _ = runs("rm")
    rows = metrics(out)
    start, final = rows[0], [r for r in rows if r.get("final")][-1]
    assert final["eval/rm/loss"] < start["eval/rm/loss"] - 0.3
    assert final["eval/rm/acc"] >= 0.95  # chance is 0.5
    print(f"reward model held-out accuracy {start['eval/rm/acc']:.3f} -> {final['eval/rm/acc']:.3f}, "
          f"loss {start['eval/rm/loss']:.3f} -> {final['eval/rm/loss']:.4f}")

    # reload with plain transformers; recompute the run's eval metrics and normalisation statistics
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.num_labels == 1
    _, ev = load_data(DataSpec(kind="pairwise", max_samples=64, max_len=512, prompt_key=None), tok,
                      log=lambda *a: None)
    objective, sums, scores = RewardModel(), {}, []
    with torch.no_grad():
        for i in range(0, len(ev), 16):
            batch = collate("pairwise", ev[i:i + 16], tok.pad_token_id)
            _, m = objective(model, None, batch)
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
            torch.testing.assert_close(hf, reward_scores(model, batch["input_ids"], batch["attention_mask"]))
            scores.append(hf)
        one = ev[0]["prompt_ids"] + ev[0]["responses"][0]
        alone = model(input_ids=torch.tensor([one])).logits[0, 0]
    torch.testing.assert_close(alone, scores[0][0])
    for k in ("acc", "margin", "loss", "reward_mean"):
        assert math.isclose(sums[k] / len(ev), final[f"eval/rm/{k}"], rel_tol=1e-4, abs_tol=1e-5), k
    scores = torch.cat(scores).double()
    stats = json.load(open(os.path.join(out, "reward_stats.json")))
    assert math.isclose(stats["mean"], scores.mean().item(), rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(stats["std"], scores.std(unbiased=False).item(), rel_tol=1e-4)
    assert (model.config.mean, model.config.std) == (stats["mean"], stats["std"])


def test_lora_reward_model_in_bf16_with_offloaded_adam_reloads_merged(runs):
    # LoRA + bf16 + DeepSpeedCPUAdam under ZeRO-2: the merged model must carry the trained value head, so
    # its fp32 eval matches the run's bf16 one up to bf16 rounding
    out, _ = runs("rm-lora")
    rows = metrics(out)
    start, final = rows[0], [r for r in rows if r.get("final")][-1]
    assert final["eval/rm/loss"] < start["eval/rm/loss"] - 0.3
    ds = json.load(open(os.path.join(out, "ds_config.json")))
    assert ds["bf16"]["enabled"] and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    merged = os.path.join(out, "merged")
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    _, ev = load_data(DataSpec(kind="pairwise", max_samples=64, max_len=512, prompt_key=None), tok,
                      log=lambda *a: None)
    sums = {}
    with torch.no_grad():
        for i in range(0, len(ev), 16):
            _, m = RewardModel()(model, None, collate("pairwise", ev[i:i + 16], tok.pad_token_id))
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + float(v)
    assert math.isclose(sums["loss"] / len(ev), final["eval/rm/loss"], abs_tol=0.01)
    assert math.isclose(sums["margin"] / len(ev), final["eval/rm/margin"], rel_tol=0.02)


def one_prompt_binary(tmp_path):
    """KTO data where every record has the same prompt: the mismatched pairs (x_i, y_{i+1}) of a micro-batch
    then hold the micro-batch's own completions whatever the pairing, so z depends only on which examples
    share a micro-step — the same on 2 ranks (micro 2, z averaged over ranks) as in 1 process (micro 4).
    The eval split has 7 records: 2 ranks evaluate the first 6."""
    root = tmp_path / "binary"
    root.mkdir()
    pairs = preference_records(24, seed=3)
    rows = [{"prompt": "say something", "completion": r[w], "label": w == "chosen"}
            for r in pairs for w in ("chosen", "rejected")]
    for split, part in (("train", rows[:16]), ("test", rows[16:23])):
        with open(root / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in part)
    return str(root)


def kto_eval(model_dir, data, rounds):
    """The KTO eval loss of a saved policy against the initial reference. ``rounds``: the eval forwards, each
    a list of every rank's batch (record indices, counted: False for a rank's repeat that only keeps the ranks'
    forwards in step); within a round z is the mean over the ranks' batches, as the collective makes it."""
    tok = load_tokenizer("tiny")
    _, ev = load_data(DataSpec(kind="binary", dataset=data, max_len=2048), tok, log=lambda *a: None)
    policy = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ref = Reference(model=load_model("tiny", seed=42, trainable=False))
    kto, total, n = KTO(beta=0.1, desirable_weight=2.0), 0.0, 0
    with torch.no_grad():
        for ranks in rounds:
            batches = [collate("binary", [ev[i] for i in idx], tok.pad_token_id) for idx, _ in ranks]
            local = []
            kto.reduce_mean = lambda z: local.append(z) or z  # noqa: E731 (each rank's own z first)
            for b in batches:
                kto(policy, ref, b)
            kto.reduce_mean = lambda z: torch.stack(local).mean()  # noqa: E731
            total += sum(float(kto(policy, ref, b)[0]) for b, (_, counted) in zip(batches, ranks) if counted)
            n += sum(len(idx) for idx, counted in ranks if counted)
    return total / n


def test_kto_trains_and_two_ranks_equal_one_process(runs):
    (out, proc), (one, _) = runs("kto"), runs("kto1")
    data = str(runs.root / "binary")
    train_loss_drops(out, "kto")
    assert "outside [1, 4/3]" in proc.stdout  # 2·n_D / n_U = 2
    # z (logged as kl) is the mean over both ranks: were it rank-local, the losses would part after step 1
    steps_equal(out, one, "kto", ("loss", "kl", "reward"), evals=False)
    assert max(abs(r["train/kto/kl"]) for r in train_records(out)) > 1e-3
    # every eval record counts on any number of ranks: 2 ranks (micro 2) evaluate records 0, 2 | 4, 6 and 1, 3, 5
    # (a batch of 1 joins the one before; rank 1 repeats its batch in the second round, z over both ranks), 1
    # process (micro 4) all 7 in batches of 4 and 3. At step 0 (π = ρ) every loss is λ/2: λ_D = 2, λ_U = 1 and
    # the records alternate desirable, undesirable
    for o in (out, one):
        assert [r for r in metrics(o) if r.get("step") == 0][0]["eval/kto/loss"] == pytest.approx((4 * 1 + 3 * 0.5) / 7)
    two_final, one_final = ([r for r in metrics(o) if r.get("final")][-1]["eval/kto/loss"] for o in (out, one))
    two_ranks = [[([0, 2], True), ([1, 3, 5], True)], [([4, 6], True), ([1, 3, 5], False)]]
    one_process = [[([0, 1, 2, 3], True)], [([4, 5, 6], True)]]
    assert two_final == pytest.approx(kto_eval(out, data, two_ranks), rel=1e-4)
    assert one_final == pytest.approx(kto_eval(one, data, one_process), rel=1e-4)
    # KTO's z pairs records within a micro-batch: its eval depends on the batching (the one exception)
    assert abs(kto_eval(out, data, two_ranks) - kto_eval(out, data, one_process)) > 1e-4


def test_chunked_head_logs_the_full_logits_losses(runs):
    """ZeRO-3, 2 ranks, KTO (policy, its KL rows, a ZeRO-3 reference): the default chunked output head gathers the
    partitioned head weight and logs every step's and eval's numbers of --logprob_chunk_size 0."""
    (chunked, proc), (full, _) = runs("kto"), runs("kto-full-logits")
    assert "full [tokens, vocab] path" not in proc.stdout
    steps_equal(chunked, full, "kto", ("loss", "kl", "reward"), evals=False)
    ev = lambda out: [r["eval/kto/loss"] for r in metrics(out) if "eval/kto/loss" in r]  # noqa: E731
    assert len(ev(chunked)) >= 2 and ev(chunked) == pytest.approx(ev(full), rel=2e-5, abs=1e-6)


def test_exo_pref_trains_and_two_ranks_equal_one_process(runs):
    (out, _), (one, _) = runs("exo"), runs("exo1")
    train_loss_drops(out, "exo-pref")
    # step 1: policy = reference, q = [½, ½]; the target is softmax([0, −10]): KL = log ½ − ½ Σ log p
    log_p = torch.log_softmax(torch.tensor([0.0, -10.0], dtype=torch.float64), 0)
    assert train_records(out)[0]["train/exo-pref/loss"] == pytest.approx(math.log(0.5) - 0.5 * float(log_p.sum()),
                                                                        rel=1e-5)
    steps_equal(out, one, "exo-pref", ("loss", "margin", "logp"))


def test_exo_rw_trains_on_three_completions(runs):
    (out, _), (one, _) = runs("exo-rw"), runs("exo-rw1")
    train_loss_drops(out, "exo-rw")
    # step 1: q uniform over 3; p = softmax([1, 0, −1] / 0.5): KL = −log 3 − mean log p
    log_p = torch.log_softmax(torch.tensor([2.0, 0.0, -2.0], dtype=torch.float64), 0)
    assert train_records(out)[0]["train/exo-rw/loss"] == pytest.approx(-math.log(3) - float(log_p.mean()), rel=1e-5)
    steps_equal(out, one, "exo-rw", ("loss", "margin", "logp"), evals=False)  # one file: no eval split


def test_simpo_trains_without_reference(runs):
    out, _ = runs("simpo")
    train_loss_drops(out, "simpo")
    # step 1 in numbers: SimPO (β 2, γ 0.5) of the initial model on the step's 8 pairs (both ranks, 2 micro-steps)
    tok = load_tokenizer("tiny")
    train, _ = load_data(DataSpec(kind="pairwise", max_samples=16, max_len=512), tok, log=lambda *a: None)
    model = load_model("tiny", seed=42).eval()
    losses = []
    with torch.no_grad():
        for ld in [CyclingLoader(train, "pairwise", 2, tok.pad_token_id, rank=r, world_size=2) for r in range(2)]:
            for _ in range(2):
                pi, n = (split_choices(t, 2) for t in sequence_logps(model, ld.next()))
                losses.append(L.simpo(pi[:, 0], pi[:, 1], n[:, 0], n[:, 1], 2.0, 0.5)[0])
    assert train_records(out)[0]["train/simpo/loss"] == pytest.approx(float(torch.cat(losses).mean()), rel=1e-5)


def test_maxright_three_objectives_picks_by_rule_on_every_rank(runs):
    out, _ = runs("joint")
    weights, opts = WEIGHTS, OPTS
    records = train_records(out)
    assert len(records) == 8
    for r in records:
        scores = {n: weights[n] * (r[f"stale/{n}"] - opts[n]) for n in weights}
        assert r["objectives"] == [max(scores, key=scores.get)], r  # first of equal scores wins: dict order
    assert sum("refresh/sft" in r for r in records) == 2  # steps 1 and 5
    assert {r["objectives"][0] for r in records} == set(weights), [r["objectives"] for r in records]
    picks = [[json.loads(line) for line in open(os.path.join(out, f"picks.rank{k}.jsonl"))] for k in range(2)]
    assert picks[0] == picks[1] and len(picks[0]) == 8
    assert all(p["local"] == p["plan"] for p in picks[0])
    assert [sorted(p["plan"]) for p in picks[0]] == [r["objectives"] for r in records]
    final = [r for r in metrics(out) if r.get("final")][-1]
    assert {"eval/sft/loss", "eval/dpo/loss", "eval/kto/loss"} <= set(final)


def test_bad_records_name_file_and_line(runs):
    for i, (module, _, expect) in enumerate(runs.bad):
        _, proc = runs(f"bad{i}", ok=False)
        assert proc.returncode == 2, (module, proc.stdout[-2000:])
        assert expect in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
