"""The online loop on conversational and HH prompts through the CLIs, in this process: generate → label with
a reward model and a post-processor → the training loader and a trainer (issue 18). No DeepSpeed launch."""

import io
import json
import math

import pytest

from launch import ROOT, train_records
from test_generation import CHAT, byte_tokenizer_with_bos, chat_llama, infer, inprocess, save_llama
from xright.cli import batch_inference, interactive_chat, lifecycle, train_dpo
from xright.data import DataSpec, load_data
from xright.data.chat import ChatRenderer
from xright.generation import Sampling, generate_batch, read_answers, tokenize_answers
from xright.models import load_for_inference, load_tokenizer

KINDS = {"iter_dpo": "pairwise", "kto": "binary", "exo": "scored", "rs": "sft"}


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def chat_samples(tmp_path_factory):
    """K = 4 sampled completions of a chat-template Llama to the conversational prompts CHAT, as
    ``batch_inference --eval_task generate`` writes them; (tokenizer, model dir, samples file)."""
    root = tmp_path_factory.mktemp("chatloop")
    tok, path = chat_llama(root)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": m}) + "\n" for m in CHAT))
    infer(root, "samples.jsonl", "--eval_task", "generate", "--pretrain", path, "--dataset", str(prompts),
          "--input_key", "prompt", "--best_of_n", "4", "--max_new_tokens", "6")
    return tok, path, root / "samples.jsonl"


@pytest.mark.parametrize("name", ["iter_dpo", "kto"])
def test_conversational_samples_labelled_and_trained_on(chat_samples, tmp_path, name):
    tok, path, samples = chat_samples
    written = [json.loads(line) for line in open(samples)]
    assert [r["input"] for r in written] == [m for m in CHAT for _ in range(4)]  # the samples keep the messages
    # the labeller (built-in tiny reward model, whose tokenizer has a chat template) writes TRL-layout records
    records = infer(tmp_path, f"{name}.jsonl", "--eval_task", "rm", "--dataset", str(samples),
                    "--post_processor", name)
    outputs = {json.dumps(m): {r["output"] for r in written if r["input"] == m} for m in CHAT}
    answers = [a for r in records for a in ((r["chosen"], r["rejected"]) if name == "iter_dpo" else (r["completion"],))]
    assert records and all(r["prompt"] in CHAT for r in records)
    assert all(len(a) == 1 and a[0]["role"] == "assistant" for a in answers)
    for r in records:
        got = [r["chosen"], r["rejected"]] if name == "iter_dpo" else [r["completion"]]
        assert all(a[0]["content"] in outputs[json.dumps(r["prompt"])] for a in got)
    # the training loader reads them back as conversations: the prompt ids are the chat template's generation prompt
    train, _ = load_data(DataSpec(kind=KINDS[name], dataset=str(tmp_path / f"{name}.jsonl"), eval_split="",
                                  max_len=1024), tok, log=quiet)
    r = ChatRenderer(tok)
    assert sorted(e["prompt_ids"] for e in train) == sorted(r.prompt_ids(x["prompt"]) for x in records)
    if name == "iter_dpo":  # and train_dpo trains on them: step 1's policy is the reference, loss log 2
        out = str(tmp_path / "dpo")
        inprocess(train_dpo.main, ["--pretrain", path, "--dataset", str(tmp_path / "iter_dpo.jsonl"),
                                   "--save_path", out, "--ckpt_path", f"{out}/ckpt", "--zero_stage", "0",
                                   "--train_batch_size", "2", "--micro_train_batch_size", "2", "--max_steps", "1",
                                   "--eval_split", "", "--learning_rate", "1e-4"])
        step = train_records(out)[0]
        assert step["train/dpo/loss"] == pytest.approx(math.log(2), abs=1e-5)


