"""ds_config overlay: templates, flags over files, contradictions and bad files are errors."""

import json

import pytest

from xright.strategy import ConfigError, DSOptions, accumulation_steps, build_ds_config, reference_config


def write(tmp_path, cfg, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(cfg))
    return str(path)


def test_template_from_zero_stage_gets_flags():
    cfg = build_ds_config(DSOptions(zero_stage=3, bf16=True, max_norm=0.5, train_batch_size=32,
                                    micro_train_batch_size=4), world_size=2)
    assert cfg["zero_optimization"]["stage"] == 3
    assert cfg["bf16"]["enabled"] is True
    assert cfg["gradient_clipping"] == 0.5
    assert cfg["train_batch_size"] == 32 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "none"
    assert "auto" not in json.dumps(cfg)


def test_adam_offload_and_trace_cache_flags():
    cfg = build_ds_config(DSOptions(zero_stage=3, adam_offload=True, disable_trace_cache=True,
                                    train_batch_size=8, micro_train_batch_size=4), world_size=2)
    assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert cfg["zero_optimization"]["stage3_max_live_parameters"] == 0


def test_file_values_kept_when_flag_not_typed(tmp_path):
    path = write(tmp_path, {"zero_optimization": {"stage": 3}, "gradient_clipping": 2.0, "bf16": {"enabled": True}})
    cfg = build_ds_config(DSOptions(deepspeed=path, zero_stage=2, train_batch_size=8, micro_train_batch_size=2),
                          world_size=2)
    assert cfg["zero_optimization"]["stage"] == 3  # --zero_stage default (2) does not override the file
    assert cfg["gradient_clipping"] == 2.0
    assert cfg["bf16"]["enabled"] is True
    assert cfg["gradient_accumulation_steps"] == 2


def test_typed_flag_agreeing_with_file_is_fine(tmp_path):
    path = write(tmp_path, {"zero_optimization": {"stage": 3}})
    cfg = build_ds_config(DSOptions(deepspeed=path, zero_stage=3, explicit={"zero_stage"}, train_batch_size=8,
                                    micro_train_batch_size=2), world_size=1)
    assert cfg["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("field,opts,needle", [
    ({"zero_optimization": {"stage": 3}}, dict(zero_stage=2, explicit={"zero_stage"}), "--zero_stage 2 contradicts zero_optimization.stage = 3"),
    ({"gradient_clipping": 1.0}, dict(max_norm=0.3, explicit={"max_norm"}), "--max_norm 0.3 contradicts gradient_clipping"),
    ({"bf16": {"enabled": False}}, dict(bf16=True, explicit={"bf16"}), "--bf16 True contradicts bf16.enabled"),
    ({"train_batch_size": 64}, dict(train_batch_size=32, explicit={"train_batch_size"}), "--train_batch_size 32 contradicts"),
    ({"zero_optimization": {"offload_optimizer": {"device": "none"}}}, dict(adam_offload=True, explicit={"adam_offload"}), "--adam_offload"),
])
def test_contradiction_is_an_error(tmp_path, field, opts, needle):
    path = write(tmp_path, field)
    base = dict(train_batch_size=8, micro_train_batch_size=2)
    base.update(opts)
    with pytest.raises(ConfigError) as e:
        build_ds_config(DSOptions(deepspeed=path, **base), world_size=1)
    assert needle in str(e.value) and path in str(e.value)


def test_unreadable_and_malformed_configs(tmp_path):
    with pytest.raises(ConfigError, match="cannot read DeepSpeed config"):
        build_ds_config(DSOptions(deepspeed=str(tmp_path / "missing.json")), world_size=1)
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match=r"bad.json line 1 column"):
        build_ds_config(DSOptions(deepspeed=str(bad)), world_size=1)
    arr = write(tmp_path, [1, 2], "arr.json")
    with pytest.raises(ConfigError, match="must be a JSON object"):
        build_ds_config(DSOptions(deepspeed=arr), world_size=1)
    both = write(tmp_path, {"fp16": {"enabled": True}, "bf16": {"enabled": True}}, "both.json")
    with pytest.raises(ConfigError, match="fp16 and bf16"):
        build_ds_config(DSOptions(deepspeed=both, train_batch_size=8, micro_train_batch_size=8), world_size=1)


def test_batch_sizes_must_divide():
    assert accumulation_steps(128, 8, 2) == 8
    with pytest.raises(ConfigError, match="must be a positive multiple of micro batch size 8 × world size 3 = 24"):
        accumulation_steps(128, 8, 3)
    with pytest.raises(ConfigError):
        build_ds_config(DSOptions(train_batch_size=10, micro_train_batch_size=4), world_size=1)
    with pytest.raises(ConfigError, match="--zero_stage must be"):
        build_ds_config(DSOptions(zero_stage=5), world_size=1)


def test_reference_config_stage():
    z2 = build_ds_config(DSOptions(zero_stage=2, train_batch_size=8, micro_train_batch_size=4), world_size=2)
    z3 = build_ds_config(DSOptions(zero_stage=3, train_batch_size=8, micro_train_batch_size=4), world_size=2)
    assert reference_config(z2, offload=False)["zero_optimization"]["stage"] == 0
    assert reference_config(z3, offload=False)["zero_optimization"]["stage"] == 3
    off = reference_config(z2, offload=True)["zero_optimization"]
    assert off["stage"] == 3 and off["offload_param"]["device"] == "cpu"
