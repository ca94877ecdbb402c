"""Batched tests: a program's stdin/stdout tests share one child (``Sandbox(batch_tests=True)``).

The reference for every result is the same check with one fresh process per test
(``batch_tests=False``), and hand-written expectations.
"""

from __future__ import annotations

import pytest

from coderlplus.execution import Sandbox

TESTS = [{"input": f"{k}\n", "output": f"{2 * k}\n"} for k in (1, 2, 3)]

# Programs that behave differently on input 2, to end (or try to end) a batch in the middle.
PROGRAMS = {
    "correct": "print(int(input()) * 2)",
    "sys_exit_on_2": "import sys\nx = int(input())\nprint(2 * x)\nsys.exit(3 if x == 2 else 0)",
    "os_exit_on_2": "import os\nx = int(input())\nprint(2 * x, flush=True)\nif x == 2: os._exit(4)",
    "loops_on_2": "x = int(input())\nwhile x == 2: pass\nprint(2 * x)",
    "raises_on_2": "x = int(input())\nprint(2 * x)\nif x == 2: raise ValueError(x)",
    "floods_on_2": "x = int(input())\nprint(2 * x)\nif x == 2: print('y' * 10**6)",
    "memory_on_2": "x = int(input())\nif x == 2: a = ' ' * 10**10\nprint(2 * x)",
    "segfault_on_2": "import ctypes\nx = int(input())\nprint(2 * x, flush=True)\nif x == 2: ctypes.string_at(0)",
    "closes_stdout": "import sys\nprint(2 * int(input()))\nsys.stdout.close()",
    "replaces_stdout": "import io, sys\nprint(2 * int(input()))\nsys.stdout = io.StringIO()",
    "low_recursion_limit": "import sys\nsys.setrecursionlimit(30)\nprint(2 * int(input()))",
    "reads_all_stdin": "import sys\nprint(2 * int(sys.stdin.read()))",
    "random": "import random\nx = int(input())\nprint(2 * x if random.random() < 2 else 0)",
    "thread": "import threading\nx = int(input())\nt = threading.Thread(target=lambda: print(2 * x))\nt.start()",
    "chdir_and_file": "import os\nos.makedirs('d', exist_ok=True)\nos.chdir('d')\nprint(2 * int(input()))",
    "changes_cwd_and_limit": "import resource\nprint(2 * int(input()))\nresource.setrlimit(resource.RLIMIT_NOFILE, (8, 8))",
}


@pytest.fixture(scope="module")
def pools():
    with (
        Sandbox(timeout_s=1.0, workers=2, max_output_bytes=100_000) as batched,
        Sandbox(timeout_s=1.0, workers=2, max_output_bytes=100_000, batch_tests=False) as fresh,
    ):
        yield batched, fresh


def _summary(check):
    # Past the output cap, how much of the flood was read and whether the child had exited
    # before the kill are a matter of timing.
    cut = [r.status == "output_limit" for r in check.results]
    return [
        (r.status, r.stdout[:16] if c else r.stdout, None if c else r.returncode)
        for r, c in zip(check.results, cut)
    ], check.statuses


def test_batched_results_equal_one_process_per_test(pools):
    batched, fresh = pools
    items = [(code, TESTS) for code in PROGRAMS.values()]
    for name, b, f in zip(PROGRAMS, batched.check_many(items), fresh.check_many(items)):
        assert _summary(b) == _summary(f), name
    expected = {  # by hand, per test
        "correct": ["pass"] * 3,
        "sys_exit_on_2": ["pass", "error", "pass"],
        "os_exit_on_2": ["pass", "error", "pass"],
        "loops_on_2": ["pass", "timeout", "pass"],
        "raises_on_2": ["pass", "error", "pass"],
        "floods_on_2": ["pass", "output_limit", "pass"],
        "memory_on_2": ["pass", "memory", "pass"],
        "segfault_on_2": ["pass", "killed", "pass"],
        "random": ["pass"] * 3,
        "thread": ["pass"] * 3,
    }
    results = dict(zip(PROGRAMS, batched.check_many(items)))
    for name, statuses in expected.items():
        assert results[name].statuses == statuses, name
    for name in (
        "closes_stdout",
        "replaces_stdout",
        "low_recursion_limit",
        "reads_all_stdin",
        "chdir_and_file",
    ):
        assert results[name].statuses == ["pass"] * 3, name


