"""What a run holds besides its activations (issue 19's floor): DeepSpeed's bucket sizes follow the model, an fp32
ZeRO-1/2 engine keeps no second copy of the weights as its master weights, ZeRO-2 makes no flat copy of the
gradients for its step, the gradient norm and the optimizer step allocate no temporaries the size of a gradient;
on CPU the flat gradient partition is resident only where written and the heap is trimmed after each reduction.
In-process engines (world size 1); the numbers are those of the unchanged path, bit for bit."""

import json
import os
import subprocess

import pytest
import torch
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer
from torch.utils._python_dispatch import TorchDispatchMode

import launch
from xright import strategy as S
from xright.models import load_model


def test_auto_bucket_sizes_scale_with_the_model():
    for template, keys in (("zero2.json", ("reduce_bucket_size", "allgather_bucket_size")),
                           ("zero3.json", ("reduce_bucket_size",))):
        for hidden, want in ((4096, 4096 ** 2), (256, 1 << 20), (None, int(5e8))):
            cfg = S.read_ds_config(f"{S.TEMPLATES}/{template}")
            S.fill_bucket_sizes(cfg, hidden)
            assert [cfg["zero_optimization"][k] for k in keys] == [want] * len(keys), (template, hidden)
            assert "auto" not in json.dumps({k: v for k, v in cfg["zero_optimization"].items() if "bucket" in k})
    written = {"zero_optimization": {"stage": 2, "reduce_bucket_size": 12345}}
    S.fill_bucket_sizes(written, 4096)
    assert written["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 12345}


def family_model(family: str | None):
    """The tiny GPT-NeoX, or a tiny random model of one of test_families' families."""
    if family is None:
        return load_model("tiny", seed=3)
    from transformers import AutoConfig, AutoModelForCausalLM

    from test_families import COMMON, FAMILIES

    model_type, fields = FAMILIES[family]
    torch.manual_seed(3)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **{**COMMON, **fields}))


def train(stage: int, steps: int = 3, share: bool = True, monkeypatch=None, accum: int = 2, family=None):
    """An in-process fp32 engine of the tiny model (or of ``family``) after ``steps`` AdamW steps of ``accum``
    micro-batches each, on fixed random batches. ``engine.most_in_step``: the largest new tensor any step after the
    first allocated; ``engine.norms``: the gradient norms."""
    if not share:
        monkeypatch.setattr(S, "_lighten_zero12", lambda optimizer: None)
    for owner, name in ((S.SlicedAdamW, "SLICE"), (S, "NORM_SLICE")):  # far below the largest gradient's size
        monkeypatch.setattr(owner, name, 1 << 10)
    st = S.Strategy()
    st.configure(S.DSOptions(zero_stage=stage, train_batch_size=2 * accum, micro_train_batch_size=2))
    model = family_model(family)
    engine = st.prepare(model, st.optimizer(model, 1e-2, (0.9, 0.95), 0.1), None)
    g, engine.most_in_step, engine.norms = torch.Generator().manual_seed(0), 0, []
    for micro in range(steps * accum):
        ids = torch.randint(0, 256, (2, 16), generator=g)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        opt, watch = engine.optimizer, LargestOutput()
        old = [*opt.single_partition_of_fp32_groups, *(t for ts in opt.averaged_gradients.values() for t in ts or ()),
               *(t for state in opt.optimizer.state.values() for t in state.values())]
        watch.inputs = {t.untyped_storage().data_ptr() for t in old}
        with watch:
            engine.step()
        if micro >= accum:  # (the first step allocates the moments)
            engine.most_in_step = max(engine.most_in_step, watch.most)
        if (micro + 1) % accum == 0:
            engine.norms.append(float(engine.get_global_grad_norm()))
    return engine


