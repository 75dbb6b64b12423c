"""Chunked log-probs (``--logprob_chunk_size``): the output head applied a few tokens at a time, with a custom
autograd that recomputes each chunk's logits in the backward, gives the full path's log-probs, losses and
gradients of every trainable parameter, for every objective, padded and packed, LoRA and full, tied and untied
heads, with Gemma-2's soft-capping and Cohere's / Granite's logit scales; and no [tokens, vocab] tensor exists."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

from test_packing import rand_examples

from xright import logprobs
from xright.data import collate
from xright.logprobs import Head, output_head, sequence_logps, target_logps, token_logps
from xright.models import load_model, register_varlen_attention
from xright.objectives import EXO, KTO, SFT, Pairwise, Reference

PAD, V = 256, 258


def family(name, packing=False, attn=None, **extra):
    """A tiny random model of a transformers family (2 layers, hidden 64, vocabulary 258); packed rows through
    xright's per-sequence SDPA, or ``attn`` (eager reads packed rows from their position ids)."""
    kw = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD, bos_token_id=257,
              eos_token_id=257, tie_word_embeddings=False)
    kw.update(extra)
    cfg = AutoConfig.for_model(name, **kw)
    cfg._attn_implementation = attn or (register_varlen_attention() if packing else "sdpa")
    torch.manual_seed(7)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # random weights big enough that the logits spread (soft-capping and scales matter)
        model.get_output_embeddings().weight.normal_(0, 0.5)
    return model


MODELS = {
    "neox": lambda packing: load_model("tiny", seed=4, packing=packing),
    "llama-tied": lambda packing: family("llama", packing, tie_word_embeddings=True),
    # Gemma-2 caps its logits at ±cap: a small cap, so the cap changes them
    "gemma2-softcap": lambda packing: family("gemma2", packing, "eager", final_logit_softcapping=2.0, head_dim=16,
                                             query_pre_attn_scalar=16, sliding_window=512),
    "cohere-scale": lambda packing: family("cohere", packing, logit_scale=0.25),
    "granite-scale": lambda packing: family("granite", packing, logits_scaling=4.0),
    "phi-bias": lambda packing: family("phi", packing),  # its head has a bias
}


def with_lora(model, targets="all-linear"):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(12)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
    with torch.no_grad():  # peft starts B at 0: a LoRA that changes nothing would test nothing
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def run(objective, policy, reference, batch, chunk, monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_SIZE", chunk)
    loss, metrics = objective(policy, reference, batch)
    return loss.detach(), {k: v.detach() for k, v in metrics.items()}, grads(policy, loss)


def assert_same(a, b, atol=1e-5, rtol=1e-5):
    (l0, m0, g0), (l1, m1, g1) = a, b
    torch.testing.assert_close(l1, l0, atol=atol, rtol=rtol)
    for k in m0:
        torch.testing.assert_close(m1[k], m0[k], atol=atol, rtol=rtol)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=atol, rtol=1e-4, msg=k)


OBJECTIVES = {"sft": (SFT, "sft"), "dpo": (lambda: Pairwise("dpo"), "pairwise"), "kto": (KTO, "binary"),
              "exo-rw": (lambda: EXO("exo-rw"), "scored"), "exo-pref": (lambda: EXO("exo-pref"), "pairwise")}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_objectives_equal_the_full_path(name, lora, layout, monkeypatch):
    """Loss, metrics and the gradient of every trainable parameter, chunks of 5 tokens vs the whole logits; the
    reference a separate model (full) or the LoRA policy with its adapters off (KTO's KL rows too)."""
    make, kind = OBJECTIVES[name]
    packed = layout == "packed"
    policy = load_model("tiny", seed=6, packing=packed)
    with torch.no_grad():  # a policy that differs from the reference
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if lora:
        policy, reference = with_lora(policy), None
        reference = Reference(lora_policy=policy)
    else:
        reference = Reference(model=load_model("tiny", seed=6, trainable=False, packing=packed))
    batch = collate(kind, rand_examples(kind, 6, seed=3, K=3 if kind == "scored" else 2), PAD, packed=packed)
    full = run(make(), policy, reference, batch, 0, monkeypatch)
    assert_same(full, run(make(), policy, reference, batch, 5, monkeypatch))
    assert_same(full, run(make(), policy, reference, batch, None, monkeypatch))  # the default: one chunk here


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("name", list(MODELS))
def test_families_heads_equal_the_full_path(name, layout, monkeypatch):
    """Tied and untied heads, a head with a bias, soft-capped and scaled logits: DPO loss and gradients."""
    packed = layout == "packed"
    policy = MODELS[name](packed).train()
    head = output_head(policy)
    assert head is not None
    if name == "gemma2-softcap":
        assert head.cap == 2.0
    if name == "cohere-scale":
        assert head.scale == 0.25
    if name == "granite-scale":
        assert head.scale == 0.25
    if name == "phi-bias":
        assert head.module.bias is not None
    reference = Reference(model=MODELS[name](packed).eval().requires_grad_(False))
    batch = collate("pairwise", rand_examples("pairwise", 5, seed=1), PAD, packed=packed)
    assert_same(run(Pairwise("dpo"), policy, reference, batch, 0, monkeypatch),
                run(Pairwise("dpo"), policy, reference, batch, 7, monkeypatch))


