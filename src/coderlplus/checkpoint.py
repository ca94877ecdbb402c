"""Checkpoints: model + tokenizer (``save_pretrained``), optimiser, scheduler, RNG and step.

Layout: ``<run_dir>/checkpoints/step_000040/`` holding ``model/`` (loadable by
``from_pretrained`` and by ``model=hf model.path=...``), ``optimizer.pt``,
``scheduler.pt``, ``rng.pt`` (python, numpy, torch and CUDA generators), ``state.json``
(step, data position, metrics state, ...) and, when used, ``alignment.json`` (the
alignment buffer) and ``critic.pt`` (PPO's value model).

Crash safety: a checkpoint is written to ``.tmp-step_N/``, every file is fsynced, and
the folder is renamed into place, so a crash (or SIGKILL) mid-save never leaves a
half checkpoint under a ``step_*`` name; a failed write (a full disk) removes the
temporary folder and raises :class:`CheckpointError`, leaving the previous checkpoints
untouched. Kept: the last ``keep_last`` plus, with ``best_metric``, the one with the
highest value of that metric in its ``state.json["eval"]`` (validation pass@1).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

PREFIX = "step_"
REQUIRED_FILES = ("state.json", "optimizer.pt", "scheduler.pt", "rng.pt", "model/config.json")
"""What a complete checkpoint folder holds (``model/`` also holds ``*.safetensors``)."""


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says what is still safe and what to do."""


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    best_metric: str | None = None,
) -> Path:
    """Write ``checkpoints/step_<step>/`` atomically and prune old ones; return its path.

    Raises :class:`CheckpointError` if anything cannot be written (e.g. the disk is full): the
    temporary folder is removed and every earlier checkpoint is left as it was.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}"
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir()
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        for name, value in (extra_json or {}).items():  # e.g. alignment.json: the alignment buffer
            (tmp / f"{name}.json").write_text(json.dumps(value))
        for name, value in (extra_torch or {}).items():  # e.g. critic.pt: PPO's value model and its optimiser
            torch.save(value, tmp / f"{name}.pt")
        # state.json last: a folder without it is incomplete (see is_complete)
        (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        _fsync_tree(tmp)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(run_dir)
        raise CheckpointError(
            f"could not write checkpoint {final}: {type(e).__name__}: {e}. "
            + (
                f"The previous checkpoint {previous[-1]} is intact. "
                if previous
                else "No earlier checkpoint exists. "
            )
            + f"Free space under {root} ({_free_mb(root)} MB free now) or point hydra.run.dir elsewhere, "
            "then resume with trainer.resume=auto."
        ) from e
    if final.exists():  # the same step saved again (e.g. a resumed run's last step): swap, never delete first
        old = root / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(root)
    prune_checkpoints(run_dir, keep_last, best_metric)
    return final


def prune_checkpoints(run_dir: Path, keep_last: int, best_metric: str | None = None) -> list[Path]:
    """Delete all checkpoints but the last ``keep_last`` and the best by ``best_metric``; return the kept."""
    found = list_checkpoints(run_dir)
    keep = set(found[-keep_last:])
    best = best_checkpoint(run_dir, best_metric) if best_metric else None
    if best is not None:
        keep.add(best)
    for old in found:
        if old not in keep:
            shutil.rmtree(old, ignore_errors=True)
    return sorted(keep)


def best_checkpoint(run_dir: Path, metric: str) -> Path | None:
    """The checkpoint with the highest ``state.json["eval"][metric]`` (the earliest on ties), or None."""
    best, best_value = None, -float("inf")
    for path in list_checkpoints(run_dir):
        value = read_state(path).get("eval", {}).get(metric)
        if isinstance(value, (int, float)) and value > best_value:
            best, best_value = path, value
    return best


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def missing_files(path: Path) -> list[str]:
    """What a checkpoint folder lacks (empty when complete)."""
    path = Path(path)
    missing = [name for name in REQUIRED_FILES if not (path / name).exists()]
    if not list((path / "model").glob("*.safetensors")):
        missing.append("model/*.safetensors")
    return missing


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run; incomplete ones (copied by hand, damaged) are skipped
    with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        missing = missing_files(path)
        if not missing:
            return path
        log.warning("skipping checkpoint %s: it lacks %s", path, ", ".join(missing))
    return None


def read_state(path: Path) -> dict[str, Any]:
    """``state.json`` of a checkpoint ({} if unreadable)."""
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError):
        return {}


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore weights, optimiser, scheduler and RNG in place; return ``state.json``."""
    from safetensors.torch import load_file

    path = Path(path)
    missing_parts = missing_files(path)
    if missing_parts:
        raise CheckpointError(
            f"{path} is not a complete coderlplus checkpoint (missing {', '.join(missing_parts)}); "
            f"pick another folder under {path.parent}, or trainer.resume=auto to take the newest complete one"
        )
    state_dict: dict[str, torch.Tensor] = {}
    for w in sorted((path / "model").glob("*.safetensors")):
        state_dict.update(load_file(w))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}. "
            f"Resume with the model config the run was started with (see {path.parent.parent}/.hydra/config.yaml)"
        )
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())


def _fsync_tree(folder: Path) -> None:
    """Flush every file of ``folder`` (and the folders) to disk, so the rename publishes complete data."""
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems cannot fsync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _free_mb(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free // 2**20
    except OSError:
        return -1
