"""Generation, reward labelling, the win-rate judge and the chat CLI (issue 9).

Two 2-rank launches in all: ZeRO-3 greedy generation (compared with a one-process ZeRO-0 run: the same
file, so world size and stage change nothing) and ZeRO-3 reward scoring with the ``exo`` post-processor
(compared with one process, then trained on). Everything else runs in this process (world size 1).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from launch import ROOT, env, metrics, run_many, train_records
from xright.cli import batch_inference, lifecycle
from xright.data import DataError, DataSpec, load_data
from xright.data.synthetic import preference_records
from xright.generation import (Sampling, csft, cut_at_eos, encode_prompts, eos_ids, generate, generate_batch, kto,
                               post_process, read_answers, read_prompts, rs, score, win_rate)
from xright.models import load_model, load_tokenizer
from xright.sharding import gather_ordered, plan_batches, rank_batches

GEN = ["--eval_task", "generate", "--max_samples", "18", "--max_new_tokens", "20", "--micro_batch_size", "4"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def infer(tmp_path, name, *args):
    """batch_inference in this process (world size 1); its output records."""
    out = str(tmp_path / name)
    saved = dict(os.environ)
    try:
        batch_inference.main([*args, "--output_path", out])
    finally:  # leave no RANK/MASTER_PORT behind: a launched run would inherit this process's port
        os.environ.clear()
        os.environ.update(saved)
    return read_jsonl(out)


def inprocess(main, argv):
    saved = dict(os.environ)
    try:
        return main(argv)
    finally:
        os.environ.clear()
        os.environ.update(saved)


# ---- generation -------------------------------------------------------------------------------------

def test_two_ranks_zero3_greedy_file_equals_one_rank_zero0(two_rank, tmp_path):
    # 18 prompts in micro-batches of 4 are 5 batches: rank 1 has 2 and must make a 3rd (discarded) call
    # so that ZeRO-3's collective parameter gathers stay in step
    two = two_rank["greedy"]
    one = infer(tmp_path, "one.jsonl", *GEN, "--greedy_sampling", "--zero_stage", "0")
    with open(two) as f, open(tmp_path / "one.jsonl") as g:
        assert f.read() == g.read()
    prompts = read_prompts(DataSpec(kind="sft", max_samples=18, seed=42))
    assert [r["id"] for r in one] == [p["id"] for p in prompts]  # input order, the prompts' own ids
    assert [r["input"] for r in one] == [p["prompt"] for p in prompts]
    assert all(r["prompt_id"] == r["id"] for r in one)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time():
    tok = load_tokenizer("tiny")
    model = load_model("tiny", seed=5, trainable=False)
    recs = read_prompts(DataSpec(kind="sft", max_samples=10, seed=42))
    ids = encode_prompts(recs, tok, DataSpec(kind="sft"), 1024)
    assert len({len(x) for x in ids}) > 1  # really padded
    s = Sampling(max_new_tokens=12, greedy=True)
    batched = gather_ordered(generate(model, ids, s, 4, eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id), len(ids),
                             lambda x: [x])
    for x, got in zip(ids, batched):
        out = model.generate(torch.tensor([x]), attention_mask=torch.ones(1, len(x), dtype=torch.long),
                             max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        assert got == [cut_at_eos(out[0, len(x):].tolist(), tok.eos_token_id)[0]]


def test_prompt_ids_are_the_trainers_prompt_ids():
    tok = load_tokenizer("tiny")
    spec = DataSpec(kind="pairwise", max_samples=8, seed=42)
    train, _ = load_data(spec, tok, log=lambda *a: None)
    recs = read_prompts(DataSpec(kind="sft", max_samples=8, seed=42))
    assert encode_prompts(recs, tok, spec, 1024) == [e["prompt_ids"] for e in train]


def test_sharding_plan_and_eos_cut():
    batches = plan_batches([5, 3, 5, 1, 4], 2)
    assert batches == [[3, 1], [4, 0], [2]]  # by length, ties in input order
    assert rank_batches(batches, 1, 2, synced=False) == [(1, [4, 0], True)]
    assert rank_batches(batches, 1, 2, synced=True) == [(1, [4, 0], True), (0, [3, 1], False)]
    assert rank_batches(batches, 0, 2, synced=True) == [(0, [3, 1], True), (2, [2], True)]
    assert cut_at_eos([7, 8, 2, 9], 2) == ([7, 8], True)
    assert cut_at_eos([7, 8], 2) == ([7, 8], False)
    assert cut_at_eos([7, 8, 2, 9], [9, 8]) == ([7], True)
    # nothing to compute (every answer left out): no calls on any rank, even in step (ZeRO-3)
    assert rank_batches([], 0, 2, synced=True) == rank_batches([], 1, 2, synced=True) == []
    with pytest.raises(RuntimeError, match="1 of 3 inputs missing"):
        gather_ordered({0: "a", 2: "c"}, 3, lambda x: [x])


def test_fixed_seed_reproduces_sampled_output(tmp_path):
    args = [*GEN, "--best_of_n", "3", "--temperature", "0.9", "--top_p", "0.95", "--max_samples", "6"]
    a = infer(tmp_path, "a.jsonl", *args)
    b = infer(tmp_path, "b.jsonl", *args)
    c = infer(tmp_path, "c.jsonl", *args, "--seed", "7")
    assert a == b
    assert [r["output"] for r in a] != [r["output"] for r in c]
    assert [r["id"] for r in a[:3]] == [f"{a[0]['prompt_id']}#{k}" for k in range(3)]
    assert len(a) == 18 and len({r["output"] for r in a[:3]}) == 3  # K different samples of one prompt


def test_bad_prompt_record_names_file_line_and_field(tmp_path):
    data = tmp_path / "p.jsonl"
    data.write_text('{"input": "hi"}\n{"inptu": "ho"}\n')
    with pytest.raises(DataError, match=r"p.jsonl line 2: field 'input': missing.*did you mean 'inptu'"):
        infer(tmp_path, "o.jsonl", *GEN, "--dataset", str(data))
    answers = tmp_path / "a.jsonl"
    answers.write_text('{"input": "hi", "output": "ho"}\n\n{"input": "hi", "output": 3}\n')
    with pytest.raises(DataError, match=r"a.jsonl line 3: field 'output': must be a string, got int 3"):
        infer(tmp_path, "o.jsonl", "--eval_task", "rm", "--dataset", str(answers))


def test_vllm_missing_is_one_clear_line(tmp_path, capsys):
    if __import__("importlib").util.find_spec("vllm") is not None:
        pytest.skip("vllm installed")
    with pytest.raises(SystemExit) as exit_:
        lifecycle.main_guard(lambda: batch_inference.main(["--eval_task", "generate_vllm", "--output_path",
                                                        str(tmp_path / "o")]))
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "xright: error: --eval_task generate_vllm needs vLLM, which is not installed: pip install 'xright[vllm]' "
        "(CUDA GPU only), or use --eval_task generate"]


def test_alpaca_eval_format(tmp_path):
    out = tmp_path / "alpaca.json"
    with pytest.raises(json.JSONDecodeError):  # one JSON array, not JSON lines
        infer(tmp_path, "alpaca.json", *GEN, "--eval_task", "generate_alpaca_eval", "--max_samples", "3",
              "--greedy_sampling", "--generator", "tiny-sft")
    rows = json.loads(out.read_text())
    assert [set(r) for r in rows] == [{"instruction", "output", "generator"}] * 3
    assert rows[0]["generator"] == "tiny-sft"
    assert [r["instruction"] for r in rows] == [p["prompt"] for p in read_prompts(DataSpec(kind="sft", max_samples=3))]


# ---- stopping at every eos id, BOS kept, --iter, oversampled sources (issue 16) ---------------------------

def tiny_family(family: str, vocab_size: int = 259, seed: int = 0):
    """A random-weight model of ``family`` from transformers' config class (large init: varied greedy output)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              initializer_range=0.5, max_position_embeddings=256)
    if family != "gpt_neox":
        kw["num_key_value_heads"] = 2
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw)).eval()


