"""Checkpoints: model + tokenizer (``save_pretrained``), optimiser, scheduler, RNG and step.

Layout: ``<run_dir>/checkpoints/step_000040/`` holding ``model/`` (loadable by
``from_pretrained`` and by ``model=hf model.path=...``), ``optimizer.pt``,
``scheduler.pt``, ``rng.pt`` (python, numpy, torch and CUDA generators), ``state.json``
(step, data position, metrics state, ...) and, when used, ``alignment.json`` (the
alignment buffer) and ``critic.pt`` (PPO's value model).

Sharded checkpoints (``distributed.checkpoint=sharded``, the default for ``fsdp2``): instead
of ``optimizer.pt`` (and ``critic.pt``), ``dcp/`` holds the trained modules' weights and
optimiser states as ``torch.distributed.checkpoint`` (DCP) shards, each rank writing its
own (``dcp/.metadata``, ``dcp/__<rank>_0.distcp``); nothing is gathered onto one rank.
DCP reshards on load, so any world size resumes it, one plain process included.
``model/`` is still written (by rank 0, from the full copy of the policy every rank keeps
for sampling), so ``from_pretrained`` and ``coderlplus-eval`` read either kind. One file
of the whole training state: ``python -m torch.distributed.checkpoint.format_utils
dcp_to_torch <step>/dcp state.pt``.

Crash safety: a checkpoint is written to ``.tmp-step_N/``, every file is fsynced, and
the folder is renamed into place (by rank 0, after every rank has written its shards),
so a crash (or SIGKILL) mid-save never leaves a half checkpoint under a ``step_*`` name;
a failed write (a full disk, on any rank) removes the temporary folder and raises
:class:`CheckpointError` on every rank, leaving the previous checkpoints untouched. Kept:
the last ``keep_last`` plus, with ``best_metric``, the one with the highest value of that
metric in its ``state.json["eval"]`` (validation pass@1).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

PREFIX = "step_"
REQUIRED_FILES = ("state.json", "scheduler.pt", "rng.pt", "model/config.json")
"""What a complete checkpoint folder holds (``model/`` also holds ``*.safetensors``, and there is
``optimizer.pt`` or, sharded, ``dcp/.metadata``)."""
SHARDED_DIR = "dcp"
"""The folder of a sharded checkpoint's DCP shards."""


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
    sharded: dict[str, Any] | None = None,
    comm=None,
) -> Path:
    """Write ``checkpoints/step_<step>/`` atomically and prune old ones; return its path.

    ``optimizer``: an object with ``state_dict()`` or that state dict, written as ``optimizer.pt``
    (None with ``sharded``). ``sharded``: DCP entries (e.g. ``{"policy": TrainState(...)}``) every
    rank writes into ``dcp/``. With several ranks every rank calls this function and ``comm`` (a
    :class:`coderlplus.distributed.Strategy`) says which is rank 0, who writes everything else.

    Raises :class:`CheckpointError` (on every rank) if anything cannot be written (e.g. the disk is
    full): the temporary folder is removed and every earlier checkpoint is left as it was.
    """
    comm = comm or _OneProcess()
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{final.name}"
    failure: BaseException | None = None
    if comm.is_main:
        try:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):  # left by a run killed mid-save
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        except Exception as e:
            failure = e
    # every rank learns whether the folder exists before writing into it
    if _agree(comm, failure) is None and sharded is not None:
        try:
            import torch.distributed.checkpoint as dcp

            writer = dcp.FileSystemWriter(tmp / SHARDED_DIR, sync_files=True)
            with _one_process_is_meant():
                dcp.save(sharded, storage_writer=writer, no_dist=comm.world == 1)
        except (Exception, dcp.api.CheckpointException) as e:  # DCP's is a BaseException
            failure = e
    if comm.is_main and failure is None:
        try:
            _write_files(tmp, step, model, tokenizer, optimizer, scheduler, state, extra_json, extra_torch)
        except Exception as e:
            failure = e
    error = _agree(comm, failure)
    if error is not None:
        if comm.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        comm.barrier()  # the temporary folder is gone before any rank goes on
        if not comm.is_main:
            raise CheckpointError(
                f"could not write checkpoint {final}: {error} (rank 0 says more)"
            ) from failure
        previous = list_checkpoints(run_dir)
        raise CheckpointError(
            f"could not write checkpoint {final}: {error}. "
            + (
                f"The previous checkpoint {previous[-1]} is intact. "
                if previous
                else "No earlier checkpoint exists. "
            )
            + f"Free space under {root} ({_free_mb(root)} MB free now) or point hydra.run.dir elsewhere, "
            "then resume with trainer.resume=auto."
        ) from failure
    if comm.is_main:
        _publish(tmp, final)
        prune_checkpoints(run_dir, keep_last, best_metric)
    comm.barrier()  # published before any rank goes on
    return final


