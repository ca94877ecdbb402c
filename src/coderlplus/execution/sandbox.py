"""Run untrusted Python programs fast and contained: the sandbox behind code rewards.

RL runs hundreds of short, machine-written programs per step; they loop forever,
allocate without bound, fork, write files, open sockets and try to kill their
parent. A :class:`Sandbox` keeps a pool of warm *server* processes
(``_server.py``, one per worker). For each program a server ``fork()``s a fresh
child, so each program starts in a clean interpreter in about a millisecond,
instead of the tens of milliseconds of a new interpreter. :meth:`Sandbox.run_many`
spreads a whole batch over the servers, in chunks of up to 16 programs per message;
a server answers each program as soon as it is done and goes straight on to the
next one (no round trip to the trainer between programs).

**Isolation** (``isolation="bwrap"``, the default; see :mod:`.isolation`): every
server lives in its own bubblewrap sandbox: user, PID, network (loopback only),
IPC, UTS and mount namespaces; read-only system and Python folders and nothing
else of the host (no home folders, no project, no run directories); a private
size-capped ``/tmp``; uid 65534; an environment without secrets. Where bwrap
cannot start (no user namespaces) the pool falls back to ``isolation="rlimit"``
with a loud warning, or raises :class:`SandboxUnavailable` when
``require_isolation=True``.

**Per program**, in both modes (``_server.py``):

* its own session/process group, a fresh empty working folder (also ``HOME`` and
  ``TMPDIR``), removed afterwards;
* stdin from the given string; stdout/stderr captured through pipes and capped;
* rlimits: address space ``memory_mb``, CPU time ``cpu_s``, file size 10 MB,
  64 open files, no core dumps, processes (64 per server inside bwrap; 1024 for
  the user with ``rlimit``, where Linux ignores it for root);
* a wall-clock ``timeout_s``: the server kills the process group; what escaped it
  with ``setsid()`` is adopted by the server (a child subreaper) and killed, and
  inside bwrap anything left dies with the server's PID namespace;
* ``PYTHONHASHSEED=0`` and ``random`` seeded with 0, so runs are reproducible.

**Batched tests** (``batch_tests=True``, the default): :meth:`Sandbox.check_many` runs
the stdin/stdout tests of one program one after another in *one* child, since a fork
costs more than a short program (3x the throughput on TinyCode's 4 tests). Each test
still gets a fresh ``__main__``, its own stdin, stdout/stderr capture, wall-clock
timeout and CPU seconds, and the same ``random`` state. A test that times out,
crashes, exceeds its output cap, runs out of memory, ends the process (``os._exit``)
or starts a thread ends the child; the tests after it run in a fresh one. What a test
changes elsewhere in the interpreter (monkeypatched modules, ``os.environ``, files in
its folder) is seen by the later tests *of the same program*, never by another
program. A program can shift its output between its own tests (it can write to the
pipe the child reports on), never make a test pass without printing that test's
expected output, which never enters the sandbox. Assert-style tests (``{"code": ...}``)
always run one process per test, since they pass on exit status alone.
``batch_tests=False`` gives one fresh process per test everywhere.

**Statuses**: ``ok`` (exit 0), ``error`` (non-zero exit: an exception,
``sys.exit(n)``, a syntax error), ``timeout`` (wall clock or CPU limit),
``memory`` (an uncaught ``MemoryError``, which is what the address-space limit
raises), ``output_limit`` (more than ``max_output_bytes`` on stdout, or more than
``max(max_output_bytes, 1 MiB)`` on stderr), ``killed`` (a signal, e.g. a
segfault, or the program killed its server). A program calling ``sys.exit(213)``
shows as ``memory`` (the exit code the sandbox uses for it).

**Pool health**: a server is replaced by a fresh one after ``recycle_after``
programs (at the end of the chunk that reaches it) and after any anomaly (it
died, did not answer, or could not clean up after a program). Nothing survives
:meth:`Sandbox.close`, garbage collection of the Sandbox, or the trainer's exit,
even by SIGKILL (bwrap's ``--die-with-parent`` and the PID namespace; a plain
server gets a parent-death signal and kills the running program and what it left).

**Programs see** the standard library of the trainer's Python (no site-packages
unless ``site_packages=True``); common modules (``math``, ``collections``,
``re``...) are preloaded in the server, so importing them costs nothing.

What bwrap isolation does NOT give: no seccomp filter (the whole kernel system-call
surface is reachable, as in any unprivileged process), no cgroup limits (memory is
bounded per process by ``memory_mb`` and per server by the process limit, CPU by
``cpu_s`` and the wall timeout), and everything under ``/usr`` and the Python
installation is readable.

What ``isolation="rlimit"`` does NOT isolate: the network, the file system (the
trainer's user may read and write its files, credentials included), other
processes of the user; a program running as root may raise its own rlimits (the
wall-clock timeout is still enforced from outside).

**Native fork loop** (``native=True``, the default): the servers run stretches of single
programs in C (``forkrun.c``, compiled on first use by :mod:`coderlplus.cbuild` and sent
to the servers in their config): fork, the child's set-up, the collection of its output
and the answer, with no Python in the server between two forks. After a fork every page
either process writes costs a page fault; the Python loop touched ~170 pages of the
server per program, the C one ~15. Same results; batches of stdin tests, traces, a run
whose answer needs Python (files or processes left behind, output that is not UTF-8), or
a machine without a C compiler use the Python loop (``Sandbox.native`` says whether the
servers have the C one).

Linux only (``fork``, ``pidfd_open``, ``prctl``; without pidfd it polls).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import math
import os
import queue
import select
import shutil
import signal
import struct
import subprocess
import tempfile
import threading
import time
import warnings
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coderlplus import cbuild
from coderlplus.execution.isolation import (
    ISOLATIONS,
    IsolationUnavailable,
    bwrap_command,
    rlimit_command,
    sandbox_env,
    server_code,
)

log = logging.getLogger("coderlplus.sandbox")

# How long past the program's own timeout the parent waits for a server's answer
# (clean-up of what the program left) before declaring it dead.
_SERVER_GRACE_S = 20.0
_MAX_CHUNK = 16  # requests sent to a server in one message (see Sandbox._dispatch)
_START_TIMEOUT_S = 60.0  # a server's hello (bwrap + interpreter start; slow machines)
_BWRAP_NPROC = 64  # processes per server inside bwrap (its own user namespace counts them)
_FORKRUN = Path(__file__).with_name("forkrun.c")
_forkrun_state: dict = {}  # "blob": the compiled forkrun library, base64; "why": why there is none
_forkrun_lock = threading.Lock()

STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "killed")


def _forkrun_blob() -> str | None:
    """forkrun.c compiled (once per process), base64 for a server's config; None: cannot."""
    with _forkrun_lock:
        if "blob" not in _forkrun_state:
            blob, why = None, None
            try:
                lib = cbuild.build(_FORKRUN, ("-O2", "-shared", "-fPIC", "-s"))
                blob = base64.b64encode(lib.read_bytes()).decode()
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                why = f"cannot build {_FORKRUN.name}: {e}"
                log.info("coderlplus sandbox: %s; the servers run the Python fork loop", why)
            _forkrun_state.update(blob=blob, why=why)
        return _forkrun_state["blob"]


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot start with the requested isolation."""


@dataclass
class ExecResult:
    """The outcome of running one program on one input."""

    status: str
    """``"ok"``, ``"error"``, ``"timeout"``, ``"memory"``, ``"output_limit"`` or ``"killed"``."""
    stdout: str
    """What the program printed (at most ``max_output_bytes``; UTF-8, bad bytes replaced)."""
    stderr: str
    """The last few KB of stderr (tracebacks)."""
    duration_s: float
    """Wall-clock time from fork to exit."""
    returncode: int | None = None
    """Exit code, or minus the signal number that killed it; None if unknown."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class TraceOptions:
    """What :meth:`Sandbox.trace` records (defaults: the paper's module-level final values)."""

    entry: str | None = None
    """Also report the locals of this function (e.g. ``"main"``) when its call from module
    level returns; module-level names win on a clash."""
    trajectory: bool = False
    """Also record every change of a variable, line by line: ``[line, function, name, value]``."""
    max_events: int = 256
    """Trajectory length cap (``truncated`` is set when reached)."""
    max_items: int = 64
    """Longest list/tuple/set/dict kept; a longer one drops the variable."""
    max_total: int = 1000
    """Most items in one value, all nesting levels together."""
    max_depth: int = 4
    """Deepest nesting kept."""
    max_str: int = 1000
    """Longest string kept."""
    max_digits: int = 100
    """Largest integer kept, in decimal digits."""
    max_variables: int = 64
    """Most variables reported (the last bound)."""