def first_seen(seq: list[int], start: int = 2) -> list[tuple[int, int]]:
    """(position, token) for the tokens of ``seq`` that occur there for the first time, from ``start`` on."""
    return [(i, t) for i, t in enumerate(seq) if i >= start and t not in seq[:i]]


class Tok:  # what eos_ids reads of a tokenizer
    def __init__(self, eos):
        self.eos_token_id = eos


def test_greedy_best_of_n_gives_n_copies_of_the_greedy_completion():
    """transformers refuses num_return_sequences > 1 without sampling: greedy runs once, its K copies are equal."""
    model, prompts = tiny_family("llama"), [[10, 20, 30, 40, 50], [60, 70]]
    one = generate_batch(model, prompts, Sampling(max_new_tokens=8, greedy=True), eos_ids=258, pad_id=256, seed=0)
    three = generate_batch(model, prompts, Sampling(max_new_tokens=8, greedy=True, n=3), eos_ids=258, pad_id=256,
                           seed=0)
    assert three == [c * 3 for c in one] and all(len(c[0]) == 8 for c in one)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt_neox"])
def test_generation_stops_at_every_eos_id_of_the_generation_config(family):
    model = tiny_family(family)
    prompts, s = [[10, 20, 30, 40, 50], [60, 70]], Sampling(max_new_tokens=12, greedy=True)
    model.generation_config.eos_token_id = None
    full = [c[0] for c in generate_batch(model, prompts, s, eos_ids=258, pad_id=256, seed=0)]
    assert [len(c) for c in full] == [12, 12]  # 258 never comes: the whole greedy continuations
    # a stops prompt 0 at step i, b stops prompt 1 at step j; neither occurs earlier in the other
    i, a, j, b = next((i, a, j, b) for i, a in first_seen(full[0]) for j, b in first_seen(full[1])
                      if a != b and b not in full[0][:i] and a not in full[1][:j])
    want = [[full[0][:i]], [full[1][:j]]]
    model.generation_config.eos_token_id = [255, a, b]  # a list (Llama-3-Instruct) ...
    assert eos_ids(Tok(258), model) == [258, 255, a, b]
    steps = [0]
    hook = model.register_forward_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
    assert generate_batch(model, prompts, s, eos_ids=eos_ids(Tok(258), model), pad_id=256, seed=0) == want
    hook.remove()
    assert steps[0] == max(i, j) + 1  # generation stopped there (not only the output cut)
    model.generation_config.eos_token_id = b  # ... or an int, beside the tokenizer's own eos
    assert eos_ids(Tok(a), model) == [a, b]
    assert generate_batch(model, prompts, s, eos_ids=eos_ids(Tok(a), model), pad_id=256, seed=0) == want


def byte_tokenizer_with_bos():
    """The built-in byte-level vocabulary + pad, eos, and a BOS every encoded text starts with (as Llama's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for t in ("<pad>", "</s>", "<s>"):
        vocab[t] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>")


def word_tokenizer_with_bos():
    """Words w0…w59 (decoded joined by spaces, so a streamer prints word by word), pad, eos and BOS."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<pad>": 1, "</s>": 2, "<s>": 3, **{f"w{i}": 4 + i for i in range(60)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="<pad>", eos_token="</s>",
                                   bos_token="<s>")


def save_llama(path, tok) -> str:
    """A random-weight Llama saved with ``tok``: a model dir as the CLIs load it."""
    model = tiny_family("llama", vocab_size=len(tok))
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = \
        tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def declare_eos(path, ids: list[int]) -> None:
    """Set the saved generation config's eos ids (as Llama-3-Instruct lists several)."""
    file = os.path.join(path, "generation_config.json")
    config = json.load(open(file))
    config["eos_token_id"] = ids
    json.dump(config, open(file, "w"))


