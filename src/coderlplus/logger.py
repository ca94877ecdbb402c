"""Run logging: ``metrics.jsonl`` in the run directory (always) and Weights & Biases.

W&B runs ``online`` when an API key is configured, ``offline`` otherwise
(sync later with ``wandb sync <run_dir>/wandb/offline-run-*``), and honour
``$WANDB_MODE`` (tests set ``disabled``). The full resolved config is attached.

Resume: a checkpoint records how many lines ``metrics.jsonl`` had when it was written
(:attr:`RunLogger.lines`); resuming cuts the file back to that many lines
(:func:`truncate_metrics`), so the rows of steps after the checkpoint, which the resumed
run logs again, are neither lost nor duplicated. The W&B run id is recorded too, and a
resumed run continues the same W&B run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from coderlplus.config import LoggerConfig

log = logging.getLogger(__name__)


def _wandb_mode(cfg: LoggerConfig) -> str:
    if cfg.wandb_mode != "auto":
        return cfg.wandb_mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (Path.home() / ".netrc").exists()
    return "online" if has_key else "offline"


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # keep NaN/inf visible without breaking strict JSON readers
    return v


def truncate_metrics(path: Path, lines: int) -> int:
    """Keep the first ``lines`` complete lines of a metrics file; return how many were cut off
    (a partial last line, written when the run was killed, counts as one)."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    pos = 0
    for _ in range(lines):
        nl = data.find(b"\n", pos)
        if nl < 0:
            break
        pos = nl + 1
    tail = data[pos:]
    if tail:
        with path.open("r+b") as f:
            f.truncate(pos)
    return tail.count(b"\n") + (0 if tail.endswith(b"\n") or not tail else 1)


def count_lines(path: Path) -> int:
    path = Path(path)
    return path.read_bytes().count(b"\n") if path.exists() else 0


class RunLogger:
    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        full_config: dict[str, Any],
        resume_id: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.lines = count_lines(self.metrics_path)
        """Complete lines in metrics.jsonl (a checkpoint records it; resume truncates to it)."""
        self._file = self.metrics_path.open("a")
        self.wandb_run = None
        mode = _wandb_mode(cfg)
        name = cfg.name or self.run_dir.name
        # What this run is called where (read by experiment analyses, and by people).
        (self.run_dir / "logger.json").write_text(
            json.dumps({"name": name, "group": cfg.group, "tags": list(cfg.tags), "wandb_mode": mode})
        )
        if mode != "disabled":
            try:
                import wandb

                self.wandb_run = wandb.init(
                    project=cfg.project,
                    name=name,
                    group=cfg.group,
                    tags=list(cfg.tags) or None,
                    config=full_config,
                    dir=str(self.run_dir),
                    mode=mode,
                    reinit="finish_previous",
                    **({"id": resume_id, "resume": "allow"} if resume_id else {}),
                )
            except Exception as e:  # logging must never kill a run
                log.warning("W&B init failed (%s); continuing with metrics.jsonl only", e)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.lines += 1
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    @property
    def run_id(self) -> str | None:
        """The W&B run id (None without W&B)."""
        return self.wandb_run.id if self.wandb_run is not None else None

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = v

    def close(self) -> None:
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


class NullLogger:
    """What ranks other than 0 log to under ``distributed=ddp|fsdp2``: nothing (rank 0 logs the run)."""

    lines = 0
    run_id = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass
