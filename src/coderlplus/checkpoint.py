"""Checkpoints: model + tokenizer (``save_pretrained``), optimiser, scheduler, RNG and step.

Layout: ``<run_dir>/checkpoints/step_000040/`` holding ``model/`` (loadable by
``from_pretrained`` and by ``model=hf model.path=...``), ``optimizer.pt``,
``scheduler.pt``, ``rng.pt``, ``state.json`` and, when used, ``alignment.json`` (the
alignment buffer) and ``critic.pt`` (PPO's value model). Written to a temporary folder
and renamed, so a crash mid-save never leaves a half checkpoint; the last
``keep_last`` are kept.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "step_"


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(
    run_dir: Path,
    step: int,
    model,
    tokenizer,
    optimizer,
    scheduler,
    state: dict[str, Any],
    keep_last: int = 2,
    extra_json: dict[str, Any] | None = None,
    extra_torch: dict[str, Any] | None = None,
) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    for name, value in (extra_json or {}).items():  # e.g. alignment.json: the alignment buffer
        (tmp / f"{name}.json").write_text(json.dumps(value))
    for name, value in (extra_torch or {}).items():  # e.g. critic.pt: PPO's value model and its optimiser
        torch.save(value, tmp / f"{name}.pt")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimiser, scheduler and RNG in place; return ``state.json``."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = sorted((path / "model").glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{path}/model holds no *.safetensors weights: not a coderlplus checkpoint")
    state_dict: dict[str, torch.Tensor] = {}
    for w in weights:
        state_dict.update(load_file(w))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}"
        )
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())
