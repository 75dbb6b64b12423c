"""Chat with a model in the terminal: multi-turn history, answers streamed token by token.

    python -m xright.cli.interactive_chat --pretrain ./ckpt/sft --greedy_sampling

Type a message and Enter. ``clear`` forgets the conversation, ``exit`` (or Ctrl-D / Ctrl-C) quits. The
conversation is rendered as the trainers render a prompt: the chat template over all turns
(``--apply_chat_template``), else ``--input_template`` with each user text, the answer and a newline.
``--ta_prompt FILE`` goes in front (as XRIGHT), as the system message under the chat template (XRIGHT drops it
there; a template that refuses it is an error before the model loads). The oldest turns are dropped to fit
``--max_len`` (one message still too long keeps its BOS and its end). An answer ends at the tokenizer's eos
or at any eos id of the model's generation config."""

import argparse
import sys
from pathlib import Path

from xright.cli import lifecycle
from xright.cli.batch_inference import add_generation_flags, model_for, tokenizer_for

def parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generation_flags(p, "policy: HF dir, hub id or xright LoRA adapter dir; default: built-in tiny model")
    p.set_defaults(max_new_tokens=512, top_p=0.9, temperature=0.2, repetition_penalty=1.2)
    p.add_argument("--max_len", type=int, default=2048, help="conversation + answer tokens")
    p.add_argument("--ta_prompt", type=str, default=None,
                   help="file whose text precedes the conversation (the system message with --apply_chat_template)")
    return p


def streamer(tokenizer, stop: list[int]):
    """transformers' ``TextStreamer`` (prints the answer as it is generated) without the eos that ends it: an eos
    id of the model's generation config need not be a special token that decoding skips."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def put(self, value):  # generate() puts the prompt first, then each new token
            if not self.next_tokens_are_prompt:
                value = value.new_tensor([t for t in value.reshape(-1).tolist() if t not in stop])
            if value.numel():
                super().put(value)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def render(history: list[tuple[str, str]], user: str, tokenizer, args, preamble: str = "") -> dict:
    """The prompt record for ``user`` after the (user, assistant) turns of ``history``: with the chat template
    the messages (encoded as the trainers encode a conversation's prompt), else the templated text."""
    if args.apply_chat_template:
        msgs = [{"role": "system", "content": preamble}] if preamble else []
        msgs += [m for u, a in history for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
        return {"prompt": msgs + [{"role": "user", "content": user}], "raw_prompt": False}
    fmt = (lambda u: args.input_template.format(u)) if args.input_template else (lambda u: u)
    return {"prompt": preamble + "".join(fmt(u) + a + "\n" for u, a in history) + fmt(user), "raw_prompt": True}


def main(argv=None, stdin=None):
    args = parser().parse_args(argv)
    import torch

    from xright.data import DataError, DataSpec
    from xright.generation import Sampling, encode_prompts, eos_ids, generate_batch

    if args.input_template and "{}" not in args.input_template:
        raise lifecycle.UsageError(f"--input_template must contain '{{}}': {args.input_template!r}")
    try:
        preamble = Path(args.ta_prompt).read_text() if args.ta_prompt else ""
    except OSError as e:
        raise lifecycle.UsageError(f"--ta_prompt {args.ta_prompt}: {e.strerror}") from None
    tokenizer = tokenizer_for(args)
    raw = DataSpec(kind="sft", input_template=None)  # render() has templated the text already
    if args.apply_chat_template:  # the template (and its system message for --ta_prompt) fails now, not at turn 1
        try:
            encode_prompts([render([], "hi", tokenizer, args, preamble)], tokenizer, raw, 0)
        except DataError as e:
            what = " with --ta_prompt as the system message" if preamble else ""
            raise lifecycle.UsageError(f"--apply_chat_template{what}: {e}") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model_for(args, len(tokenizer)).to(device)
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
            if user.strip().lower() in ("exit", "quit"):
                break
            if user.strip().lower() == "clear":
                history = []
                print("(history cleared)", flush=True)
                continue
            if not user.strip():
                continue
            while True:  # drop the oldest turns until the conversation leaves room to answer
                prompt = [render(history, user, tokenizer, args, preamble)]
                ids = encode_prompts(prompt, tokenizer, raw, 0)[0]
                if args.max_len - len(ids) >= min(args.max_new_tokens, 16) or not history:
                    break
                history = history[1:]
            if len(ids) > args.max_len - 1:  # one message alone is too long: keep BOS and its end
                ids = encode_prompts(prompt, tokenizer, raw, args.max_len - 1)[0]
            sampling = Sampling(max_new_tokens=max(1, min(args.max_new_tokens, args.max_len - len(ids))),
                                greedy=args.greedy_sampling, top_p=args.top_p, temperature=args.temperature,
                                repetition_penalty=args.repetition_penalty, seed=args.seed + len(history))
            out = generate_batch(model, [ids], sampling, eos_ids=stop, pad_id=tokenizer.pad_token_id,
                                 seed=sampling.seed, device=device, streamer=streamer(tokenizer, stop))
            answer = tokenizer.decode(out[0][0], skip_special_tokens=True)
            history.append((user, answer))
    except KeyboardInterrupt:
        print(flush=True)


if __name__ == "__main__":
    lifecycle.main_guard(main)
