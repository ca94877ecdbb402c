"""The trace-alignment reward on hand-written completions, with hand-computed rewards."""

from __future__ import annotations

import pytest

from coderlplus.plugins import load_plugins
from coderlplus.registry import REWARDS

load_plugins()

# Ground truth of a program `n = int(input()); xs = [n, n * 2]; print(n + 7)` run on "3".
GT = {"expected_output": "10\n", "expected_variables": {"n": 3, "xs": [3, 6]}}
# 1 output + 2 variables = 3 items: reward = 0.1 + 0.9 * correct / 3
R = {k: 0.1 + 0.9 * k / 3 for k in range(4)}


def reward(completion: str, gt: dict = GT, **cfg) -> float:
    cls = REWARDS.get("trace_alignment")
    return cls(REWARDS.make_config("trace_alignment", cfg)).score_one(completion, gt)


CASES = [
    # (completion, expected reward, why)
    ('Reasoning.\n{"final_output": "10\\n", "variables": {"n": 3, "xs": [3, 6]}}', R[3], "all right"),
    ('{"final_output": "10", "variables": {"n": 3, "xs": [3, 6]}}', R[3], "no reasoning, no newline"),
    (
        'a\nb\n{"final_output": "10\\n", "variables": {"n": 3, "xs": [3, 6]}}\n\n  \n',
        R[3],
        "blank lines after",
    ),
    ('{"final_output": 10, "variables": {"n": 3, "xs": [3, 6]}}', R[3], "output as a number prints as 10"),
    ('{"final_output": "  10  ", "variables": {"n": 3.0, "xs": [3.0, 6]}}', R[3], "1.0 == 1, strip"),
    ('{"final_output": "10\\n", "variables": {"n": 3.0000000001, "xs": [3, 6]}}', R[3], "within 1e-9"),
    ('{"final_output": "10\\n", "variables": {"n": 3.001, "xs": [3, 6]}}', R[2], "not within 1e-9"),
    ('{"final_output": "11\\n", "variables": {"n": 3, "xs": [3, 6]}}', R[2], "wrong output"),
    ('{"final_output": "10\\n", "variables": {"n": 3}}', R[2], "missing variable is wrong"),
    ('{"final_output": "10\\n", "variables": {}}', R[1], "only the output"),
    ('{"final_output": "9", "variables": {}}', R[0], "well formed, nothing right"),
    (
        '{"final_output": "10", "variables": {"n": 3, "xs": [3, 6], "extra": 1}}',
        R[3],
        "extra variables ignored",
    ),
    ('{"final_output": "10", "variables": {"n": 3, "xs": [3, 6]}, "note": "hi"}', R[3], "extra key ignored"),
    ('{"final_output": "10", "variables": {"n": "3", "xs": [3, 6]}}', R[2], "a string is not a number"),
    ('{"final_output": "10", "variables": {"n": 3, "xs": [3, 6, 9]}}', R[2], "list length differs"),
    ('{"final_output": "10", "variables": {"n": 3, "xs": [6, 3]}}', R[2], "list order matters"),
    ('{"final_output": "10", "variables": [3, [3, 6]]}', R[1], "variables not an object: all wrong"),
    (
        '{"final_output": "10\\n", "variables": {"n": 3, "xs": [3, 6]}}\nDone.',
        0.0,
        "JSON not on the last line",
    ),
    ('{"final_output": "10\\n"}', 0.0, "no variables key"),
    ('{"variables": {"n": 3}}', 0.0, "no final_output key"),
    ("The answer is 10.", 0.0, "no JSON at all"),
    ("", 0.0, "empty completion"),
    (
        '```json\n{"final_output": "10", "variables": {"n": 3, "xs": [3, 6]}}\n```',
        0.0,
        "fenced: last line is ```",
    ),
    ('{"final_output": "10", "variables": {"n": 3, "xs": [3, 6]', 0.0, "truncated JSON"),
    ('["final_output", "variables"]', 0.0, "a list, not an object"),
    ("{'final_output': '10', 'variables': {'n': 3}}", 0.0, "Python dict syntax is not JSON"),
    ('{"final_output": "10", "variables": {"n": NaN, "xs": [3, 6]}}', R[2], "NaN equals nothing"),
    ('{"final_output": "10", "variables": {"n": true, "xs": [3, 6]}}', R[2], "a bool is not a number"),
]


@pytest.mark.parametrize("completion, expected, why", CASES, ids=[c[2] for c in CASES])
def test_hand_written_completions(completion, expected, why):
    assert reward(completion) == pytest.approx(expected, abs=1e-12), why


def test_at_least_25_cases():
    assert len(CASES) >= 25


def test_tolerant_equality_of_other_types():
    gt = {
        "expected_output": "a\nb\n",
        "expected_variables": {"flag": True, "nothing": None, "d": {"k": [1, {"z": False}]}, "s": "x y"},
    }
    # 1 output + 4 variables = 5 items
    right = (
        '{"final_output": "a  \\n  b", "variables": {"flag": "true", "nothing": "None", '
        '"d": {"k": [1.0, {"z": "false"}]}, "s": " x y "}}'
    )
    assert reward(right, gt) == pytest.approx(1.0)
    assert reward(
        '{"final_output": "a\\nb", "variables": {"flag": 1, "nothing": null}}', gt
    ) == pytest.approx(
        0.1 + 0.9 * 2 / 5  # output and null right; 1 is not True; d and s missing
    )
    assert reward('{"final_output": "a b", "variables": {"d": {"k": [1]}}}', gt) == pytest.approx(0.1)


def test_multiline_output_line_by_line():
    gt = {"expected_output": "1\n2\n3\n", "expected_variables": {}}
    assert reward('{"final_output": "1\\n2\\n3", "variables": {}}', gt) == pytest.approx(1.0)
    assert reward('{"final_output": "1 2 3", "variables": {}}', gt) == pytest.approx(0.1)
    assert reward('{"final_output": [1, 2, 3], "variables": {}}', {"expected_output": "[1, 2, 3]\n"}) == 1.0


def test_format_bonus_is_config():
    assert reward('{"final_output": "9", "variables": {}}', format_bonus=0.0) == 0.0
    assert reward('{"final_output": "10", "variables": {}}', format_bonus=0.4) == pytest.approx(0.4 + 0.6 / 3)


def test_bad_config_is_rejected():
    from coderlplus.config import ConfigError

    with pytest.raises(ConfigError, match="format_bonus"):
        REWARDS.make_config("trace_alignment", {"format_bonus": 1.5})


def test_info_counts():
    cls = REWARDS.get("trace_alignment")
    out = cls().score('x\n{"final_output": "10", "variables": {"n": 3}}', GT)
    assert out.info == {
        "format": True,
        "output_correct": True,
        "correct": 2,
        "items": 3,
        "all_correct": False,
    }
