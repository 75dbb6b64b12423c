"""Files written so that a crash never leaves half of one: atomic writes, model saves, checkpoints."""

from __future__ import annotations

import json
import os
import shutil
import tempfile


def atomic_write(path: str, text: str) -> None:
    """``text`` into ``path`` through a synced temporary file renamed over it."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2))


MARKERS = ("config.json", "adapter_config.json")


def save_model(module, state: dict, tokenizer, path: str, extra_files: dict | None = None) -> None:
    """``module`` (with ``state``), ``tokenizer`` and ``extra_files`` (JSON) saved into ``path`` (which may hold
    other files) through a temporary folder, the ``MARKERS`` of a model removed first and moved in last: a crash in
    between leaves no model that looks complete."""
    os.makedirs(path, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=path, prefix=".model.tmp-")
    try:
        module.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            atomic_write_json(os.path.join(tmp, name), obj)
        for name in MARKERS:
            if os.path.exists(os.path.join(path, name)):
                os.remove(os.path.join(path, name))
        for name in sorted(os.listdir(tmp), key=lambda n: n in MARKERS):
            dst = os.path.join(path, name)
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            os.replace(os.path.join(tmp, name), dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def install_checkpoint(ckpt_dir: str, tmp_tag: str, tag: str, state: dict, max_num: int, max_gb: float) -> None:
    """The engine state DeepSpeed wrote under ``tmp_tag``, with ``xright_state.json``, renamed into ``tag``; then
    the ``latest`` pointer, then pruning: a crash at any moment leaves the previous checkpoint loadable."""
    tmp = os.path.join(ckpt_dir, tmp_tag)
    atomic_write_json(os.path.join(tmp, "xright_state.json"), state)
    final = os.path.join(ckpt_dir, tag)
    old = f"{tmp}.old"  # a ".tmp-global_step" name: pruning removes it if we die before we do
    if os.path.exists(final):  # another run's (or another state's) checkpoint of this step
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)  # two renames, not a removal, between the old and the new one
    os.replace(tmp, final)
    atomic_write(os.path.join(ckpt_dir, "latest"), tag)
    shutil.rmtree(old, ignore_errors=True)
    prune_checkpoints(ckpt_dir, keep=tag, max_num=max_num, max_gb=max_gb)


def prune_checkpoints(ckpt_dir: str, keep: str, max_num: int, max_gb: float) -> None:
    """Drop the oldest checkpoints beyond ``max_num`` / ``max_gb`` (never ``keep``), and stale temporaries."""
    for name in os.listdir(ckpt_dir):
        if name.startswith(".tmp-global_step"):
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)
    tags = sorted((n for n in os.listdir(ckpt_dir) if n.startswith("global_step") and n[11:].isdigit()),
                  key=lambda n: int(n[11:]))
    sizes = {t: sum(os.path.getsize(os.path.join(root, n)) for root, _, names in os.walk(os.path.join(ckpt_dir, t))
                    for n in names) for t in tags}
    while len(tags) > 1 and (len(tags) > max(1, max_num) or sum(sizes.values()) > max_gb * 2**30):
        old = tags.pop(0)
        if old == keep:
            break
        shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)
        sizes.pop(old)
