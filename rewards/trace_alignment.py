"""The trace-alignment reward of CodeRL+ (arXiv 2510.18471): did the model predict what the program did?

An alignment task shows a program and one input and asks for the printed output
and the final values of a few variables. The answer is free reasoning and then,
on its **last line**, one JSON object::

    {"final_output": "10\\n", "variables": {"n": 3, "xs": [1, 2]}}

Reward, with ``n`` target variables and ``format_bonus`` (0.1 in the paper)::

    0                                                   last line is not a JSON object with both keys
    format_bonus + (1 - format_bonus) * correct / (1 + n)   otherwise

where the output counts as one item and each target variable as one; a missing
variable is wrong, extra keys are ignored. Values compare with tolerant equality
(:func:`values_equal`): ``None``/``null``, ``True``/``"true"``, numbers within 1e-9
(``1.0 == 1``, but a bool is not a number), recursive lists and dicts, strings
compared after stripping. The output compares line by line after stripping each
line (blank lines at the ends ignored); a non-string prediction is printed as
Python's ``print`` would (``42`` matches ``"42\\n"``).

Ground truth (``task.payload``): ``{"expected_output": str, "expected_variables":
{name: value}}``, made by :mod:`coderlplus.tasks.alignment` from a real run.
``info``: ``format`` (bool), ``output_correct``, ``correct`` / ``items`` (counts),
``all_correct``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from coderlplus.config import ConfigError
from coderlplus.registry import register_reward
from coderlplus.reward import Reward, RewardConfig
from coderlplus.types import RewardOutput, Rollout

_TRUE = ("true", "True")
_FALSE = ("false", "False")
_NONE = ("null", "None")
_MAX_LINE_CHARS = 1 << 20  # a longer last line is not parsed (and scores 0)


@dataclass
class TraceAlignmentConfig(RewardConfig):
    format_bonus: float = 0.1
    """Reward for a well-formed answer, whatever its content (the paper's 0.1)."""
    abs_tol: float = 1e-9
    """Two numbers are equal when they differ by at most this much (or relatively)."""

    def __post_init__(self):
        if not 0.0 <= self.format_bonus <= 1.0:
            raise ConfigError(f"trace_alignment.format_bonus={self.format_bonus} must be in [0, 1]")
        if self.abs_tol < 0:
            raise ConfigError(f"trace_alignment.abs_tol={self.abs_tol} must be >= 0")


def parse_answer(completion: str) -> dict | None:
    """The JSON object on the last non-empty line, if it has both keys; else None."""
    lines = [line for line in str(completion).splitlines() if line.strip()]
    if not lines or len(lines[-1]) > _MAX_LINE_CHARS:
        return None
    try:
        answer = json.loads(lines[-1].strip())
    except (ValueError, RecursionError):
        return None
    if not isinstance(answer, dict) or "final_output" not in answer or "variables" not in answer:
        return None
    return answer


def values_equal(predicted: Any, expected: Any, tol: float = 1e-9, depth: int = 0) -> bool:
    """Tolerant equality of a predicted JSON value and a traced one (see the module docstring)."""
    if depth > 50:
        return False
    if expected is None:
        return predicted is None or (isinstance(predicted, str) and predicted.strip() in _NONE)
    if isinstance(expected, bool):
        if isinstance(predicted, bool):
            return predicted == expected
        return isinstance(predicted, str) and predicted.strip() in (_TRUE if expected else _FALSE)
    if isinstance(expected, (int, float)):
        if isinstance(predicted, bool) or not isinstance(predicted, (int, float)):
            return False
        if isinstance(predicted, float) and not math.isfinite(predicted):
            return False
        return (
            math.isclose(float(predicted), float(expected), rel_tol=tol, abs_tol=tol) or predicted == expected
        )
    if isinstance(expected, str):
        return isinstance(predicted, str) and predicted.strip() == expected.strip()
    if isinstance(expected, (list, tuple)):
        return (
            isinstance(predicted, (list, tuple))
            and len(predicted) == len(expected)
            and all(values_equal(p, e, tol, depth + 1) for p, e in zip(predicted, expected))
        )
    if isinstance(expected, dict):
        return (
            isinstance(predicted, dict)
            and set(map(str, predicted)) == set(map(str, expected))
            and all(values_equal(predicted.get(str(k)), v, tol, depth + 1) for k, v in expected.items())
        )
    return False


def _printed(value: Any) -> str:
    """A predicted output as text: strings as they are, anything else as ``print`` shows it."""
    return value if isinstance(value, str) else str(value)


def output_equal(predicted: Any, expected: str) -> bool:
    """Printed outputs equal line by line after stripping; blank lines at the ends ignored."""

    def lines(text: str) -> list[str]:
        out = [line.strip() for line in text.splitlines()]
        while out and not out[-1]:
            out.pop()
        while out and not out[0]:
            out.pop(0)
        return out

    try:
        return lines(_printed(predicted)) == lines(str(expected))
    except (ValueError, RecursionError):  # str() of a huge int or a deep list
        return False


@register_reward("trace_alignment")
class TraceAlignmentReward(Reward):
    Config = TraceAlignmentConfig

    def __call__(self, rollouts: list[Rollout]) -> list[RewardOutput]:
        return [self.score(r.completion, r.task.payload) for r in rollouts]

    def score_one(self, completion: str, ground_truth: dict[str, Any]) -> float:
        return self.score(completion, ground_truth).reward

    def score(self, completion: str, ground_truth: dict[str, Any]) -> RewardOutput:
        expected_vars = dict(ground_truth.get("expected_variables") or {})
        items = 1 + len(expected_vars)
        answer = parse_answer(completion)
        if answer is None:
            info = {
                "format": False,
                "output_correct": False,
                "correct": 0,
                "items": items,
                "all_correct": False,
            }
            return RewardOutput(0.0, info)
        tol = self.cfg.abs_tol
        output_ok = output_equal(answer["final_output"], str(ground_truth.get("expected_output", "")))
        predicted = answer["variables"] if isinstance(answer["variables"], dict) else {}
        correct = int(output_ok) + sum(
            name in predicted and values_equal(predicted[name], value, tol)
            for name, value in expected_vars.items()
        )
        bonus = self.cfg.format_bonus
        info = {
            "format": True,
            "output_correct": output_ok,
            "correct": correct,
            "items": items,
            "all_correct": correct == items,
        }
        return RewardOutput(bonus + (1.0 - bonus) * correct / items, info)
