"""The program sandbox, output comparison and code extraction."""

from __future__ import annotations

import time

import pytest
from conftest import HAVE_CC

from coderlplus.execution import ExecResult, Sandbox, compare_output, extract_code

TIMEOUT_S = 1.0


@pytest.fixture(scope="module", params=["bwrap", "rlimit", "bwrap-python", "rlimit-python"])
def sandbox(request):
    """The behaviour tests run in both isolation modes (bwrap must really start: no fallback),
    each with the servers' C fork loop (forkrun.c) and with the Python one."""
    isolation, _, loop = request.param.partition("-")
    sb = Sandbox(
        timeout_s=TIMEOUT_S,
        memory_mb=512,
        max_output_bytes=65536,
        workers=2,
        isolation=isolation,
        require_isolation=True,
        native=loop != "python",
    )
    assert sb.native == (loop != "python" and HAVE_CC)
    yield sb
    sb.close()


# --------------------------------------------------------------------------- sandbox


def test_prints(sandbox):
    r = sandbox.run("print('hello', 6 * 7)")
    assert isinstance(r, ExecResult)
    assert (r.status, r.stdout, r.returncode) == ("ok", "hello 42\n", 0)
    assert 0 < r.duration_s < TIMEOUT_S


def test_reads_stdin(sandbox):
    code = "import sys\nn = int(input())\nrest = sys.stdin.read().split()\nprint(n * 2, len(rest))"
    r = sandbox.run(code, "21\na b c\n")
    assert (r.status, r.stdout) == ("ok", "42 3\n")


def test_exception_is_error_with_traceback(sandbox):
    r = sandbox.run("def f():\n    return 1 / 0\nprint('before')\nf()")
    assert r.status == "error" and r.returncode == 1
    assert r.stdout == "before\n"
    assert "ZeroDivisionError" in r.stderr and "Traceback" in r.stderr
    assert "_server.py" not in r.stderr  # the sandbox's own frames are hidden


def test_syntax_error(sandbox):
    r = sandbox.run("def f(:\n")
    assert r.status == "error" and "SyntaxError" in r.stderr


def test_infinite_loop_times_out(sandbox):
    t0 = time.monotonic()
    r = sandbox.run("while True:\n    pass")
    assert r.status == "timeout"
    assert time.monotonic() - t0 < TIMEOUT_S + 1


def test_sleep_times_out(sandbox):
    r = sandbox.run("import time\nprint('started', flush=True)\ntime.sleep(30)")
    assert r.status == "timeout" and r.stdout == "started\n"


def test_memory_limit(sandbox):
    r = sandbox.run("x = bytearray(2 * 1024**3)\nprint('allocated')")
    assert r.status == "memory" and r.stdout == ""
    assert "MemoryError" in r.stderr


def test_output_limit(sandbox):
    r = sandbox.run("import sys\nsys.stdout.write('x' * (10 * 1024 * 1024))")
    assert r.status == "output_limit"
    assert len(r.stdout) <= 65536


def test_stderr_flood_is_stopped(sandbox):
    r = sandbox.run("import sys\nwhile True:\n    sys.stderr.write('y' * 100000)")
    assert r.status == "output_limit"
    assert 0 < len(r.stderr) <= 8192  # only the tail comes back


@pytest.mark.parametrize("code", ["import sys\nsys.exit(3)", "import os\nos._exit(3)", "raise SystemExit(3)"])
def test_exit_code(sandbox, code):
    r = sandbox.run(code)
    assert (r.status, r.returncode) == ("error", 3)


def test_exit_zero_is_ok(sandbox):
    r = sandbox.run("import sys\nprint('done')\nsys.exit(0)")
    assert (r.status, r.stdout, r.returncode) == ("ok", "done\n", 0)


def test_segfault_is_killed(sandbox):
    r = sandbox.run("import ctypes\nctypes.string_at(0)")
    assert r.status == "killed" and r.returncode is not None and r.returncode < 0


def test_detached_grandchild_does_not_hang(sandbox):
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print('parent done')\n"
    )
    t0 = time.monotonic()
    r = sandbox.run(code)
    assert time.monotonic() - t0 < TIMEOUT_S + 1
    assert r.status == "ok" and r.stdout == "parent done\n"


def test_grandchild_holding_stdout_times_out(sandbox):
    code = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nelse:\n    time.sleep(60)"
    )
    t0 = time.monotonic()
    r = sandbox.run(code)
    assert r.status == "timeout"
    assert time.monotonic() - t0 < TIMEOUT_S + 1.5


