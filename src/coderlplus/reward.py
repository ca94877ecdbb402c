"""Reward modules and the router that picks one per task kind.

A reward plugin (a file in ``rewards/``) subclasses :class:`Reward`, declares a
``Config`` dataclass, and registers with ``@register_reward("name")``. It is
batched (``__call__(rollouts)``) so a sandbox can run the programs in parallel,
and offers ``score_one(completion, ground_truth)`` for notebooks.

The router maps each task kind to a weighted sum of rewards, from the Hydra
``reward`` group, e.g. ``{"codegen": {"outcome": {"weight": 1.0}}}``.
A reward that raises on a batch scores every rollout of that batch 0 with
``info[name]["reward_error"]`` set (counted in the ``errors/reward`` metric); the step goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
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

    @staticmethod
    def _safe_call(name: str, reward: Reward, rollouts: list[Rollout]) -> list[RewardOutput]:
        try:
            scores = reward(rollouts)
            if len(scores) != len(rollouts):
                raise RuntimeError(f"returned {len(scores)} scores for {len(rollouts)} rollouts")
            return scores
        except Exception as e:  # a broken reward must not kill the run
            log.exception("reward %r failed on a batch of %d rollouts; scoring them 0", name, len(rollouts))
            return [RewardOutput(0.0, {"reward_error": f"{type(e).__name__}: {e}"}) for _ in rollouts]
