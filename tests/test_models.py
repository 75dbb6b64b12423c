"""Model loading: local paths (the hub code path), errors, LoRA, the reference with adapters off."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from xright.logging import MetricsLogger, wandb_settings
from xright.models import (LoraSpec, ModelLoadError, attn_implementation, is_peft, load_model, load_tokenizer,
                           tiny_tokenizer)
from xright.objectives import Reference


def test_tiny_is_deterministic_and_loads_from_a_local_path(tmp_path):
    a, b = load_model("tiny", seed=7), load_model("tiny", seed=7)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    a.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    c = load_model(str(tmp_path))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    tok = load_tokenizer(str(tmp_path))
    assert tok.pad_token_id == 256 and tok.decode(tok("héllo")["input_ids"]) == "héllo"


def test_missing_model_and_flash_attention_fail_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer("./no/such/dir")
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="--flash_attn needs"):
            attn_implementation(True)
    assert attn_implementation(False) is None  # transformers picks SDPA, else the model's eager attention


def test_lora_reference_is_the_base_model():
    base = load_model("tiny", seed=3, trainable=False)
    policy = load_model("tiny", seed=3, lora=LoraSpec(rank=4, alpha=8))
    assert is_peft(policy)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.fill_(0.05)  # make the adapter matter
    batch = {"input_ids": torch.tensor([[1, 2, 3, 4, 5]]), "attention_mask": torch.ones(1, 5, dtype=torch.long),
             "loss_mask": torch.tensor([[0, 0, 1, 1, 1]], dtype=torch.bool)}
    ref = Reference(lora_policy=policy).sequence_logps(batch)[0]
    base_lp = Reference(model=base).sequence_logps(batch)[0]
    from xright.logprobs import sequence_logps
    with torch.no_grad():
        pol = sequence_logps(policy, batch)[0]
    torch.testing.assert_close(ref, base_lp)
    assert not torch.allclose(pol, base_lp)
    assert policy.training  # the reference pass leaves the policy's mode alone


def test_metrics_logger_jsonl_tensorboard_and_truncate(tmp_path):
    log = MetricsLogger(str(tmp_path), True, tensorboard_dir=str(tmp_path / "tb"))
    for step in range(1, 5):
        log.log({"step": step, "train/sft/loss": 1.0 / step})
    log.log({"step": 4, "done": True})
    log.truncate(2)
    log.log({"step": 3, "train/sft/loss": 0.3})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_wandb_settings_prefers_environment(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_settings(None, None, None, "p", "r") is None
    assert wandb_settings("True", None, None, "p", "r")["key"] is None
    assert wandb_settings("abc123", None, None, "p", "r")["key"] == "abc123"
    monkeypatch.setenv("WANDB_API_KEY", "from-env")
    assert wandb_settings("abc123", None, None, "p", "r")["key"] == "from-env"


def _tiny_llama_dir(tmp_path):
    """A two-layer Llama saved locally (no download): q/k/v/o and MLP projections by name."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    path = tmp_path / "llama"
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("arch", ["gpt_neox", "llama"])
@pytest.mark.parametrize("targets", ["one", "several", "all-linear"])
def test_lora_target_modules_as_argparse_gives_them(tmp_path, arch, targets):
    """--target_modules NAME [NAME …] arrives as a list (one name too); its default is the string all-linear."""
    names = {"gpt_neox": {"one": ["query_key_value"], "several": ["query_key_value", "dense_4h_to_h"]},
             "llama": {"one": ["q_proj"], "several": ["q_proj", "v_proj", "down_proj"]}}[arch]
    pretrain = "tiny" if arch == "gpt_neox" else _tiny_llama_dir(tmp_path)
    linear = {"gpt_neox": {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"},
              "llama": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}[arch]
    cases = {"one": [names["one"]], "several": [names["several"]], "all-linear": ["all-linear", ["all-linear"]]}
    for value in cases[targets]:
        model = load_model(pretrain, lora=LoraSpec(rank=4, alpha=8, target_modules=value))
        lora_a = [n for n, _ in model.named_parameters() if n.endswith("lora_A.default.weight")]
        adapted = {n.split(".")[-4] for n in lora_a}  # …layers.0.attention.query_key_value.lora_A.default.weight
        assert adapted == (linear if targets == "all-linear" else set(names[targets])), value
        assert len(lora_a) == model.config.num_hidden_layers * len(adapted)  # every layer, not only the first


def test_several_eos_ids_and_no_pad_load(tmp_path):
    # Llama-3.x-Instruct: eos_token_id is a list and there is no pad id; transformers 5 refuses a list pad id
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, bos_token_id=1, eos_token_id=[61, 63],
                         pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    assert load_model(str(tmp_path)).config.pad_token_id == 61  # the first eos id
    assert load_model(str(tmp_path), pad_token_id=62).config.pad_token_id == 62  # the tokenizer's, when given
    reward = load_model(str(tmp_path), task="reward", pad_token_id=62, trainable=False)
    assert reward.config.pad_token_id == 62 and reward.config.eos_token_id == [61, 63]


def test_merge_lora_uses_the_runs_seed(tmp_path):
    # the built-in tiny base is built from --seed: the merged model must be that base + the adapter
    from peft import PeftModel

    from launch import run_cli

    out = tmp_path / "lora"
    run_cli("train_sft", ["--save_path", str(out), "--ckpt_path", str(out / "ckpt"), "--seed", "7", "--lora_rank", "4",
                          "--lora_alpha", "8", "--merge_lora", "--max_steps", "2", "--train_batch_size", "4",
                          "--micro_train_batch_size", "2", "--learning_rate", "1e-2", "--max_samples", "16"], nproc=1)
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    ids = torch.tensor([[5, 77, 120, 31, 9, 200]])

    def adapted_logits(seed):
        base = load_model("tiny", seed=seed, trainable=False, vocab_size=merged.config.vocab_size)
        with torch.no_grad():
            return PeftModel.from_pretrained(base, str(out)).eval()(input_ids=ids).logits

    with torch.no_grad():
        logits = merged(input_ids=ids).logits
    torch.testing.assert_close(logits, adapted_logits(7), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(logits, adapted_logits(42), atol=1e-2)  # another base: the seed matters


def test_merging_an_adapter_raises_no_deprecation_warning(tmp_path):
    # peft's from_pretrained reads transformers' deprecated is_gradient_checkpointing: not a warning of ours to show
    import warnings

    from xright.models import load_for_inference, merge_saved_adapter

    tok = tiny_tokenizer()
    load_model("tiny", seed=3, vocab_size=len(tok), lora=LoraSpec(rank=4, alpha=8)).save_pretrained(tmp_path / "lora")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        merge_saved_adapter(None, str(tmp_path / "lora"), str(tmp_path / "merged"), tok, seed=3)
        load_for_inference(str(tmp_path / "lora"), vocab_size=len(tok))
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "merged").config.vocab_size == len(tok)