@pytest.mark.parametrize("name", ["gemma2-softcap", "cohere-scale"])
def test_the_logit_transforms_matter(name):
    """Without its cap or scale a family's log-probs differ from the model's: the tests above would see it."""
    policy = MODELS[name](False).eval()
    batch = collate("sft", rand_examples("sft", 4), PAD)
    head = output_head(policy)
    with torch.no_grad():
        want, mask = token_logps(policy, batch, chunk_size=0)
        want = want * mask  # the chunked path computes the response tokens only
        torch.testing.assert_close(token_logps(policy, batch, chunk_size=3)[0], want, atol=1e-5, rtol=1e-5)
        logprobs._HEADS[policy] = (1.0, None)  # a head that forgot the transform
        assert (token_logps(policy, batch, chunk_size=3)[0] - want).abs().max() > 0.05
        logprobs._HEADS[policy] = (head.scale, head.cap)


def test_token_logps_in_bf16_are_close(monkeypatch):
    """bf16 weights: the matmul in bf16, the log-sum-exp and the head's gradient accumulated in fp32."""
    policy = family("llama").to(torch.bfloat16)
    batch = collate("sft", rand_examples("sft", 6, seed=2), PAD)
    full = run(SFT(), policy, None, batch, 0, monkeypatch)
    chunked = run(SFT(), policy, None, batch, 4, monkeypatch)
    torch.testing.assert_close(chunked[0], full[0], rtol=2e-3, atol=0)
    for k, g in full[2].items():
        err = (chunked[2][k].float() - g.float()).norm() / g.float().norm()
        assert err < 2e-2, (k, float(err))


def test_only_the_chunk_is_ever_vocab_wide():
    """No tensor with a vocabulary-wide last dimension holds more than one chunk of tokens, in the forward or the
    backward; the full path holds every token's logits (the check that the test can fail)."""
    class Widest(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.rows = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(r.alias_info is not None for r in func._schema.returns):  # a view (Wᵀ) allocates nothing
                return out
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == V:
                    self.rows = max(self.rows, t.numel() // V)
            return out

    policy = load_model("tiny", seed=1)
    batch = collate("pairwise", rand_examples("pairwise", 6, seed=4), PAD)
    output_head(policy)  # the one-time check (16 tokens of full logits) before we watch
    for chunk, most in ((8, 8), (0, batch["input_ids"].numel())):
        with Widest() as w:
            sequence_logps(policy, batch, chunk_size=chunk)[0].sum().backward()
        assert w.rows == most, (chunk, w.rows)


def test_only_response_tokens_are_computed():
    """Prompt and pad positions get no head computation (0 in token_logps, as the mask says)."""
    policy = load_model("tiny", seed=1).eval()
    batch = collate("pairwise", rand_examples("pairwise", 4, seed=5), PAD)
    seen = []
    head = output_head(policy)
    logprobs._HEADS[policy] = (1.0, None)
    original = Head.logits
    try:
        Head.logits = lambda self, h: seen.append(h.shape[0]) or original(self, h)
        with torch.no_grad():
            logps, mask = token_logps(policy, batch, chunk_size=1000)
    finally:
        Head.logits = original
    assert seen == [int(mask.sum())] and int(mask.sum()) < mask.numel()
    assert (logps[mask == 0] == 0).all()
    with torch.no_grad():
        full = token_logps(policy, batch, chunk_size=0)[0]
    torch.testing.assert_close(logps, full * mask, atol=1e-5, rtol=1e-5)


def test_heads_the_chunked_path_cannot_reproduce_take_the_full_path(monkeypatch):
    """A LoRA-adapted head (not a plain linear layer) and a model that transforms its logits in a way not
    recognised here: the full path, said once per model, same numbers."""
    said = []
    monkeypatch.setattr(logprobs, "say", said.append)
    lora_head = with_lora(load_model("tiny", seed=2), ["query_key_value", "lm_head"])
    llama = family("llama")

    class Doubled(type(llama)):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    odd = family("llama")
    odd.__class__ = Doubled
    batch = collate("sft", rand_examples("sft", 4), PAD)
    for model, why in ((lora_head, "not a plain linear layer"), (odd, "its logits are not")):
        with torch.no_grad():
            full, mask = token_logps(model, batch, chunk_size=0)
            torch.testing.assert_close(token_logps(model, batch, chunk_size=3)[0] * mask, full * mask)
            token_logps(model, batch, chunk_size=3)
        assert output_head(model) is None
        assert sum(why in s for s in said) == 1, said
    assert output_head(llama) is not None


@pytest.mark.parametrize("cap,scale,bias", [(None, 1.0, False), (1.5, 1.0, True), (None, 0.3, False), (3.0, 2.0, True)])
def test_target_logps_by_hand(cap, scale, bias):
    """The function itself against log_softmax of the explicit logits (fp64), values and every gradient."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 11, bias=bias).double()
    h = torch.randn(13, 8, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (13,))
    g = torch.randn(13, dtype=torch.float64)
    z = lin(h) * scale
    if cap:
        z = cap * torch.tanh(z / cap)
    want = torch.log_softmax(z, -1).gather(1, t[:, None]).squeeze(1)
    want_grads = torch.autograd.grad((want * g).sum(), [h, *lin.parameters()])
    got = target_logps(h, t, Head(lin, scale, cap), chunk=4)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-6)
    got_grads = torch.autograd.grad((got.double() * g).sum(), [h, *lin.parameters()])
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_a_micro_batch_without_response_tokens_gives_zero_gradients():
    """The head still gets a (zero) gradient, as from the full path: under ZeRO-3 every rank reduces it."""
    policy = load_model("tiny", seed=1)
    batch = collate("sft", rand_examples("sft", 3), PAD)
    batch["loss_mask"] = torch.zeros_like(batch["loss_mask"])
    lp = sequence_logps(policy, batch, chunk_size=4)[0]
    lp.sum().backward()
    head = output_head(policy).module.weight
    assert lp.tolist() == [0.0, 0.0, 0.0]
    assert head.grad is not None and head.grad.shape == head.shape and (head.grad == 0).all()
