"""Run untrusted Python programs fast, with limits: the sandbox behind code rewards.

RL runs hundreds of short programs per step, so starting an interpreter per
program (~20-50 ms) is too slow. A :class:`Sandbox` keeps a small pool of warm
*server* processes (``_server.py``, one per worker, started once with a scrubbed
environment). For each program a server ``fork()``s a fresh child, so each
program starts in a clean interpreter in a few milliseconds (about 1.6 ms of
throughput per trivial program with 2 workers on 2 slow cores). The parent talks
to the servers over pipes (length-prefixed JSON) and spreads
:meth:`Sandbox.run_many` over them with one thread per server.

What each program gets (see ``_server.py``):

* its own session/process group, a fresh empty temp dir as cwd (and ``HOME``,
  ``TMPDIR``), removed afterwards;
* stdin from the given string; stdout/stderr captured through pipes;
* rlimits: address space ``memory_mb``, CPU time ``cpu_s``, file size 10 MB,
  64 open files, no core dumps (and 1024 processes, which Linux ignores for root);
* a wall-clock ``timeout_s``: the server kills the process group when it expires;
  leftover descendants, even ones that called ``setsid()``, are adopted by the
  server (a child subreaper) and killed;
* an environment holding only ``PATH``, ``LANG``/``LC_ALL=C.UTF-8``, ``HOME``,
  ``TMPDIR``, ``PYTHONHASHSEED=0``, ``PYTHONDONTWRITEBYTECODE=1`` (and
  ``LD_LIBRARY_PATH`` when set, for interpreters that need it): no API keys.

Statuses: ``ok`` (exit 0), ``error`` (non-zero exit: an exception, ``sys.exit(n)``,
a syntax error), ``timeout`` (wall clock or CPU limit), ``memory`` (an uncaught
``MemoryError``, which is what hitting the address-space limit raises),
``output_limit`` (more than ``max_output_bytes`` on stdout, or more than
``max(max_output_bytes, 1 MiB)`` on stderr), ``killed`` (a signal, e.g. a
segfault, or the program killed its server).

What it does NOT isolate (this is resource limiting, not a security boundary):

* the network: programs can open sockets (a later version adds namespaces via
  bubblewrap);
* the file system: programs run as the same user as the trainer and may read or
  write any file that user can, credentials files such as ``~/.netrc`` included
  (only their cwd is private and cleaned up);
* other processes of the same user: a program may signal them;
* a program running as root may raise its own rlimits (the wall-clock timeout
  is still enforced from outside);
* if a program kills its server, the program itself dies with it
  (``PR_SET_PDEATHSIG``), but what it forked may survive.

Linux only (``fork``, ``pidfd_open``, ``prctl``; without pidfd it polls).
Running out of memory in a way that is not a ``MemoryError`` (an extension
aborting) shows as ``killed``; a program calling ``sys.exit(213)`` shows as
``memory`` (the exit code the sandbox uses for it).

Determinism: ``PYTHONHASHSEED=0`` and ``random`` seeded with 0 in every program.
The server preloads common standard modules (``math``, ``collections``, ``re``...);
site-packages of the trainer's interpreter are importable.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_SERVER_SCRIPT = Path(__file__).with_name("_server.py")
# How long past the program's own timeout the parent waits for a server's answer
# (server start-up, clean-up of what the program left) before declaring it dead.
_SERVER_GRACE_S = 20.0

STATUSES = ("ok", "error", "timeout", "memory", "output_limit", "killed")


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


def _scrubbed_env(home: str) -> dict[str, str]:
    env = {
        "PATH": os.environ.get("PATH", os.defpath),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "TMPDIR": home,
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if os.environ.get("LD_LIBRARY_PATH"):  # some interpreters cannot start without it
        env["LD_LIBRARY_PATH"] = os.environ["LD_LIBRARY_PATH"]
    return env


class _ServerDied(Exception):
    pass


class _Server:
    """One warm server process and the pipes to it. Not thread-safe: one user at a time."""

    def __init__(self, config: dict):
        self.config = config
        self.proc: subprocess.Popen | None = None
        self.base: str | None = None
        self.start()

    def start(self) -> None:
        self.base = tempfile.mkdtemp(prefix="coderlplus-sandbox-")
        cfg = json.dumps(self.config | {"base": self.base})
        self.proc = subprocess.Popen(
            [sys.executable, "-s", str(_SERVER_SCRIPT), cfg],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_scrubbed_env(self.base),
            cwd=self.base,
            close_fds=True,
            start_new_session=True,  # Ctrl-C in the trainer's terminal does not reach it
        )

    def request(self, payload: bytes, wait_s: float) -> dict:
        proc = self.proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise _ServerDied("not running")
        try:
            _write_all(proc.stdin.fileno(), struct.pack(">I", len(payload)) + payload)
            deadline = time.monotonic() + wait_s
            head = _read_exact(proc.stdout.fileno(), 4, deadline)
            body = _read_exact(proc.stdout.fileno(), struct.unpack(">I", head)[0], deadline)
            return json.loads(body)
        except (OSError, ValueError, EOFError, struct.error) as e:
            raise _ServerDied(str(e) or type(e).__name__) from e

    def restart(self) -> None:
        self.stop(kill=True)
        self.start()

    def stop(self, kill: bool = False) -> None:
        _stop_server(self.proc, self.base, kill)
        self.proc, self.base = None, None


def _stop_server(proc: subprocess.Popen | None, base: str | None, kill: bool = False) -> None:
    if proc is not None:
        try:
            if not kill and proc.stdin is not None:
                proc.stdin.close()  # EOF: the server exits after its current program
                try:
                    proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    kill = True
            if kill or proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    proc.kill()
                proc.wait(timeout=5.0)
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


def _shutdown(servers: list[_Server], owner_pid: int) -> None:
    """Stop every server (the finalizer: must not reference the Sandbox)."""
    if os.getpid() != owner_pid:
        return  # a forked copy of the trainer exiting: the servers are not its own
    for s in servers:
        _stop_server(s.proc, s.base)
        s.proc, s.base = None, None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exact(fd: int, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the sandbox server did not answer in time")
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            continue
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            raise EOFError("the sandbox server exited")
        buf += chunk
    return bytes(buf)


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


class Sandbox:
    """A pool of warm sandbox servers; see the module docstring.

    Args:
        timeout_s: wall-clock limit per program.
        memory_mb: address-space limit per program (0 or None: no limit).
        max_output_bytes: stdout cap; more kills the program with ``"output_limit"``.
        workers: server processes (programs run in parallel); default: usable CPUs.
        cpu_s: CPU-time limit per program; default ``ceil(timeout_s) + 1``.

    Thread-safe (not fork-safe: create one per process). ``run``/``run_many`` never
    raise for anything a program does.
    Use as a context manager or call :meth:`close`; servers are also stopped at
    interpreter exit.
    """

    def __init__(
        self,
        timeout_s: float = 2.0,
        memory_mb: int = 512,
        max_output_bytes: int = 65536,
        workers: int | None = None,
        cpu_s: float | None = None,
    ):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if max_output_bytes <= 0:
            raise ValueError(f"max_output_bytes must be positive, got {max_output_bytes}")
        self.timeout_s = float(timeout_s)
        self.memory_mb = int(memory_mb or 0)
        self.max_output_bytes = int(max_output_bytes)
        self.workers = int(workers) if workers else _default_workers()
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.cpu_s = max(1, math.ceil(cpu_s if cpu_s is not None else math.ceil(self.timeout_s) + 1))
        config = {
            "timeout_s": self.timeout_s,
            "memory_mb": self.memory_mb,
            "max_output_bytes": self.max_output_bytes,
            "cpu_s": self.cpu_s,
        }
        self._servers: list[_Server] = []
        self._pid = os.getpid()
        self._finalizer = weakref.finalize(self, _shutdown, self._servers, self._pid)
        self._idle: queue.SimpleQueue[_Server] = queue.SimpleQueue()
        self._closed = False
        for _ in range(self.workers):
            server = _Server(config)
            self._servers.append(server)
            self._idle.put(server)

    # ------------------------------------------------------------------ running

    def run(self, code: str, stdin: str = "") -> ExecResult:
        """Run one program on one input."""
        return self.run_many([(code, stdin)])[0]

    def run_many(self, items: Sequence[tuple[str, str]]) -> list[ExecResult]:
        """Run ``(code, stdin)`` pairs in parallel over the workers; results in the same order."""
        if self._closed:
            raise RuntimeError("this Sandbox is closed")
        if os.getpid() != self._pid:
            raise RuntimeError("a Sandbox cannot be used in a forked child process; create one there")
        items = list(items)
        results: list[ExecResult | None] = [None] * len(items)
        next_index = iter(range(len(items)))
        lock = threading.Lock()

        def work() -> None:
            server = self._idle.get()
            try:
                while True:
                    with lock:
                        i = next(next_index, None)
                    if i is None:
                        return
                    code, stdin = items[i]
                    results[i] = self._execute(server, code, stdin)
            finally:
                self._idle.put(server)

        n_threads = min(self.workers, len(items))
        if n_threads <= 1:
            if items:
                work()
        else:
            threads = [threading.Thread(target=work, daemon=True) for _ in range(n_threads)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        return [r if r is not None else _internal_error("no result") for r in results]

    def _execute(self, server: _Server, code: str, stdin: str) -> ExecResult:
        t0 = time.monotonic()
        try:
            payload = json.dumps({"code": str(code), "stdin": str(stdin or "")}).encode()
            resp = server.request(payload, wait_s=2 * self.timeout_s + _SERVER_GRACE_S)
            return ExecResult(
                status=str(resp["status"]),
                stdout=str(resp["stdout"]),
                stderr=str(resp["stderr"]),
                duration_s=float(resp["duration_s"]),
                returncode=resp.get("returncode"),
            )
        except _ServerDied as e:
            # Most likely the program killed its server. Start a new one; report the program.
            with contextlib.suppress(Exception):
                server.restart()
            return ExecResult(
                status="killed",
                stdout="",
                stderr=f"sandbox: the server process died while running this program ({e}); restarted it",
                duration_s=time.monotonic() - t0,
                returncode=None,
            )
        except Exception as e:  # a bug in the sandbox must not reach the trainer
            return _internal_error(f"{type(e).__name__}: {e}", time.monotonic() - t0)

    # ------------------------------------------------------------------ life cycle

    def close(self) -> None:
        """Stop the servers (idempotent)."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Sandbox(timeout_s={self.timeout_s}, memory_mb={self.memory_mb}, "
            f"max_output_bytes={self.max_output_bytes}, workers={self.workers}, cpu_s={self.cpu_s})"
        )


def _internal_error(msg: str, duration_s: float = 0.0) -> ExecResult:
    return ExecResult("killed", "", f"sandbox internal error: {msg}", duration_s, None)
