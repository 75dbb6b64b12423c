"""Chat with a model in the terminal: multi-turn history, answers streamed token by token.

    python -m xright.cli.interactive_chat --pretrain ./ckpt/sft --greedy_sampling

Type a message and Enter. ``clear`` forgets the conversation, ``exit`` (or Ctrl-D / Ctrl-C) quits.
The conversation is rendered as the trainers render a prompt: with ``--apply_chat_template`` the
tokenizer's chat template over all turns; otherwise each turn is ``--input_template`` with the user's
text, followed by the model's answer and a newline. ``--ta_prompt FILE`` puts that file's text in front of
the conversation (as XRIGHT). When the conversation outgrows ``--max_len`` the oldest turns are dropped (a
single message that is still too long keeps its BOS and its end). An answer ends at the tokenizer's eos or
at any eos id of the model's generation config.
"""

import argparse
import sys

from xright.cli import lifecycle

CLEAR, EXIT = "clear", ("exit", "quit")


def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain", type=str, default=None, help="HF dir, hub id or xright LoRA adapter dir; default tiny")
    p.add_argument("--bf16", action="store_true", default=False)
    p.add_argument("--flash_attn", action="store_true", default=False)
    p.add_argument("--load_in_4bit", action="store_true", default=False)
    p.add_argument("--disable_fast_tokenizer", action="store_true", default=False)
    p.add_argument("--trust_remote_code", action="store_true", default=False)
    p.add_argument("--max_len", type=int, default=2048, help="conversation + answer tokens")
    p.add_argument("--max_new_tokens", type=int, default=512)
    p.add_argument("--greedy_sampling", action="store_true", default=False)
    p.add_argument("--top_p", type=float, default=0.9)
    p.add_argument("--temperature", type=float, default=0.2)
    p.add_argument("--repetition_penalty", type=float, default=1.2)
    p.add_argument("--input_template", type=str, default="User: {}\nAssistant: ", help="'' for none")
    p.add_argument("--apply_chat_template", action="store_true", default=False)
    p.add_argument("--tokenizer_chat_template", type=str, default=None)
    p.add_argument("--ta_prompt", type=str, default=None, help="file whose text precedes the conversation")
    p.add_argument("--seed", type=int, default=42)
    return p


class Streamer:
    """Prints the answer as it is generated (transformers' ``TextStreamer``), without the eos that ends it: an
    eos id of the model's generation config need not be a special token that decoding skips."""

    def __init__(self, tokenizer, stop: list[int]):
        from transformers import TextStreamer

        self.text = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stop, self.prompt = set(stop), True

    def put(self, value):  # generate() puts the prompt first, then each new token
        if self.prompt:
            self.prompt = False
            return self.text.put(value)
        keep = [t for t in value.reshape(-1).tolist() if t not in self.stop]
        if keep:
            self.text.put(value.new_tensor(keep))

    def end(self):
        self.text.end()


def render(history: list[tuple[str, str]], user: str, tokenizer, args, preamble: str = "") -> str:
    """The prompt text for ``user`` after the (user, assistant) turns of ``history``."""
    if args.apply_chat_template:
        msgs = [m for u, a in history for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
        text = tokenizer.apply_chat_template(msgs + [{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        fmt = (lambda u: args.input_template.format(u)) if args.input_template else (lambda u: u)
        text = "".join(fmt(u) + a + "\n" for u, a in history) + fmt(user)
    return preamble + text


def main(argv=None, stdin=None):
    args = parser().parse_args(argv)
    import torch

    from xright.generation import Sampling, encode_prompts, eos_ids, generate_batch
    from xright.data import DataSpec
    from xright.models import load_for_inference, load_tokenizer

    if args.input_template and "{}" not in args.input_template:
        raise lifecycle.UsageError(f"--input_template must contain '{{}}': {args.input_template!r}")
    preamble = ""
    if args.ta_prompt:
        try:
            with open(args.ta_prompt) as f:
                preamble = f.read()
        except OSError as e:
            raise lifecycle.UsageError(f"--ta_prompt {args.ta_prompt}: {e.strerror}") from None
    tokenizer = load_tokenizer(args.pretrain, use_fast=not args.disable_fast_tokenizer,
                               trust_remote_code=args.trust_remote_code, chat_template=args.tokenizer_chat_template)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_for_inference(args.pretrain, bf16=args.bf16, flash_attn=args.flash_attn, load_in_4bit=args.load_in_4bit,
                               trust_remote_code=args.trust_remote_code, vocab_size=len(tokenizer)).to(device)
    raw = DataSpec(kind="sft", input_template=None)  # render() has templated the text already
    stop = eos_ids(tokenizer, model)
    stdin = stdin or sys.stdin
    history: list[tuple[str, str]] = []
    print("xright chat: 'clear' forgets the conversation, 'exit' or Ctrl-D quits", flush=True)
    try:
        while True:
            print("> ", end="", flush=True)
            line = stdin.readline()
            if not line:  # EOF
                print(flush=True)
                break
            user = line.rstrip("\n")
            if user.strip().lower() in EXIT:
                break
            if user.strip().lower() == CLEAR:
                history = []
                print("(history cleared)", flush=True)
                continue
            if not user.strip():
                continue
            while True:  # drop the oldest turns until the conversation leaves room to answer
                prompt = [{"prompt": render(history, user, tokenizer, args, preamble), "raw_prompt": True}]
                ids = encode_prompts(prompt, tokenizer, raw, 0)[0]
                room = args.max_len - len(ids)
                if room >= min(args.max_new_tokens, 16) or not history:
                    break
                history = history[1:]
            if len(ids) > args.max_len - 1:  # one message alone is too long: keep BOS and its end
                ids = encode_prompts(prompt, tokenizer, raw, args.max_len - 1)[0]
            sampling = Sampling(max_new_tokens=max(1, min(args.max_new_tokens, args.max_len - len(ids))),
                                greedy=args.greedy_sampling, top_p=args.top_p, temperature=args.temperature,
                                repetition_penalty=args.repetition_penalty, seed=args.seed + len(history))
            streamer = Streamer(tokenizer, stop)
            out = generate_batch(model, [ids], sampling, eos_ids=stop, pad_id=tokenizer.pad_token_id,
                                 seed=sampling.seed, device=device, streamer=streamer)
            answer = tokenizer.decode(out[0][0], skip_special_tokens=True)
            history.append((user, answer))
    except KeyboardInterrupt:
        print(flush=True)


if __name__ == "__main__":
    lifecycle.main_guard(main)