def test_environment_is_scrubbed(sandbox, monkeypatch):
    # The servers were started before this variable was set; start a fresh sandbox after.
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-123")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with Sandbox(timeout_s=TIMEOUT_S, workers=1, isolation=sandbox.isolation) as sb:
        r = sb.run("import os\nprint(sorted(os.environ))\nprint(os.environ.get('WANDB_API_KEY'))")
    assert r.status == "ok"
    assert "secret-key-123" not in r.stdout and "HF_TOKEN" not in r.stdout
    assert r.stdout.splitlines()[1] == "None"
    names = set(eval(r.stdout.splitlines()[0]))
    assert names <= {
        "PATH",
        "LANG",
        "LC_ALL",
        "HOME",
        "TMPDIR",
        "PYTHONHASHSEED",
        "PYTHONDONTWRITEBYTECODE",
        "LD_LIBRARY_PATH",
    }


def test_private_empty_cwd(sandbox):
    write = (
        "import os\nprint(os.listdir('.'))\nopen('leftover.txt', 'w').write('x')\n"
        "os.mkdir('sub')\nprint(os.getcwd() == os.environ['HOME'] == os.environ['TMPDIR'])"
    )
    with Sandbox(
        timeout_s=TIMEOUT_S, workers=1, isolation=sandbox.isolation
    ) as sb:  # one server: same folder
        first, second = sb.run(write), sb.run(write)
    assert first.status == second.status == "ok", first.stderr
    # Each program starts in an empty folder: what the first wrote is gone for the second.
    assert first.stdout == second.stdout == "[]\nTrue\n"


def test_hash_seed_is_fixed(sandbox):
    code = "print(hash('abc'), sorted({'x', 'y', 'z'}, key=hash))"
    outs = {r.stdout for r in sandbox.run_many([(code, "")] * 4)}
    assert len(outs) == 1


def test_run_many_preserves_order(sandbox):
    items = []
    expected = []
    for i in range(50):
        kind = i % 5
        if kind == 0:
            items.append(("print(int(input()) + 1)", f"{i}\n"))
            expected.append(("ok", f"{i + 1}\n"))
        elif kind == 1:
            items.append((f"raise ValueError({i})", ""))
            expected.append(("error", ""))
        elif kind == 2:
            items.append((f"import sys\nprint({i})\nsys.exit(2)", ""))
            expected.append(("error", f"{i}\n"))
        elif kind == 3:
            items.append((f"print('{i}' * 3)", ""))
            expected.append(("ok", f"{i}{i}{i}\n"))
        else:
            items.append(("x = bytearray(2 * 1024**3)", ""))
            expected.append(("memory", ""))
    items[7] = ("while True: pass", "")
    expected[7] = ("timeout", "")
    results = sandbox.run_many(items)
    assert [(r.status, r.stdout) for r in results] == expected


def test_run_many_empty(sandbox):
    assert sandbox.run_many([]) == []


def test_program_killing_its_server(sandbox):
    r = sandbox.run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(5)")
    assert r.status != "ok"
    results = sandbox.run_many([("print('still works')", "")] * 4)
    assert [x.status for x in results] == ["ok"] * 4
    assert all(x.stdout == "still works\n" for x in results)


def test_server_killers_inside_chunks(sandbox):
    """Programs go to the servers in chunks (several per message): a program that kills its
    server mid-chunk fails alone; the programs before it keep their results and the ones
    after it run on the fresh server."""
    killer = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(5)"
    n = 24 * 4 * sandbox.workers  # chunks of 16 programs
    killers = {5, 6, 16, n - 1}  # two in a row, one at a chunk's first place, the last one
    items = [(killer, "") if i in killers else (f"print({i} * 2)", "") for i in range(n)]
    deaths = sandbox.stats["server_deaths"]
    results = sandbox.run_many(items)
    for i, r in enumerate(results):
        if i in killers:
            assert r.status == "killed" and "server process died" in r.stderr, (i, r)
        else:
            assert (r.status, r.stdout) == ("ok", f"{2 * i}\n"), (i, r)
    assert sandbox.stats["server_deaths"] - deaths == len(killers)


def test_closed_sandbox_refuses():
    sb = Sandbox(timeout_s=TIMEOUT_S, workers=1)
    assert sb.run("print(1)").stdout == "1\n"
    sb.close()
    sb.close()  # idempotent
    with pytest.raises(RuntimeError):
        sb.run("print(1)")


def test_throughput(sandbox):
    items = [("print(1)", "")] * 200
    sandbox.run_many(items[:4])  # warm
    t0 = time.perf_counter()
    results = sandbox.run_many(items)
    elapsed = time.perf_counter() - t0
    assert all(r.status == "ok" and r.stdout == "1\n" for r in results)
    print(
        f"\nsandbox: 200 trivial programs in {elapsed:.3f} s on {sandbox.workers} workers "
        f"= {1000 * elapsed / 200:.2f} ms per program"
    )
    assert elapsed < 10


# --------------------------------------------------------------------------- compare_output


