"""CodeRL+ alignment: the harvester's filters, the buffer's strategies, the batch mixer."""

from __future__ import annotations

import random

import pytest

from coderlplus.config import ConfigError
from coderlplus.tasks.alignment import (
    REASONS,
    Alignment,
    AlignmentBuffer,
    AlignmentConfig,
    AlignmentHarvester,
    alignment_metrics,
    cyclomatic_complexity,
)
from coderlplus.types import RewardOutput, Rollout, Task


def code_task(tid: str = "t", inputs=("3\n",)) -> Task:
    tests = [{"input": i, "output": "?\n"} for i in inputs]
    return Task(tid, "codegen", [{"role": "user", "content": "q"}], {"tests": tests, "reference": None}, "x")


def rollout(body: str | None, task: Task | None = None, group: int = 0) -> Rollout:
    text = "no code here" if body is None else f"Here:\n```python\n{body}\n```"
    return Rollout(task or code_task(), text, [1], [2], [0.0], group_id=group)


def harvest(items, cfg=None, prompt_tokens=None, max_prompt=None, sandbox=None):
    rollouts = [rollout(body, task) for body, _, task in items]
    scores = [RewardOutput(r, {}) for _, r, _ in items]
    h = AlignmentHarvester(cfg or AlignmentConfig(enabled=True), sandbox, prompt_tokens, max_prompt, seed=0)
    return h.harvest(rollouts, scores, step=5)


GOOD = "n = int(input())\ntotal = 0\nfor i in range(n):\n    total += i\nprint(total)"


def test_each_filter_reason_is_counted(sandbox):
    only_asserts = Task(
        "a", "codegen", [{"role": "user", "content": "q"}], {"tests": [{"code": "assert 1"}]}, "x"
    )
    items = [
        (GOOD, 1.0, code_task()),  # passed
        (None, 0.0, code_task()),  # no_code
        ("def f(:", 0.0, code_task()),  # syntax
        ("x = 1\nprint(x)", 0.0, only_asserts),  # no_input
        ("x = 1\nraise ValueError(x)", 0.0, code_task()),  # error
        ("x = 1\nwhile True:\n    pass", 0.0, code_task()),  # timeout
        ("x = 1", 0.0, code_task()),  # empty_output
        ("x = object()\ny = 2\nprint(y)", 0.0, code_task()),  # unserialisable
        ("print(5)", 0.0, code_task()),  # no_variables
        (GOOD, 0.0, code_task("kept")),  # kept
        ("n = int(input())\nprint(sum(range(n)))", 0.0, code_task()),  # duplicate: same (input, output) 3 / 3
    ]
    tasks, counts = harvest(items, sandbox=sandbox)
    assert counts == dict.fromkeys(REASONS, 0) | {
        "passed": 1,
        "no_code": 1,
        "syntax": 1,
        "no_input": 1,
        "error": 1,
        "timeout": 1,
        "empty_output": 1,
        "unserialisable": 1,
        "no_variables": 1,
        "duplicate": 1,
    }
    assert len(tasks) == 1
    t = tasks[0]
    assert t.kind == "align" and t.source == "alignment"
    # The label is what the program did on the first input ("3\n": 0 + 1 + 2 = 3).
    assert t.payload["expected_output"] == "3\n"
    assert t.payload["expected_variables"] == {"n": 3, "i": 2, "total": 3}  # the last three bound
    assert t.meta["source_task"] == "kept" and t.meta["source_passed"] is False and t.meta["step"] == 5
    text = t.prompt[-1]["content"]
    assert GOOD in text and "3" in text and "n, i, total" in text and '"final_output"' in text


def test_complexity_range_and_too_long(sandbox):
    branchy = "n = int(input())\nif n > 1:\n    print(n)\nelse:\n    print(0)"
    flat = "n = int(input())\nprint(n)"
    cfg = AlignmentConfig(enabled=True, min_complexity=2, max_complexity=3)
    tasks, counts = harvest([(flat, 0.0, code_task()), (branchy, 0.0, code_task())], cfg, sandbox=sandbox)
    assert counts["complexity"] == 1 and [t.payload["code"].strip() for t in tasks] == [branchy]
    tasks, counts = harvest(
        [(flat, 0.0, code_task())], prompt_tokens=lambda t: 999, max_prompt=256, sandbox=sandbox
    )
    assert (tasks, counts["too_long"]) == ([], 1)


def test_cyclomatic_complexity_by_hand():
    assert cyclomatic_complexity("x = 1") == 1
    assert cyclomatic_complexity("if a and b or c:\n    pass") == 1 + 1 + 1 + 1  # if, and, or
    assert cyclomatic_complexity("for i in x:\n    while y:\n        pass") == 3
    assert cyclomatic_complexity("z = [i for i in x if i]") == 1 + 2  # the for and the if
    assert cyclomatic_complexity("try:\n    f()\nexcept E:\n    pass") == 2
    assert cyclomatic_complexity("def f(:") is None


def test_options_failed_only_choice_and_inputs(sandbox):
    cfg = AlignmentConfig(
        enabled=True, failed_only=False, variable_choice="first", max_variables=2, n_inputs=2
    )
    task = code_task("two", inputs=("2\n", "4\n"))
    tasks, counts = harvest([(GOOD, 1.0, task)], cfg, sandbox=sandbox)
    assert counts["passed"] == 0
    assert [t.payload["input"] for t in tasks] == ["2\n", "4\n"]
    assert [t.payload["expected_output"] for t in tasks] == ["1\n", "6\n"]
    assert tasks[1].payload["expected_variables"] == {"n": 4, "i": 3}  # the first two (by last binding line)
    assert all(t.meta["source_passed"] for t in tasks)


