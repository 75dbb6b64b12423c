"""Padding-free micro-batches (--packing_samples), length grouping (--group_by_length) and the
flash-attention-2 inputs: the packed layout gives the padded layout's log-probs, losses and gradients."""

import contextlib
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from launch import final_eval, run_cli, train_records
from xright.data import CyclingLoader, collate
from xright.data.collate import example_length
from xright.logprobs import model_inputs, num_tokens, sequence_logps, token_logps
from xright.models import VARLEN_SDPA, load_model, register_varlen_attention
from xright.objectives import EXO, KTO, SFT, Pairwise, Reference

PAD = 256


def rand_examples(kind, n, seed=0, K=2):
    g = torch.Generator().manual_seed(seed)
    ints = lambda lo, hi: int(torch.randint(lo, hi, (1,), generator=g))  # noqa: E731
    toks = lambda m: torch.randint(0, 256, (m,), generator=g).tolist()  # noqa: E731
    out = []
    for i in range(n):
        e = {"id": f"{kind}{i}", "prompt_ids": toks(0 if i == 1 else ints(1, 12))}  # example 1: empty prompt
        if kind in ("pairwise", "scored"):
            e["responses"] = [toks(ints(1, 15)) for _ in range(K)]
            if kind == "scored":
                e["rewards"] = torch.randn(K, generator=g).tolist()
        else:
            e["response_ids"] = toks(ints(1, 15))
            if kind == "binary":
                e["label"] = i % 3 != 0
        out.append(e)
    return out


# ---- the layout -------------------------------------------------------------------------------------

