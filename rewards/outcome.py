"""The outcome reward: does the program pass the task's tests?

For every completion we take the last fenced Python block (:func:`extract_code`)
and check it against every test of its task with :meth:`Sandbox.check_many`: a
stdin/stdout test compares what it prints with the expected output (trailing
whitespace and blank lines at the ends do not matter); an assert test
(``{"code": ...}``, HumanEval style) passes when its asserts hold. All
``(program, test)`` pairs of a batch go to the sandbox in one batch, so they run
in parallel.

Reward:

* ``partial=False`` (default): 1.0 if the program passes every test, else 0.0;
* ``partial=True``: the fraction of tests passed.

A completion without code scores 0 (``status="no_code"``); so does a task without
tests (``status="no_tests"``: nothing can be checked).

``info`` of every rollout::

    {"status": "pass" | "no_code" | "no_tests" | <status of the first failing test>,
     "passed": tests passed, "total": tests of the task,
     "failed_test": index of the first failing test, or None}

where the status of a failing test is ``"wrong"`` (it ran but printed something
else, or an assert failed) or the sandbox's status (``"error"``, ``"timeout"``, ``"memory"``,
``"output_limit"``, ``"killed"``).

Every test is run even after one fails, so ``passed`` is exact; with
``stop_at_first_failure=True`` (only when ``partial`` is false) the first test of
every program is run first (one batch) and the remaining tests only for programs
that passed it (a second batch): much less sandbox time on a batch of wrong or
looping programs, at the price of ``passed`` then counting only the tests that ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from coderlplus.execution import CheckResult, Sandbox, extract_code
from coderlplus.registry import register_reward
from coderlplus.reward import Reward, RewardConfig
from coderlplus.types import RewardOutput, Rollout


@dataclass
class OutcomeConfig(RewardConfig):
    partial: bool = False
    """If true, reward = fraction of tests passed; else 1.0 only when all pass."""
    stop_at_first_failure: bool = False
    """Skip the other tests of a program that fails its first test (ignored when ``partial``)."""


@register_reward("outcome")
class OutcomeReward(Reward):
    Config = OutcomeConfig

    def __call__(self, rollouts: list[Rollout]) -> list[RewardOutput]:
        return self.score([r.completion for r in rollouts], [r.task.payload for r in rollouts])

    def score_one(self, completion: str, ground_truth: dict[str, Any]) -> float:
        return self.score([completion], [ground_truth])[0].reward

    def score(self, completions: list[str], payloads: list[dict[str, Any]]) -> list[RewardOutput]:
        """Score completions against their tasks' payloads (``{"tests": [...]}``)."""
        if self.sandbox is None:
            self.sandbox = Sandbox()  # one per reward instance, reused by every batch
        items = [(extract_code(c), list(p.get("tests") or [])) for c, p in zip(completions, payloads)]
        stop = self.cfg.stop_at_first_failure and not self.cfg.partial
        return [self._judge(check) for check in self.sandbox.check_many(items, stop_at_first_failure=stop)]

    def _judge(self, check: CheckResult) -> RewardOutput:
        if self.cfg.partial:
            reward = check.n_passed / check.n_total if check.n_total and not check.no_code else 0.0
        else:
            reward = 1.0 if check.passed else 0.0
        info = {
            "status": check.status,
            "passed": 0 if check.no_code else check.n_passed,
            "total": check.n_total,
            "failed_test": check.first_failure,
        }
        return RewardOutput(reward, info)
