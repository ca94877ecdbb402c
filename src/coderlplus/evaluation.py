"""Code-generation evaluation: greedy pass@1 and sampled pass@k with the unbiased estimator.

Independent of the reward plugins: a program passes when it passes every test
of its task (:meth:`Sandbox.check`), whatever reward the run trains with.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coderlplus.execution import extract_code
from coderlplus.sampler.base import Sampler, SamplingParams
from coderlplus.types import Rollout, Task


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c pass (Chen et al. 2021): ``1 - C(n-c, k) / C(n, k)``."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def programs_pass(rollouts: list[Rollout], sandbox) -> list[bool]:
    """Whether each rollout's last python block passes all its task's tests."""
    checks = sandbox.check_many([(extract_code(r.completion), r.task.payload["tests"]) for r in rollouts])
    return [c.passed for c in checks]


@dataclass
class EvalResult:
    pass_at_1: float
    rollouts: list[Rollout]
    passed: list[bool]


def greedy_pass_at_1(sampler: Sampler, tasks: list[Task], sandbox, max_new_tokens: int) -> EvalResult:
    rollouts = sampler.generate(tasks, 1, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    passed = programs_pass(rollouts, sandbox)
    return EvalResult(sum(passed) / max(1, len(passed)), rollouts, passed)


@dataclass
class SampledEvalResult:
    pass_at: dict[int, float]
    """k -> mean unbiased pass@k over the tasks."""
    rollouts: list[Rollout]
    passed: list[bool]


def sampled_pass_at_k(
    sampler: Sampler, tasks: list[Task], sandbox, n: int, ks: list[int], params: SamplingParams
) -> SampledEvalResult:
    """``n`` samples per task (``params``: temperature > 0); pass@k for each ``k <= n`` with the
    unbiased estimator, averaged over tasks."""
    if any(k < 1 or k > n for k in ks):
        raise ValueError(f"every k must be in [1, n={n}], got {ks}")
    rollouts = sampler.generate(tasks, n, params)
    passed = programs_pass(rollouts, sandbox)
    per_task = [sum(passed[i * n : (i + 1) * n]) for i in range(len(tasks))]
    pass_at = {k: float(np.mean([pass_at_k(n, c, k) for c in per_task])) if tasks else 0.0 for k in ks}
    return SampledEvalResult(pass_at, rollouts, passed)