@pytest.mark.parametrize(
    "actual, expected",
    [
        ("42\n", "42"),
        ("42", "42\n\n"),
        ("1 2 3   \n4 5\t\n", "1 2 3\n4 5\n"),
        ("\n\nyes\n", "yes"),
        ("a\r\nb\r\n", "a\nb\n"),
        ("", ""),
        ("\n  \n", ""),
        ("x\n\ny\n", "x\n\ny"),
    ],
)
def test_compare_output_equal(actual, expected):
    assert compare_output(actual, expected)


@pytest.mark.parametrize(
    "actual, expected",
    [
        ("42\n", "43\n"),
        (" 42", "42"),  # leading spaces matter
        ("1 2", "1  2"),  # inner spaces matter
        ("x\ny", "x\n\ny"),  # inner blank lines matter
        ("YES", "yes"),
        ("", "0"),
    ],
)
def test_compare_output_different(actual, expected):
    assert not compare_output(actual, expected)


# --------------------------------------------------------------------------- extract_code


def test_extract_python_block():
    text = "Here is my solution:\n```python\nn = int(input())\nprint(n * 2)\n```\nIt doubles n."
    assert extract_code(text) == "n = int(input())\nprint(n * 2)\n"


def test_extract_last_python_block():
    text = "```python\nprint(1)\n```\nbetter:\n```py\nprint(2)\n```\n"
    assert extract_code(text) == "print(2)\n"


def test_extract_prefers_python_over_bare_and_other_languages():
    text = "```python\nprint(1)\n```\nsample:\n```\n3\n```\n```text\nout\n```"
    assert extract_code(text) == "print(1)\n"


def test_extract_bare_block_when_no_python():
    text = "Solution:\n```\nprint('bare')\n```\n```bash\npython main.py\n```"
    assert extract_code(text) == "print('bare')\n"


def test_extract_only_other_languages():
    assert extract_code("```bash\necho hi\n```") is None


def test_extract_tag_case_and_python3():
    assert extract_code("```Python3\nprint(3)\n```") == "print(3)\n"


def test_extract_unclosed_block():
    text = (
        "```python\nprint(1)\n```\nnow faster:\n```python\nimport sys\nfor line in sys.stdin:\n    print(line"
    )
    assert extract_code(text) == "import sys\nfor line in sys.stdin:\n    print(line\n"


def test_extract_no_fence():
    assert extract_code("print(1)") is None
    assert extract_code("") is None


def test_extract_empty_block():
    assert extract_code("```python\n```") is None
    assert extract_code("```python\n   \n\n```") is None
    assert extract_code("text\n```python\n") is None  # truncated right after the fence


def test_extract_keeps_indentation_and_dedents_block():
    text = "1. Code:\n   ```python\n   def f():\n       return 1\n   print(f())\n   ```"
    assert extract_code(text) == "def f():\n    return 1\nprint(f())\n"


def test_extract_fence_glued_to_last_line():
    assert extract_code("```python\nprint(5)```\nDone.") == "print(5)\n"


def test_extract_new_block_opened_inside_open_block():
    text = "```python\nprint('draft')\n```python\nprint('final')\n```"
    assert extract_code(text) == "print('final')\n"


# --------------------------------------------------------------------------- the two fork loops

# Programs whose results must not depend on which fork loop ran them: stdin, exit codes,
# exceptions (traceback lines), stderr longer than the kept tail, a multi-byte character cut
# by that tail, invalid UTF-8, stdout over the cap, the CPU and wall limits, memory, signals,
# a folder left with files, an orphan still running, closed stdout.
AGREE = [
    ("print(input()[::-1])", "abc\n"),
    ("import sys\nprint(sum(map(int, sys.stdin.read().split())))", "1 2 3\n4\n"),
    ("import sys; sys.exit(7)", ""),
    ("def f():\n    raise KeyError('k')\nf()", ""),
    ("import sys\nfor i in range(3000): print(i, 'x' * 10, file=sys.stderr)", ""),
    ("import sys\nsys.stderr.write('\u00e9' * 20000)", ""),
    ("import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe bad\\n')", ""),
    ("print('y' * 70000)", ""),
    ("while True: pass", ""),
    ("import time; time.sleep(5)", ""),
    ("x = bytearray(2 << 30)", ""),
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", ""),
    ("open('f.txt', 'w').write('data'); print(open('f.txt').read())", ""),
    ("import os, time\nif os.fork() == 0:\n    os.setsid(); time.sleep(30)\nprint('parent')", ""),
    ("import os; os.close(1)", ""),
    ("", ""),
]


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler: only the Python fork loop exists here")
def test_the_c_and_python_fork_loops_agree():
    results = {}
    for native in (True, False):
        with Sandbox(timeout_s=TIMEOUT_S, memory_mb=512, workers=2, isolation="rlimit", native=native) as sb:
            assert sb.native is native
            results[native] = sb.run_many(AGREE)
    for (code, _), c, py in zip(AGREE, results[True], results[False], strict=True):
        assert (c.status, c.stdout, c.stderr) == (py.status, py.stdout, py.stderr), code
        if c.status != "output_limit":  # the kill may come before or after the writer's own exit
            assert c.returncode == py.returncode, code
    by_code = dict(zip([code for code, _ in AGREE], results[True], strict=True))
    assert by_code["print(input()[::-1])"].stdout == "cba\n"
    assert by_code["import sys; sys.exit(7)"].returncode == 7
    assert by_code["while True: pass"].status == "timeout"
    assert by_code["import time; time.sleep(5)"].status == "timeout"
    assert by_code["x = bytearray(2 << 30)"].status == "memory"
    assert by_code["print('y' * 70000)"].status == "output_limit"
    assert "\ufffd" in by_code["import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe bad\\n')"].stdout
    tail = by_code["import sys\nfor i in range(3000): print(i, 'x' * 10, file=sys.stderr)"].stderr
    assert tail.endswith("2999 xxxxxxxxxx\n") and len(tail.encode()) <= 8192