@dataclass
class TraceResult:
    """A program run with its final variable values (:meth:`Sandbox.trace`)."""

    status: str
    """As :attr:`ExecResult.status`."""
    stdout: str
    stderr: str
    duration_s: float
    returncode: int | None = None
    variables: dict[str, Any] = field(default_factory=dict)
    """Name -> JSON-safe final value, ordered by the last line that binds the name (the
    last bound is last). Names starting with ``_``, callables, classes and modules
    are left out; set -> sorted list, tuple -> list, dict keys as JSON writes them."""
    lines: dict[str, int] = field(default_factory=dict)
    """Name -> last line of the program that binds it (0: not found in the source)."""
    scopes: dict[str, str] = field(default_factory=dict)
    """Name -> ``"module"`` or ``"entry"`` (a local of the ``entry`` function)."""
    dropped: list[str] = field(default_factory=list)
    """Names whose values have no JSON form or are too big (see :class:`TraceOptions`)."""
    entry_found: bool = False
    """Whether the ``entry`` function returned to module level."""
    trajectory: list[list] | None = None
    """``[line, function, name, value]`` per change, when asked for."""
    truncated: bool = False
    """The trajectory hit ``max_events``."""
    error: str | None = None
    """Why no variables came back although the program ran (the tracer's own failure)."""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class CheckResult:
    """A program checked against a list of tests (:meth:`Sandbox.check`)."""

    statuses: list[str]
    """Per test: ``"pass"``, ``"wrong"`` (ran, but printed something else or an assert
    failed), a run status (``"error"``, ``"timeout"``...), or ``"not_run"``."""
    results: list[ExecResult | None]
    """Per test: the run, or None if it was not run."""
    no_code: bool = False
    """There was no program to check."""

    @property
    def n_total(self) -> int:
        return len(self.statuses)

    @property
    def n_passed(self) -> int:
        return sum(s == "pass" for s in self.statuses)

    @property
    def passed(self) -> bool:
        """Every test passed (False for no program or no tests)."""
        return not self.no_code and bool(self.statuses) and self.n_passed == self.n_total

    @property
    def first_failure(self) -> int | None:
        return next((i for i, s in enumerate(self.statuses) if s not in ("pass", "not_run")), None)

    @property
    def status(self) -> str:
        """``"pass"``, ``"no_code"``, ``"no_tests"``, or the status of the first failing test."""
        if self.no_code:
            return "no_code"
        if not self.statuses:
            return "no_tests"
        i = self.first_failure
        return "pass" if i is None else self.statuses[i]