def test_left_truncation_keeps_the_bos_token():
    tok = byte_tokenizer_with_bos()
    bos = tok.bos_token_id
    assert tok("ab")["input_ids"] == [bos, *tok("ab", add_special_tokens=False)["input_ids"]]
    spec = DataSpec(kind="sft", input_template="User: {}\nAssistant: ")
    recs = [{"prompt": "a long question " * 4, "raw_prompt": False}, {"prompt": "hi", "raw_prompt": False}]
    full = encode_prompts(recs, tok, spec, 0)
    assert full[0][0] == bos and len(full[0]) > 24 and len(full[1]) < 24
    cut = encode_prompts(recs, tok, spec, 24)
    assert cut == [[bos] + full[0][-23:], full[1]]  # BOS, then the end of the text (the assistant cue)
    # a text that starts with the BOS text itself (a chat template that writes it) keeps that one BOS
    raw = [{"prompt": "<s>" + "x" * 30, "raw_prompt": True}]
    assert encode_prompts(raw, tok, spec, 10) == [[bos] + tok("x" * 9, add_special_tokens=False)["input_ids"]]


def test_batch_inference_stops_at_the_generation_configs_eos(tmp_path):
    from xright.models import load_for_inference

    tok = byte_tokenizer_with_bos()
    path = save_llama(tmp_path / "llama", tok)
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"input": q}) + "\n" for q in ("what is 1+1?", "name a colour " * 5)))
    argv = ["--eval_task", "generate", "--pretrain", path, "--dataset", str(data), "--greedy_sampling",
            "--max_new_tokens", "16", "--prompt_max_len", "24"]
    spec = batch_inference.data_spec(batch_inference.parser().parse_args([*argv, "--output_path", "x"]))
    ids = encode_prompts(read_prompts(spec), tok, spec, 24)
    assert ids[1][0] == tok.bos_token_id and len(ids[1]) == 24  # the long prompt was cut and kept its BOS
    model = load_for_inference(path, vocab_size=len(tok))
    full = gather_ordered(generate(model, ids, Sampling(max_new_tokens=16, greedy=True), 16, eos_ids=tok.eos_token_id,
                                   pad_id=tok.pad_token_id), 2, lambda x: [x])
    full = [c[0] for c in full]
    i, x = first_seen(full[0])[0]
    declare_eos(path, [tok.eos_token_id, x])
    out = infer(tmp_path, "o.jsonl", *argv)
    want = [cut_at_eos(c, [tok.eos_token_id, x])[0] for c in full]
    assert len(want[0]) == i < 16  # prompt 0's answer ends at x
    assert [r["output"] for r in out] == [tok.decode(w, skip_special_tokens=True) for w in want]


CHAT = [[{"role": "user", "content": "what is 1+1?"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "name a colour"}]]


def chat_llama(tmp_path):
    """A saved Llama whose tokenizer adds BOS to text but whose chat template writes none: a chat prompt
    must get the template's tokens only (as the trainers encode it), no BOS added."""
    tok = byte_tokenizer_with_bos()
    tok.chat_template = load_tokenizer("tiny").chat_template
    return tok, save_llama(tmp_path / "llama", tok)


def test_conversational_prompts_generate_from_the_trainers_chat_prompt_ids(tmp_path):
    from xright.data.chat import ChatRenderer
    from xright.models import load_for_inference

    tok, path = chat_llama(tmp_path)
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"prompt": m}) + "\n" for m in CHAT))
    argv = ["--eval_task", "generate", "--pretrain", path, "--dataset", str(data), "--input_key", "prompt",
            "--greedy_sampling", "--max_new_tokens", "8"]
    records, ids = batch_inference.prompts(batch_inference.parser().parse_args([*argv, "--output_path", "x"]), tok)
    want = [ChatRenderer(tok).prompt_ids(m) for m in CHAT]
    assert ids == want and all(x[0] != tok.bos_token_id for x in ids)
    # the trainers' prompt ids of the same conversations (TRL pairwise layout) are the same
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": m, "chosen": "yes", "rejected": "no"}) + "\n" for m in CHAT))
    train, _ = load_data(DataSpec(kind="pairwise", dataset=str(pairs), eval_split="", max_len=1024), tok,
                         log=lambda *a: None)
    assert sorted(e["prompt_ids"] for e in train) == sorted(want)
    out = infer(tmp_path, "o.jsonl", *argv)
    assert [r["input"] for r in out] == CHAT  # the messages are kept
    model = load_for_inference(path, vocab_size=len(tok))
    greedy = [generate_batch(model, [x], Sampling(max_new_tokens=8, greedy=True), eos_ids=tok.eos_token_id,
                             pad_id=tok.pad_token_id, seed=0)[0][0] for x in want]
    assert [r["output"] for r in out] == [tok.decode(g, skip_special_tokens=True) for g in greedy]


def test_hh_dialogue_prompts_generate_from_the_dialogue_through_its_last_assistant_cue(tmp_path):
    dialogue = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what is 1+1?\n\nAssistant:"
    data = tmp_path / "hh.jsonl"
    data.write_text(json.dumps({"chosen": dialogue + " 2", "rejected": dialogue + " 3"}) + "\n")
    argv = ["--eval_task", "generate", "--dataset", str(data), "--greedy_sampling", "--max_new_tokens", "4"]
    tok = load_tokenizer("tiny")
    records, ids = batch_inference.prompts(batch_inference.parser().parse_args([*argv, "--output_path", "x"]), tok)
    assert [(r["prompt"], r["raw_prompt"]) for r in records] == [(dialogue, True)]  # no --input_template on it
    train, _ = load_data(DataSpec(kind="pairwise", dataset=str(data), eval_split="", max_len=1024), tok,
                         log=lambda *a: None)
    assert ids == [train[0]["prompt_ids"]]
    assert [r["input"] for r in infer(tmp_path, "o.jsonl", *argv)] == [dialogue]


