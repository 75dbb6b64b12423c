"""Every flag users pass, through its CLI: each one must change what the run does or writes.

The CLIs run in this process (``main(argv)``, world size 1) with the built-in tiny model for a few
steps, several flags per run. What each flag should do is computed here independently: the first
step's loss from the seeded initial model and the loader's first batches (or a closed form where the
policy still equals its reference), the LR schedule from its formula, the optimizer's settings from
the optimizer the run built, config values from the written ds_config.json, checkpoints on disk,
tensorboard event files.
"""

from __future__ import annotations

import glob
import json
import math
import os
from contextlib import contextmanager

import pytest
import torch
import transformers.modeling_utils

from launch import metrics, train_records
from xright import losses as L
from xright import strategy as S
from xright.cli import joint, train_dpo, train_exo, train_kto, train_rm, train_sft
from xright.data import CyclingLoader, DataSpec, load_data
from xright.data.synthetic import preference_records, sft_records
from xright.logprobs import sequence_logps, split_choices
from xright.models import load_model, load_tokenizer
from xright.objectives import Reference, RewardModel

TOK = load_tokenizer("tiny")
PAD = TOK.pad_token_id
QUIET = dict(log=lambda *a: None)
BASE = ["--zero_stage", "2", "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--eval_steps", "1000"]


@contextmanager
def in_process():
    """One CLI run in this process, as a world of one. Its environment variables are restored afterwards
    (launches must not inherit them); the process group stays up for the next in-process run, because
    DeepSpeed keeps its groups across engines (a new group after destroying the old one breaks them)."""
    saved = dict(os.environ)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module", autouse=True)
def _no_process_group_after_this_module():
    yield
    S.close_process_group()


def run(main, out, *argv, spies=None):
    with in_process(), pytest.MonkeyPatch.context() as mp:
        for obj, name, wrapper in spies or []:
            mp.setattr(obj, name, wrapper(getattr(obj, name)))
        main([*BASE, "--save_path", str(out), "--ckpt_path", str(out / "ckpt"), *argv])
    return train_records(str(out))


def jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def first_step(examples, kind, micro, accum, seed):
    """The micro-batches of optimizer step 1 in a one-process run (the loader's own order)."""
    loader = CyclingLoader(examples, kind, micro, PAD, seed=seed)
    return [loader.next() for _ in range(accum)]


def pair_logps(batches, policy, reference):
    """(πc, πr, ρc, ρr, |yc|, |yr|) over all pairs of the batches, float64."""
    cols = [[] for _ in range(6)]
    with torch.no_grad():
        for b in batches:
            pi, n = (split_choices(t, 2) for t in sequence_logps(policy, b))
            rho = split_choices(sequence_logps(reference, b)[0], 2) if reference is not None else torch.zeros_like(pi)
            for c, v in zip(cols, (pi[:, 0], pi[:, 1], rho[:, 0], rho[:, 1], n[:, 0], n[:, 1])):
                c.append(v.double())
    return [torch.cat(c) for c in cols]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flagdata")
    d = {"root": root}
    # SFT in its own field names, with decoys under the default names, in a directory of named splits
    (root / "sft").mkdir()
    (root / "sft_default").mkdir()
    for split, recs in (("mytrain", sft_records(16, seed=5)), ("myeval", sft_records(6, seed=5, split="eval"))):
        jsonl(root / "sft" / f"{split}.jsonl", [{"q": r["prompt"], "a": r["response"], "input": "decoy question",
                                                 "output": "decoy"} for r in recs])
        jsonl(root / "sft_default" / f"{split}.jsonl", [{"input": r["prompt"], "output": r["response"]}
                                                        for r in recs])
        jsonl(root / "sft" / "test.jsonl", [{"q": "never used", "a": "x"}] * 3)  # the default eval split
    pairs = preference_records(16, seed=6)
    d["pairs"] = jsonl(root / "pairs.jsonl", [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"],
                                               "prompt": "decoy", "chosen": "decoy", "rejected": "other decoy"}
                                              for r in pairs])
    d["pairs_default"] = jsonl(root / "pairs_default.jsonl", pairs)
    d["pairs_small"] = jsonl(root / "pairs_small.jsonl", preference_records(8, seed=7))
    # a reference model other than the policy's initial weights, so reference-based losses start away from h = 0
    ref = load_model("tiny", seed=7)
    ref.save_pretrained(root / "ref")
    TOK.save_pretrained(root / "ref")
    d["ref"] = str(root / "ref")
    return d