def compare_output(actual: str, expected: str) -> bool:
    """Whether two program outputs match, tolerant of whitespace at line ends.

    Trailing whitespace of every line and leading/trailing blank lines are
    ignored; ``\\r\\n`` equals ``\\n``. Everything else must match exactly.
    """
    return _normalize(actual) == _normalize(expected)


def _normalize(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.splitlines()]
    start, end = 0, len(lines)
    while start < end and not lines[start]:
        start += 1
    while end > start and not lines[end - 1]:
        end -= 1
    return lines[start:end]


def program_for_test(code: str, test: dict) -> tuple[str, str]:
    """The ``(program, stdin)`` that runs one test.

    Two test styles:

    * ``{"input": str, "output": str}``: the program reads ``input`` on stdin and must
      print ``output`` (compared with :func:`compare_output`);
    * ``{"code": str}``: Python run after the program in the same module, typically
      asserts on the program's functions (HumanEval's ``check(candidate)``); passes
      when it exits normally. An optional ``"setup": str`` runs before the program
      (e.g. a HumanEval prompt: its imports and helper functions).
    """
    if isinstance(test, dict) and isinstance(test.get("code"), str):
        setup = test.get("setup")
        head = f"{setup}\n" if isinstance(setup, str) and setup else ""
        return f"{head}{code}\n\n{test['code']}\n", str(test.get("input") or "")
    if isinstance(test, dict) and isinstance(test.get("input"), str) and isinstance(test.get("output"), str):
        return code, test["input"]
    raise ValueError(
        f'a test must be {{"input": str, "output": str}} (stdin/stdout) or {{"code": str}} '
        f"(asserts run after the program), got {test!r:.120}"
    )