@pytest.mark.parametrize("name,kind", [("iter_dpo", "pairwise"), ("kto", "binary"), ("exo", "scored")])
def test_post_processors_write_conversational_records_the_trainers_read(tmp_path, name, kind):
    from xright.data.chat import ChatRenderer
    from xright.generation import write_records

    tok, _ = chat_llama(tmp_path)
    samples = tmp_path / "samples.jsonl"  # as generate writes them for conversational prompts
    samples.write_text("".join(json.dumps({"id": f"p{i}#{k}", "prompt_id": f"p{i}", "input": m, "output": o}) + "\n"
                               for i, m in enumerate(CHAT) for k, o in enumerate(("two", "3", "it is 2", "4"))))
    spec = DataSpec(kind="sft", dataset=str(samples), eval_split="", max_len=1024)
    answers = read_answers(spec)  # what --eval_task rm reads: the prompts stay messages
    assert [a["prompt"] for a in answers[::4]] == CHAT
    records = [{"id": a["id"], "prompt_id": a["prompt_id"], "input": a["prompt"], "output": a["response"],
                "reward": float(k % 4 == 1) - float(k % 4 == 0)} for k, a in enumerate(answers)]
    path = str(tmp_path / f"{name}.jsonl")
    write_records(path, post_process(name, records)[0])
    written = read_jsonl(path)
    assert written and all(isinstance(r["prompt"], list) for r in written)
    answer = {"iter_dpo": "chosen", "kto": "completion", "exo": "completions"}[name]
    first = written[0][answer][0] if name == "exo" else written[0][answer]
    assert first == [{"role": "assistant", "content": first[0]["content"]}]  # TRL's conversational layout
    train, _ = load_data(DataSpec(kind=kind, dataset=path, eval_split="", max_len=1024, apply_chat_template=True),
                         tok, log=lambda *a: None)
    r = ChatRenderer(tok)
    assert sorted(e["prompt_ids"] for e in train) == sorted(r.prompt_ids(c["prompt"]) for c in written)
    assert {tuple(e["prompt_ids"]) for e in train} == {tuple(r.prompt_ids(m)) for m in CHAT}
    if name == "iter_dpo":  # best "3" vs worst "two", each one assistant turn after the prompt
        p, (c, j), _ = r.encode(CHAT[0], [[{"role": "assistant", "content": "3"}], [{"role": "assistant", "content": "two"}]])
        e = next(e for e in train if e["prompt_ids"] == p)
        assert e["responses"] == [c, j]
        # csft writes the reward into the last user turn (rs keeps the messages, answer as text)
        assert csft(records[:1])[0]["input"] == [{"role": "user", "content": "what is 1+1? <rm_score>: -1.00 "}]


class Recorder:
    """A stdout that remembers each write with the number of model forwards run before it."""

    def __init__(self, forwards):
        self.forwards, self.writes = forwards, []

    def write(self, text):
        if text:
            self.writes.append((text, self.forwards[0]))
        return len(text)

    def flush(self):
        pass

    @property
    def text(self):
        return "".join(t for t, _ in self.writes)


def test_interactive_chat_streams_stops_at_every_eos_keeps_bos_and_exits(tmp_path, monkeypatch):
    import io

    import xright.generation
    import xright.models
    from xright.cli import interactive_chat

    tok = word_tokenizer_with_bos()
    path = save_llama(tmp_path / "llama", tok)
    argv = ["--pretrain", path, "--greedy_sampling", "--max_new_tokens", "16", "--repetition_penalty", "1.0",
            "--max_len", "24"]
    args = interactive_chat.parser().parse_args(argv)
    raw = DataSpec(kind="sft", input_template=None)
    ids = encode_prompts([interactive_chat.render([], "w1 w2", tok, args)], tok, raw, 0)[0]
    model = xright.models.load_for_inference(path, vocab_size=len(tok))
    full = generate_batch(model, [ids], Sampling(max_new_tokens=16, greedy=True), eos_ids=tok.eos_token_id,
                          pad_id=tok.pad_token_id, seed=0)[0][0]
    i, x = first_seen(full, 4)[0]
    declare_eos(path, [tok.eos_token_id, x])
    answer = tok.decode(full[:i], skip_special_tokens=True)

    forwards, prompts = [0], []
    load = xright.models.load_for_inference

    def counted(*a, **k):  # the chat's model, counting its forwards
        m = load(*a, **k)
        m.register_forward_hook(lambda *_: forwards.__setitem__(0, forwards[0] + 1))
        return m
    monkeypatch.setattr(xright.models, "load_for_inference", counted)
    gen = xright.generation.generate_batch
    monkeypatch.setattr(xright.generation, "generate_batch", lambda m, p, *a, **k: prompts.append(p[0]) or gen(m, p, *a, **k))
    out = Recorder(forwards)
    monkeypatch.setattr(sys, "stdout", out)
    long = " ".join(f"w{k % 60}" for k in range(40))
    stdin = io.StringIO(f"w1 w2\n{long}\nexit\nw3\n")
    assert lifecycle.guarded(lambda: interactive_chat.main(argv, stdin=stdin)) == 0
    assert stdin.read() == "w3\n"  # `exit` ended the session: the next line is never read
    turns = out.text.split("quits\n", 1)[1].split("> ")
    assert len(turns) == 4 and turns[0] == "" and turns[3] == ""
    assert turns[1] == answer + "\n"  # stopped at x (the generation config's eos), and x is not printed
    assert forwards[0] >= i + 1
    # streamed: the answer's words were printed one by one while the model was still generating
    first = next(k for k, (t, _) in enumerate(out.writes) if t == "> ") + 1
    during = [t for t, n in out.writes[first:] if n < i]
    assert len(during) >= 3 and answer.startswith("".join(during))
    # the 40-word message alone exceeds --max_len: cut from the left, its BOS kept
    assert prompts[1][0] == tok.bos_token_id and len(prompts[1]) == 23
    assert prompts[1][1:] == tok(interactive_chat.render([], long, tok, args)["prompt"], add_special_tokens=False)["input_ids"][-22:]