def test_without_a_compiler_the_python_fork_loop_runs(monkeypatch, tmp_path):
    from coderlplus.execution import sandbox as sandbox_module

    monkeypatch.setattr(sandbox_module, "_forkrun_state", {})
    monkeypatch.setenv("CODERLPLUS_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with Sandbox(timeout_s=TIMEOUT_S, workers=1, isolation="rlimit") as sb:
        assert sb.native is False
        assert sb.run("print(6 * 7)").stdout == "42\n"
    assert "no-such-compiler" in sandbox_module._forkrun_state["why"]


def test_a_long_stretch_of_single_runs_keeps_order_through_hand_backs():
    """64 programs to one server (chunks of 16): the C loop hands programs with bad UTF-8
    output, files left behind or a live orphan back to Python mid-stretch and goes on."""
    items, expected = [], []
    for i in range(64):
        kind = i % 4
        if kind == 0:
            items.append((f"print({i} * 3)", ""))
            expected.append(("ok", f"{i * 3}\n"))
        elif kind == 1:
            items.append((f"import sys\nsys.stdout.buffer.write(b'{i}\\xff\\n')", ""))
            expected.append(("ok", f"{i}\ufffd\n"))
        elif kind == 2:
            items.append((f"open('left.txt', 'w').write('x')\nprint(input() + '{i}')", "in"))
            expected.append(("ok", f"in{i}\n"))
        else:
            items.append(
                (f"import os, time\nif os.fork() == 0:\n    os.setsid(); time.sleep(30)\nprint({i})", "")
            )
            expected.append(("ok", f"{i}\n"))
    with Sandbox(timeout_s=TIMEOUT_S, workers=1, isolation="bwrap", require_isolation=True) as sb:
        assert sb.native == HAVE_CC
        results = sb.run_many(items)
        assert [(r.status, r.stdout) for r in results] == expected
        assert sb.stats["anomalies"] == 0 and sb.stats["restarts"] == 0
        assert sb.run("import os; print(sorted(os.listdir('.')))").stdout == "[]\n"  # folders emptied


def test_a_server_does_not_grow_over_thousands_of_programs():
    """What the server keeps per program (answers, buffers, frames) is freed: its resident
    memory after 1,500 more programs (output, errors, big stderr) stays where it was."""
    mixed = [
        ("print(sum(range(100)))", ""),
        ("import sys\nprint(input() * 3, file=sys.stderr)\nprint('x' * 5000)", "ab"),
        ("1/0", ""),
        ("import sys\nsys.stderr.write('e' * 20000)", ""),
        ("import sys\nsys.stdout.buffer.write(b'\\xff' * 100)", ""),
    ] * 100

    def server_kb(sb: Sandbox) -> int:
        sizes = []
        for pid in sb.processes():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"python" not in f.read().split(b"\0")[0]:  # the interpreter, not bwrap
                        continue
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    sizes.append(next(int(line.split()[1]) for line in f if line.startswith("Rss:")))
            except (OSError, StopIteration):
                continue
        assert len(sizes) == 1, sizes  # the one server (programs are gone)
        return sizes[0]

    with Sandbox(timeout_s=TIMEOUT_S, workers=1, isolation="bwrap", require_isolation=True) as sb:
        sb.run_many(mixed)
        before = server_kb(sb)
        for _ in range(3):
            results = sb.run_many(mixed)
        assert [r.status for r in results[:5]] == ["ok", "ok", "error", "ok", "ok"]
        assert server_kb(sb) - before < 256, (before, server_kb(sb))