def judge(test: dict, result: ExecResult) -> str:
    """``"pass"``, ``"wrong"`` or the run's failure status, for a test run by :func:`program_for_test`."""
    if "code" in test:
        if result.status == "ok":
            return "pass"
        last = result.stderr.strip().splitlines()[-1:] or [""]
        return "wrong" if result.status == "error" and last[0].startswith("AssertionError") else result.status
    if result.status != "ok":
        return result.status
    return "pass" if compare_output(result.stdout, test["output"]) else "wrong"


class _ServerDied(Exception):
    pass


class _Server:
    """One warm server process and the pipes to it. Not thread-safe: one user at a time."""

    def __init__(self, pool: Sandbox):
        self.pool = pool
        self.proc: subprocess.Popen | None = None
        self.base: str | None = None  # host folder of a plain server's work dirs
        self.log = None  # the server's stderr (bwrap's complaints, crash reports)
        self.hello: dict = {}
        self.served = 0
        self._inbox = bytearray()  # bytes read from the server, not yet taken as answers

    def start(self) -> None:
        pool = self.pool
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the server
        if pool.isolation == "bwrap":
            argv, _ = bwrap_command(pool._server_cfg(), pool.site_packages, pool.tmp_mb)
            env, cwd = sandbox_env("/tmp"), "/"
        else:
            self.base = tempfile.mkdtemp(prefix="coderlplus-sandbox-")
            argv = rlimit_command(pool._server_cfg(), self.base)
            env, cwd = sandbox_env(self.base), self.base
        # Started from the pool's one long-lived spawner thread: bwrap's --die-with-parent
        # fires when the *thread* that started it ends.
        self.proc = pool._spawner.submit(
            subprocess.Popen,
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=env,
            cwd=cwd,
            close_fds=True,
            start_new_session=True,  # Ctrl-C in the trainer's terminal does not reach it
        ).result()
        self.served = 0
        self._inbox = bytearray()
        try:
            try:  # the server's code (see isolation.SERVER_BOOTSTRAP)
                self.proc.stdin.write(server_code())
                self.proc.stdin.flush()
            except OSError as e:  # it died at once: its log says why
                raise _ServerDied(f"could not send the server its code: {e}") from e
            self.hello = self._read_frame(time.monotonic() + _START_TIMEOUT_S)
            if not self.hello.get("ready"):
                raise _ServerDied(f"unexpected hello {self.hello!r:.200}")
        except _ServerDied as e:
            detail = self.stderr_tail() or str(e)
            self.stop(kill=True)
            raise IsolationUnavailable(f"the {pool.isolation} sandbox server did not start: {detail}") from e

    def stderr_tail(self, n: int = 2000) -> str:
        if self.log is None:
            return ""
        try:
            self.log.seek(0, os.SEEK_END)
            size = self.log.tell()
            self.log.seek(max(0, size - n))
            return self.log.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""

    def request_chunk(self, messages: list[dict]):
        """Send requests as one chunk; yield their responses as the server sends them.

        Each response is waited for from the one before it: its runs' timeouts (twice) and
        a grace for clean-up. The server stops after a response with an anomaly (the
        caller replaces it).
        """
        proc = self.proc
        if proc is None or proc.stdin is None:
            raise _ServerDied("not running")
        payload = json.dumps({"chunk": messages}).encode()
        try:
            _write_all(proc.stdin.fileno(), struct.pack(">I", len(payload)) + payload)
        except OSError as e:
            raise _ServerDied(str(e) or type(e).__name__) from e
        for message in messages:
            runs = _n_runs(message)
            response = self._read_frame(time.monotonic() + runs * 2 * self.pool.timeout_s + _SERVER_GRACE_S)
            self.served += runs
            yield response

    def _read_frame(self, deadline: float) -> dict:
        proc = self.proc
        if proc is None or proc.stdout is None:
            raise _ServerDied("not running")
        try:
            fd = proc.stdout.fileno()
            self._fill(fd, 4, deadline)
            end = 4 + struct.unpack(">I", self._inbox[:4])[0]
            self._fill(fd, end, deadline)
            body = bytes(self._inbox[4:end])
            del self._inbox[:end]
            return json.loads(body)
        except (OSError, ValueError, EOFError, struct.error) as e:
            raise _ServerDied(str(e) or type(e).__name__) from e

    def _fill(self, fd: int, n: int, deadline: float) -> None:
        """Read until the inbox holds ``n`` bytes. Reads take what is there (often several
        answers at once: the server does not wait for us), not one frame at a time."""
        while len(self._inbox) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the sandbox server did not answer in time")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, max(n - len(self._inbox), 1 << 16))
            if not chunk:
                raise EOFError("the sandbox server exited")
            self._inbox += chunk

    def restart(self) -> None:
        self.stop(kill=True)
        self.start()

    def stop(self, kill: bool = False) -> None:
        _stop_server(self.proc, self.base, self.log, kill)
        self.proc, self.base, self.log = None, None, None


