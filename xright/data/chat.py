"""Chat templates at token level: messages -> (prompt ids, answer ids), the one rendering every caller uses. A
record that breaks the rules of docs/data.md is refused (a BadRecord), never cut at a shifted boundary.
"""

from __future__ import annotations

import os

from .records import BadRecord

SENTINEL = "xright-answer-5f3a"
NO_TEMPLATE = ("the tokenizer has no chat template, needed for chat messages and --apply_chat_template; pass one "
               "with --tokenizer_chat_template (Jinja text or a file) or use --input_template")


def template_text(value: str) -> str:
    """``--tokenizer_chat_template``: the Jinja text itself, or the path of a file holding it."""
    path = os.path.expanduser(value)
    if "{" not in value and os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return value


def _short(text: str, n: int = 40) -> str:
    """The end of a rendered text (where a boundary fault shows)."""
    return repr(text) if len(text) <= n else "…" + repr(text[-n:])


class ChatRenderer:
    """Renders and tokenises conversations with ``tokenizer``'s chat template (docs/data.md)."""

    def __init__(self, tokenizer, field: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise BadRecord(NO_TEMPLATE, field)
        self.tok = tokenizer
        self.special = set(getattr(tokenizer, "all_special_ids", None) or []) | {
            int(i) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
            if getattr(t, "special", False)}
        self.eos = tokenizer.eos_token_id
        self._blank: dict[int, bool] = {}

    def render(self, messages: list[dict], generation: bool, field: str | None = None) -> str:
        try:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception as e:  # jinja's raise_exception (unsupported role, order …) or a template error
            raise BadRecord(f"the chat template fails on it: {type(e).__name__}: {e}", field) from None

    def ids(self, texts: list[str]) -> list[list[int]]:
        return [list(x) for x in self.tok(texts, add_special_tokens=False, verbose=False)["input_ids"]]

    def ends_turn(self, answer: list[int]) -> bool:
        """Whether the template closed the answer: a special token among its trailing special/blank tokens."""
        for i in reversed(answer):
            if i in self.special:
                return True
            if i not in self._blank:
                self._blank[i] = not self.tok.decode([i]).strip()
            if not self._blank[i]:
                return False
        return False

    def _check_prefix(self, p_text: str, p: list[int], w_text: str, w: list[int], field) -> None:
        if not w_text.startswith(p_text):
            n = next((i for i, (a, b) in enumerate(zip(p_text, w_text)) if a != b), min(len(p_text), len(w_text)))
            raise BadRecord(f"the chat template renders the prompt (with the generation prompt) as "
                            f"{_short(p_text[:n + 20])} but the conversation as {_short(w_text[:n + 20])}: the prompt "
                            "is not a prefix of the conversation, so the answer's boundary is undefined", field)
        if w[:len(p)] != p:
            n = next((i for i, (a, b) in enumerate(zip(p, w)) if a != b), min(len(p), len(w)))
            raise BadRecord(f"the prompt's tokens are not a prefix of the conversation's: token {n} is "
                            f"{self.tok.decode(p[n:n + 1])!r} in the prompt but {self.tok.decode(w[n:n + 1])!r} in "
                            "the conversation (the tokenizer merges across the end of the generation prompt)", field)

    def _check_generation_prompt(self, prompt: list[dict], p_text: str, field) -> None:
        """A template that ignores add_generation_prompt must put nothing but whitespace between the prompt and
        the answer's text (Mistral's ``[/INST]`` is its own cue); found with a sentinel answer."""
        if self.render(prompt, False, field) != p_text:
            return
        w_text = self.render(prompt + [{"role": "assistant", "content": SENTINEL}], False, field)
        at = w_text.find(SENTINEL, len(p_text)) if w_text.startswith(p_text) else -1
        if at > 0 and w_text[len(p_text):at].strip():
            raise BadRecord(f"the chat template has no generation prompt (add_generation_prompt changes nothing) and "
                            f"renders {w_text[len(p_text):at]!r} before the assistant's answer, which would be trained "
                            "as part of the answer; use a template that supports add_generation_prompt", field)

    def encode(self, prompt: list[dict], answers: list[list[dict]], fields: list[str | None] | None = None,
               mask_roles: bool = False) -> tuple[list[int], list[list[int]], list[list[int] | None]]:
        """(prompt ids, [K answer ids], [K masks or None]); each answer ends with its end of turn (or eos).
        ``fields`` name the answers for errors; ``mask_roles``: a mask (1 = trained) keeps assistant turns only."""
        fields = fields or [None] * len(answers)
        p_text = self.render(prompt, True, fields[0])
        w_texts = [self.render(prompt + a, False, f) for a, f in zip(answers, fields)]
        p, *ws = self.ids([p_text, *w_texts])
        self._check_generation_prompt(prompt, p_text, fields[0])
        outs, masks = [], []
        for a, f, w_text, w in zip(answers, fields, w_texts, ws):
            self._check_prefix(p_text, p, w_text, w, f)
            if mask_roles and any(m["role"] != "assistant" for m in a):
                ids, mask = self._turns(prompt, a, p, w, f)
            else:
                ids, mask = w[len(p):], None
                if not self.ends_turn(ids):
                    ids = ids + [self.eos]
            if not ids or mask is not None and not any(mask):
                raise BadRecord("the chat template renders nothing for the answer", f)
            outs.append(ids)
            masks.append(mask)
        return p, outs, masks

    def _turns(self, prompt, answer, p, whole, field) -> tuple[list[int], list[int]]:
        """Answer ids and mask: assistant turns trained (each closed by eos where the template renders no
        end of turn), the other turns masked."""
        msgs = prompt + answer
        ids, mask, pos = [], [], len(p)
        for i in range(len(prompt), len(msgs)):
            if msgs[i]["role"] != "assistant":
                continue
            s_text = self.render(msgs[:i], True, field)
            e_text = self.render(msgs[:i + 1], False, field)
            s, e = self.ids([s_text, e_text])
            if whole[:len(s)] != s:
                raise BadRecord(f"the chat template's generation prompt for assistant turn {i} ("
                                f"{_short(s_text)}) is not a token prefix of the whole conversation", field)
            end = len(s)
            while end < min(len(e), len(whole)) and e[end] == whole[end]:
                end += 1
            if end <= len(s):
                raise BadRecord(f"the chat template renders nothing for assistant turn {i} inside the whole "
                                "conversation", field)
            ids += whole[pos:len(s)]
            mask += [0] * (len(s) - pos)
            turn = whole[len(s):end] + ([] if self.ends_turn(whole[len(s):end]) else [self.eos])
            ids += turn
            mask += [1] * len(turn)
            pos = end
        ids += whole[pos:]
        mask += [0] * (len(whole) - pos)
        return ids, mask

    def prompt_ids(self, prompt: list[dict], field: str | None = None) -> list[int]:
        """A generation prompt's ids: the prompt rendered with the generation prompt, no special tokens added."""
        return self.ids([self.render(prompt, True, field)])[0]