class _OneProcess:
    """The ``comm`` of a single-process save: rank 0 of 1."""

    is_main, world = True, 1

    def barrier(self) -> None:
        pass

    def gather(self, obj: Any) -> list[Any]:
        return [obj]


def _agree(comm, failure: BaseException | None) -> str | None:
    """Every rank's failure, gathered: the first one as text (``rank r: Type: message``), or None."""
    mine = None if failure is None else _describe(failure)
    for rank, error in enumerate(comm.gather(mine)):
        if error is not None:
            return error if comm.world == 1 or error.startswith("rank ") else f"rank {rank}: {error}"
    return None


def _describe(failure: BaseException) -> str:
    """``Type: message`` of an error; for DCP's, of the first rank's that failed (``rank r: ...``)."""
    failures = getattr(failure, "failures", None)  # torch.distributed.checkpoint's CheckpointException
    if isinstance(failures, dict) and failures:
        rank, (exc, _trace) = min(failures.items())
        inner = f"{type(exc).__name__}: {exc}"
        return f"rank {rank}: {inner}" if rank or _dist_world() > 1 else inner
    return f"{type(failure).__name__}: {failure}"


def _dist_world() -> int:
    """The process group's size (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _write_files(tmp, step, model, tokenizer, optimizer, scheduler, state, extra_json, extra_torch) -> None:
    """Rank 0's part of a checkpoint: the weights for ``from_pretrained``, optimiser, scheduler, RNG, state."""
    model.save_pretrained(tmp / "model")
    tokenizer.save_pretrained(tmp / "model")
    if optimizer is not None:
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / "rng.pt")
    for name, value in (extra_json or {}).items():  # e.g. alignment.json: the alignment buffer
        (tmp / f"{name}.json").write_text(json.dumps(value))
    for name, value in (extra_torch or {}).items():  # e.g. critic.pt: PPO's value model and its optimiser
        torch.save(value, tmp / f"{name}.pt")
    # state.json last: a folder without it is incomplete (see is_complete)
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=2))
    _fsync_tree(tmp)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the complete temporary folder into place."""
    if final.exists():  # the same step saved again (e.g. a resumed run's last step): swap, never delete first
        old = final.parent / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    _fsync_dir(final.parent)


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
    if not (path / "optimizer.pt").exists() and not is_sharded(path):
        missing.append(f"optimizer.pt (or {SHARDED_DIR}/.metadata)")
    return missing


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint holds its training state as DCP shards (``dcp/``)."""
    return (Path(path) / SHARDED_DIR / ".metadata").exists()


def sharded_keys(path: Path) -> set[str]:
    """The top-level entries of a sharded checkpoint's DCP state (e.g. ``{"policy", "critic"}``)."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(Path(path) / SHARDED_DIR).read_metadata()
    return {key.split(".", 1)[0] for key in metadata.state_dict_metadata}


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


def load_checkpoint(
    path: Path, model, optimizer, scheduler, sharded: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Restore weights, optimiser, scheduler and RNG in place; return ``state.json``.

    ``model`` gets ``model/``'s weights. A full checkpoint's ``optimizer.pt`` goes to ``optimizer``;
    a sharded one's ``dcp/`` to the DCP entries ``sharded`` names (every rank calls this then; DCP
    reshards the saved tensors to the live ones, whatever the world size).
    """
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
    if is_sharded(path):
        if sharded is None:
            raise CheckpointError(f"{path} is sharded ({SHARDED_DIR}/): pass the DCP entries to load it into")
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        no_dist = not (dist.is_available() and dist.is_initialized())
        with _one_process_is_meant():
            dcp.load(sharded, storage_reader=dcp.FileSystemReader(path / SHARDED_DIR), no_dist=no_dist)
    else:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(path / "rng.pt", weights_only=False))
    return json.loads((path / "state.json").read_text())


@contextlib.contextmanager
def _one_process_is_meant():
    """Silence DCP's warning that it saves or loads in a single process (without a process group)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninit")
        yield


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
