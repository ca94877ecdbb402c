"""Reward modules and the router that picks one per task kind.

A reward plugin (a file in ``rewards/``) subclasses :class:`Reward`, declares a
``Config`` dataclass, and registers with ``@register_reward("name")``. It is
batched (``__call__(rollouts)``) so a sandbox can run the programs in parallel,
and offers ``score_one(completion, ground_truth)`` for notebooks.

The router maps each task kind to a weighted sum of rewards, from the Hydra
``reward`` group, e.g. ``{"codegen": {"outcome": {"weight": 1.0}}}``.

Failures never stop a step. A reward that raises on a batch is called again on each
rollout alone, so only the rollouts it cannot score get 0 for it, with
``info[name]["reward_error"]`` (the exception) and ``info[name]["error_origin"]``
(``"sandbox"`` when it was raised inside :mod:`coderlplus.execution`, else ``"reward"``);
a non-finite reward (NaN, inf) counts as a failure too. The trainer counts them in the
``errors/reward`` and ``errors/sandbox`` metrics. Each kind of failure (reward name,
origin, exception type) is logged once per process, with its traceback and the rollout
that caused it; later ones only at debug level.
"""

from __future__ import annotations

import logging
import math
import os
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from coderlplus.registry import REWARDS, ConfigError
from coderlplus.types import RewardOutput, Rollout

log = logging.getLogger(__name__)


@dataclass
class RewardConfig:
    """Options every reward has."""

    weight: float = 1.0
    """Weight of this reward in its task kind's weighted sum."""


class Reward:
    """Base class of reward plugins."""

    Config: ClassVar[type] = RewardConfig
    registry_name: ClassVar[str | None] = None

    def __init__(self, cfg: Any = None, sandbox: Any = None):
        self.cfg = cfg if cfg is not None else self.Config()
        self.sandbox = sandbox

    def __call__(self, rollouts: list[Rollout]) -> list[RewardOutput]:
        raise NotImplementedError

    def score_one(self, completion: str, ground_truth: dict[str, Any]) -> float:
        """Score one completion against a task payload (for notebooks and tests)."""
        raise NotImplementedError


class RewardRouter:
    """Scores a mixed batch: each rollout gets the weighted sum of its task kind's rewards."""

    def __init__(self, spec: Mapping[str, Mapping[str, Mapping[str, Any]]], sandbox: Any = None):
        self.by_kind: dict[str, list[tuple[str, Reward]]] = {}
        for kind, rewards in spec.items():
            if not rewards:
                raise ConfigError(f"reward.{kind}: no reward given for task kind {kind!r}")
            entries = []
            for name, opts in rewards.items():
                cls = REWARDS.get(name)
                cfg = REWARDS.make_config(name, dict(opts or {}), where=f"reward.{kind}.{name}")
                entries.append((name, cls(cfg, sandbox=sandbox)))
            self.by_kind[kind] = entries
        self._logged: set[tuple[str, str, str]] = set()  # failures already logged with a traceback

    def __call__(self, rollouts: list[Rollout]) -> list[RewardOutput]:
        out = [RewardOutput(0.0, {}) for _ in rollouts]
        by_kind: dict[str, list[int]] = {}
        for i, r in enumerate(rollouts):
            by_kind.setdefault(r.task.kind, []).append(i)
        for kind, idx in by_kind.items():
            if kind not in self.by_kind:
                raise ConfigError(
                    f"no reward configured for task kind {kind!r}; configured kinds: {sorted(self.by_kind)}. "
                    f"Add one under reward.{kind}."
                )
            subset = [rollouts[i] for i in idx]
            for name, reward in self.by_kind[kind]:
                scores = self._safe_call(name, reward, subset)
                for i, s in zip(idx, scores):
                    out[i].reward += reward.cfg.weight * s.reward
                    out[i].info[name] = s.info | {"reward": s.reward}
        return out

    def _safe_call(self, name: str, reward: Reward, rollouts: list[Rollout]) -> list[RewardOutput]:
        """``reward(rollouts)``; if the batch call fails, one call per rollout, failures scoring 0."""
        try:
            scores = reward(rollouts)
            if len(scores) != len(rollouts):
                raise RuntimeError(f"returned {len(scores)} scores for {len(rollouts)} rollouts")
        except Exception as e:  # a broken reward must not kill the run: find the rollouts it cannot score
            if len(rollouts) == 1:
                return [self._failed(name, rollouts[0], e, traceback.format_exc())]
            return [self._safe_call(name, reward, [r])[0] for r in rollouts]
        return [self._checked(name, s, r) for s, r in zip(scores, rollouts)]

    def _checked(self, name: str, score: Any, rollout: Rollout) -> RewardOutput:
        """``score`` if it is a RewardOutput with a finite reward and a dict info, else a failure."""
        if not isinstance(score, RewardOutput) or not isinstance(score.info, dict):
            return self._failed(name, rollout, TypeError(f"returned {score!r:.100}, not a RewardOutput"), "")
        try:
            finite = math.isfinite(float(score.reward))
        except (TypeError, ValueError, OverflowError):
            finite = False
        if not finite:
            return self._failed(name, rollout, ValueError(f"non-finite reward {score.reward!r:.100}"), "")
        return score

    def _failed(self, name: str, rollout: Rollout, error: BaseException, tb: str) -> RewardOutput:
        origin = "sandbox" if tb and _raised_in(error, _EXECUTION_DIR) else "reward"
        key = (name, origin, type(error).__name__)
        if key not in self._logged:
            self._logged.add(key)
            log.error(
                "reward %r could not score a rollout (task %s, kind %s): %s: %s; it scores 0 and the step "
                "goes on (counted in errors/%s; further %s errors are logged at debug level).\n"
                "completion (first 300 chars): %r\n%s",
                name, rollout.task.id, rollout.task.kind, type(error).__name__, error, origin,
                type(error).__name__, str(rollout.completion)[:300], tb,
            )  # fmt: skip
        else:
            log.debug(
                "reward %r failed on task %s: %s: %s", name, rollout.task.id, type(error).__name__, error
            )
        return RewardOutput(
            0.0, {"reward_error": f"{type(error).__name__}: {error}"[:500], "error_origin": origin}
        )


_EXECUTION_DIR = str(Path(__file__).resolve().parent / "execution") + os.sep


def _raised_in(error: BaseException, folder: str) -> bool:
    """Whether the innermost frame of ``error``'s traceback is a file under ``folder``."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return str(Path(tb.tb_frame.f_code.co_filename).resolve()).startswith(folder)