# ---- reward labelling -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    """A reward model trained by train_rm (one process) and the builtin eval pairs it was evaluated on,
    written as generation records (chosen and rejected answers of each prompt)."""
    root = tmp_path_factory.mktemp("rm")
    out = str(root / "rm")
    from xright.cli import train_rm

    inprocess(train_rm.main, ["--save_path", out, "--max_samples", "64", "--max_steps", "8", "--micro_train_batch_size",
                              "4", "--train_batch_size", "8", "--eval_steps", "1000", "--zero_stage", "0",
                              "--learning_rate", "1e-3", "--lr_scheduler", "constant"])
    pairs = root / "answers.jsonl"
    with open(pairs, "w") as f:
        for r in preference_records(64, 42, "eval"):
            for k in ("chosen", "rejected"):
                f.write(json.dumps({"id": f"{r['id']}#{k}", "prompt_id": r["id"], "input": r["prompt"],
                                    "output": r[k]}) + "\n")
    return out, str(pairs)


@pytest.fixture(scope="module")
def two_rank(rm_run, tmp_path_factory):
    """The file's 2-rank ZeRO-3 batch_inference runs, in one launch: greedy generation, and EXO labelling by
    the reward model. name -> output file."""
    rm, pairs = rm_run
    root = tmp_path_factory.mktemp("two_rank")
    out = {"greedy": str(root / "two.jsonl"), "exo": str(root / "exo2.jsonl")}
    run_many([{"module": "batch_inference", "args": [*GEN, "--greedy_sampling", "--zero_stage", "3",
                                                     "--output_path", out["greedy"]]},
              {"module": "batch_inference", "args": ["--eval_task", "rm", "--pretrain", rm, "--dataset", pairs,
                                                     "--zero_stage", "3", "--micro_batch_size", "6",
                                                     "--post_processor", "exo", "--output_path", out["exo"]]}],
             str(root / "launch"))
    return out


def test_rm_scores_equal_train_rm_evaluation(rm_run, tmp_path):
    rm, pairs = rm_run
    scored = infer(tmp_path, "scored.jsonl", "--eval_task", "rm", "--pretrain", rm, "--dataset", pairs,
                   "--micro_batch_size", "5")
    final = [r for r in metrics(rm) if r.get("final")][-1]
    chosen = [r["reward"] for r in scored if r["id"].endswith("#chosen")]
    rejected = [r["reward"] for r in scored if r["id"].endswith("#rejected")]
    assert len(chosen) == len(rejected) == 64
    assert sum(chosen) / 64 == pytest.approx(final["eval/rm/reward_chosen"], abs=1e-5)
    assert sum(rejected) / 64 == pytest.approx(final["eval/rm/reward_rejected"], abs=1e-5)
    assert sum(c > r for c, r in zip(chosen, rejected)) / 64 == final["eval/rm/acc"]
    # --normalize_reward uses the statistics train_rm saved
    stats = json.load(open(os.path.join(rm, "reward_stats.json")))
    norm = infer(tmp_path, "norm.jsonl", "--eval_task", "rm", "--pretrain", rm, "--dataset", pairs, "--normalize_reward")
    assert [n["reward"] for n in norm] == pytest.approx([(r["reward"] - stats["mean"]) / stats["std"] for r in scored],
                                                        abs=1e-5)


def test_lora_reward_model_normalises_with_the_statistics_train_rm_saved(rm_run, tmp_path):
    from xright.cli import train_rm

    _, pairs = rm_run
    out = str(tmp_path / "lora_rm")
    inprocess(train_rm.main, ["--save_path", out, "--max_samples", "16", "--max_steps", "2", "--micro_train_batch_size",
                              "4", "--train_batch_size", "8", "--zero_stage", "0", "--lora_rank", "4", "--lora_alpha",
                              "8", "--learning_rate", "1e-3", "--lr_scheduler", "constant"])
    assert not os.path.exists(os.path.join(out, "config.json"))  # a LoRA save: no config to hold the statistics
    stats = json.load(open(os.path.join(out, "reward_stats.json")))
    raw = infer(tmp_path, "raw.jsonl", "--eval_task", "rm", "--pretrain", out, "--dataset", pairs)
    norm = infer(tmp_path, "norm.jsonl", "--eval_task", "rm", "--pretrain", out, "--dataset", pairs, "--normalize_reward")
    assert [n["reward"] for n in norm] == pytest.approx([(r["reward"] - stats["mean"]) / stats["std"] for r in raw],
                                                        abs=1e-5)


def test_two_rank_zero3_exo_labels_train_exo_rw(rm_run, two_rank, tmp_path):
    rm, pairs = rm_run
    two = two_rank["exo"]
    one = infer(tmp_path, "exo1.jsonl", "--eval_task", "rm", "--pretrain", rm, "--dataset", pairs,
                "--post_processor", "exo")
    two = read_jsonl(two)
    assert [r["id"] for r in two] == [r["id"] for r in one] == [p["id"] for p in preference_records(64, 42, "eval")]
    for a, b in zip(one, two):
        assert a["completions"] == b["completions"] and a["rewards"] == pytest.approx(b["rewards"], abs=1e-5)
    # the scored records train EXO-rw as they are
    out = str(tmp_path / "exo_run")
    from xright.cli import train_exo

    inprocess(train_exo.main, ["--loss", "exo-rw", "--dataset", str(tmp_path / "exo1.jsonl"), "--save_path", out,
                               "--zero_stage", "0", "--train_batch_size", "8", "--micro_train_batch_size", "4",
                               "--learning_rate", "2e-3", "--lr_scheduler", "constant", "--max_epochs", "3",
                               "--eval_split", "", "--beta", "0.5"])
    losses = [r["train/exo-rw/loss"] for r in train_records(out)]
    assert len(losses) == 24
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.02, losses


def prompt_file(path, name, n):
    path.write_text("".join(json.dumps({"input": f"{name} question {k}"}) + "\n" for k in range(n)))
    return str(path)


def test_iter_slices_partition_one_blend_and_respect_max_samples(tmp_path):
    a, b = prompt_file(tmp_path / "a.jsonl", "a", 30), prompt_file(tmp_path / "b.jsonl", "b", 30)
    blend = [*GEN[:1], "generate", "--dataset", f"{a},{b}", "--dataset_probs", "0.5,0.5", "--max_new_tokens", "1",
             "--rollout_batch_size", "10"]
    order = read_prompts(batch_inference.data_spec(batch_inference.parser().parse_args([*blend, "--output_path", "x"])))
    assert len(order) == 60
    got = [r for it in range(3) for r in infer(tmp_path, f"i{it}.jsonl", *blend, "--iter", str(it))]
    assert [r["id"] for r in got] == [r["id"] for r in order[:30]]  # three slices of one order: 30 distinct prompts
    assert len({r["input"] for r in got}) == 30
    # --max_samples bounds the blend the slices cut: 25 prompts are 10 + 10 + 5, and a 4th slice is an error
    capped = [*blend, "--max_samples", "25"]
    got = [r for it in range(3) for r in infer(tmp_path, f"c{it}.jsonl", *capped, "--iter", str(it))]
    spec = batch_inference.data_spec(batch_inference.parser().parse_args([*capped, "--output_path", "x"]))
    assert [r["id"] for r in got] == [r["id"] for r in read_prompts(spec)] and len(got) == 25
    with pytest.raises(DataError, match=r"no prompts from index 30: the blend has 25 \(max_samples 25\)"):
        infer(tmp_path, "c3.jsonl", *capped, "--iter", "3")


def test_copies_of_an_oversampled_source_get_distinct_ids(rm_run, tmp_path):
    from xright.cli.eval_winrate import aligned
    from xright.generation import read_answers

    rm, _ = rm_run
    a, b = prompt_file(tmp_path / "a.jsonl", "a", 3), prompt_file(tmp_path / "b.jsonl", "b", 30)
    # 33 prompts at 0.5/0.5: 17 from a's 3 records, so each of them comes 5 or 6 times
    gen = infer(tmp_path, "g.jsonl", "--eval_task", "generate", "--dataset", f"{a},{b}", "--dataset_probs", "0.5,0.5",
                "--max_new_tokens", "2", "--greedy_sampling")
    ids = [r["id"] for r in gen]
    assert len(ids) == 33 and len(set(ids)) == 33 and [r["prompt_id"] for r in gen] == ids
    copies = sorted(i for i in ids if i.startswith("a.jsonl:1"))
    assert copies[0] == "a.jsonl:1" and {c.split("~")[1] for c in copies[1:]} == {str(n) for n in range(2, len(copies) + 1)}
    spec = DataSpec(kind="sft", dataset=str(tmp_path / "g.jsonl"), max_samples=10**8)
    assert aligned({"g": "g.jsonl"}, {"g": read_answers(spec)}) == ids  # the judge takes the file
    # scoring an oversampled answers file (2 answers per prompt): each copy of a prompt keeps its own group
    for name, n in (("k2", 2), ("other", 4)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps({"id": f"{name}{p}#{k}", "prompt_id": f"{name}{p}", "input": f"q{p}",
                                     "output": f"answer {k}"}) + "\n" for p in range(n) for k in range(2))
    scored_ = infer(tmp_path, "s.jsonl", "--eval_task", "rm", "--pretrain", rm, "--dataset",
                    f"{tmp_path / 'k2.jsonl'},{tmp_path / 'other.jsonl'}", "--dataset_probs", "0.6,0.4")
    k2 = [r for r in scored_ if r["id"].startswith("k2")]
    assert len(k2) == 7 and len({r["id"] for r in k2}) == 7  # 7 draws of 4 records: 3 of them twice
    groups = {}
    for r in k2:
        groups.setdefault(r["prompt_id"], []).append(r["id"])
    assert sorted(groups["k20"]) == ["k20#0", "k20#1"] and sorted(groups["k21"]) == ["k21#0", "k21#1"]
    copies = {g: ids for g, ids in groups.items() if g not in ("k20", "k21")}  # the second pass: 3 answers
    assert set(copies) <= {"k20~2", "k21~2"} and sum(len(ids) for ids in copies.values()) == 3
    assert all(i.startswith(g[:-2] + "#") and i.endswith("~2") for g, ids in copies.items() for i in ids)


def test_rm_with_no_answer_left_to_score_is_one_clear_error(tmp_path):
    answers = tmp_path / "a.jsonl"
    answers.write_text(json.dumps({"input": "a very long question " * 10, "output": "yes"}) + "\n")
    with pytest.raises(lifecycle.UsageError, match=r"no answers to score: the prompts of all 1 are longer than --max_len 16"):
        infer(tmp_path, "o.jsonl", "--eval_task", "rm", "--dataset", str(answers), "--max_len", "16")
    assert score(None, [], 4, 0, rank=1, world_size=2, synced=True) == {}  # ZeRO-3, 2 ranks: no call, no error


# ---- post-processors ------------------------------------------------------------------------------------

def scored(prompt_id, prompt, outputs_rewards):
    return [{"id": f"{prompt_id}#{k}", "prompt_id": prompt_id, "input": prompt, "output": o, "reward": r}
            for k, (o, r) in enumerate(outputs_rewards)]


SCORED = (scored("p1", "what is 1+1?", [("two", 0.5), ("2", 2.0), ("3", -1.0), ("it is 2", 2.0)]) +
          scored("p2", "reverse 'ab'", [("ba", 1.0), ("ab", 1.0), ("b a", 1.0), ("  ", 5.0)]))


def test_post_processors_by_hand():
    assert rs(SCORED) == [{"id": "p1", "input": "what is 1+1?", "output": "2", "reward": 2.0},
                          {"id": "p2", "input": "reverse 'ab'", "output": "  ", "reward": 5.0}]
    usable, blank = post_process("rs", SCORED)
    assert blank == 1 and usable[1]["output"] == "ba"  # the blank best answer is left out (no trainer takes it)
    pairs, _ = post_process("iter_dpo", SCORED)
    # p2's remaining answers tie: best and worst are the same answer, so no pair
    assert pairs == [{"id": "p1", "prompt": "what is 1+1?", "chosen": "2", "rejected": "3", "chosen_reward": 2.0,
                      "rejected_reward": -1.0}]
    groups, _ = post_process("exo", SCORED)
    assert groups == [{"id": "p1", "prompt": "what is 1+1?", "completions": ["two", "2", "3", "it is 2"],
                       "rewards": [0.5, 2.0, -1.0, 2.0]}]  # p2 has 3 usable answers, not K = 4
    median = kto(SCORED[:4])  # median of (-1, 0.5, 2, 2) is 1.25
    assert [(r["completion"], r["label"]) for r in median] == [("two", False), ("2", True), ("3", False),
                                                                ("it is 2", True)]
    assert kto(SCORED[4:7]) == []  # all equal to the median: no preference
    opts = type("Opts", (), {"kto_threshold": 0.7, "reward_template": None})()
    assert [r["label"] for r in kto(SCORED[:7], opts)] == [False, True, False, True, True, True, True]
    assert csft(SCORED[:1])[0]["input"] == "what is 1+1? <rm_score>: 0.50 "


def test_each_post_processors_output_is_read_by_its_trainer(tmp_path):
    from xright.cli import train_dpo, train_kto, train_sft

    records = []
    for i, r in enumerate(preference_records(8, 42, "train")):
        records += scored(r["id"], r["prompt"], [(r["chosen"], 1.0 + i), (r["rejected"], -1.0), (r["rejected"] + "!", 0.0),
                                                 (r["chosen"] + " Sure.", 0.5)])
    train = {"rs": train_sft.main, "csft": train_sft.main, "iter_dpo": train_dpo.main, "kto": train_kto.main}
    for name, main in train.items():
        path = tmp_path / f"{name}.jsonl"
        from xright.generation import write_records

        write_records(str(path), post_process(name, records)[0])
        out = str(tmp_path / f"run_{name}")
        inprocess(main, ["--dataset", str(path), "--save_path", out, "--zero_stage", "0", "--train_batch_size", "4",
                         "--micro_train_batch_size", "2", "--max_steps", "2", "--eval_split", "",
                         "--learning_rate", "1e-4"])
        steps = train_records(out)
        assert len(steps) == 2 and all(math.isfinite(s[next(k for k in s if k.endswith("/loss"))]) for s in steps)


# ---- the win-rate judge ---------------------------------------------------------------------------------

def test_win_rate_on_synthetic_scores_with_known_answers():
    # 60 wins, 10 ties, 30 losses: 0.65 exactly, with a mean difference of (60·2 − 30·1)/100 = 0.9
    a = [2.0] * 60 + [0.0] * 10 + [-1.0] * 30
    res = win_rate(a, [0.0] * 100, n_boot=4000, seed=1)
    assert (res["wins"], res["ties"], res["losses"]) == (60, 10, 30)
    assert res["win_rate"] == pytest.approx(0.65) and res["mean_score_diff"] == pytest.approx(0.9)
    # a population with P(A beats B) = 0.7: the estimate from 400 prompts and its interval cover 0.7,
    # and the interval is as wide as the binomial one (2 · 1.96 · √(0.21/400) ≈ 0.090)
    gen = torch.Generator().manual_seed(0)
    b = torch.randn(400, generator=gen)
    a = b + torch.where(torch.rand(400, generator=gen) < 0.7, 1.0, -1.0)
    res = win_rate(a.tolist(), b.tolist(), n_boot=4000, seed=2)
    assert res["ci_low"] < 0.7 < res["ci_high"]
    assert 0.075 < res["ci_high"] - res["ci_low"] < 0.105
    assert res["ci_low"] < res["win_rate"] < res["ci_high"]


def test_eval_winrate_cli_chosen_vs_rejected_is_the_rm_accuracy(rm_run, tmp_path):
    from xright.cli import eval_winrate

    rm, pairs = rm_run
    rows = read_jsonl(pairs)
    for which in ("chosen", "rejected"):
        with open(tmp_path / f"{which}.jsonl", "w") as f:
            for r in rows:
                if r["id"].endswith(which):
                    f.write(json.dumps({**r, "id": r["prompt_id"]}) + "\n")
    with open(tmp_path / "short.jsonl", "w") as f:  # the rejected answers of the first half of the prompts
        f.writelines(line for line in open(tmp_path / "rejected.jsonl").readlines()[:32])
    out = str(tmp_path / "judge")
    inprocess(eval_winrate.main, ["--reward_pretrain", rm, "--baseline", str(tmp_path / "rejected.jsonl"),
                                  "--candidates", f"{tmp_path / 'chosen.jsonl'},{tmp_path / 'rejected.jsonl'}",
                                  "--names", "hedged,terse", "--output_dir", out])
    res = json.load(open(os.path.join(out, "winrate.json")))
    final = [r for r in metrics(rm) if r.get("final")][-1]
    hedged, terse = res["rows"]
    assert hedged["win_rate"] == final["eval/rm/acc"] and hedged["n"] == 64
    assert hedged["mean_score_diff"] == pytest.approx(final["eval/rm/margin"], abs=1e-5)
    assert (terse["win_rate"], terse["ties"], terse["mean_score_diff"]) == (0.5, 64, 0.0)  # itself: all ties
    assert hedged["mean_len"] > 3 * hedged["baseline_mean_len"]  # the hedged answers are long: visible
    table = open(os.path.join(out, "winrate.md")).read()
    assert table.count("\n") == 4 and "| hedged | 1.000 |" in table
    # a model instead of a file: its greedy answers to the same (built-in held-out) prompts come first
    inprocess(eval_winrate.main, ["--reward_pretrain", rm, "--baseline", str(tmp_path / "rejected.jsonl"),
                                  "--candidates", "tiny", "--max_samples", "64", "--max_new_tokens", "8",
                                  "--output_dir", out])
    res = json.load(open(os.path.join(out, "winrate.json")))
    assert res["rows"][0]["name"] == "tiny" and res["rows"][0]["n"] == 64
    assert len(read_jsonl(os.path.join(out, "answers_tiny.jsonl"))) == 64
    with pytest.raises(lifecycle.UsageError, match=r"short.jsonl misses 32 \(first 'builtin:pairwise:eval:32'\)"):
        inprocess(eval_winrate.main, ["--reward_pretrain", rm, "--baseline", str(tmp_path / "rejected.jsonl"),
                                      "--candidates", str(tmp_path / "short.jsonl"), "--output_dir", out])



def test_eval_winrate_renders_with_the_template_it_is_given(rm_run, tmp_path):
    """``--tokenizer_chat_template`` reaches the judge and the generating model: with Llama-3's template instead
    of the tokenizer's own, the same answers get other scores, and the model answers other prompts."""
    from xright.cli import eval_winrate

    rm, pairs = rm_run
    template = os.path.join(os.path.dirname(__file__), "fixtures", "chat_templates", "llama3.jinja")
    for which in ("chosen", "rejected"):
        with open(tmp_path / f"{which}.jsonl", "w") as f:
            f.writelines(json.dumps({**r, "id": r["prompt_id"]}) + "\n" for r in read_jsonl(pairs)
                         if r["id"].endswith(which))
    with open(tmp_path / "first16.jsonl", "w") as f:  # the model answers the first 16 held-out prompts
        f.writelines(open(tmp_path / "rejected.jsonl").readlines()[:16])
    files = ["--reward_pretrain", rm, "--baseline", str(tmp_path / "rejected.jsonl"), "--candidates",
             str(tmp_path / "chosen.jsonl"), "--apply_chat_template"]
    model = ["--reward_pretrain", rm, "--baseline", str(tmp_path / "first16.jsonl"), "--candidates", "tiny",
             "--max_samples", "16", "--max_new_tokens", "6", "--apply_chat_template"]
    seen = {}
    for name, extra in (("own", []), ("llama3", ["--tokenizer_chat_template", template])):
        for job, args in (("files", files), ("model", model)):
            out = str(tmp_path / f"{job}-{name}")
            inprocess(eval_winrate.main, [*args, *extra, "--output_dir", out])
            seen[job, name] = json.load(open(os.path.join(out, "winrate.json")))["rows"][0]
        seen["answers", name] = [r["output"] for r in read_jsonl(os.path.join(out, "answers_tiny.jsonl"))]
    assert seen["files", "own"]["n"] == seen["files", "llama3"]["n"] == 64
    assert seen["files", "own"]["mean_score_diff"] != seen["files", "llama3"]["mean_score_diff"]
    assert len(seen["answers", "llama3"]) == 16 and seen["answers", "own"] != seen["answers", "llama3"]

