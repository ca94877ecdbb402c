"""Run logging: ``metrics.jsonl`` in the run directory (always) and Weights & Biases.

W&B runs ``online`` when an API key is configured, ``offline`` otherwise
(sync later with ``wandb sync <run_dir>/wandb/offline-run-*``), and honour
``$WANDB_MODE`` (tests set ``disabled``). The full resolved config is attached.
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


class RunLogger:
    def __init__(self, cfg: LoggerConfig, run_dir: Path, full_config: dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
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
                )
            except Exception as e:  # logging must never kill a run
                log.warning("W&B init failed (%s); continuing with metrics.jsonl only", e)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            for k, v in values.items():
                self.wandb_run.summary[k] = v

    def close(self) -> None:
        self._file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
