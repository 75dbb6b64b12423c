"""Conversational preference data through chat templates (xright.data.chat): the real templates of the major
families as shipped (tests/fixtures/chat_templates), token-level prompt/answer boundaries, the layouts TRL and
UltraFeedback use, KTO/EXO/multi-turn SFT, refusals with file and line, hub ``name@data_dir``, cache keys."""

import gzip
import json
import os

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from xright.data import DataError, DataSpec, collate, load_data
from xright.data.chat import ChatRenderer, template_text
from xright.data.records import BadRecord
from xright.models import tiny_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATES = os.path.join(HERE, "fixtures", "chat_templates")
HH = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "data", "hh-rlhf", "harmless-base-test.jsonl.gz")

# family -> (template file, special tokens, bos, eos, does the tokenizer add BOS on its own?)
FAMILIES = {
    "qwen2.5": ("qwen2.5.jinja", ["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", False),
    "llama3": ("llama3.jinja", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               "<|begin_of_text|>", "<|eot_id|>", True),
    "mistral": ("mistral.jinja", ["<s>", "</s>"], "<s>", "</s>", True),
    "gemma": ("gemma.jinja", ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", True),
    "zephyr": ("zephyr.jinja", ["<s>", "</s>"], "<s>", "</s>", True),
    "phi3": ("phi3.jinja", ["<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"], "<s>", "<|endoftext|>",
             False),
}
Q = [{"role": "user", "content": "What is 2+2?"}]
# what each family renders for Q with the generation prompt, and for the answer "4." after it (by hand, from
# the templates as the model cards ship them)
PROMPT = {
    "qwen2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
               "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] What is 2+2? [/INST]",
    "gemma": "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "zephyr": "<|user|>\nWhat is 2+2?</s>\n<|assistant|>\n",
    "phi3": "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n",
}
ANSWER = {"qwen2.5": "4.<|im_end|>\n", "llama3": "4.<|eot_id|>", "mistral": "4.</s>", "gemma": "4.<end_of_turn>\n",
          "zephyr": "4.</s>\n", "phi3": "4.<|end|>\n<|endoftext|>"}


def family_tokenizer(family):
    """The tiny byte-level tokenizer with the family's special tokens, bos/eos and template; a family whose
    tokenizer adds BOS by itself (Llama, Mistral, Gemma) gets a post-processor that does, so a second BOS
    would show."""
    name, specials, bos, eos, adds_bos = FAMILIES[family]
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.add_special_tokens({"eos_token": eos, **({"bos_token": bos} if bos else {})})
    if adds_bos:
        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
    tok.chat_template = template_text(os.path.join(TEMPLATES, name))
    return tok


def decode(tok, ids):
    return tok.decode(list(ids))


def masked_in(tok, batch, row=0):
    ids, mask = batch["input_ids"][row], batch["loss_mask"][row]
    return decode(tok, ids[mask])


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def spec(kind, path, **kw):
    return DataSpec(**{"kind": kind, "dataset": path, "eval_split": "", "max_len": 1024, **kw})


class Log(list):
    def __call__(self, msg):
        self.append(str(msg))


# ------------------------------------------------------------------------------ the families' templates


@pytest.mark.parametrize("family", list(FAMILIES))
def test_real_templates_prompt_is_a_token_prefix_and_answer_ends_with_end_of_turn(family):
    tok = family_tokenizer(family)
    if FAMILIES[family][4]:
        assert tok("x").input_ids[0] == tok.bos_token_id  # this tokenizer adds BOS on its own
    r = ChatRenderer(tok)
    p, (a,), (mask,) = r.encode(Q, [[{"role": "assistant", "content": "4."}]])
    assert decode(tok, p) == PROMPT[family]
    assert decode(tok, a) == ANSWER[family]  # the answer and the template's end of turn; no eos added after it
    assert mask is None
    assert p.count(tok.bos_token_id) == (1 if PROMPT[family].startswith(tok.bos_token or "\0") else 0)
    assert p + a == r.ids([tok.apply_chat_template(Q + [{"role": "assistant", "content": "4."}], tokenize=False)])[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_real_templates_multi_turn_sft_trains_exactly_the_assistant_turns(family):
    tok = family_tokenizer(family)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    p, (a,), (mask,) = ChatRenderer(tok).encode(msgs[:1], [msgs[1:]], mask_roles=True)
    trained = [i for i, m in zip(a, mask) if m]
    end = {"qwen2.5": "<|im_end|>\n", "llama3": "<|eot_id|>", "mistral": "</s>", "gemma": "<end_of_turn>\n",
           "zephyr": "</s>\n", "phi3": "<|end|>\n"}[family]
    last = end + ("<|endoftext|>" if family == "phi3" else "")  # Phi-3 ends a conversation with eos
    assert decode(tok, trained) == f"hello{end}4{last}"
    # the masked part is exactly the second user turn and the generation prompt that follows it
    untrained = decode(tok, [i for i, m in zip(a, mask) if not m])
    assert "2+2?" in untrained and "hello" not in untrained and not untrained.endswith("4")
    assert decode(tok, p + a) == tok.apply_chat_template(msgs, tokenize=False)


def test_template_without_end_of_turn_gets_eos():
    tok = tiny_tokenizer()  # "User: …\nAssistant: …\n": no special token closes a turn
    p, (a,), _ = ChatRenderer(tok).encode(Q, [[{"role": "assistant", "content": "4."}]])
    assert decode(tok, p) == "User: What is 2+2?\nAssistant: " and decode(tok, a) == "4.\n<|endoftext|>"


def merging_tokenizer():
    """Byte-level BPE with one merge, ':' + ' ' -> ': ', so 'Assistant:' then ' 4' tokenise across the boundary."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab[":Ġ"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[(":", "Ġ")]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    bpe.decoder = decoders.ByteLevel()
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    return tok


BAD_TEMPLATES = {
    # the generation prompt ends with a newline the conversation does not render
    "text": ("{% for m in messages %}<{{ m['role'] }}>{% if m['role'] != 'assistant' %}\n{% endif %}{{ m['content'] }}"
             "\n{% endfor %}{% if add_generation_prompt %}<assistant>\n{% endif %}",
             "not a prefix of the conversation"),
    # 'assistant:' + ' 4.' merges ': ' across the boundary
    "tokens": (None, "prompt's tokens are not a prefix of the conversation's: token"),
    # no generation prompt: 'Assistant: ' would be trained as part of every answer
    "no generation prompt": ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}",
                             "has no generation prompt"),
}


@pytest.mark.parametrize("case", list(BAD_TEMPLATES))
def test_template_faults_are_refused_with_file_line_and_reason(tmp_path, case):
    template, needle = BAD_TEMPLATES[case]
    tok = merging_tokenizer() if template is None else tiny_tokenizer()
    if template is not None:
        tok.chat_template = template
    good = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": "b"}
    path = write(tmp_path / "t.jsonl", [good, {**good, "chosen": "4."}])
    with pytest.raises(DataError) as e:
        load_data(spec("pairwise", path), tok, log=Log())
    msg = str(e.value)
    assert msg.startswith(f"{path} line 1: field 'chosen': ") and needle in msg and "\n" not in msg, msg


def test_merging_tokenizer_is_fine_where_the_boundary_does_not_merge():
    tok = merging_tokenizer()
    tok.chat_template = tok.chat_template.replace("assistant:", "assistant: ")
    p, (a,), _ = ChatRenderer(tok).encode(Q, [[{"role": "assistant", "content": "4."}]])
    assert decode(tok, a) == "4.\n<|endoftext|>"


# ------------------------------------------------------------------------------ layouts through load_data

CHATML = "qwen2.5"
SYS = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"


def convo(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


LAYOUTS = {
    # TRL conversational: prompt messages, completions as messages
    "trl": ("pairwise", {"prompt": [{"role": "user", "content": "2+2?"}],
                         "chosen": [{"role": "assistant", "content": "4"}],
                         "rejected": [{"role": "assistant", "content": "5"}]}),
    # UltraFeedback-binarized: a string prompt and whole conversations (the conversation wins)
    "ultrafeedback": ("pairwise", {"prompt": "ignored", "chosen": convo("2+2?", "4"), "rejected": convo("2+2?", "5")}),
    "kto": ("binary", {"prompt": [{"role": "user", "content": "2+2?"}],
                       "completion": [{"role": "assistant", "content": "4"}], "label": True}),
    "exo": ("scored", {"prompt": [{"role": "user", "content": "2+2?"}],
                       "completions": ["4", [{"role": "assistant", "content": "5"}]], "rewards": [1.0, 0.0]}),
    "sft": ("sft", {"messages": convo("2+2?", "4")}),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_trains_exactly_the_answer_and_its_end_of_turn(tmp_path, layout):
    tok = family_tokenizer(CHATML)
    kind, rec = LAYOUTS[layout]
    train, _ = load_data(spec(kind, write(tmp_path / "d.jsonl", [rec, rec])), tok, log=Log())
    batch = collate(kind, [train[0], train[1]], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == (4 if kind in ("pairwise", "scored") else 2)
    assert masked_in(tok, batch, 0) == "4<|im_end|>\n"
    prompt = decode(tok, batch["input_ids"][0][batch["attention_mask"][0].bool() & ~batch["loss_mask"][0]])
    assert prompt == SYS + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    if kind in ("pairwise", "scored"):
        assert masked_in(tok, batch, 2) == "5<|im_end|>\n"  # row k*B + b: the second answer of example 0


def test_multiturn_sft_masks_exactly_the_non_assistant_turns(tmp_path):
    tok = family_tokenizer(CHATML)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}]
    path = write(tmp_path / "m.jsonl", [{"messages": msgs}] * 2)
    for multiturn, trained in ((False, "4<|im_end|>\n"), (True, "hello<|im_end|>\n4<|im_end|>\n")):
        train, _ = load_data(spec("sft", path, multiturn=multiturn), tok, log=Log())
        batch = collate("sft", list(train), tok.pad_token_id)
        assert masked_in(tok, batch) == trained
        whole = decode(tok, batch["input_ids"][0][batch["attention_mask"][0].bool()])
        assert whole == tok.apply_chat_template(msgs, tokenize=False)
        assert ("response_mask" in train[0]) == multiturn
    # the masked tokens, in order: system, first user turn + cue, second user turn + cue
    untrained = decode(tok, batch["input_ids"][0][batch["attention_mask"][0].bool() & ~batch["loss_mask"][0]])
    assert untrained == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
                         "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_ultrafeedback_and_trl_layouts_give_the_same_examples(tmp_path):
    tok = family_tokenizer("llama3")
    sys = {"role": "system", "content": "Be kind."}
    uf = {"prompt": "q", "chosen": [sys, *convo("q", "yes")], "rejected": [sys, *convo("q", "no")]}
    trl = {"prompt": [sys, {"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "yes"}],
           "rejected": [{"role": "assistant", "content": "no"}]}
    both = {**trl, "chosen": uf["chosen"], "rejected": uf["rejected"]}  # prompt messages and whole conversations
    a, _ = load_data(spec("pairwise", write(tmp_path / "uf.jsonl", [uf])), tok, log=Log())
    b, _ = load_data(spec("pairwise", write(tmp_path / "trl.jsonl", [trl])), tok, log=Log())
    c, _ = load_data(spec("pairwise", write(tmp_path / "both.jsonl", [both])), tok, log=Log())
    assert (a[0]["prompt_ids"], a[0]["responses"]) == (b[0]["prompt_ids"], b[0]["responses"])
    assert (c[0]["prompt_ids"], c[0]["responses"]) == (b[0]["prompt_ids"], b[0]["responses"])
    assert [decode(tok, r) for r in a[0]["responses"]] == ["yes<|eot_id|>", "no<|eot_id|>"]


def test_plain_text_and_apply_chat_template_on_strings(tmp_path):
    tok = family_tokenizer(CHATML)
    path = write(tmp_path / "p.jsonl", [{"prompt": "2+2?", "chosen": "4", "rejected": "5"}])
    plain, _ = load_data(spec("pairwise", path), tok, log=Log())
    assert decode(tok, plain[0]["prompt_ids"]) == "User: 2+2?\nAssistant: "
    assert decode(tok, plain[0]["responses"][0]) == "4<|im_end|>"  # text: + eos, as before
    chat, _ = load_data(spec("pairwise", path, apply_chat_template=True), tok, log=Log())
    assert decode(tok, chat[0]["prompt_ids"]) == SYS + "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert decode(tok, chat[0]["responses"][0]) == "4<|im_end|>\n"


def test_disk_cache_gives_the_in_memory_chat_examples(tmp_path):
    tok = family_tokenizer(CHATML)
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    for kind, rec, kw in (("sft", {"messages": msgs}, {"multiturn": True}), ("pairwise", LAYOUTS["trl"][1], {}),
                          ("scored", LAYOUTS["exo"][1], {})):
        s = spec(kind, write(tmp_path / f"{kind}.jsonl", [rec] * 3), **kw)
        want, _ = load_data(s, tok, log=Log())
        s.cache_dir = str(tmp_path / "cache")
        got, _ = load_data(s, tok, log=Log())
        assert list(got) == want, kind


# ------------------------------------------------------------------------------ bad records

BAD = {
    "message without role": ({"prompt": [{"content": "q"}], "chosen": "a", "rejected": "b"}, "'prompt[0].role'"),
    "message without content": ({"chosen": [{"role": "user"}, {"role": "assistant", "content": "a"}],
                                 "rejected": convo("q", "b")}, "'chosen[0].content'"),
    "answer does not end with the assistant": (
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]},
        "'rejected[1].role': the last message must have role 'assistant'"),
    "different prompts": ({"chosen": convo("q1", "a"), "rejected": convo("q2", "b")},
                          "'chosen': the conversations have different prompts"),
    "empty assistant message": ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a",
                                 "rejected": [{"role": "assistant", "content": "  "}]},
                                "'rejected[0].content': is whitespace-only"),
    "answer list and string": ({"chosen": convo("q", "a"), "rejected": "b"}, "'rejected': is a string"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_conversational_records_name_file_line_and_field(tmp_path, case):
    rec, needle = BAD[case]
    good = {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}
    path = write(tmp_path / "bad.jsonl", [good, rec])
    with pytest.raises(DataError) as e:
        load_data(spec("pairwise", path), family_tokenizer(CHATML), log=Log())
    assert str(e.value).startswith(f"{path} line 2: field ") and needle in str(e.value), str(e.value)


def test_template_that_raises_names_the_record(tmp_path):
    tok = family_tokenizer("gemma")  # Gemma's template raises on a system message
    rec = {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "chosen": "a",
           "rejected": "b"}
    path = write(tmp_path / "g.jsonl", [rec])
    with pytest.raises(DataError, match=r"g.jsonl line 1: field 'chosen': the chat template fails on it: "
                                        r"TemplateError: System role not supported"):
        load_data(spec("pairwise", path), tok, log=Log())


def test_apply_chat_template_without_a_template_is_refused_before_reading(tmp_path):
    tok = tiny_tokenizer()
    tok.chat_template = None
    with pytest.raises(DataError, match="--apply_chat_template: the tokenizer has no chat template"):
        load_data(spec("pairwise", str(tmp_path / "never-read.jsonl"), apply_chat_template=True), tok, log=Log())
    path = write(tmp_path / "c.jsonl", [LAYOUTS["trl"][1]])
    with pytest.raises(DataError, match=r"c.jsonl line 1: field 'chosen': the tokenizer has no chat template"):
        load_data(spec("pairwise", path), tok, log=Log())


# ------------------------------------------------------------------------------ template flag, hub, cache keys


def test_tokenizer_chat_template_takes_text_or_a_file(tmp_path):
    from xright.models import load_tokenizer

    path = os.path.join(TEMPLATES, "llama3.jinja")
    text = open(path).read()
    assert load_tokenizer("tiny", chat_template=path).chat_template == text
    assert load_tokenizer("tiny", chat_template=text).chat_template == text


def test_hub_name_at_data_dir(monkeypatch, tmp_path):
    import datasets

    calls = []

    def fake_load_dataset(name, split, **kw):
        calls.append((name, split, kw))
        if split != "train":
            raise ValueError(f"Unknown split {split}")
        return datasets.Dataset.from_list([{"chosen": "\n\nHuman: q\n\nAssistant: a",
                                            "rejected": "\n\nHuman: q\n\nAssistant: b"}] * 2)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    train, _ = load_data(DataSpec(kind="pairwise", dataset="Anthropic/hh-rlhf@harmless-base", eval_split="test"),
                         tiny_tokenizer(), log=Log())
    assert calls == [("Anthropic/hh-rlhf", "train", {"data_dir": "harmless-base"}),
                     ("Anthropic/hh-rlhf", "test", {"data_dir": "harmless-base"})]
    assert train[0]["id"].startswith("Anthropic/hh-rlhf@harmless-base:train:0@")  # the folder is part of the id


def test_cache_keys_change_with_the_template_text():
    from xright.data import store

    a, b = family_tokenizer(CHATML), family_tokenizer(CHATML)
    s = DataSpec(kind="pairwise")
    assert store.fingerprint(s, a) == store.fingerprint(s, b)
    b.chat_template = b.chat_template.replace("You are Qwen", "You are Q")
    assert store.fingerprint(s, a) != store.fingerprint(s, b)
    c = DataSpec(kind="sft", multiturn=True)
    assert store.fingerprint(c, a) != store.fingerprint(DataSpec(kind="sft"), a)


def test_reference_table_key_changes_with_the_template_text():
    from xright import fingerprints

    a, b = family_tokenizer(CHATML), family_tokenizer(CHATML)
    b.chat_template = b.chat_template.replace("You are Qwen", "You are Q")
    data = {"dpo": DataSpec(kind="pairwise")}
    key = lambda tok: fingerprints.digest(  # noqa: E731
        fingerprints.reference("tiny", 42, "fp32", False, False, tok, data))
    assert key(a) == key(family_tokenizer(CHATML)) and key(a) != key(b)


# ------------------------------------------------------------------------------ the CLIs, in this process


def chat_layouts(tmp_path, n=32):
    """The built-in preference pairs as three files: UltraFeedback layout, TRL layout, and the same pre-rendered
    with the tiny tokenizer's template to plain prompt/chosen/rejected text."""
    from xright.data.synthetic import preference_records

    tok = tiny_tokenizer()
    uf, trl, plain = [], [], []
    for r in preference_records(n, seed=3):
        user = [{"role": "user", "content": r["prompt"]}]
        answers = {k: [{"role": "assistant", "content": r[k]}] for k in ("chosen", "rejected")}
        uf.append({"prompt": r["prompt"], **{k: user + a for k, a in answers.items()}})
        trl.append({"prompt": user, **answers})
        p = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        plain.append({"prompt": p, **{k: tok.apply_chat_template(user + a, tokenize=False)[len(p):]
                                      for k, a in answers.items()}})
    return {name: write(tmp_path / f"{name}.jsonl", recs) for name, recs in
            (("uf", uf), ("trl", trl), ("plain", plain))}


def run_main(module, args):
    """A CLI's main in this process, as tests/multirun.py runs it: (exit code, its metrics)."""
    import importlib

    from xright.cli import lifecycle
    from xright.strategy import release_engines

    cli = importlib.import_module(f"xright.cli.{module}")
    try:
        code = lifecycle.guarded(lambda: cli.main(args))
    finally:
        release_engines()
    save = args[args.index("--save_path") + 1]
    path = os.path.join(save, "metrics.jsonl")
    return code, [json.loads(line) for line in open(path)] if os.path.exists(path) else []


SMALL = ["--zero_stage", "0", "--train_batch_size", "4", "--micro_train_batch_size", "2", "--max_steps", "2",
         "--eval_fraction", "0.25", "--eval_steps", "1000", "--learning_rate", "1e-3", "--lr_scheduler", "constant"]


def test_dpo_on_ultrafeedback_and_trl_layouts_equals_the_pre_rendered_text(tmp_path):
    files = chat_layouts(tmp_path)
    got = {}
    for name, extra in (("uf", []), ("trl", []), ("plain", ["--input_template", ""])):
        code, rows = run_main("train_dpo", [*SMALL, "--dataset", files[name], *extra,
                                            "--save_path", str(tmp_path / name)])
        assert code == 0, name
        got[name] = rows
    rm = {}  # and the reward model on the same pairs
    for name, extra in (("uf", []), ("trl", ["--prompt_key", "prompt"]),
                        ("plain", ["--prompt_key", "prompt", "--input_template", ""])):
        code, rows = run_main("train_rm", [*SMALL, "--dataset", files[name], *extra,
                                           "--save_path", str(tmp_path / f"rm-{name}")])
        assert code == 0, name
        rm[name] = [{k: v for k, v in r.items() if k.startswith(("train/", "eval/"))} for r in rows]
    assert rm["uf"] == rm["trl"] == rm["plain"] and "eval/rm/loss" in rm["trl"][0]
    ev = lambda rows: [(r["step"], r["eval/dpo/logp_chosen"], r["eval/dpo/logp_rejected"])  # noqa: E731
                       for r in rows if "eval/dpo/logp_chosen" in r]
    train = lambda rows: [r["train/dpo/loss"] for r in rows if "train/dpo/loss" in r]  # noqa: E731
    assert ev(got["plain"])[0][0] == 0 and ev(got["plain"])[0][1] < 0
    for name in ("uf", "trl"):
        assert ev(got[name]) == ev(got["plain"]), name  # the same tokens: the same numbers, exactly
        assert train(got[name]) == train(got["plain"]), name


def test_kto_and_exo_on_conversational_records_equal_the_pre_rendered_text(tmp_path):
    from xright.data.synthetic import preference_records

    tok = tiny_tokenizer()

    def render(prompt, answer):
        p = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        msgs = answer if isinstance(answer, list) else [{"role": "assistant", "content": answer}]
        return p, tok.apply_chat_template(prompt + msgs, tokenize=False)[len(p):]

    data = {"kto": ([], []), "exo": ([], [])}
    for i, r in enumerate(preference_records(16, seed=4)):
        user = [{"role": "system", "content": "Answer."}, {"role": "user", "content": r["prompt"]}]
        completion = [{"role": "assistant", "content": r["chosen" if i % 2 else "rejected"]}]
        data["kto"][0].append({"prompt": user, "completion": completion, "label": bool(i % 2)})
        p, c = render(user, completion)
        data["kto"][1].append({"prompt": p, "completion": c, "label": bool(i % 2)})
        comps = [r["chosen"], [{"role": "assistant", "content": r["rejected"]}], [{"role": "assistant", "content": "?"}]]
        data["exo"][0].append({"prompt": user, "completions": comps, "rewards": [1.0, 0.0, -1.0]})
        data["exo"][1].append({"prompt": p, "completions": [render(user, x)[1] for x in comps],
                               "rewards": [1.0, 0.0, -1.0]})
    for module, name, extra in (("train_kto", "kto", []), ("train_exo", "exo-rw", ["--loss", "exo-rw"])):
        got = []
        for j, recs in enumerate(data[name.split("-")[0]]):
            path = write(tmp_path / f"{name}{j}.jsonl", recs)
            code, rows = run_main(module, [*SMALL, "--dataset", path, *extra, *(["--input_template", ""] if j else []),
                                           "--save_path", str(tmp_path / f"{name}{j}")])
            assert code == 0, name
            got.append([(r["step"], r.get(f"eval/{name}/loss"), r.get(f"train/{name}/loss"), r.get("tokens"))
                        for r in rows if f"eval/{name}/loss" in r or f"train/{name}/loss" in r])
        assert len(got[0]) == 4 and got[0] == got[1], name  # eval at 0, steps 1 and 2, final eval: the same numbers


BAD_CLI = {
    "message without role": ({"prompt": [{"content": "q"}], "chosen": "a", "rejected": "b"}, "'prompt[0].role'"),
    "message without content": ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "'prompt[0].content'"),
    "answer not ending with the assistant": (
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"},
                                                                  {"role": "user", "content": "more"}],
         "rejected": "b"}, "'chosen[1].role'"),
    "different prompts": ({"chosen": convo("q1", "a"), "rejected": convo("q2", "b")}, "different prompts"),
    "empty assistant message": ({"chosen": convo("q", ""), "rejected": convo("q", "b")}, "'chosen[1].content': is empty"),
    "no generation prompt": (None, "field 'chosen': the chat template has no generation prompt"),
}


@pytest.mark.parametrize("case", list(BAD_CLI))
def test_bad_conversational_input_exits_2_before_training(tmp_path, capsys, case):
    rec, needle = BAD_CLI[case]
    good = {"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}
    path = write(tmp_path / "bad.jsonl", [good, rec or good, good, good])
    extra = []
    if rec is None:
        extra = ["--tokenizer_chat_template", "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"]
    from xright.cli import lifecycle, train_dpo

    capsys.readouterr()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        lifecycle.main_guard(lambda: train_dpo.main([*SMALL, "--dataset", path, *extra, "--save_path", str(out)]))
    err = capsys.readouterr().err
    assert e.value.code == 2
    line = [x for x in err.splitlines() if x.startswith("xright: error: ")]
    assert len(line) == 1 and "Traceback" not in err, err
    want_line = 1 if rec is None else 2  # a template fault shows at the first record
    assert line[0].startswith(f"xright: error: {path} line {want_line}: field ") and needle in line[0], line[0]
    assert not (out / "model.safetensors").exists() and not (out / "metrics.jsonl").exists()


# ------------------------------------------------------------------------------ real data: HH as conversations


def hh_messages(dialogue):
    """'\\n\\nHuman: … \\n\\nAssistant: …' -> messages."""
    import re

    parts = re.split(r"\n\n(Human|Assistant):", dialogue)
    return [{"role": "user" if role == "Human" else "assistant", "content": text.strip()}
            for role, text in zip(parts[1::2], parts[2::2])]


@pytest.mark.skipif(not os.path.exists(HH), reason="shared HH data absent")
def test_hh_pairs_as_conversations_in_both_layouts(tmp_path):
    with gzip.open(HH, "rt") as f:
        pairs = [json.loads(line) for _, line in zip(range(300), f)]
    uf, trl = [], []
    for p in pairs:
        c, r = hh_messages(p["chosen"]), hh_messages(p["rejected"])
        uf.append({"chosen": c, "rejected": r})
        if c[:-1] == r[:-1]:  # TRL needs one prompt: pairs that differ before their last turn stay out
            trl.append({"prompt": c[:-1], "chosen": c[-1:], "rejected": r[-1:]})
    tok = tiny_tokenizer()
    kw = dict(skip_bad_records=True, max_len=4096)
    log = Log()
    a, _ = load_data(spec("pairwise", write(tmp_path / "uf.jsonl", uf), **kw), tok, log=log)
    b, _ = load_data(spec("pairwise", write(tmp_path / "trl.jsonl", trl), **kw), tok, log=Log())
    by_prompt = {tuple(e["prompt_ids"]): e["responses"] for e in b}
    same = [e for e in a if by_prompt.get(tuple(e["prompt_ids"])) == e["responses"]]
    assert len(b) >= 250 and len(same) == len(b), (len(a), len(b), len(same))
    e = same[0]
    assert decode(tok, e["prompt_ids"]).startswith("User: ") and decode(tok, e["prompt_ids"]).endswith("Assistant: ")
    assert all(decode(tok, r).endswith("\n<|endoftext|>") for r in e["responses"])
    print(f"HH as conversations: {len(a)} UltraFeedback-layout pairs, {len(b)} TRL-layout pairs, {len(same)} "
          f"identical examples; {' | '.join(x for x in log if 'skipped' in x)}")


def test_reward_model_rows_end_with_the_end_of_turn(tmp_path):
    """The reward model scores each row's last real token: the template's end of turn, or eos where it has none."""
    for family, last in (("llama3", "<|eot_id|>"), ("qwen2.5", "\n"), (None, "<|endoftext|>")):
        tok = family_tokenizer(family) if family else tiny_tokenizer()
        train, _ = load_data(spec("pairwise", write(tmp_path / "p.jsonl", [LAYOUTS["trl"][1]] * 2)), tok, log=Log())
        batch = collate("pairwise", list(train), tok.pad_token_id)
        ends = batch["attention_mask"].sum(1) - 1
        assert [decode(tok, [int(batch["input_ids"][b, e])]) for b, e in enumerate(ends)] == [last] * 4, family
        if family == "qwen2.5":  # ChatML's turn ends '<|im_end|>\n'
            assert all(int(batch["input_ids"][b, e - 1]) == tok.convert_tokens_to_ids("<|im_end|>")
                       for b, e in enumerate(ends))


def test_csv_and_parquet_hold_conversations(tmp_path):
    import pandas as pd

    rec = LAYOUTS["ultrafeedback"][1]
    want, _ = load_data(spec("pairwise", write(tmp_path / "a.jsonl", [rec])), tiny_tokenizer(), log=Log())
    pd.DataFrame([{k: json.dumps(v) if isinstance(v, list) else v for k, v in rec.items()},
                  {"prompt": "[{not json", "chosen": "[{also text", "rejected": "b"}]).to_csv(tmp_path / "a.csv",
                                                                                          index=False)
    pd.DataFrame([rec]).to_parquet(tmp_path / "a.parquet")
    for name in ("a.csv", "a.parquet"):
        got, _ = load_data(spec("pairwise", str(tmp_path / name)), tiny_tokenizer(), log=Log())
        assert (got[0]["prompt_ids"], got[0]["responses"]) == (want[0]["prompt_ids"], want[0]["responses"]), name
    assert len(got) == 1 and len(load_data(spec("pairwise", str(tmp_path / "a.csv")), tiny_tokenizer(),
                                           log=Log())[0]) == 2  # the text row stays text


def test_completions_without_prompt_key_say_which_flag(tmp_path):
    path = write(tmp_path / "rm.jsonl", [LAYOUTS["trl"][1]])
    with pytest.raises(DataError, match=r"rm.jsonl line 1: field 'chosen': .*prompt_key is None .* --prompt_key prompt"):
        load_data(spec("pairwise", path, prompt_key=None), tiny_tokenizer(), log=Log())
    path = write(tmp_path / "uf.jsonl", [LAYOUTS["ultrafeedback"][1]])  # whole conversations need no prompt field
    assert len(load_data(spec("pairwise", path, prompt_key=None), tiny_tokenizer(), log=Log())[0]) == 1


def test_conversational_pairs_feed_kto_exo_and_sft_from_chosen(tmp_path):
    tok = family_tokenizer(CHATML)
    path = write(tmp_path / "uf.jsonl", [LAYOUTS["ultrafeedback"][1]] * 2)
    pair, _ = load_data(spec("pairwise", path), tok, log=Log())
    unpaired, _ = load_data(spec("binary", path), tok, log=Log())
    assert sorted((e["label"], decode(tok, e["response_ids"])) for e in unpaired) == \
        [(False, "5<|im_end|>\n")] * 2 + [(True, "4<|im_end|>\n")] * 2
    scored, _ = load_data(spec("scored", path), tok, log=Log())
    assert scored[0]["responses"] == pair[0]["responses"] and scored[0]["prompt_ids"] == pair[0]["prompt_ids"]
    sft, _ = load_data(spec("sft", path, sft_from_chosen=True), tok, log=Log())
    assert (sft[0]["prompt_ids"], sft[0]["response_ids"]) == (pair[0]["prompt_ids"], pair[0]["responses"][0])


def test_generation_prompts_from_every_layout():
    from xright.data.records import generation_prompt

    s = DataSpec(kind="sft")
    user = [{"role": "user", "content": "q"}]
    hh = {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}
    cases = [({"input": "q"}, ("q", False)), ({"input": user}, (user, False)),
             ({"input": "\n\nHuman: q\n\nAssistant:"}, ("\n\nHuman: q\n\nAssistant:", True)),
             ({"messages": convo("q", "a")}, (user, False)), (hh, ("\n\nHuman: q\n\nAssistant:", True)),
             (LAYOUTS["ultrafeedback"][1], (LAYOUTS["trl"][1]["prompt"], False)),
             ({**LAYOUTS["trl"][1], "prompt": user}, (user, False))]
    for rec, want in cases:
        assert generation_prompt(rec, s) == want, rec
    with pytest.raises(BadRecord, match="the prompt's last message is the assistant's"):
        generation_prompt({"input": convo("q", "a")}, s)
    with pytest.raises(BadRecord, match="missing"):
        generation_prompt({"text": "q"}, s)
