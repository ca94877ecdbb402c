"""Sandbox.trace: final variable values, checked against hand-computed traces."""

from __future__ import annotations

import textwrap

import pytest

from coderlplus.execution import TraceOptions


def trace(sandbox, code: str, stdin: str = "", **options):
    return sandbox.trace(textwrap.dedent(code), stdin, TraceOptions(**options))


def test_loop(sandbox):
    t = trace(sandbox, "total = 0\nfor i in range(4):\n    total += i\nprint(total)")
    assert (t.status, t.stdout) == ("ok", "6\n")
    assert t.variables == {"i": 3, "total": 6}
    assert list(t.variables) == ["i", "total"]  # ordered by the last line binding each name
    assert t.lines == {"i": 2, "total": 3}
    assert t.scopes == {"i": "module", "total": "module"}


def test_nested_lists_and_comprehension_scope(sandbox):
    t = trace(sandbox, "grid = [[0] * 2 for _ in range(2)]\ngrid[1][0] = 5\nrow = grid[1]\n")
    assert t.variables == {"grid": [[0, 0], [5, 0]], "row": [5, 0]}  # `_` is the comprehension's


def test_reassignment_keeps_the_last_value(sandbox):
    t = trace(sandbox, "x = 1\ny = x\nx = 'a'\nx = [x, x]\n")
    assert t.variables == {"y": 1, "x": ["a", "a"]}
    assert t.lines == {"y": 2, "x": 4}


def test_shadowing_function_locals_are_not_module_variables(sandbox):
    code = """
    n = 10
    def double(n):
        n = n * 2
        return n
    m = double(3)
    """
    t = trace(sandbox, code)
    assert t.variables == {"n": 10, "m": 6}  # `double` is callable: left out


def test_strings_with_newlines_and_unicode(sandbox):
    t = trace(sandbox, 's = "a\\nb"\nu = "héllo ✓"\nempty = ""\n')
    assert t.variables == {"s": "a\nb", "u": "héllo ✓", "empty": ""}


def test_sets_become_sorted_lists(sandbox):
    t = trace(sandbox, "s = {3, 1, 2}\nf = frozenset('ba')\nmixed = {1, 'a'}\nempty = set()\n")
    assert t.variables == {"s": [1, 2, 3], "f": ["a", "b"], "empty": []}
    assert t.dropped == ["mixed"]  # not sortable


def test_early_exit(sandbox):
    t = trace(sandbox, "a = 1\nimport sys\nsys.exit(0)\nb = 2\n")
    assert (t.status, t.variables) == ("ok", {"a": 1})
    t = trace(sandbox, "a = 1\nimport sys\nsys.exit(2)\nb = 2\n")
    assert (t.status, t.returncode, t.variables) == ("error", 2, {"a": 1})


def test_exception_after_some_assignments(sandbox):
    t = trace(sandbox, "a = [1]\nb = a + [2]\nc = 1 / 0\nd = 3\n")
    assert t.status == "error" and "ZeroDivisionError" in t.stderr
    assert t.variables == {"a": [1], "b": [1, 2]}


def test_json_safe_conversion_rules(sandbox):
    code = """
    import math
    t = (1, (2, 3))
    d = {1: 'a', None: True, 2.5: [None]}
    flag = True
    nothing = None
    big = 10 ** 150
    ok_int = 10 ** 50
    nan = math.nan
    inf = float('inf')
    obj = object()
    class K: pass
    _private = 1
    long_list = list(range(65))
    deep = [[[[[1]]]]]
    long_str = 'x' * 1001
    tuple_key = {(1, 2): 3}
    collision = {1: 'a', '1': 'b'}
    """
    t = trace(sandbox, code)
    assert t.variables == {
        "t": [1, [2, 3]],
        "d": {"1": "a", "null": True, "2.5": [None]},
        "flag": True,
        "nothing": None,
        "ok_int": 10**50,
    }
    assert t.variables["flag"] is True  # not 1
    assert t.dropped == sorted(
        ["big", "nan", "inf", "obj", "long_list", "deep", "long_str", "tuple_key", "collision"]
    )


def test_limits_are_options(sandbox):
    t = trace(sandbox, "xs = list(range(65))\ndeep = [[[[[1]]]]]\n", max_items=100, max_depth=6)
    assert t.variables == {"xs": list(range(65)), "deep": [[[[[1]]]]]}


def test_hostile_values_do_not_break_the_trace(sandbox):
    code = """
    class Bad:
        def __lt__(self, other):
            raise RuntimeError("no")
        def __hash__(self):
            return 1
    s = {Bad(), Bad()}
    x = 1
    """
    t = trace(sandbox, code)
    assert t.variables == {"x": 1} and "s" in t.dropped


def test_entry_function_locals(sandbox):
    code = """
    def main():
        n = int(input())
        sq = n * n
        print(sq)

    main()
    """
    plain = trace(sandbox, code, "3\n")
    assert (plain.stdout, plain.variables) == ("9\n", {})  # the paper's scope sees nothing
    t = trace(sandbox, code, "3\n", entry="main")
    assert t.entry_found
    assert t.variables == {"n": 3, "sq": 9}
    assert t.scopes == {"n": "entry", "sq": "entry"}
    assert t.lines == {"n": 3, "sq": 4}


def test_entry_locals_when_it_raises_and_module_names_win(sandbox):
    code = """
    x = 'module'
    def main():
        x = 'local'
        y = 1
        raise ValueError(y)
    main()
    """
    t = trace(sandbox, code, entry="main")
    assert t.status == "error" and t.entry_found
    assert t.variables == {"x": "module", "y": 1}


def test_trajectory(sandbox):
    t = trace(sandbox, "x = 0\nfor i in range(2):\n    x += 10\n", trajectory=True)
    # [line that made the change, function, name, new value], worked out by hand.
    assert t.trajectory == [
        [1, "<module>", "x", 0],
        [2, "<module>", "i", 0],
        [3, "<module>", "x", 10],
        [2, "<module>", "i", 1],
        [3, "<module>", "x", 20],
    ]
    assert not t.truncated
    capped = trace(sandbox, "x = 0\nfor i in range(2):\n    x += 10\n", trajectory=True, max_events=2)
    assert capped.trajectory == t.trajectory[:2] and capped.truncated
    assert capped.variables == t.variables == {"i": 1, "x": 20}


def test_trajectory_inside_functions(sandbox):
    code = "def f(a):\n    b = a + 1\n    return b\nr = f(1)\n"
    t = trace(sandbox, code, trajectory=True)
    assert t.trajectory == [[1, "f", "a", 1], [2, "f", "b", 2], [4, "<module>", "r", 2]]


def test_max_variables_keeps_the_last_bound(sandbox):
    t = trace(sandbox, "a = 1\nb = 2\nc = 3\nd = 4\na = 5\n", max_variables=3)
    assert list(t.variables) == ["c", "d", "a"] and t.variables["a"] == 5


@pytest.mark.parametrize(
    "code, status",
    [("while True:\n    pass", "timeout"), ("import os\nx = 1\nos._exit(0)", "ok"), ("def f(:\n", "error")],
)
def test_no_variables_when_the_program_gives_none(sandbox, code, status):
    t = trace(sandbox, code)
    assert t.status == status and t.variables == {} and t.error is None


def test_trace_matches_run(sandbox):
    code = "n = int(input())\nprint(n * 3)\n"
    r, t = sandbox.run(code, "7\n"), sandbox.trace(code, "7\n")
    assert (r.status, r.stdout) == (t.status, t.stdout) == ("ok", "21\n")
    assert t.variables == {"n": 7}