def test_pack_layout_by_hand():
    exs = [{"id": "a", "prompt_ids": [1, 2], "response_ids": [3]},
           {"id": "b", "prompt_ids": [], "response_ids": [4, 5, 6]},   # no prompt: token 4 has no predictor
           {"id": "c", "prompt_ids": [7], "response_ids": [8, 9]}]
    b = collate("sft", exs, PAD, packed=True)
    assert "attention_mask" not in b and b["ids"] == ["a", "b", "c"]
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 0, 1, 2]]
    assert b["loss_mask"].tolist() == [[False, False, True, False, True, True, False, True, True]]
    assert b["cu_seqlens"].tolist() == [0, 3, 6, 9] and b["cu_seqlens"].dtype == torch.int32
    assert b["max_seqlen"] == 3
    assert num_tokens(b).item() == 9 == num_tokens(collate("sft", exs, PAD)).item()
    # KTO: the mismatched KL rows (x_i, y_{i+1}) are packed the same way, under their prefix
    kto = collate("binary", [{**e, "label": True} for e in exs], PAD, packed=True)
    assert "kl_attention_mask" not in kto
    assert kto["kl_input_ids"].tolist() == [[1, 2, 4, 5, 6, 8, 9, 7, 3]]
    assert kto["kl_position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1]]
    assert kto["kl_cu_seqlens"].tolist() == [0, 5, 7, 9] and kto["kl_max_seqlen"] == 5
    # pairwise: K-major rows become K-major sequences (chosen of every example, then rejected)
    pairs = [{"id": "p", "prompt_ids": [1], "responses": [[2], [3, 4]]},
             {"id": "q", "prompt_ids": [5], "responses": [[6, 7, 8], [9]]}]
    pw = collate("pairwise", pairs, PAD, packed=True)
    assert pw["input_ids"].tolist() == [[1, 2, 5, 6, 7, 8, 1, 3, 4, 5, 9]]
    assert pw["cu_seqlens"].tolist() == [0, 2, 6, 9, 11] and pw["num_choices"] == 2


def test_flash_attention_inputs_are_what_transformers_derives_from_position_ids():
    """--flash_attn on a GPU: the explicit varlen kwargs equal what transformers' flash integration
    would infer from the packed position ids (int32 cumulative lengths, the longest sequence)."""
    from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids

    b = collate("pairwise", rand_examples("pairwise", 5), PAD, packed=True)
    kw = model_inputs(b)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(b["position_ids"])
    assert torch.equal(kw["cu_seq_lens_q"], cu_q) and torch.equal(kw["cu_seq_lens_k"], cu_k)
    assert kw["cu_seq_lens_q"].dtype == cu_q.dtype == torch.int32
    assert kw["max_length_q"] == kw["max_length_k"] == int(max_q) == int(max_k)
    assert isinstance(kw["max_length_q"], int)  # flash_attn_varlen_func wants a Python int (no device sync)
    assert kw["use_cache"] is False and "attention_mask" not in kw


def _reference_varlen_kernel(calls):
    """flash_attn_varlen_func's contract in plain torch: q/k/v [total, heads, dim], causal within each
    cu_seqlens segment. Lets the flash-attention-2 code path of transformers run on a CPU."""
    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None, max_seqlen_k=None, softmax_scale=None,
               causal=True, **kw):
        calls.append((cu_seqlens_q.clone(), max_seqlen_q, causal))
        bounds = cu_seqlens_q.tolist()
        outs = [torch.nn.functional.scaled_dot_product_attention(
            *(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=causal, scale=softmax_scale).transpose(0, 1)
            for a, b in zip(bounds, bounds[1:])]
        return torch.cat(outs)
    return varlen


def test_flash_attention_2_code_path_gets_the_packed_boundaries(monkeypatch):
    """transformers' flash-attention-2 integration, with a torch stand-in for the CUDA kernel: a packed
    forward reaches the variable-length kernel with the batch's cu_seqlens and gives the padded
    log-probs. (The real kernel needs a GPU and flash-attn; it was not run here.)"""
    from transformers import AttentionInterface
    from transformers import modeling_flash_attention_utils as fa
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    calls, dense = [], []
    kernel = _reference_varlen_kernel(calls)
    monkeypatch.setattr(fa, "lazy_import_flash_attention", lambda *a, **k: (
        (lambda *a, **k: dense.append(1), kernel, None, None, None), (lambda **kw: {
            "causal": kw["is_causal"], "softmax_scale": kw["softmax_scale"], "max_seqlen_q": kw.get("max_seqlen_q"),
            "max_seqlen_k": kw.get("max_seqlen_k")}, None)))
    AttentionInterface.register("test_fa2", flash_attention_forward)
    AttentionMaskInterface.register("test_fa2", flash_attention_mask)
    model = load_model("tiny", seed=3).eval()
    exs = rand_examples("pairwise", 4, seed=5)
    with torch.no_grad():
        padded = sequence_logps(model, collate("pairwise", exs, PAD))[0]
        model.config._attn_implementation = "test_fa2"
        packed_batch = collate("pairwise", exs, PAD, packed=True)
        packed = sequence_logps(model, packed_batch)[0]
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    assert len(calls) == model.config.num_hidden_layers and not dense
    assert all(torch.equal(cu, packed_batch["cu_seqlens"]) and m == packed_batch["max_seqlen"] and causal
               for cu, m, causal in calls)


# ---- log-probs: packed row == padded rows -------------------------------------------------------------

def tiny_llama():
    cfg = LlamaConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=PAD, bos_token_id=257, eos_token_id=257)  # 2 kv heads: GQA
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(11)
    return LlamaForCausalLM(cfg)


def with_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(12)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # make the adapters matter
    return model


@contextlib.contextmanager
def attention(model, name):
    config = (model.get_base_model() if hasattr(model, "get_base_model") else model).config
    before, config._attn_implementation = config._attn_implementation, name
    try:
        yield
    finally:
        config._attn_implementation = before


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_packed_logps_and_grads_equal_padded(arch, lora, mode):
    model = load_model("tiny", seed=4) if arch == "gpt_neox" else tiny_llama()
    model = with_lora(model) if lora else model
    model.train(mode == "train")  # dropout is 0 in both configs: train mode must give the same numbers
    register_varlen_attention()
    exs = rand_examples("pairwise", 6, seed=1)
    padded, packed = collate("pairwise", exs, PAD), collate("pairwise", exs, PAD, packed=True)
    lp_pad, n_pad = sequence_logps(model, padded)
    g_pad = grads(model, lp_pad.sum())
    for name in (VARLEN_SDPA, "sdpa"):  # xright's per-sequence SDPA, and transformers' block-diagonal mask
        with attention(model, name):
            lp, n = sequence_logps(model, packed)
            tok, mask = token_logps(model, packed)
            g = grads(model, lp.sum())
        torch.testing.assert_close(lp, lp_pad, atol=1e-5, rtol=0)
        assert torch.equal(n, n_pad)
        tok_pad, mask_pad = token_logps(model, padded)
        assert torch.equal(mask, mask_pad)
        torch.testing.assert_close(tok * mask, tok_pad * mask_pad, atol=1e-5, rtol=0)
        assert g.keys() == g_pad.keys()
        for k in g:
            torch.testing.assert_close(g[k], g_pad[k], atol=1e-5, rtol=1e-4)