# ---- SFT: fields, splits, seed, optimizer, LR schedule, logging, checkpoints, DeepSpeed keys ---------------

@pytest.fixture(scope="module")
def sft_run(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_run")
    seen = {"optimizers": [], "checkpointed": 0}

    def spy_optimizer(fn):
        def wrapped(self, *a, **k):
            opt = fn(self, *a, **k)
            seen["optimizers"].append(opt)
            return opt
        return wrapped

    def spy_checkpoint(fn):
        def wrapped(*a, **k):
            seen["checkpointed"] += 1
            return fn(*a, **k)
        return wrapped

    records = run(train_sft.main, out, "--dataset", str(files["root"] / "sft"), "--input_key", "q",
                  "--output_key", "a", "--train_split", "mytrain", "--eval_split", "myeval", "--seed", "3",
                  "--adam_betas", "0.8", "0.9", "--l2", "0.1", "--lr_scheduler", "cosine_with_min_lr",
                  "--lr_warmup_ratio", "0.5", "--min_lr_ratio", "0.2", "--train_batch_size", "4",
                  "--micro_train_batch_size", "2", "--max_steps", "4", "--use_tensorboard", str(out / "tb"),
                  "--save_steps", "1", "--max_ckpt_num", "2", "--grad_accum_dtype", "fp32", "--zpg", "2",
                  "--gradient_checkpointing",
                  spies=[(S.Strategy, "optimizer", spy_optimizer), (transformers.modeling_utils, "checkpoint", spy_checkpoint)])
    return out, records, seen


def sft_expected(files, seed, eval_too=False):
    spec = DataSpec(kind="sft", dataset=str(files["root"] / "sft_default"), train_split="mytrain",
                    eval_split="myeval", seed=seed)
    train, ev = load_data(spec, TOK, **QUIET)
    model = load_model("tiny", seed=seed).eval()

    def mean_nll(batches):
        num = den = 0.0
        with torch.no_grad():
            for b in batches:
                logps, n = sequence_logps(model, b)
                num -= float(logps.sum())
                den += float(n.sum())
        return num / den

    from xright.data import collate
    step1 = mean_nll(first_step(train, "sft", 2, 2, seed))
    return step1, (mean_nll([collate("sft", ev, PAD)]) if eval_too else None), len(ev)


def test_sft_fields_splits_and_seed(files, sft_run):
    out, records, _ = sft_run
    step1, ev0, n_eval = sft_expected(files, seed=3, eval_too=True)
    assert records[0]["train/sft/loss"] == pytest.approx(step1, rel=1e-5)
    start = [r for r in metrics(str(out)) if r.get("step") == 0 and "eval/sft/loss" in r][0]
    assert start["eval/sft/loss"] == pytest.approx(ev0, rel=1e-5)  # the 'myeval' split, not 'test'
    assert n_eval == 6
    # another seed: another initial model and order, so another first loss
    assert abs(sft_expected(files, seed=42)[0] - step1) > 1e-3


def test_sft_optimizer_betas_and_weight_decay(sft_run):
    _, _, seen = sft_run
    (opt,) = seen["optimizers"]
    groups = opt.param_groups
    assert all(tuple(g["betas"]) == (0.8, 0.9) for g in groups)
    decays = sorted(g["weight_decay"] for g in groups)
    assert decays == [0.0, 0.1]  # --l2 on matrices, none on biases and norms


def test_sft_lr_warmup_and_min_lr(sft_run):
    _, records, _ = sft_run
    # cosine_with_min_lr over 4 steps, ceil(4 × 0.5) = 2 warmup steps, floor 0.2 × 1e-3; step k logs the rate it
    # applied, lr(k − 1) (the scheduler steps after the optimizer)
    def lr(k):
        if k < 2:
            return 1e-3 * k / 2
        progress = (k - 2) / (4 - 2)
        return 1e-3 * (0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert [r["lr"] for r in records] == pytest.approx([lr(k) for k in range(0, 4)], rel=1e-6)


def test_sft_tensorboard_event_file_holds_the_logged_losses(sft_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, records, _ = sft_run
    assert glob.glob(str(out / "tb" / "events.out.tfevents.*"))
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/sft/loss")]
    assert [s for s, _ in got] == [1, 2, 3, 4]
    assert [v for _, v in got] == pytest.approx([r["train/sft/loss"] for r in records], rel=1e-6)


def test_sft_max_ckpt_num_keeps_the_newest(sft_run):
    out, _, _ = sft_run
    assert sorted(os.path.basename(p) for p in glob.glob(str(out / "ckpt" / "global_step*"))) == \
        ["global_step3", "global_step4"]


def test_sft_deepspeed_keys_and_gradient_checkpointing(sft_run):
    out, _, seen = sft_run
    ds = json.load(open(out / "ds_config.json"))
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    assert ds["zero_optimization"]["zero_hpz_partition_size"] == 2
    assert seen["checkpointed"] > 0  # --gradient_checkpointing recomputes the layers


# ---- SFT data shaping: pretrain mode, chat templates, eval_fraction, blends, max_ckpt_mem ----------------------

# prefix-consistent, as chat rendering requires: the generation prompt "=>" is also what opens an assistant turn
CHAT = ("{% for m in messages %}{% if m['role'] == 'assistant' %}=>{% endif %}<<{{ m['content'] }}>>{% endfor %}"
        "{% if add_generation_prompt %}=>{% endif %}")


def test_pretrain_mode_chat_template_eval_fraction_and_probs(files, tmp_path):
    out = tmp_path / "run"
    a = str(files["root"] / "sft_default" / "mytrain.jsonl")
    b = jsonl(tmp_path / "other.jsonl", [{"input": r["prompt"], "output": r["response"] * 3}
                                         for r in sft_records(12, seed=9)])
    flags = dict(dataset=f"{a},{b}", dataset_probs="0.25,0.75", eval_fraction=0.25, pretrain_mode=True,
                 apply_chat_template=True, max_samples=16)
    records = run(train_sft.main, out, "--dataset", flags["dataset"], "--dataset_probs", flags["dataset_probs"],
                  "--eval_fraction", "0.25", "--pretrain_mode", "--apply_chat_template", "--tokenizer_chat_template",
                  CHAT, "--max_samples", "16", "--train_batch_size", "4", "--micro_train_batch_size", "2",
                  "--max_steps", "1", "--save_steps", "1", "--max_ckpt_mem", "0")
    tok = load_tokenizer("tiny", chat_template=CHAT)
    model = load_model("tiny", seed=42).eval()

    def expected(tokenizer=tok, **change):
        train, ev = load_data(DataSpec(kind="sft", **{**flags, **change}), tokenizer, **QUIET)
        num = den = 0.0
        with torch.no_grad():
            for batch in first_step(train, "sft", 2, 2, 42):
                logps, n = sequence_logps(model, batch)
                num -= float(logps.sum())
                den += float(n.sum())
        return num / den, train, ev

    step1, train, ev = expected()
    assert records[0]["train/sft/loss"] == pytest.approx(step1, rel=1e-5)
    assert len(ev) == 4 and len(train) == 12  # 25 % of 16 held out
    assert all(e["prompt_ids"] == [] for e in train)  # pretrain mode: the whole text is trained on
    assert train[0]["response_ids"][:2] == tok("<<", add_special_tokens=False)["input_ids"]
    # each flag matters: without it the first loss would differ
    for change in (dict(pretrain_mode=False), dict(apply_chat_template=False), dict(dataset_probs="0.75,0.25"),
                   dict(tokenizer=TOK)):
        assert abs(expected(**change)[0] - step1) > 1e-4, change
    # --max_ckpt_mem 0: every older checkpoint is over the budget; only the newest is kept
    assert [os.path.basename(p) for p in glob.glob(str(out / "ckpt" / "global_step*"))] == ["global_step1"]


# ---- pairwise losses and their hyperparameters ----------------------------------------------------------

PAIR_RUNS = {
    # name: (flags, pure loss on (πc, πr, ρc, ρr, |yc|, |yr|))
    "ipo": (["--ipo", "--beta", "0.5"], lambda pc, pr, rc, rr, lc, lr: L.ipo(pc, pr, rc, rr, 0.5)[0]),
    "ipo_average": (["--ipo", "--ipo_average", "--beta", "0.5"],
                    lambda pc, pr, rc, rr, lc, lr: L.ipo(pc / lc, pr / lr, rc / lc, rr / lr, 0.5)[0]),
    "cdpo": (["--label_smoothing", "0.3", "--beta", "0.5"],
             lambda pc, pr, rc, rr, lc, lr: L.dpo(pc, pr, rc, rr, 0.5, 0.3)[0]),
    "slic": (["--loss", "slic", "--slic_delta", "30", "--slic_lambda", "0.2"],
             lambda pc, pr, rc, rr, lc, lr: L.slic(pc, pr, 30.0, 0.2)),
    "simpo": (["--loss", "simpo", "--beta", "2", "--simpo_gamma", "0.9"],
              lambda pc, pr, rc, rr, lc, lr: L.simpo(pc, pr, lc, lr, 2.0, 0.9)[0]),
}


@pytest.fixture(scope="module")
def pair_setup(files):
    train, _ = load_data(DataSpec(kind="pairwise", dataset=files["pairs_default"], max_len=512), TOK, **QUIET)
    batches = first_step(train, "pairwise", 4, 2, 42)
    policy = load_model("tiny", seed=42).eval()
    reference = load_model(files["ref"], trainable=False).eval()
    return pair_logps(batches, policy, reference), pair_logps(batches, policy, None)


@pytest.mark.parametrize("name", list(PAIR_RUNS))
def test_pair_loss_flags_and_keys(files, pair_setup, tmp_path, name):
    flags, pure = PAIR_RUNS[name]
    with_ref, without_ref = pair_setup
    ref_configs = []

    def spy(fn):
        def wrapped(*a, **k):
            ref_configs.append(fn(*a, **k))
            return ref_configs[-1]
        return wrapped

    offload = ["--ref_offload"] if name == "cdpo" else []
    records = run(train_dpo.main, tmp_path / "run", "--dataset", files["pairs"], "--prompt_key", "question",
                  "--chosen_key", "good", "--rejected_key", "bad", "--ref_pretrain", files["ref"],
                  "--train_batch_size", "8", "--micro_train_batch_size", "4", "--max_steps", "1", *flags, *offload,
                  spies=[(S, "reference_config", spy)])
    if name in ("slic", "simpo"):
        assert not ref_configs  # reference-free: no reference loaded
    else:  # --ref_offload: a ZeRO-3 reference with its parameters on the CPU, same numbers
        (cfg,) = ref_configs
        assert cfg["zero_optimization"]["stage"] == (3 if offload else 0)
        assert (cfg["zero_optimization"].get("offload_param") or {}).get("device") == ("cpu" if offload else None)
    loss = "ipo" if name.startswith("ipo") else "dpo" if name == "cdpo" else name
    logps = without_ref if name in ("slic", "simpo") else with_ref
    expect = float(pure(*logps).mean())
    assert records[0][f"train/{loss}/loss"] == pytest.approx(expect, rel=1e-5)
    # the flags must matter on these numbers: the default (plain DPO, β 0.1) gives another value
    assert abs(float(L.dpo(*with_ref[:4], 0.1)[0].mean()) - expect) > 1e-3


def test_ipo_average_and_summed_differ_on_these_numbers(pair_setup):
    logps = pair_setup[0]
    a, b = (float(PAIR_RUNS[k][1](*logps).mean()) for k in ("ipo", "ipo_average"))
    assert abs(a - b) > 1e-2


# ---- KTO, EXO, reward model ---------------------------------------------------------------------------

def test_kto_weights_and_keys(tmp_path):
    # at step 1 the policy is its reference: r = 0, z = 0, every loss is λ·σ(0) = λ/2
    data = jsonl(tmp_path / "binary.jsonl", [{"x": r["prompt"], "y": r[which], "ok": which == "chosen"}
                                             for r in preference_records(4, seed=8) for which in ("chosen", "rejected")])
    records = run(train_kto.main, tmp_path / "run", "--dataset", data, "--prompt_key", "x", "--completion_key", "y",
                  "--label_key", "ok", "--desirable_loss_weight", "1.5", "--undesirable_loss_weight", "0.5",
                  "--train_batch_size", "8", "--micro_train_batch_size", "4", "--max_steps", "1")
    assert records[0]["train/kto/loss"] == pytest.approx((1.5 * 4 + 0.5 * 4) / (2 * 8), rel=1e-6)
    assert records[0]["train/kto/kl"] == 0.0


def test_exo_epsilon_closed_form(files, tmp_path):
    # π = ρ at step 1: q = [½, ½], KL(q‖p) = log ½ − ½(log(1−ε) + log ε)
    records = run(train_exo.main, tmp_path / "run", "--dataset", files["pairs_small"], "--loss", "exo-pref",
                  "--exo_epsilon", "0.1", "--train_batch_size", "8", "--micro_train_batch_size", "4", "--max_steps", "1")
    assert records[0]["train/exo-pref/loss"] == pytest.approx(math.log(0.5) - 0.5 * (math.log(0.9) + math.log(0.1)),
                                                              rel=1e-6)


def test_exo_rw_keys_and_dpo_forms(files, tmp_path):
    rows = [{"prompt": r["prompt"], "outs": [r["chosen"], r["rejected"], "no idea"], "scores": [1.0, 0.0, -2.0 + i]}
            for i, r in enumerate(preference_records(8, seed=10))]
    data = jsonl(tmp_path / "scored.jsonl", rows)
    common = ["--dataset", data, "--completions_key", "outs", "--rewards_key", "scores", "--beta_r", "0.5",
              "--train_batch_size", "8", "--micro_train_batch_size", "4", "--max_steps", "1"]
    exo = run(train_exo.main, tmp_path / "exo", "--loss", "exo-rw", *common)
    # π = ρ: q uniform over K = 3, KL(q‖p) = −log 3 − mean_k log p_k with p = softmax(r / β_r)
    hand = [-math.log(3) - sum(math.log(p) for p in
                               torch.softmax(torch.tensor(r["scores"], dtype=torch.float64) / 0.5, 0).tolist()) / 3
            for r in rows]
    assert exo[0]["train/exo-rw/loss"] == pytest.approx(sum(hand) / len(hand), rel=1e-6)
    # dpo-rw with a distinct reference: cross entropy −Σ p log q on the model's log-probs
    dpo = run(train_exo.main, tmp_path / "dpo", "--loss", "dpo-rw", "--ref_pretrain", files["ref"], *common)
    train, _ = load_data(DataSpec(kind="scored", dataset=data, completions_key="outs", rewards_key="scores",
                                  max_len=512), TOK, **QUIET)
    policy, reference = load_model("tiny", seed=42).eval(), load_model(files["ref"], trainable=False).eval()
    total = 0.0
    with torch.no_grad():
        for b in first_step(train, "scored", 4, 2, 42):
            pi, rho = (split_choices(sequence_logps(m, b)[0], 3) for m in (policy, reference))
            total += float(L.dpo_forward_kl(pi, rho, L.exo_rw_target(b["rewards"], 0.5), 0.1).sum())
    assert dpo[0]["train/dpo-rw/loss"] == pytest.approx(total / 8, rel=1e-5)


def test_dpo_pref_is_cdpo_with_the_reference(files, pair_setup, tmp_path):
    records = run(train_exo.main, tmp_path / "run", "--dataset", files["pairs_default"], "--loss", "dpo-pref",
                  "--exo_epsilon", "0.2", "--beta", "0.5", "--ref_pretrain", files["ref"], "--train_batch_size", "8",
                  "--micro_train_batch_size", "4", "--max_steps", "1")
    expect = float(L.dpo(*pair_setup[0][:4], 0.5, 0.2)[0].mean())
    assert records[0]["train/dpo-pref/loss"] == pytest.approx(expect, rel=1e-5)


def test_reward_model_margin_key_and_fp32_loss(tmp_path):
    rows = [{**r, "gap": 0.5 * i} for i, r in enumerate(preference_records(8, seed=11))]
    data = jsonl(tmp_path / "rm.jsonl", rows)
    records = run(train_rm.main, tmp_path / "run", "--dataset", data, "--prompt_key", "prompt", "--margin_loss",
                  "--margin_key", "gap", "--compute_fp32_loss", "--train_batch_size", "8",
                  "--micro_train_batch_size", "4", "--max_steps", "1")
    train, _ = load_data(DataSpec(kind="pairwise", dataset=data, margin_key="gap", max_len=512), TOK, **QUIET)
    model = load_model("tiny", task="reward", seed=42).eval()
    with_margin = without = 0.0
    with torch.no_grad():
        for b in first_step(train, "pairwise", 4, 2, 42):
            with_margin += float(RewardModel(use_margin=True)(model, None, b)[0])
            without += float(RewardModel(use_margin=False)(model, None, b)[0])
    assert records[0]["train/rm/loss"] == pytest.approx(with_margin / 8, rel=1e-5)
    assert abs(with_margin - without) / 8 > 1e-2


# ---- joint CLI: early stopping ------------------------------------------------------------------------

def ALRIGHT(argv):
    return joint.main(argv, schedule="alright")


JOINT = ["--train_batch_size", "4", "--sft_micro_train_batch_size", "2", "--rlhf_micro_train_batch_size", "2",
         "--sft_max_samples", "8", "--rlhf_max_samples", "16", "--max_steps", "6", "--eval_steps", "2"]


def test_ref_pareto_front_stops_when_dominated(tmp_path):
    out = tmp_path / "run"
    # the front's one point is dominated by any loss below 100: the first evaluation (step 0) stops the run
    run(ALRIGHT, out, *JOINT, "--ref_pareto_sft", "100", "--ref_pareto_dpo", "100")
    rows = metrics(str(out))
    assert not [r for r in rows if "objectives" in r]
    assert "dominates reference Pareto point 0" in rows[-1]["stopped_early"]


def test_eps_stops_near_the_optimum(tmp_path):
    out = tmp_path / "run"
    # optima equal to nothing reachable never stop; optima equal to the step-2 eval losses within eps do
    run(ALRIGHT, out, *JOINT, "--sft_opt", "0.001", "--dpo_opt", "0.001", "--eps", "1e-3")
    first = metrics(str(out))
    assert len([r for r in first if "objectives" in r]) == 6 and first[-1]["stopped_early"] is None
    ev = [r for r in first if r.get("step") == 2 and "eval/sft/loss" in r][0]
    out2 = tmp_path / "run2"
    run(ALRIGHT, out2, *JOINT, "--sft_opt", str(ev["eval/sft/loss"]), "--dpo_opt",
        str(ev["eval/dpo/loss"]), "--eps", "1e-3")
    rows = metrics(str(out2))
    assert [r["step"] for r in rows if "objectives" in r] == [1, 2]
    assert "within --eps" in rows[-1]["stopped_early"]


def test_equal_length_and_steps_per_epoch(tmp_path):
    out = tmp_path / "run"
    # a joint epoch of 3 steps, once: 3 steps; XRIGHT's pairing advances both loaders every step and restarts
    # both at the epoch's end, so the checkpoint after step 3 has both at the start of epoch 1
    run(ALRIGHT, out, *[a for a in JOINT if a not in ("--max_steps", "6")], "--steps_per_epoch",
        "3", "--max_epochs", "1", "--equal_length", "--save_steps", "3")
    assert [r["step"] for r in train_records(str(out))] == [1, 2, 3]
    state = json.load(open(out / "ckpt" / "global_step3" / "xright_state.json"))
    assert {k: (v["epoch"], v["examples"]) for k, v in state["loaders"].items()} == {"sft": (1, 0), "dpo": (1, 0)}


def test_lora_rank_alpha_dropout_and_one_target_module(tmp_path):
    out = tmp_path / "run"
    trained = []

    def spy(fn):
        def wrapped(self, model, *a, **k):
            trained.extend((n, p.numel()) for n, p in model.named_parameters() if p.requires_grad)
            return fn(self, model, *a, **k)
        return wrapped

    run(train_sft.main, out, "--lora_rank", "4", "--lora_alpha", "8", "--target_modules", "query_key_value",
        "--lora_dropout", "0.1", "--max_samples", "16", "--train_batch_size", "4", "--micro_train_batch_size", "2",
        "--max_steps", "1", spies=[(S.Strategy, "optimizer", spy)])
    cfg = json.load(open(out / "adapter_config.json"))
    assert sorted(cfg["target_modules"]) == ["query_key_value"]
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8, 0.1)
    # only the adapters on the 4 layers' fused qkv projection (128 -> 384) train: 4 × (128·4 + 4·384)
    assert all("query_key_value.lora_" in n for n, _ in trained) and sum(k for _, k in trained) == 4 * (512 + 1536)


def test_deepspeed_file_batch_sizes_are_used(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0,
                              "zero_optimization": {"stage": 2}}))
    out = tmp_path / "run"
    records = run(train_sft.main, out, "--deepspeed", str(ds), "--max_samples", "16", "--max_epochs", "1")
    train, _ = load_data(DataSpec(kind="sft", max_samples=16), TOK, **QUIET)
    model = load_model("tiny", seed=42).eval()
    num = den = 0.0
    with torch.no_grad():
        for b in first_step(train, "sft", 2, 4, 42):  # micro 2 × accumulation 4 = the file's 8 per step
            logps, n = sequence_logps(model, b)
            num, den = num - float(logps.sum()), den + float(n.sum())
    assert len(records) == 2  # 16 examples / 8 per step
    assert records[0]["train/sft/loss"] == pytest.approx(num / den, rel=1e-5)
    written = json.load(open(out / "ds_config.json"))
    assert (written["train_batch_size"], written["train_micro_batch_size_per_gpu"],
            written["gradient_accumulation_steps"]) == (8, 2, 4)


