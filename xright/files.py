"""Files written so that a crash never leaves half of one: atomic writes, model saves, checkpoint pruning."""

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


def publish(tmp: str, path: str) -> None:
    """Move a finished save from ``tmp`` into ``path``, which may hold other files (metrics).

    The files that make a directory look like a model (config.json, adapter_config.json) are
    removed first and moved in last, so a crash in between leaves no model that looks complete.
    """
    for name in MARKERS:
        if os.path.exists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    for name in sorted(os.listdir(tmp), key=lambda n: n in MARKERS):
        dst = os.path.join(path, name)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(tmp, name), dst)


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
