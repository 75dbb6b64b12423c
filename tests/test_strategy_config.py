"""ds_config overlay: templates, flags over files, contradictions and bad files are errors."""

import json

import pytest

from xright.strategy import (ConfigError, DSOptions, accumulation_steps, build_ds_config, fill_bucket_sizes,
                             reference_config)


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
    fill_bucket_sizes(cfg, 128)  # the bucket sizes follow the model: filled when the engine is built
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


# ---- batch sizes from a --deepspeed file; ZeRO-0 with bf16 -------------------------------------

@pytest.fixture
def in_process(monkeypatch):
    """Run a CLI's main(argv) here as a world of one. The environment variables it needs are restored
    afterwards (subprocess launches must not inherit them); the process group stays up for the next
    in-process run, as DeepSpeed keeps its groups across engines."""
    import torch

    from launch import free_port

    for key, value in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(free_port())).items():
        monkeypatch.setenv(key, value)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def train_losses(out, name="sft"):
    with open(f"{out}/metrics.jsonl") as f:
        return [r[f"train/{name}/loss"] for r in map(json.loads, f) if f"train/{name}/loss" in r]


def test_deepspeed_file_batch_sizes_are_what_the_loop_trains(tmp_path, in_process):
    from xright.cli import train_sft

    # the file's 8 = 2 × 4 accumulation × 1 rank; no batch flag typed (their defaults are 128 and 8)
    path = write(tmp_path, {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 2,
                            "zero_optimization": {"stage": 0}})
    out = str(tmp_path / "run")
    train_sft.main(["--deepspeed", path, "--max_samples", "16", "--max_steps", "2", "--save_path", out,
                    "--eval_steps", "100", "--learning_rate", "1e-3"])
    cfg = read_json(f"{out}/ds_config.json")
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) \
        == (8, 2, 4)
    sft = read_json(f"{out}/batches.json")["objectives"]["sft"]
    assert (sft["examples_per_rank_per_micro_batch"], sft["micro_batches_per_step"], sft["examples_per_step"]) \
        == (2, 4, 8)
    assert sft["micro_batches_drawn_per_rank"] == 2 * 4 and sft["examples_drawn"] == 16


def test_deepspeed_file_accumulation_is_honoured_or_refused(tmp_path, monkeypatch):
    from xright.cli import batching, common, train_sft

    def parsed(argv):
        seen = {}
        monkeypatch.setattr(common, "run", lambda args, specs, *a, **k: seen.update(args=args, specs=specs))
        train_sft.main(argv)
        return seen["args"], seen["specs"]

    # micro batch and accumulation but no train_batch_size: micro × accumulation × ranks (the launcher's WORLD_SIZE)
    monkeypatch.setenv("WORLD_SIZE", "2")
    path = write(tmp_path, {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, "gas.json")
    args, specs = parsed(["--deepspeed", path])
    assert (args.train_batch_size, specs[0].micro_batch_size) == (12, 2)
    cfg = build_ds_config(batching.ds_options(args, specs), world_size=2)
    assert (cfg["train_batch_size"], cfg["gradient_accumulation_steps"]) == (12, 3)
    assert str(batching.batch_plan(args, specs, 2)["sft"]) == (
        "2 examples per rank per micro-batch × 3 micro-batches per optimizer step × 2 ranks = 12 examples per "
        "optimizer step")
    # a typed flag against the file's accumulation is an error naming both
    args, specs = parsed(["--deepspeed", path, "--train_batch_size", "16"])
    with pytest.raises(ConfigError, match=r"gradient_accumulation_steps = 3 in .*gas.json contradicts train_batch_size "
                                          r"16 / \(train_micro_batch_size_per_gpu 2 × world size 2\) = 4"):
        build_ds_config(batching.ds_options(args, specs), world_size=2)
    bad = write(tmp_path, {"train_batch_size": "32"}, "bad.json")
    with pytest.raises(ConfigError, match=r'bad.json: train_batch_size must be a positive integer or "auto", '
                                          r'got \'32\''):
        parsed(["--deepspeed", bad])


def test_zero0_drops_the_templates_fp32_accumulation_under_bf16(tmp_path):
    cfg = build_ds_config(DSOptions(zero_stage=0, bf16=True, train_batch_size=4, micro_train_batch_size=2), 1)
    assert "grad_accum_dtype" not in cfg.get("data_types", {})
    z2 = build_ds_config(DSOptions(zero_stage=2, bf16=True, train_batch_size=4, micro_train_batch_size=2), 1)
    assert z2["data_types"]["grad_accum_dtype"] == "fp32"  # ZeRO's optimizers accumulate in fp32
    with pytest.raises(ConfigError, match=r"--grad_accum_dtype = fp32 is impossible at ZeRO stage 0 with bf16 weights"):
        build_ds_config(DSOptions(zero_stage=0, bf16=True, grad_accum_dtype="fp32", explicit={"grad_accum_dtype"},
                                  train_batch_size=4, micro_train_batch_size=2), 1)
    path = write(tmp_path, {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True},
                            "data_types": {"grad_accum_dtype": "fp32"}})
    with pytest.raises(ConfigError, match=r"data_types.grad_accum_dtype in .*ds.json = fp32 is impossible at ZeRO "
                                          r"stage 0 with bf16 weights"):
        build_ds_config(DSOptions(deepspeed=path, train_batch_size=4, micro_train_batch_size=2), 1)