@pytest.mark.parametrize("stage", [1, 2])
def test_fp32_zero_keeps_no_second_copy_of_the_weights_or_the_gradients(stage, monkeypatch):
    try:
        engine = train(stage, monkeypatch=monkeypatch)
        opt = engine.optimizer
        assert opt.reduce_bucket_size == 1 << 20  # the template's "auto" at hidden 128
        for master, flat in zip(opt.single_partition_of_fp32_groups, opt.bit16_groups_flat):
            assert master.data_ptr() == flat.data_ptr() and master.numel() == flat.numel()
        # the parameters' links into the master weights (safe_get_full_fp32_param, universal checkpoints) moved too
        flats = {f.untyped_storage().data_ptr() for f in opt.bit16_groups_flat}
        assert {p._hp_mapping.hp_fragment.untyped_storage().data_ptr() for p in engine.module.parameters()} == flats
        partition = max(f.numel() for f in opt.bit16_groups_flat)  # the larger of two groups (weight decay or not)
        # ZeRO-2's step reads the gradients where the reduction left them, its norm copies no gradient whole
        # (ZeRO-1 reduces in its step, into a new partition either way)
        assert engine.most_in_step == partition if stage == 1 else engine.most_in_step <= 1 << 10
        ours = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        state, norms = [s["exp_avg_sq"].clone() for s in opt.optimizer.state.values()], engine.norms
        S.release_engines()
        engine = train(stage, share=False, monkeypatch=monkeypatch)
        opt = engine.optimizer
        assert all(m.data_ptr() != f.data_ptr() for m, f in zip(opt.single_partition_of_fp32_groups,
                                                                opt.bit16_groups_flat))
        assert engine.most_in_step == partition  # DeepSpeed's own step: a copy
        assert norms == engine.norms and min(norms) > 1.0  # the same norms, and they clip (max_norm 1)
        for n, p in engine.module.named_parameters():
            assert torch.equal(p, ours[n]), n
        assert all(torch.equal(a, s["exp_avg_sq"]) for a, s in zip(state, opt.optimizer.state.values()))
    finally:
        S.release_engines()


class LargestOutput(TorchDispatchMode):
    """Records the most elements of any new tensor an op returned (``inputs``: storages that are not new)."""

    most, inputs = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        new = [t.numel() for t in (out if isinstance(out, (tuple, list)) else (out,))
               if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in self.inputs]
        self.most = max([self.most, *new])
        return out