# ---- interactive chat -----------------------------------------------------------------------------------

def test_interactive_chat_answers_two_turns_with_history_and_exits_on_eof(capsys):
    import io

    from xright.cli import interactive_chat
    from xright.models import load_for_inference

    turns = ["what is 1+1?", "and 2+2?", "clear", "hi"]
    stdin = io.StringIO("".join(t + "\n" for t in turns))
    assert lifecycle.guarded(lambda: interactive_chat.main(["--greedy_sampling", "--max_new_tokens", "10"], stdin=stdin)) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    body = out.out.split("quits\n", 1)[1]
    answers = body.split("> ")[1:]
    assert answers[-1] == "\n"  # EOF: a clean newline and exit
    assert answers[2] == "(history cleared)\n"
    # what the streamed answers must be: greedy answers to the conversation so far (cleared before "hi")
    args = interactive_chat.parser().parse_args(["--greedy_sampling"])
    tok = load_tokenizer("tiny")
    model = load_for_inference("tiny", vocab_size=len(tok))
    history, expected = [], []
    for user in (turns[0], turns[1], None, turns[3]):
        if user is None:
            history = []
            continue
        text = interactive_chat.render(history, user, tok, args)["prompt"]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out = generate_batch(model, [ids], Sampling(max_new_tokens=10, greedy=True, repetition_penalty=1.2),
                             eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0)  # the chat's defaults
        expected.append(tok.decode(out[0][0], skip_special_tokens=True))
        history.append((user, expected[-1]))
    assert [answers[0], answers[1], answers[3]] == [e + "\n" for e in expected]
    assert interactive_chat.render(history[:1], "x", tok, args)["prompt"] == (
        f"User: hi\nAssistant: {expected[2]}\nUser: x\nAssistant: ")