def test_unserialisable_can_be_skipped_instead(sandbox):
    cfg = AlignmentConfig(enabled=True, drop_unserialisable=False)
    tasks, _ = harvest([("x = object()\ny = 2\nprint(y)", 0.0, code_task())], cfg, sandbox=sandbox)
    assert tasks[0].payload["expected_variables"] == {"y": 2}


def _task(i: int, passed: bool = False) -> Task:
    return Task(f"a{i}", "align", [], {}, "alignment", {"source_passed": passed})


def test_buffer_capacity_and_recent():
    buf = AlignmentBuffer(capacity=5, strategy="recent", seed=0)
    buf.add([_task(i) for i in range(4)], step=1)
    buf.add([_task(i) for i in range(4, 7)], step=2)
    assert len(buf) == 5  # the two oldest were dropped
    assert sorted(t.id for t in buf.sample(3)) == ["a4", "a5", "a6"]  # the latest step first
    got = buf.sample(4)
    assert sorted(t.id for t in got)[-3:] == ["a4", "a5", "a6"] and len({t.id for t in got}) == 4
    assert len(buf.sample(99)) == 5


def test_buffer_random_is_seeded_and_distinct():
    a, b = AlignmentBuffer(100, "random", seed=3), AlignmentBuffer(100, "random", seed=3)
    for buf in (a, b):
        buf.add([_task(i) for i in range(50)], step=1)
    ids = [t.id for t in a.sample(20)]
    assert ids == [t.id for t in b.sample(20)] and len(set(ids)) == 20


def test_buffer_balanced_takes_half_of_each():
    buf = AlignmentBuffer(100, "balanced", seed=0)
    buf.add([_task(i, passed=i < 10) for i in range(40)], step=1)
    got = buf.sample(8)
    assert sum(t.meta["source_passed"] for t in got) == 4
    only_failed = AlignmentBuffer(100, "balanced", seed=0)
    only_failed.add([_task(i) for i in range(10)], step=1)
    assert len(only_failed.sample(6)) == 6  # falls back to what there is


def test_buffer_state_round_trip():
    a = AlignmentBuffer(100, "random", seed=1)
    a.add([_task(i) for i in range(30)], step=2)
    a.sample(5)
    b = AlignmentBuffer(100, "random", seed=99)
    b.load_state_dict(a.state_dict())
    assert [t.id for t in a.sample(10)] == [t.id for t in b.sample(10)]


def test_mixer_ratio_and_min_buffer():
    al = Alignment(AlignmentConfig(enabled=True, ratio=0.4), sandbox=None)
    assert al.n_align(10) == 0  # empty buffer: all code generation
    al.buffer.add([_task(i) for i in range(3)], step=1)
    assert al.n_align(10) == 0  # fewer than one batch's worth (4)
    al.buffer.add([_task(3)], step=1)
    assert al.n_align(10) == 4 and al.n_align(32) == 0  # 13 needed for a 32-prompt batch
    al = Alignment(AlignmentConfig(enabled=True, ratio=0.5, min_buffer=20), sandbox=None)
    al.buffer.add([_task(i) for i in range(19)], step=1)
    assert al.n_align(8) == 0
    al.buffer.add([_task(19)], step=1)
    assert al.n_align(8) == 4


def test_alignment_metrics_by_hand():
    tasks = [_task(i) for i in range(3)]
    rolls = [Rollout(t, "", [1], [1], [0.0]) for t in tasks] + [rollout("x=1")]
    infos = [
        {"format": True, "output_correct": True, "correct": 3, "items": 3, "all_correct": True},
        {"format": True, "output_correct": False, "correct": 1, "items": 3, "all_correct": False},
        {"format": False, "output_correct": False, "correct": 0, "items": 2, "all_correct": False},
    ]
    scores = [RewardOutput(0.0, {"trace_alignment": i}) for i in infos] + [RewardOutput(1.0, {})]
    m = alignment_metrics(rolls, scores)
    assert m["align/accuracy"] == pytest.approx(1 / 3)
    assert m["align/format_rate"] == pytest.approx(2 / 3)
    assert m["align/item_accuracy"] == pytest.approx(4 / 8)
    assert m["align/output_accuracy"] == pytest.approx(1 / 3)
    assert alignment_metrics(rolls[3:], scores[3:]) == {}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"ratio": 1.0}, "ratio"),
        ({"strategy": "newest"}, "strategy"),
        ({"variable_choice": "middle"}, "variable_choice"),
        ({"min_variables": 4}, "min_variables"),
        ({"min_complexity": 5, "max_complexity": 2}, "min_complexity"),
        ({"template": "no placeholders {oops}"}, "template"),
        ({"template": "Input {input} only"}, "code"),
    ],
)
def test_bad_alignment_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AlignmentConfig(**kwargs)


def test_random_variable_choice_is_seeded(sandbox):
    cfg = AlignmentConfig(enabled=True, variable_choice="random", max_variables=2)
    body = "a = 1\nb = 2\nc = 3\nd = 4\nprint(a)"
    first, _ = harvest([(body, 0.0, code_task())], cfg, sandbox=sandbox)
    again, _ = harvest([(body, 0.0, code_task())], cfg, sandbox=sandbox)
    assert first[0].payload["expected_variables"] == again[0].payload["expected_variables"]
    assert len(first[0].payload["expected_variables"]) == 2
    random.Random(0)  # (the harvester's own rng, not the global one, decides)
