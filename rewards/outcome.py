"""The outcome reward: does the program pass the task's tests?

For every completion we take the last fenced Python block (:func:`extract_code`),
run it on the input of every test of its task, and compare what it prints with
the expected output (:func:`compare_output`: trailing whitespace and blank lines
at the ends do not matter). All ``(program, test)`` pairs of a batch go to the
sandbox in one ``run_many`` call, so they run in parallel.

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
else) or the sandbox's status (``"error"``, ``"timeout"``, ``"memory"``,
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

from coderlplus.execution import ExecResult, Sandbox, compare_output, extract_code
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
        """Score completions against their tasks' payloads (``{"tests": [{"input", "output"}]}``)."""
        programs = [extract_code(c) for c in completions]
        tests = [list(p.get("tests") or []) for p in payloads]
        # results[i][j]: the result of program i on test j (None: not run)
        results: list[list[ExecResult | None]] = [[None] * len(t) for t in tests]
        if self.cfg.stop_at_first_failure and not self.cfg.partial:
            self._run(programs, tests, results, first=0, last=1)
            self._run(programs, tests, results, first=1, last=None, only_if_passed=0)
        else:
            self._run(programs, tests, results, first=0, last=None)
        return [self._judge(p, t, r) for p, t, r in zip(programs, tests, results)]

    def _run(self, programs, tests, results, first, last, only_if_passed=None) -> None:
        """Run tests ``first:last`` of every program in one sandbox batch, filling ``results``."""
        jobs = []  # (program index, test index)
        for i, (code, task_tests) in enumerate(zip(programs, tests)):
            if code is None:
                continue
            if only_if_passed is not None and not self._passed(results[i][only_if_passed], task_tests[0]):
                continue
            jobs += [(i, j) for j in range(len(task_tests))[first:last]]
        if not jobs:
            return
        if self.sandbox is None:
            self.sandbox = Sandbox()  # one per reward instance, reused by every batch
        outs = self.sandbox.run_many([(programs[i], str(tests[i][j].get("input", ""))) for i, j in jobs])
        for (i, j), out in zip(jobs, outs):
            results[i][j] = out

    @staticmethod
    def _passed(result: ExecResult | None, test: dict[str, Any]) -> bool:
        return (
            result is not None
            and result.status == "ok"
            and compare_output(result.stdout, str(test.get("output", "")))
        )

    def _judge(self, code: str | None, tests: list[dict], results: list[ExecResult | None]) -> RewardOutput:
        total = len(tests)
        if code is None:
            return RewardOutput(0.0, {"status": "no_code", "passed": 0, "total": total, "failed_test": None})
        if total == 0:
            return RewardOutput(0.0, {"status": "no_tests", "passed": 0, "total": 0, "failed_test": None})
        passed, status, failed_test = 0, "pass", None
        for j, (test, result) in enumerate(zip(tests, results)):
            if self._passed(result, test):
                passed += 1
            elif failed_test is None and result is not None:
                failed_test = j
                status = "wrong" if result.status == "ok" else result.status
        if self.cfg.partial:
            reward = passed / total
        else:
            reward = 1.0 if passed == total else 0.0
        info = {"status": status, "passed": passed, "total": total, "failed_test": failed_test}
        return RewardOutput(reward, info)