def test_a_saved_lora_adapter_loads_merged_on_its_seeded_base(tmp_path):
    from xright.models import LoraSpec, load_for_inference

    policy = load_model("tiny", seed=3, lora=LoraSpec(rank=4, alpha=8))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:  # B starts at 0 (a no-op adapter): make it matter
                p.copy_(torch.randn_like(p) * 0.1)
    policy.save_pretrained(tmp_path)
    (tmp_path / "xright_args.json").write_text(json.dumps({"pretrain": None, "seed": 3}))
    assert not (tmp_path / "config.json").exists()
    merged = load_for_inference(str(tmp_path))
    x = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = policy.eval()(input_ids=x).logits
        torch.testing.assert_close(merged(input_ids=x).logits, want)
        assert not torch.allclose(load_model("tiny", seed=3, trainable=False)(input_ids=x).logits, want)


def test_interactive_chat_exits_cleanly_on_ctrl_c():
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "xright.cli.interactive_chat", "--max_new_tokens", "4"], cwd=ROOT,
                            env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = ""
    while not seen.endswith("> "):  # the model is loaded and the chat waits for input
        ch = proc.stdout.read(1)
        assert ch, f"chat ended before its prompt: {seen!r} {proc.stderr.read()}"
        seen += ch
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert out == "\n"