def test_hh_samples_read_back_get_the_template_once(tmp_path):
    """An HH dialogue prompt is raw in generation; the samples' ``input`` (the dialogue) must stay raw when the
    labeller scores it and when each post-processor's records are trained on (no ``User: …`` around it)."""
    dialogues = ["\n\nHuman: hi\n\nAssistant: hello\n\nHuman: what is 1+1?\n\nAssistant:",
                 "\n\nHuman: name a colour\n\nAssistant:"]
    hh = tmp_path / "hh.jsonl"
    hh.write_text("".join(json.dumps({"chosen": d + " 2", "rejected": d + " 3"}) + "\n" for d in dialogues))
    tok = load_tokenizer("tiny")
    pairs, _ = load_data(DataSpec(kind="pairwise", dataset=str(hh), eval_split="", max_len=1024), tok, log=quiet)
    want = [e["prompt_ids"] for e in pairs]
    assert want == [tok(d, add_special_tokens=False)["input_ids"] for d in dialogues]
    infer(tmp_path, "samples.jsonl", "--eval_task", "generate", "--dataset", str(hh), "--best_of_n", "4",
          "--max_new_tokens", "6")
    spec = batch_inference.data_spec(batch_inference.parser().parse_args(
        ["--eval_task", "rm", "--dataset", str(tmp_path / "samples.jsonl"), "--output_path", "x"]))
    examples, _ = tokenize_answers(read_answers(spec), tok, spec)  # what the labeller scores
    assert [e["prompt_ids"] for e in examples] == [w for w in want for _ in range(4)]
    for name, kind in KINDS.items():
        infer(tmp_path, f"{name}.jsonl", "--eval_task", "rm", "--dataset", str(tmp_path / "samples.jsonl"),
              "--post_processor", name)
        train, _ = load_data(DataSpec(kind=kind, dataset=str(tmp_path / f"{name}.jsonl"), eval_split="",
                                      max_len=1024), tok, log=quiet)
        assert train and all(e["prompt_ids"] in want for e in train), name


def test_ta_prompt_with_the_chat_template_is_the_system_message(tmp_path, capsys):
    tok, path = chat_llama(tmp_path)
    ta = tmp_path / "ta.txt"
    ta.write_text("You are terse.")
    argv = ["--pretrain", path, "--apply_chat_template", "--ta_prompt", str(ta), "--greedy_sampling",
            "--max_new_tokens", "6"]
    assert lifecycle.guarded(lambda: interactive_chat.main(argv, stdin=io.StringIO("what is 1+1?\n"))) == 0
    answer = capsys.readouterr().out.split("quits\n", 1)[1].split("> ")[1]
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "what is 1+1?"}]
    ids = ChatRenderer(tok).prompt_ids(msgs)
    assert tok.decode(ids).startswith("System: You are terse.\nUser: what is 1+1?")
    out = generate_batch(load_for_inference(path, vocab_size=len(tok)), [ids],
                         Sampling(max_new_tokens=6, greedy=True, repetition_penalty=1.2), eos_ids=tok.eos_token_id,
                         pad_id=tok.pad_token_id, seed=0)
    assert answer == tok.decode(out[0][0], skip_special_tokens=True) + "\n"


def test_ta_prompt_refused_by_the_chat_template_is_one_line_before_the_model_loads(tmp_path, monkeypatch):
    import xright.models

    tok, path = chat_llama(tmp_path)
    ta = tmp_path / "ta.txt"
    ta.write_text("You are terse.")
    monkeypatch.setattr(xright.models, "load_for_inference", lambda *a, **k: pytest.fail("the model was loaded"))
    gemma = f"{ROOT}/tests/fixtures/chat_templates/gemma.jinja"  # raises on a system message
    argv = ["--pretrain", path, "--apply_chat_template", "--tokenizer_chat_template", gemma, "--ta_prompt", str(ta)]
    with pytest.raises(lifecycle.UsageError, match=r"--apply_chat_template with --ta_prompt as the system message: "
                                                   r".*System role not supported"):
        interactive_chat.main(argv, stdin=io.StringIO("hi\n"))
    with pytest.raises(lifecycle.UsageError, match="no chat template"):  # no template at all: also before loading
        plain = save_llama(tmp_path / "plain", byte_tokenizer_with_bos())
        interactive_chat.main(["--pretrain", plain, "--apply_chat_template", "--ta_prompt", str(ta)],
                              stdin=io.StringIO("hi\n"))