def test_zero0_bf16_run_trains(tmp_path, in_process):
    from xright.cli import train_sft

    out = str(tmp_path / "run")
    train_sft.main(["--zero_stage", "0", "--bf16", "--train_batch_size", "4", "--micro_train_batch_size", "2",
                    "--max_samples", "16", "--max_steps", "6", "--learning_rate", "3e-3", "--lr_scheduler",
                    "constant", "--eval_steps", "100", "--save_path", out])
    losses = train_losses(out)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
    assert "grad_accum_dtype" not in read_json(f"{out}/ds_config.json").get("data_types", {})


def test_batch_meanings_follow_each_toolkit(monkeypatch):
    """XRIGHT's CLIs count --train_batch_size in loader batches, OpenRLHF-style ones in examples."""
    from xright.cli import batching, common, joint, train_sft, train_sft_pref

    def parsed(main, argv):
        seen = {}
        monkeypatch.setattr(common, "run", lambda args, specs, *a, **k: seen.update(args=args, specs=specs))
        main(argv)
        return seen["args"], seen["specs"]

    def geometry(args, specs, world):
        return {k: (b.per_rank, b.micro_steps, b.per_step) for k, b in batching.batch_plan(args, specs, world).items()}

    paper = ["--train_batch_size", "2", "--sft_micro_train_batch_size", "12", "--rlhf_micro_train_batch_size", "4"]
    for schedule in ("alright", "maxright", "mix", "sequential"):
        args, specs = parsed(lambda a: joint.main(a, schedule=schedule), paper)
        # DeepSpeed's micro batch is 1 loader batch: on 2 GPUs one loader batch per rank per step, on 1 GPU two
        assert geometry(args, specs, 2) == {"sft": (12, 1, 24), "dpo": (4, 1, 8)}
        assert geometry(args, specs, 1) == {"sft": (12, 2, 24), "dpo": (4, 2, 8)}
        cfg = build_ds_config(batching.ds_options(args, specs), world_size=2)
        assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) \
            == (2, 1, 1)  # XRIGHT's own DeepSpeed config for these flags
    args, specs = parsed(lambda a: joint.main(a, schedule="alright"), [*paper, "--train_batch_size", "3"])
    with pytest.raises(ConfigError, match=r"--train_batch_size 3 must be a positive multiple of "
                                          r"--micro_train_batch_size \(as XRIGHT: DeepSpeed's micro batch in loader "
                                          r"batches\) 1 × world size 2"):
        batching.batch_plan(args, specs, 2)
    # train_sft_pref: loader batches of --rlhf_micro_train_batch_size, train_batch_size / (micro × world) of them
    args, specs = parsed(train_sft_pref.main, ["--train_batch_size", "2", "--rlhf_micro_train_batch_size", "6"])
    assert geometry(args, specs, 2) == {"sft": (6, 1, 12)}
    args, specs = parsed(train_sft_pref.main, ["--train_batch_size", "8", "--rlhf_micro_train_batch_size", "6",
                                               "--micro_train_batch_size", "2"])
    assert geometry(args, specs, 2) == {"sft": (6, 2, 24)}
    # OpenRLHF's meaning: examples per optimizer step
    args, specs = parsed(train_sft.main, ["--train_batch_size", "8", "--micro_train_batch_size", "2"])
    assert geometry(args, specs, 2) == {"sft": (2, 2, 8)}