def test_interactive_chat_with_the_chat_template_prompts_with_the_trainers_ids(tmp_path, capsys):
    import io

    from xright.cli import interactive_chat
    from xright.data.chat import ChatRenderer
    from xright.models import load_for_inference

    tok, path = chat_llama(tmp_path)  # the tokenizer adds BOS, the template writes none: no BOS
    stdin = io.StringIO("what is 1+1?\nand 2+2?\n")
    argv = ["--pretrain", path, "--apply_chat_template", "--greedy_sampling", "--max_new_tokens", "6"]
    assert lifecycle.guarded(lambda: interactive_chat.main(argv, stdin=stdin)) == 0
    answers = capsys.readouterr().out.split("quits\n", 1)[1].split("> ")[1:3]
    model = load_for_inference(path, vocab_size=len(tok))
    msgs, expected = [], []
    for user in ("what is 1+1?", "and 2+2?"):
        msgs.append({"role": "user", "content": user})
        ids = ChatRenderer(tok).prompt_ids(msgs)
        out = generate_batch(model, [ids], Sampling(max_new_tokens=6, greedy=True, repetition_penalty=1.2),
                             eos_ids=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0)
        expected.append(tok.decode(out[0][0], skip_special_tokens=True))
        msgs.append({"role": "assistant", "content": expected[-1]})
    assert answers == [e + "\n" for e in expected]
