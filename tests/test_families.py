"""Model families: every popular one loads, trains padded, packs exactly or is refused, takes LoRA.

Tiny random-weight models of each family are built from transformers' config classes (no download),
saved with xright's byte-level tokenizer and loaded back through ``load_model`` / ``load_tokenizer``
(the hub code path, on local files). ``python -m pytest -s tests/test_families.py`` prints the table
that docs/families.md records.
"""

import os
import warnings

import pytest
import torch

from xright.data import collate
from xright.logprobs import token_logps
from xright.models import (VARLEN_SDPA, VARLEN_SDPA_CHECKED, LoraSpec, PackingRefused, check_model, load_model,
                           load_tokenizer, recurrent_state, tiny_tokenizer)
from xright.objectives import KTO, SFT, Pairwise, Reference, RewardModel

PAD, EOS = 256, 257
COMMON = dict(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=EOS,
              eos_token_id=EOS)
# (model type, its config's fields) — the per-family names and traps (Falcon's head_dim is derived, GPT-2
# and Bloom name their sizes differently, Gemma's head_dim defaults to 256)
FAMILIES = {
    "llama": ("llama", {}),
    "llama3": ("llama", {"tie_word_embeddings": False, "rope_scaling": {  # a Llama-3.x config
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {"head_dim": 16}),
    "mistral": ("mistral", {"sliding_window": 64}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "gemma": ("gemma", {"head_dim": 16}),
    "gemma2": ("gemma2", {"head_dim": 16, "sliding_window": 64}),  # logit/attention soft-capping
    "gemma3_text": ("gemma3_text", {"head_dim": 16, "sliding_window": 64}),
    "phi3": ("phi3", {}),
    "olmo2": ("olmo2", {}),
    "gpt_neox": ("gpt_neox", {}),
    "gpt2": ("gpt2", {"n_embd": 64, "n_layer": 2, "n_head": 4}),
    "falcon": ("falcon", {}),
    "stablelm": ("stablelm", {}),
    "bloom": ("bloom", {"n_layer": 2, "n_head": 4}),
    "opt": ("opt", {"ffn_dim": 128, "word_embed_proj_dim": 64}),
    "jamba": ("jamba", {}),  # attention + Mamba layers: packing refused
}


def examples(kind, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    toks = lambda m: torch.randint(0, 256, (m,), generator=g).tolist()  # noqa: E731
    ln = lambda: int(torch.randint(2, 10, (1,), generator=g))  # noqa: E731
    out = []
    for i in range(n):
        e = {"id": f"{kind}{i}", "prompt_ids": toks(ln())}
        if kind == "pairwise":
            e["responses"] = [toks(ln()) + [EOS], toks(ln()) + [EOS]]
        else:
            e["response_ids"] = toks(ln()) + [EOS]
            if kind == "binary":
                e["label"] = i % 2 == 0
        out.append(e)
    return out


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("families")
    tok = tiny_tokenizer()
    out = {}
    for name, (model_type, fields) in FAMILIES.items():
        config = AutoConfig.for_model(model_type, **{**COMMON, **fields})
        torch.manual_seed(0)
        path = str(root / name)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = path
    return out


RESULTS = {}  # family -> column -> cell, for the table


@pytest.fixture(scope="module", autouse=True)
def table():
    yield
    cols = ["loads", "attention", "SFT", "DPO", "KTO", "RM", "packed", "LoRA"]
    lines = ["| family | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 1)]
    lines += [f"| {f} | " + " | ".join(RESULTS[f].get(c, "") for c in cols) + " |" for f in FAMILIES if f in RESULTS]
    print("\n" + "\n".join(lines))


def step_lowers_loss(model, objective, reference, batch):
    """One plain optimizer step on ``batch``: finite loss and gradients, and the same batch's loss falls."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-3)
    loss, _ = objective(model, reference, batch)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params if p.grad is not None)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    opt.step()
    after, _ = objective(model, reference, batch)
    assert after < loss, (float(loss), float(after))
    return f"{loss.item():.3f}→{after.item():.3f}"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loads_and_trains_padded(family_dirs, family):
    path = family_dirs[family]
    tok = load_tokenizer(path)
    assert tok.pad_token_id == PAD
    policy = load_model(path, seed=1, pad_token_id=tok.pad_token_id)
    reference = Reference(model=load_model(path, trainable=False, pad_token_id=tok.pad_token_id))
    row = RESULTS.setdefault(family, {})
    row["loads"] = "yes"
    row["attention"] = policy.config._attn_implementation
    # transformers' SDPA where the class has it, its own eager attention where not (no SDPA error)
    assert policy.config._attn_implementation == ("sdpa" if type(policy)._supports_sdpa else "eager")
    for name, objective, kind in (("SFT", SFT(), "sft"), ("DPO", Pairwise("dpo"), "pairwise"),
                                  ("KTO", KTO(), "binary")):
        objective.reduce_mean = lambda t: t
        row[name] = step_lowers_loss(policy, objective, reference, collate(kind, examples(kind), PAD))
    rm = load_model(path, task="reward", seed=1, pad_token_id=tok.pad_token_id)
    row["RM"] = step_lowers_loss(rm, RewardModel(), None, collate("pairwise", examples("pairwise"), PAD))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_packs_exactly_or_is_refused(family_dirs, family):
    """With packing the per-token log-probs of a packed row equal the padded ones (fp32, 1e-5), or the
    probe refuses with one line naming the model type: never a silently different number."""
    path = family_dirs[family]
    model = load_model(path, packing=True).eval()
    model_type = model.config.model_type
    if not getattr(type(model), "_supports_attention_backend", False):  # xright's attention would never run:
        assert model.config._attn_implementation in ("sdpa", "eager")  # the printed name is what runs
    exs = examples("pairwise", 6, seed=3)
    with torch.no_grad():
        padded, mask = token_logps(model, collate("pairwise", exs, PAD))
        packed, _ = token_logps(model, collate("pairwise", exs, PAD, packed=True))
    delta = float(((packed - padded) * mask).abs().max())
    try:
        line = check_model(model, packing=True)
    except PackingRefused as e:
        msg = str(e)
        assert "\n" not in msg and model_type in msg and msg.startswith("--packing_samples")
        if recurrent_state(model.config):  # refused from its config, before any forward
            assert "carry state from one sequence of a packed row into the next" in msg
        RESULTS.setdefault(family, {})["packed"] = f"refused (max Δ {delta:.0e})"
        assert delta > 1e-5 or recurrent_state(model.config)  # the probe refuses what really differs
        return
    assert delta <= 1e-5, (family, delta, line)
    assert model_type in line and "packed rows exact" in line
    RESULTS.setdefault(family, {})["packed"] = f"exact (max Δ {delta:.0e}), " + (
        "per-sequence SDPA" if "per-sequence" in line else "block-diagonal mask")


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_lora_default_targets(family_dirs, family):
    model = load_model(family_dirs[family], seed=2, lora=LoraSpec(rank=4, alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # make the adapters matter, so that the step changes the loss
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    cell = step_lowers_loss(model, SFT(), None, collate("sft", examples("sft"), PAD))
    RESULTS.setdefault(family, {})["LoRA"] = f"{len(trainable) // 2} adapters, {cell}"


# ---- the probe's parts --------------------------------------------------------------------------------

def test_mask_of_a_packed_row_is_transformers_block_diagonal_mask(family_dirs):
    """A model class that does not pass the boundaries down to its attention (Nemotron here, like
    StableLM/Falcon before they were kept on plain SDPA) must still get transformers' packed-row mask:
    with the per-sequence SDPA's name its packed rows stay exact, through the mask."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("nemotron", **COMMON)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.config._attn_implementation = VARLEN_SDPA
    exs = examples("sft", 5, seed=4)
    with torch.no_grad():
        padded, mask = token_logps(model, collate("sft", exs, PAD))
        packed, _ = token_logps(model, collate("sft", exs, PAD, packed=True))
    assert float(((packed - padded) * mask).abs().max()) < 1e-5
    assert "block-diagonal mask" in check_model(model, packing=True)
    assert model.config._attn_implementation == VARLEN_SDPA  # it keeps the mask: it needs it
    with torch.no_grad():
        again, _ = token_logps(model, collate("sft", exs, PAD, packed=True))
    assert float(((again - padded) * mask).abs().max()) < 1e-5


def test_packed_row_runs_the_per_sequence_attention(family_dirs, monkeypatch):
    """Which attention ran for a packed row (both give the same numbers): on a family whose every
    attention call gets the row's boundaries, torch's SDPA only ever sees one sequence at a time (never
    the L×L product of the whole row), and once the probe has seen that, no L×L mask is built either."""
    import transformers.integrations.sdpa_attention as sdpa
    from transformers import AttentionInterface

    model = load_model(family_dirs["llama"], packing=True).eval()
    assert model.config._attn_implementation == VARLEN_SDPA
    assert "per-sequence SDPA in 2 of 2 attention calls" in check_model(model, packing=True)
    assert model.config._attn_implementation == VARLEN_SDPA_CHECKED
    batch = collate("pairwise", examples("pairwise", 4, seed=5), PAD, packed=True)
    lengths = batch["cu_seqlens"].diff().tolist()
    seen, masks = [], []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(sdpa.torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, *a, **kw: seen.append((q.shape[-2], k.shape[-2])) or real(q, k, *a, **kw))
    attention = AttentionInterface._global_mapping[VARLEN_SDPA_CHECKED]
    monkeypatch.setitem(AttentionInterface._global_mapping, VARLEN_SDPA_CHECKED,
                        lambda m, q, k, v, mask, **kw: masks.append(mask) or attention(m, q, k, v, mask, **kw))
    with torch.no_grad():
        token_logps(model, batch)
    assert seen == [(n, n) for n in lengths] * model.config.num_hidden_layers
    assert masks == [None] * model.config.num_hidden_layers


def test_flash_attention_2_packed_rows_are_probed_too(family_dirs, monkeypatch):
    """--flash_attn: the probe runs transformers' flash-attention-2 path (here with test_packing.py's torch
    stand-in for the CUDA kernel) and says the variable-length kernel read the boundaries."""
    from test_packing import _reference_varlen_kernel
    from transformers import AttentionInterface
    from transformers import modeling_flash_attention_utils as fa
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    calls = []

    def dense_kernel(q, k, v, dropout_p=0.0, softmax_scale=None, causal=True, **kw):  # [B, T, heads, dim]
        return torch.nn.functional.scaled_dot_product_attention(
            *(x.transpose(1, 2) for x in (q, k, v)), is_causal=causal, scale=softmax_scale).transpose(1, 2)

    monkeypatch.setattr(fa, "lazy_import_flash_attention", lambda *a, **k: (
        (dense_kernel, _reference_varlen_kernel(calls), None, fa._pad_input, fa._unpad_input), (lambda **kw: {
            "causal": kw["is_causal"], "softmax_scale": kw["softmax_scale"], "max_seqlen_q": kw.get("max_seqlen_q"),
            "max_seqlen_k": kw.get("max_seqlen_k")}, None)))
    monkeypatch.setitem(AttentionInterface._global_mapping, "flash_attention_2", flash_attention_forward)
    monkeypatch.setitem(AttentionMaskInterface._global_mapping, "flash_attention_2", flash_attention_mask)
    model = load_model(family_dirs["gpt_neox"])  # (the stand-in kernel has no grouped-query heads)
    model.config._attn_implementation = "flash_attention_2"  # what load_model(flash_attn=True) asks for
    line = check_model(model, packing=True)
    assert "flash_attention_2 (gpt_neox); packed rows exact" in line and "variable-length kernel" in line
    assert len(calls) == 3 * model.config.num_hidden_layers  # padded (unpadded by transformers), packed, changed


def test_leak_across_sequences_is_refused_even_where_padded_and_packed_agree_within_noise(family_dirs):
    """bf16: the packed-vs-padded comparison alone cannot see Bloom's leak (bf16 rounding is as large);
    the changed-neighbour check still refuses it, and accepts an exact family in bf16."""
    bloom = load_model(family_dirs["bloom"], bf16=True, packing=True)
    with pytest.raises(PackingRefused, match="bloom.*changing one sequence moves the others"):
        check_model(bloom, packing=True)
    assert "packed rows exact" in check_model(load_model(family_dirs["qwen2"], bf16=True, packing=True),
                                              packing=True)


def test_positions_that_do_not_restart_are_refused(family_dirs):
    """A model that drops the packed row's position ids (numbering the whole row 0…L−1) leaks nothing
    across sequences, but its later sequences sit at the wrong positions: the packed-vs-padded check
    refuses it."""
    model = load_model(family_dirs["gpt2"], packing=True)
    forward = model.forward
    model.forward = lambda *a, position_ids=None, **kw: forward(*a, **kw)
    with pytest.raises(PackingRefused, match="gpt2.*packed vs padded log-probs differ by up to"):
        check_model(model, packing=True)


@pytest.mark.parametrize("model_type", ["mamba", "mamba2", "rwkv", "jamba", "recurrent_gemma", "falcon_h1", "minimax",
                                        "zamba", "zamba2", "qwen3_next", "bamba", "nemotron_h"])
def test_recurrent_state_is_detected_from_the_config(model_type):
    from transformers import AutoConfig

    assert recurrent_state(AutoConfig.for_model(model_type))


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "gemma3_text", "gpt_oss", "mixtral", "qwen2"])
def test_attention_only_configs_have_no_recurrent_state(model_type):
    from transformers import AutoConfig

    assert recurrent_state(AutoConfig.for_model(model_type)) is None


def test_probe_leaves_train_mode_and_weights_alone(family_dirs):
    model = load_model(family_dirs["gpt2"], packing=True)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    check_model(model, packing=True)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_no_deprecation_warnings_from_our_calls(family_dirs):
    """Gradient checkpointing and LoRA go through the non-deprecated names (no "removed in v6")."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model = load_model(family_dirs["llama"], gradient_checkpointing=True, lora=LoraSpec(rank=4, alpha=8))
    assert model.get_base_model().is_activation_checkpointing


# ---- the CLI ---------------------------------------------------------------------------------------------

CLI = ["--max_steps", "1", "--train_batch_size", "4", "--micro_train_batch_size", "2", "--max_samples", "16",
       "--zero_stage", "0", "--eval_steps", "1"]


def run_sft(argv):
    """train_sft in this process, as a launch would end it: the exit code, engines and groups released."""
    from xright.cli import lifecycle, train_sft
    from xright.strategy import close_process_group

    try:
        return lifecycle.guarded(lambda: train_sft.main(argv))
    finally:
        close_process_group()


def test_cli_refuses_inexact_packing_before_step_1(family_dirs, tmp_path, capfd):
    out = tmp_path / "bloom"
    code = run_sft(["--pretrain", family_dirs["bloom"], "--packing_samples", "--save_path", str(out),
                    "--ckpt_path", str(out / "ck"), *CLI])
    err = capfd.readouterr().err
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("xright: error:")]
    assert len(lines) == 1 and "bloom" in lines[0] and "--packing_samples" in lines[0], err
    assert not (out / "metrics.jsonl").exists()  # nothing trained, nothing logged


def test_cli_packing_logs_the_padded_step_0_eval_loss(family_dirs, tmp_path, capfd):
    from launch import metrics

    evals = {}
    for layout in ("padded", "packed"):
        out = tmp_path / layout
        argv = ["--pretrain", family_dirs["qwen2"], "--save_path", str(out), "--ckpt_path", str(out / "ck"), *CLI]
        assert run_sft(argv + ["--packing_samples"] * (layout == "packed")) == 0
        evals[layout] = [r["eval/sft/loss"] for r in metrics(str(out)) if r.get("step") == 0 and "eval/sft/loss" in r]
    assert len(evals["padded"]) == 1
    assert evals["packed"] == pytest.approx(evals["padded"], abs=1e-5)
    printed = capfd.readouterr().out
    assert "xright: attention: sdpa (qwen2)" in printed  # the choice, printed once per run
    assert "xright: attention: xright_varlen_sdpa (qwen2); packed rows exact" in printed
    assert os.path.exists(tmp_path / "packed" / "config.json")


# ---- ZeRO-3 on 2 ranks: a hub-path model is partitioned by zero.Init while it loads, so every rank
# probes the engine together (packed = padded under ZeRO-3: test_packing.py); one launch, two runs ----------

Z3 = ["--zero_stage", "3", "--max_steps", "1", "--train_batch_size", "4", "--micro_train_batch_size", "1",
      "--max_samples", "16", "--eval_steps", "1", "--no_precompute_ref_log_probs"]


@pytest.fixture(scope="module")
def zero3(family_dirs, tmp_path_factory):
    from launch import launch_named

    return launch_named(tmp_path_factory.mktemp("zero3"), {2: {
        "packed": ("train_dpo", ["--pretrain", family_dirs["qwen2"], *Z3, "--packing_samples"]),
        "bloom": ("train_dpo", ["--pretrain", family_dirs["bloom"], *Z3, "--packing_samples"])}})


def test_zero3_ranks_probe_the_partitioned_policy_and_reference_together(zero3):
    _, proc = zero3("packed")
    assert "xright: attention: xright_varlen_sdpa (qwen2); packed rows exact" in proc.stdout
    assert "xright: reference attention: xright_varlen_sdpa (qwen2); packed rows exact" in proc.stdout
    _, refused = zero3("bloom", ok=False)
    assert refused.returncode == 2
    errors = [ln for ln in refused.stderr.splitlines() if ln.startswith("xright: error:")]
    assert len(errors) == 2 and len(set(errors)) == 1 and "bloom" in errors[0]  # the same one line on each rank