def test_sliced_adamw_is_torch_adamw_without_full_size_temporaries():
    n = S.SlicedAdamW.SLICE
    sizes = [(3, n + 5), (2 * n + 7,), (5,)]  # a flat ZeRO partition, a matrix, a bias
    make = lambda: [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))  # noqa: E731
                    for i, s in enumerate(sizes)]
    ours, theirs = make(), make()
    groups = lambda ps: [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]  # noqa
    opt, ref = S.SlicedAdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95)), torch.optim.AdamW(groups(theirs), lr=1e-2,
                                                                                           betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(9)
    for step in range(4):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        watch = LargestOutput()
        watch.inputs = {t.untyped_storage().data_ptr() for p in ours for t in (p, p.grad, *opt.state[p].values())}
        with watch:
            opt.step()
        ref.step()
        if step:  # (the first step allocates the moments)
            assert watch.most <= n
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
        assert all(torch.equal(x, y) for x, y in zip(opt.state[a].values(), ref.state[b].values()))
    assert opt.state_dict()["state"][0]["step"] == ref.state_dict()["state"][0]["step"] == 4


@pytest.mark.parametrize("family", ["llama3", "qwen2", "gemma2", "falcon"])  # untied, tied, soft-capped, fused QKV
def test_families_give_deepspeeds_own_numbers_without_its_copies(family, monkeypatch):
    try:
        engine = train(2, monkeypatch=monkeypatch, family=family)
        assert engine.most_in_step <= 1 << 10
        ours, norms = {n: p.detach().clone() for n, p in engine.module.named_parameters()}, engine.norms
        S.release_engines()
        engine = train(2, share=False, monkeypatch=monkeypatch, family=family)
        assert norms == engine.norms and min(norms) > 1.0
        assert all(torch.equal(p, ours[n]) for n, p in engine.module.named_parameters())
    finally:
        S.release_engines()

def test_a_deepspeed_without_the_compact_path_keeps_its_own_gradient_copies(monkeypatch):
    """Freeing reduced gradients is only right where DeepSpeed has reduced them into the flat partition."""
    monkeypatch.delattr(DeepSpeedZeroOptimizer, "_build_compact_grad_partition_buffer")
    try:
        engine = train(2, monkeypatch=monkeypatch)
        ours = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        assert engine.most_in_step == max(f.numel() for f in engine.optimizer.bit16_groups_flat)  # its flat copy
        S.release_engines()
        engine = train(2, share=False, monkeypatch=monkeypatch)
        assert all(torch.equal(p, ours[n]) for n, p in engine.module.named_parameters())
    finally:
        S.release_engines()

def test_zero2_frees_each_fp32_gradient_once_it_is_reduced():
    """Reduced into the flat partition, a gradient is not kept besides it (the head's, 128k × hidden, would be)."""
    try:
        st = S.Strategy()
        st.configure(S.DSOptions(zero_stage=2, train_batch_size=2, micro_train_batch_size=2))
        st.ds_config["zero_optimization"]["reduce_bucket_size"] = 4096  # a reduction every few parameters
        model = load_model("tiny", seed=3)
        engine = st.prepare(model, st.optimizer(model, 1e-2, (0.9, 0.95), 0.1), None)
        first = next(engine.module.parameters())  # the embedding: its gradient comes last
        kept, reduced = [], []

        def look(p):
            reduced.append(engine.optimizer.params_already_reduced.count(True))
            kept.extend(n for n, q in engine.module.named_parameters() if q is not p and q.grad is not None)

        first.register_post_accumulate_grad_hook(look)
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        assert reduced[0] > 10  # reductions happened before the last gradient
        assert len(kept) < 3, kept  # at most the bucket still waiting for its reduction
    finally:
        S.release_engines()


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads /proc")
def test_the_flat_gradient_partition_is_resident_only_where_written():
    before = resident_mib()
    t = S._lazily_zeroed(lambda: torch.zeros(16 << 20))  # 64 MiB
    assert torch.count_nonzero(t) == 0 and t.dtype == torch.float32 and t.shape == (16 << 20,)
    assert resident_mib() - before < 8
    t[: 8 << 20].add_(1.0)  # half of it
    assert 24 < resident_mib() - before < 48
    assert torch.zeros(3, 5).shape == (3, 5) and torch.zeros is S.torch.zeros  # torch's own again
    small = S._lazily_zeroed(lambda: torch.zeros((2, 3), dtype=torch.float64))
    assert small.shape == (2, 3) and small.dtype == torch.float64 and not small.any()


def test_zero2_on_cpu_trims_the_heap_after_each_reduction_into_a_lazily_zeroed_partition(monkeypatch):
    """Every gradient reduction is followed by a heap trim, and the engine builds its flat gradient partition
    through :func:`xright.strategy._lazily_zeroed` (resident only where written, tested above)."""
    reductions, trims, built = [], [], []
    reduce, lazily = DeepSpeedZeroOptimizer.reduce_ipg_grads, S._lazily_zeroed
    monkeypatch.setattr(DeepSpeedZeroOptimizer, "reduce_ipg_grads",
                        lambda self, *a, **k: reductions.append(1) or reduce(self, *a, **k))
    monkeypatch.setattr(S, "_malloc_trim", lambda pad: trims.append(pad))
    monkeypatch.setattr(S, "_lazily_zeroed", lambda build, *args: built.append(args) or lazily(build, *args))
    try:
        st = S.Strategy()
        st.configure(S.DSOptions(zero_stage=2, train_batch_size=2, micro_train_batch_size=2))
        st.ds_config["zero_optimization"]["reduce_bucket_size"] = 4096
        model = load_model("tiny", seed=3)
        engine = st.prepare(model, st.optimizer(model, 1e-2, (0.9, 0.95), 0.1), None)
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        assert len(reductions) > 10 and trims == [0] * len(reductions)
        groups = len(engine.optimizer.bit16_groups)
        assert sorted(built) == [(i,) for i in range(groups)]  # one partition per parameter group
    finally:
        S.release_engines()

def test_two_ranks_give_deepspeeds_own_numbers_bit_for_bit():
    port = launch.free_port()
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(port),
                           os.path.join(launch.ROOT, "tests", "zero12_ranks.py")], cwd=launch.ROOT, env=launch.env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in proc.stdout.splitlines() if "RESULT " in line]
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        for stage, rep in r["report"].items():
            assert len(rep["equal"]) == rep["of"] > 10, (r["rank"], stage, rep)
            ours, theirs = rep["norms"]
            assert ours == theirs and len(ours) == 3 and min(ours) > 1.0, (r["rank"], stage, rep)
    launch.assert_no_shm_left(port)