def _stop_server(proc: subprocess.Popen | None, base: str | None, log_file=None, kill: bool = False) -> None:
    if proc is not None:
        try:
            if not kill and proc.stdin is not None:
                proc.stdin.close()  # EOF: the server exits after its current program
                try:
                    proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    kill = True
            if kill or proc.poll() is None:
                # Everything below it first (inside bwrap: its init, the server, programs; they
                # would die with it anyway, but a moment later), then bwrap or the server.
                inside = descendants(proc.pid)
                for pid in inside:
                    with contextlib.suppress(OSError):
                        os.kill(pid, signal.SIGKILL)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    proc.kill()
                proc.wait(timeout=5.0)
                _wait_gone(inside, 2.0)
        except Exception:
            pass
        for f in (proc.stdin, proc.stdout):
            try:
                if f is not None:
                    f.close()
            except Exception:
                pass
    if base is not None:
        shutil.rmtree(base, ignore_errors=True)
    if log_file is not None:
        with contextlib.suppress(Exception):
            log_file.close()


def _wait_gone(pids: list[int], wait_s: float) -> None:
    """Wait until processes that are not our children have died (up to ``wait_s``)."""
    end = time.monotonic() + wait_s
    while pids and time.monotonic() < end:
        pids = [p for p in pids if _alive(p)]
        if pids:
            time.sleep(0.005)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _shutdown(servers: list[_Server], owner_pid: int, spawner: ThreadPoolExecutor) -> None:
    """Stop every server (the finalizer: must not reference the Sandbox)."""
    if os.getpid() != owner_pid:
        return  # a forked copy of the trainer exiting: the servers are not its own
    for s in servers:
        _stop_server(s.proc, s.base, s.log)
        s.proc, s.base, s.log = None, None, None
    spawner.shutdown(wait=False)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from ``/proc``)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, stack = [], [pid]
    while stack:
        for kid in children.get(stack.pop(), []):
            out.append(kid)
            stack.append(kid)
    return out