def test_packed_rows_under_gradient_checkpointing():
    """The boundaries are kwargs of every layer call; checkpointed layers must pass them on too."""
    model = load_model("tiny", seed=1, packing=True, gradient_checkpointing=True).train()
    exs = rand_examples("pairwise", 4)
    lp_pad = sequence_logps(model, collate("pairwise", exs, PAD))[0]
    g_pad = grads(model, lp_pad.sum())
    lp = sequence_logps(model, collate("pairwise", exs, PAD, packed=True))[0]
    g = grads(model, lp.sum())
    torch.testing.assert_close(lp, lp_pad, atol=1e-5, rtol=0)
    for k in g:
        torch.testing.assert_close(g[k], g_pad[k], atol=1e-5, rtol=1e-4)


def test_sliding_window_longer_than_a_packed_sequence_is_refused():
    """The per-sequence SDPA applies no sliding window: exact while every sequence fits in it, an error
    (not a silently different attention) once one does not."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=8, pad_token_id=PAD)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = MistralForCausalLM(cfg).eval()
    register_varlen_attention()
    short = [{"id": str(i), "prompt_ids": [1, 2, 3], "response_ids": [4 + i] * (1 + i)} for i in range(3)]
    with torch.no_grad():
        padded = sequence_logps(model, collate("sft", short, PAD))[0]
        with attention(model, VARLEN_SDPA):
            torch.testing.assert_close(sequence_logps(model, collate("sft", short, PAD, packed=True))[0], padded,
                                       atol=1e-5, rtol=0)
            long = short + [{"id": "x", "prompt_ids": [1] * 5, "response_ids": [2] * 5}]  # 10 > 8 tokens
            with pytest.raises(ValueError, match="exceeds this model's sliding window"):
                sequence_logps(model, collate("sft", long, PAD, packed=True))


def test_lora_reference_reads_packed_rows():
    policy = with_lora(load_model("tiny", seed=4, packing=True))
    base = load_model("tiny", seed=4, trainable=False)
    exs = rand_examples("pairwise", 4, seed=2)
    ref = Reference(lora_policy=policy).sequence_logps(collate("pairwise", exs, PAD, packed=True))[0]
    torch.testing.assert_close(ref, Reference(model=base).sequence_logps(collate("pairwise", exs, PAD))[0],
                               atol=1e-5, rtol=0)


# ---- objectives: same loss, same gradients --------------------------------------------------------------

@pytest.mark.parametrize("objective,kind", [
    (SFT(), "sft"), (Pairwise("dpo"), "pairwise"), (Pairwise("simpo"), "pairwise"),
    (EXO("exo-rw"), "scored"), (EXO("exo-pref"), "pairwise"), (KTO(), "binary")],
    ids=["sft", "dpo", "simpo", "exo-rw", "exo-pref", "kto"])
def test_packed_objective_equals_padded(objective, kind):
    policy = load_model("tiny", seed=6, packing=True)
    with torch.no_grad():  # a reference that differs from the policy
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    reference = Reference(model=load_model("tiny", seed=6, trainable=False, packing=True))
    exs = rand_examples(kind, 6, seed=3, K=3 if kind == "scored" else 2)
    out = {}
    for layout in ("padded", "packed"):
        batch = collate(kind, exs, PAD, packed=layout == "packed")
        loss, metrics = objective(policy, reference, batch)
        out[layout] = (loss.detach(), {k: v.detach() for k, v in metrics.items()}, objective.units(batch),
                       grads(policy, loss))
    (l0, m0, u0, g0), (l1, m1, u1, g1) = out["padded"], out["packed"]
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-6)
    assert torch.equal(u1, u0)
    for k in m0:
        torch.testing.assert_close(m1[k], m0[k], atol=1e-5, rtol=1e-6)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-5, rtol=1e-4)


# ---- length grouping ------------------------------------------------------------------------------------

def fake(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"id": str(i), "prompt_ids": [1] * int(torch.randint(1, 50, (1,), generator=g)), "response_ids": [2]}
            for i in range(n)]


def draw(loader, n):
    return [loader.next()["ids"] for _ in range(n)]


def test_group_by_length_batches_similar_lengths_in_a_shuffled_order():
    ex = fake(200)
    length = {e["id"]: example_length(e) for e in ex}
    W, mb = 2, 4
    make = lambda r, seed=3: CyclingLoader(ex, "sft", mb, PAD, rank=r, world_size=W, seed=seed,  # noqa: E731
                                           group_by_length=True, group_window=5)
    ranks = [make(r) for r in range(W)]
    n = len(ranks[0])
    assert n == len(ranks[1]) == 200 // (W * mb)  # every rank takes the same number of micro-batches
    per_rank = [draw(lo, n) for lo in ranks]
    steps = [a + b for a, b in zip(*per_rank)]  # global micro-step i: every rank's i-th micro-batch
    assert sorted(i for s in steps for i in s) == sorted(length)  # one epoch: every example once

    def padding(batches):  # fraction of the padded micro-batches that is padding
        return 1 - sum(length[i] for b in batches for i in b) / sum(len(b) * max(length[i] for i in b) for b in batches)

    random_order = draw(CyclingLoader(ex, "sft", mb, PAD, rank=0, world_size=W, seed=3), n)
    assert padding(per_rank[0]) < 0.5 * padding(random_order)  # measured 0.11 vs 0.37
    # shuffled, not sorted: the longest example of successive global micro-batches is not monotone
    longest = [max(length[i] for i in s) for s in steps]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)
    # a pure function of (seed, epoch): a new loader repeats it; the next epoch and another seed differ
    assert draw(make(0), n) == per_rank[0]
    assert draw(ranks[0], n) != per_rank[0]
    assert draw(make(0, seed=4), n) != per_rank[0]


def test_group_by_length_resumes_exactly_mid_epoch():
    ex = fake(90, seed=1)
    make = lambda: CyclingLoader(ex, "sft", 4, PAD, rank=1, world_size=2, seed=9, group_by_length=True,  # noqa: E731
                                 group_window=3, packed=True)
    a = make()
    draw(a, 7)  # 11 micro-batches per epoch: stop mid-epoch
    state = a.state_dict()
    rest = [a.next() for _ in range(9)]  # crosses into the next epoch
    b = make()
    b.load_state_dict(state)
    again = [b.next() for _ in range(9)]
    assert [x["ids"] for x in again] == [x["ids"] for x in rest]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["cu_seqlens"], y["cu_seqlens"])
               for x, y in zip(rest, again))


# ---- the CLIs: same losses in one process and under 2 ranks of ZeRO-3 -------------------------------------

# Mix computes SFT and DPO every step (both packed, both evaluated). The 2-rank run's per-rank micro
# batches are half the single process's, so each global micro-step covers the same examples.
MIX = ["--objectives", "sft,dpo", "--schedule", "mix", "--train_batch_size", "8", "--learning_rate", "2e-3",
       "--max_steps", "4", "--eval_steps", "2", "--sft_max_samples", "16", "--dpo_max_samples", "16",
       "--group_by_length", "--seed", "5"]
ONE = ["--sft_micro_train_batch_size", "4", "--dpo_micro_train_batch_size", "4"]
TWO = ["--sft_micro_train_batch_size", "2", "--dpo_micro_train_batch_size", "2"]


@pytest.fixture(scope="module")
def mix_runs(tmp_path_factory):
    from xright.cli import train_joint

    root = tmp_path_factory.mktemp("packing")
    out = {k: str(root / k) for k in ("padded", "packed", "zero3")}
    where = lambda k: ["--save_path", out[k], "--ckpt_path", os.path.join(out[k], "ckpt")]  # noqa: E731
    train_joint.main(["--zero_stage", "2", *where("padded"), *MIX, *ONE])
    train_joint.main(["--zero_stage", "2", *where("packed"), *MIX, *ONE, "--packing_samples"])
    run_cli("train_joint", ["--zero_stage", "3", *where("zero3"), *MIX, *TWO, "--packing_samples"])
    return out


def losses(out):
    recs = train_records(out)
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    return [[r[f"train/{k}/loss"] for k in ("sft", "dpo")] for r in recs], final_eval(out)


def flat(rows):
    return [x for r in rows for x in r]


def test_cli_packing_logs_the_padded_losses(mix_runs):
    (train_pad, eval_pad), (train_pack, eval_pack) = losses(mix_runs["padded"]), losses(mix_runs["packed"])
    assert flat(train_pack) == pytest.approx(flat(train_pad), abs=1e-5)
    for k in ("eval/sft/loss", "eval/dpo/loss"):
        assert eval_pack[k] == pytest.approx(eval_pad[k], abs=1e-5)
    assert train_pad[0] != train_pad[-1]  # it trained


def test_zero3_two_ranks_packed_equal_padded(mix_runs):
    (train_pad, eval_pad), (train_z3, eval_z3) = losses(mix_runs["padded"]), losses(mix_runs["zero3"])
    assert flat(train_z3) == pytest.approx(flat(train_pad), abs=1e-5)
    for k in ("eval/sft/loss", "eval/dpo/loss"):
        assert eval_z3[k] == pytest.approx(eval_pad[k], abs=1e-5)


def test_zero3_run_had_rows_of_different_lengths_per_rank_and_micro_step(mix_runs):
    """The launch above really packed different lengths on the two ranks and across micro-steps."""
    from xright.cli import flags, lifecycle, train_joint
    from xright.data import load_data
    from xright.models import load_tokenizer

    args = flags.parse(train_joint.parser({"sft": "sft", "dpo": "dpo"}), [*MIX, *TWO])
    tok = load_tokenizer(None)
    for name, kind in (("sft", "sft"), ("dpo", "pairwise")):
        train = load_data(flags.data_spec(args, kind, name + "_", name=name), tok, log=lambda *a: None)[0]
        lens = [[int(b["input_ids"].shape[1]) for b in draw_batches(train, kind, r)] for r in range(2)]
        assert lens[0] != lens[1] and len(set(lens[0])) > 1, lens


def draw_batches(train, kind, rank):
    loader = CyclingLoader(train, kind, 2, PAD, rank=rank, world_size=2, seed=5, packed=True, group_by_length=True)
    return [loader.next() for _ in range(4)]


def test_reward_model_refuses_packing(tmp_path):
    from xright.cli import flags, lifecycle, train_rm

    with pytest.raises(lifecycle.UsageError, match="--packing_samples is not supported for reward models"):
        train_rm.main(["--packing_samples", "--save_path", str(tmp_path)])
    assert not os.listdir(tmp_path)


# --group_by_length with --packing_samples resuming bitwise after SIGKILL, across an epoch boundary, on 2 ranks:
# test_resume.py's sft case


def test_fused_adamw_only_on_cuda():
    """A GPU run without offload gets torch's fused AdamW; the CPU path keeps the default AdamW."""
    from xright.strategy import Strategy

    model = load_model("tiny", seed=0)
    s = Strategy.__new__(Strategy)  # no process group needed to build an optimizer
    s.ds_config = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "none"}}}
    s.device = torch.device("cpu")
    assert not s.optimizer(model, 1e-3, (0.9, 0.95), 0.0).defaults["fused"]
    s.device = torch.device("cuda")  # the kernel runs only at step(): building it needs no GPU
    assert s.optimizer(model, 1e-3, (0.9, 0.95), 0.0).defaults["fused"] is True
