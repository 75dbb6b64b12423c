"""Metrics sinks: JSONL file, wandb, tensorboard. Rank 0 only. The only module importing wandb/tb."""

from __future__ import annotations

import json
import os

from xright.files import atomic_write


class MetricsLogger:
    """One JSON object per line in ``<save_path>/metrics.jsonl`` (appended to with ``resume``), mirrored to
    wandb/tensorboard."""

    def __init__(self, save_path: str, enabled: bool, *, resume: bool = False, wandb: dict | None = None,
                 tensorboard_dir: str | None = None, config: dict | None = None):
        self.enabled = enabled
        self.path = os.path.join(save_path, "metrics.jsonl")
        self._wandb = self._tb = None
        if not enabled:
            return
        os.makedirs(save_path, exist_ok=True)
        self._file = open(self.path, "a" if resume else "w", buffering=1)
        if wandb is not None:
            import wandb as wandb_module

            if wandb["key"] and os.environ.get("WANDB_MODE") != "offline":
                wandb_module.login(key=wandb["key"], relogin=True)
            self._wandb = wandb_module.init(entity=wandb["entity"], project=wandb["project"], group=wandb["group"],
                                            name=wandb["name"], config=config or {},
                                            resume="allow" if resume else None, reinit=True)
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tensorboard_dir)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        step = record.get("step")
        if self._wandb is not None:
            self._wandb.log(numbers, step=step)
        if self._tb is not None:
            for key, value in numbers.items():
                if key != "step":
                    self._tb.add_scalar(key, value, step)

    def truncate(self, step: int) -> None:
        """On resume: keep the records up to ``step`` (what the checkpoint has seen) and go on appending."""
        if not self.enabled:
            return
        self._file.close()
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step
                    and not {"final", "done"} & set(json.loads(line))]
        atomic_write(self.path, "".join(keep))
        self._file = open(self.path, "a", buffering=1)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self._tb is not None:
            self._tb.close()


def wandb_settings(use_wandb: str | None, org: str | None, group: str | None, project: str,
                   run_name: str) -> dict | None:
    """``--use_wandb <token>`` or ``--use_wandb True``: the key from ``WANDB_API_KEY`` when set, else from the flag;
    kept out of every printed or saved config (the caller must drop ``use_wandb`` from what it dumps)."""
    if not use_wandb or use_wandb.lower() in ("false", "0", "no", "none"):
        return None
    key = os.environ.get("WANDB_API_KEY")
    if not key and use_wandb.lower() not in ("true", "1", "yes"):
        key = use_wandb
    return {"key": key, "entity": org, "group": group, "project": project, "name": run_name}