class Sandbox:
    """A pool of warm, isolated sandbox servers; see the module docstring.

    Args:
        timeout_s: wall-clock limit per program.
        memory_mb: address-space limit per program (0 or None: no limit).
        max_output_bytes: stdout cap; more kills the program with ``"output_limit"``.
        workers: server processes (programs run in parallel); default: usable CPUs.
        cpu_s: CPU-time limit per program; default ``ceil(timeout_s) + 1``.
        isolation: ``"bwrap"`` (namespaces, see :mod:`.isolation`) or ``"rlimit"``.
        require_isolation: with ``"bwrap"``, raise :class:`SandboxUnavailable` instead of
            falling back to ``"rlimit"`` when bwrap cannot start.
        tmp_mb: size of each bwrap server's private ``/tmp`` (the programs' files).
        recycle_after: replace a server by a fresh one after this many programs. A restart
            costs ~70 ms of CPU and stalls its worker ~0.1 s (~2.5 % of the pool's time at
            2,000 on 2 cores); the server runs no program code and its memory does not grow
            (+20 kB over 19,000 programs, 2026-11-27), so 10,000 by default.
        site_packages: let programs import the trainer's site-packages (read-only).
        batch_tests: in :meth:`check`/:meth:`check_many`, run a program's stdin/stdout
            tests one after another in one child process (a fresh ``__main__``, stdin,
            output capture, time limits and ``random`` state per test; see "Batched
            tests" above) instead of one process per test. ``False``: a fresh process
            for every test.

    Thread-safe (not fork-safe: create one per process). ``run``/``run_many``/
    ``check``/``trace`` never raise for anything a program does. Use as a context
    manager or call :meth:`close`; servers are also stopped at interpreter exit.
    """

    def __init__(
        self,
        timeout_s: float = 2.0,
        memory_mb: int = 512,
        max_output_bytes: int = 65536,
        workers: int | None = None,
        cpu_s: float | None = None,
        isolation: str = "bwrap",
        require_isolation: bool = False,
        tmp_mb: int = 64,
        recycle_after: int = 10000,
        site_packages: bool = False,
        batch_tests: bool = True,
        native: bool = True,
    ):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if max_output_bytes <= 0:
            raise ValueError(f"max_output_bytes must be positive, got {max_output_bytes}")
        if isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {isolation!r}")
        if recycle_after < 1 or tmp_mb < 1:
            raise ValueError("recycle_after and tmp_mb must be >= 1")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb or 0)
        self.max_output_bytes = int(max_output_bytes)
        self.workers = int(workers) if workers else _default_workers()
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.cpu_s = max(1, math.ceil(cpu_s if cpu_s is not None else math.ceil(self.timeout_s) + 1))
        self.isolation = isolation
        self.require_isolation = bool(require_isolation)
        self.tmp_mb = int(tmp_mb)
        self.recycle_after = int(recycle_after)
        self.site_packages = bool(site_packages)
        self.batch_tests = bool(batch_tests)
        self.native = bool(native)  # set from the first server's hello
        self.stats = {"programs": 0, "restarts": 0, "anomalies": 0, "server_deaths": 0}
        """Counters since creation: programs run, servers replaced (recycling included),
        anomalies reported by servers, servers that died under a program."""
        self._stats_lock = threading.Lock()
        self._servers: list[_Server] = []
        self._pid = os.getpid()
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-spawner")
        self._finalizer = weakref.finalize(self, _shutdown, self._servers, self._pid, self._spawner)
        self._idle: queue.SimpleQueue[_Server] = queue.SimpleQueue()
        self._closed = False
        try:
            self._start_servers()
        except BaseException:
            self.close()
            raise

    def _server_cfg(self) -> dict:
        return {
            "timeout_s": self.timeout_s,
            "memory_mb": self.memory_mb,
            "max_output_bytes": self.max_output_bytes,
            "cpu_s": self.cpu_s,
            "nproc": _BWRAP_NPROC if self.isolation == "bwrap" else None,
            "contained": self.isolation == "bwrap",  # a PID namespace ends everything with the server
            "forkrun": _forkrun_blob() if self.native else None,
        }

    def _start_servers(self) -> None:
        first = _Server(self)
        try:
            first.start()
        except IsolationUnavailable as e:
            if self.isolation != "bwrap":
                raise SandboxUnavailable(str(e)) from e
            if self.require_isolation:
                raise SandboxUnavailable(
                    f"{e}\nbubblewrap isolation is required (require_isolation / "
                    "execution.require_isolation=true); fix bwrap or set isolation=rlimit."
                ) from e
            message = (
                "\n" + "!" * 78 + "\n"
                "coderlplus sandbox: bubblewrap could not start, so programs run WITHOUT namespaces\n"
                "(isolation='rlimit': they can reach the network and this user's files).\n"
                f"Reason: {e}\n"
                "Set execution.require_isolation=true to make this an error.\n" + "!" * 78
            )
            log.warning(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
            self.isolation = "rlimit"
            first = _Server(self)
            first.start()
        if self.native and not first.hello.get("native"):
            log.info("coderlplus sandbox: Python fork loop (%s)", first.hello.get("native_off"))
        self.native = bool(first.hello.get("native"))
        outer = first.hello.get("outer_uid")
        if self.isolation == "bwrap" and outer is not None and str(outer) == "0":
            log.warning(
                "coderlplus sandbox: bwrap runs as root outside the sandbox (could not drop to an "
                "unprivileged uid): RLIMIT_NPROC does not apply. Server log: %s",
                first.stderr_tail(),
            )
        self._servers.append(first)
        self._idle.put(first)
        for _ in range(self.workers - 1):
            server = _Server(self)
            server.start()
            self._servers.append(server)
            self._idle.put(server)

    # ------------------------------------------------------------------ running

    def run(self, code: str, stdin: str = "") -> ExecResult:
        """Run one program on one input."""
        return self.run_many([(code, stdin)])[0]

    def run_many(self, items: Sequence[tuple[str, str]]) -> list[ExecResult]:
        """Run ``(code, stdin)`` pairs in parallel over the workers; results in the same order."""
        requests = [{"code": str(code), "stdin": str(stdin or ""), "trace": None} for code, stdin in items]
        return [_exec_result(r) for r in self._dispatch(requests)]

    def trace(self, code: str, stdin: str = "", options: TraceOptions | None = None) -> TraceResult:
        """Run one program and return its final variable values (see :class:`TraceResult`)."""
        return self.trace_many([(code, stdin)], options)[0]

    def trace_many(
        self, items: Sequence[tuple[str, str]], options: TraceOptions | None = None
    ) -> list[TraceResult]:
        """:meth:`trace` for many ``(code, stdin)`` pairs, in parallel."""
        opts = asdict(options or TraceOptions())
        requests = [{"code": str(code), "stdin": str(stdin or ""), "trace": opts} for code, stdin in items]
        return [_trace_result(r) for r in self._dispatch(requests)]

    def check(
        self, code: str | None, tests: Sequence[dict], stop_at_first_failure: bool = False
    ) -> CheckResult:
        """Run a program on its tests (both styles, see :func:`program_for_test`)."""
        return self.check_many([(code, tests)], stop_at_first_failure)[0]

    def check_many(
        self, items: Sequence[tuple[str | None, Sequence[dict]]], stop_at_first_failure: bool = False
    ) -> list[CheckResult]:
        """Check many ``(code, tests)`` pairs; all their runs go to the pool in one batch.

        With ``stop_at_first_failure`` the first test of every program runs first and
        the others only for programs that passed it (two batches); tests not run are
        ``"not_run"``. A ``None`` program gives ``no_code``.
        """
        checks = [
            CheckResult(["not_run"] * len(tests), [None] * len(tests), no_code=code is None)
            for code, tests in items
        ]
        jobs = []  # (item, test index, program, stdin)
        for i, (code, tests) in enumerate(items):
            for j, test in enumerate(tests):
                program, stdin = program_for_test(code or "", test)  # validates every test first
                jobs.append((i, j, program, stdin))
        jobs = [job for job in jobs if items[job[0]][0] is not None]

        def run_jobs(selected):
            requests, owners = [], []  # one request per program: its stdin tests together
            for i, group in itertools.groupby(selected, key=lambda job: job[0]):
                batch, single = [], []
                for job in group:
                    (batch if self.batch_tests and "code" not in items[i][1][job[1]] else single).append(job)
                if len(batch) > 1:
                    requests.append({"code": batch[0][2], "stdins": [job[3] for job in batch]})
                    owners.append(batch)
                else:
                    single += batch
                for job in single:
                    requests.append({"code": job[2], "stdin": job[3], "trace": None})
                    owners.append([job])
            for batch, response in zip(owners, self._dispatch(requests)):
                for (i, j, _, _), r in zip(batch, response.get("runs") or [response]):
                    result = _exec_result(r)
                    checks[i].results[j] = result
                    checks[i].statuses[j] = judge(items[i][1][j], result)

        if stop_at_first_failure:
            run_jobs([job for job in jobs if job[1] == 0])
            run_jobs([job for job in jobs if job[1] > 0 and checks[job[0]].statuses[0] == "pass"])
        else:
            run_jobs(jobs)
        return checks

    def _dispatch(self, requests: list[dict]) -> list[dict]:
        """Send requests to the servers, in parallel; responses in the same order."""
        if self._closed:
            raise RuntimeError("this Sandbox is closed")
        if os.getpid() != self._pid:
            raise RuntimeError("a Sandbox cannot be used in a forked child process; create one there")
        responses: list[dict | None] = [None] * len(requests)
        # Requests go to the servers in chunks, answered one by one as they finish: a
        # server goes straight on to its next program while this thread reads the last
        # result. Several chunks per worker keep the workers evenly loaded to the end.
        size = max(1, min(_MAX_CHUNK, len(requests) // (4 * self.workers)))
        chunks = iter(range(0, len(requests), size))
        lock = threading.Lock()

        def work() -> None:
            server = self._idle.get()
            try:
                while True:
                    with lock:
                        start = next(chunks, None)
                    if start is None:
                        return
                    stop = min(start + size, len(requests))
                    responses[start:stop] = self._execute(server, requests[start:stop])
            finally:
                self._idle.put(server)

        n_threads = min(self.workers, -(-len(requests) // size))
        if n_threads <= 1:
            if requests:
                work()
        else:
            threads = [threading.Thread(target=work, daemon=True) for _ in range(n_threads)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        with self._stats_lock:
            self.stats["programs"] += sum(_n_runs(r) for r in requests)
        return [
            r if r is not None else _failure("sandbox internal error: no result", n_runs=_n_runs(q))
            for q, r in zip(requests, responses)
        ]

    def _execute(self, server: _Server, requests: list[dict]) -> list[dict]:
        """Responses to ``requests``, run on ``server`` as one chunk.

        A response with an anomaly, or a server that dies or stops answering, ends the
        chunk there: that server is replaced and the requests after it go to the fresh one
        (a program that killed its server gets a ``killed`` failure; the others of its
        chunk run normally).
        """
        responses: list[dict] = []
        while len(responses) < len(requests):
            pending = requests[len(responses) :]
            t0 = time.monotonic()
            try:
                if server.proc is None:  # a restart failed earlier: try again
                    self._replace(server)
                for request, response in zip(pending, server.request_chunk(pending)):
                    n_runs = _n_runs(request)
                    if n_runs > 1 and len(response.get("runs") or ()) != n_runs:
                        raise _ServerDied(f"expected {n_runs} results, got {str(response)[:200]}")
                    responses.append(response)
                    t0 = time.monotonic()
                    if response.get("anomaly"):
                        self._count("anomalies")
                        self._replace(server)
                        break
                else:
                    if server.served >= self.recycle_after:
                        self._replace(server)
            except _ServerDied as e:
                # Most likely the program killed its server (or every process it could see).
                self._count("server_deaths")
                tail = server.stderr_tail(500)
                with contextlib.suppress(Exception):
                    self._replace(server)
                responses.append(
                    _failure(
                        f"sandbox: the server process died while running this program ({e}); replaced it"
                        + (f"\n{tail}" if tail else ""),
                        time.monotonic() - t0,
                        _n_runs(requests[len(responses)]),
                    )
                )
            except Exception as e:  # a bug or a failed restart must not reach the trainer
                with contextlib.suppress(Exception):
                    self._replace(server)  # its answers may be out of step now
                responses.append(
                    _failure(
                        f"sandbox internal error: {type(e).__name__}: {e}",
                        time.monotonic() - t0,
                        _n_runs(requests[len(responses)]),
                    )
                )
        return responses

    def _replace(self, server: _Server) -> None:
        self._count("restarts")
        server.restart()

    def _count(self, key: str) -> None:
        with self._stats_lock:
            self.stats[key] += 1

    # ------------------------------------------------------------------ life cycle

    def processes(self) -> list[int]:
        """Pids of every process of this pool on the host (servers, bwrap, programs)."""
        pids = []
        for s in self._servers:
            if s.proc is not None and s.proc.poll() is None:
                pids += [s.proc.pid, *descendants(s.proc.pid)]
        return pids

    def close(self) -> None:
        """Stop the servers and everything they run (idempotent)."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Sandbox(timeout_s={self.timeout_s}, memory_mb={self.memory_mb}, "
            f"max_output_bytes={self.max_output_bytes}, workers={self.workers}, cpu_s={self.cpu_s}, "
            f"isolation={self.isolation!r})"
        )


def _failure(msg: str, duration_s: float = 0.0, n_runs: int = 1) -> dict:
    one = {"status": "killed", "stdout": "", "stderr": msg, "duration_s": duration_s, "returncode": None}
    return one if n_runs == 1 else {"runs": [dict(one) for _ in range(n_runs)], "anomaly": None}


def _n_runs(request: dict) -> int:
    """How many program runs a request asks for (a batch: one per stdin)."""
    return len(request["stdins"]) if "stdins" in request else 1


def _exec_result(r: dict) -> ExecResult:
    return ExecResult(
        status=str(r["status"]),
        stdout=str(r["stdout"]),
        stderr=str(r["stderr"]),
        duration_s=float(r["duration_s"]),
        returncode=r.get("returncode"),
    )


def _trace_result(r: dict) -> TraceResult:
    result = TraceResult(**asdict(_exec_result(r)))
    trace = r.get("trace")
    if not isinstance(trace, dict):
        return result
    if "error" in trace:
        result.error = str(trace["error"])
        return result
    result.variables = dict(trace.get("variables") or {})
    result.lines = dict(trace.get("lines") or {})
    result.scopes = dict(trace.get("scopes") or {})
    result.dropped = list(trace.get("dropped") or [])
    result.entry_found = bool(trace.get("entry_found"))
    result.trajectory = trace.get("trajectory")
    result.truncated = bool(trace.get("truncated"))
    return result