# How many tests this process ran before this one: interpreter state that only lives as long as
# the process (pids are no identity: the sandbox's PID namespace reuses them at once).
RUNS_BEFORE = (
    "import builtins\nn = getattr(builtins, 'runs', 0)\nbuiltins.runs = n + 1\nprint(n, flush=True)\n"
)


def test_one_child_runs_all_tests_unless_a_test_ends_it(pools):
    batched, fresh = pools
    counted = "x = int(input())\n" + RUNS_BEFORE
    assert [r.stdout for r in batched.check(counted, TESTS).results] == ["0\n", "1\n", "2\n"]
    assert [r.stdout for r in fresh.check(counted, TESTS).results] == ["0\n", "0\n", "0\n"]
    ended = batched.check(counted + "import os\nif x == 2: os._exit(0)", TESTS)
    assert [r.stdout for r in ended.results] == ["0\n", "1\n", "0\n"]  # test 3 in a fresh child
    threads = batched.check(counted + "import threading", TESTS)
    assert [r.stdout for r in threads.results] == ["0\n"] * 3  # a run that loaded threading ends its child


def test_each_test_gets_its_own_time_limits():
    spin = "import time\nx = int(input())\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\nprint(2 * x)"
    with Sandbox(timeout_s=1.5, cpu_s=1, workers=1) as sb:
        check = sb.check(spin, TESTS)  # 1.8 s of CPU in one child, 0.6 s per test
        assert check.statuses == ["pass"] * 3, [r.stderr[-300:] for r in check.results]
        assert len({r.returncode for r in check.results}) == 1
        assert all(0.55 < r.duration_s < 1.4 for r in check.results), [r.duration_s for r in check.results]
        slow = sb.check("x = int(input())\nwhile x >= 2: pass\nprint(2 * x)", TESTS)
        assert slow.statuses == ["pass", "timeout", "timeout"]
        # Each timed-out test had its own budget: the 1 s CPU limit (up to 1 s more in a batch:
        # rlimits count whole seconds) or the 1.5 s wall clock, whichever came first.
        assert all(0.9 < r.duration_s < 2.6 for r in slow.results[1:]), [r.duration_s for r in slow.results]


def test_a_forged_report_cannot_make_a_wrong_program_pass(pools):
    batched, _ = pools
    # Writes an end-of-run report of its own on the child's control pipe, then a wrong answer.
    forger = "import os, struct\nx = int(input())\nprint(2 * x if x == 1 else 0, flush=True)\n"
    forger += "try:\n    os.write(3, struct.pack('>i', 0))\nexcept OSError:\n    pass\nprint(0)"
    check = batched.check(forger, TESTS)
    assert check.statuses[1:] == ["wrong", "wrong"]
    assert not check.passed


def test_assert_tests_are_never_batched(pools):
    batched, _ = pools
    code = "def f(x):\n    return 2 * x\n"
    tests = [{"code": f"assert f({k}) == {2 * k}\n{RUNS_BEFORE}"} for k in (1, 2, 3)]
    check = batched.check(code, tests)
    assert check.statuses == ["pass"] * 3
    assert [r.stdout for r in check.results] == ["0\n"] * 3


def test_random_state_is_the_fresh_one_in_every_test(pools):
    batched, fresh = pools
    code = "import random\ninput()\nprint(random.random(), random.randrange(10**9))"
    b, f = batched.check(code, TESTS), fresh.check(code, TESTS)
    assert len({r.stdout for r in b.results}) == 1
    assert b.results[0].stdout == f.results[0].stdout