def test_zero_stage_0_bf16_trains(tmp_path):
    records = run(train_sft.main, tmp_path / "run", "--zero_stage", "0", "--bf16", "--max_samples", "16",
                  "--train_batch_size", "4", "--micro_train_batch_size", "2", "--max_steps", "2")
    assert len(records) == 2 and all(math.isfinite(r["train/sft/loss"]) for r in records)
    assert json.load(open(tmp_path / "run" / "ds_config.json"))["bf16"]["enabled"] is True


def test_compute_fp32_loss_under_bf16(tmp_path):
    # bf16 scores: with --compute_fp32_loss the Bradley-Terry loss is computed from them in fp32, without it in
    # bf16 — two values that differ by bf16 rounding; the run logs the first
    data = jsonl(tmp_path / "rm.jsonl", preference_records(8, seed=12))
    records = run(train_rm.main, tmp_path / "run", "--dataset", data, "--prompt_key", "prompt", "--bf16",
                  "--compute_fp32_loss", "--train_batch_size", "8", "--micro_train_batch_size", "4", "--max_steps", "1")
    train, _ = load_data(DataSpec(kind="pairwise", dataset=data, max_len=512), TOK, **QUIET)
    model = load_model("tiny", task="reward", seed=42, bf16=True).eval()
    fp32 = bf16 = 0.0
    with torch.no_grad():
        for b in first_step(train, "pairwise", 4, 2, 42):
            fp32 += float(RewardModel(fp32=True)(model, None, b)[0])
            bf16 += float(RewardModel(fp32=False)(model, None, b)[0])
    assert records[0]["train/rm/loss"] == pytest.approx(fp32 / 8, rel=1e-6)
    assert abs(fp32 - bf16) / 8 > 1e-5
