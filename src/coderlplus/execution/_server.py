"""A sandbox server: a warm Python process that forks one fresh child per program.

Started by :class:`coderlplus.execution.sandbox.Sandbox` as
``python -s _server.py CONFIG_JSON`` with a scrubbed environment. It imports
nothing from ``coderlplus``: it is a plain script, so that it starts fast and
the programs it forks see a small interpreter.

Protocol, on the server's stdin (requests) and stdout (responses): frames of a
4-byte big-endian length followed by UTF-8 JSON.

* request: ``{"code": str, "stdin": str}``
* response: ``{"status": str, "stdout": str, "stderr": str, "duration_s": float,
  "returncode": int | None}``

For each request the server forks a child that becomes a session leader, sets
resource limits, moves into a fresh private temp dir, takes its stdin from a
memory file and writes stdout/stderr to pipes, then ``exec``s the program. The
server reads both pipes while the child runs (capped), enforces the wall-clock
timeout by killing the child's process group, and, being a *child subreaper*,
adopts and kills whatever the program left running (even processes that called
``setsid()``). The server never runs program code itself. It exits when its
stdin reaches EOF (the parent closed it or died).
"""

from __future__ import annotations

import builtins
import contextlib
import gc
import itertools
import json
import os
import resource
import select
import shutil
import signal
import struct
import sys
import tempfile
import time
import types

# Exit code the child uses for an uncaught MemoryError (mapped to status "memory").
EXIT_MEMORY = 213
# Exit code of a child that failed before the program started (a sandbox problem).
EXIT_SETUP = 214
FSIZE_BYTES = 10 * 1024 * 1024  # the largest file a program may write
NOFILE = 64  # open file descriptors
NPROC = 1024  # processes of the user (ignored for root)
STACK_BYTES = 64 * 1024 * 1024  # main-thread stack, for deep recursion
STDERR_TAIL_BYTES = 8192  # how much of stderr comes back (the end of it)
READ_CHUNK = 65536
ORPHAN_KILL_BUDGET_S = 2.0  # the longest we spend killing what a program left behind

# Imported once here so that programs using them start fast (the child is a fork).
PRELOAD = (
    "array",
    "bisect",
    "collections",
    "copy",
    "dataclasses",
    "datetime",
    "decimal",
    "fractions",
    "functools",
    "heapq",
    "itertools",
    "linecache",
    "math",
    "operator",
    "random",
    "re",
    "string",
    "threading",
    "traceback",
    "typing",
)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36


def _load_libc():
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True)
    except Exception:
        return None


_libc = _load_libc()


def _prctl(option: int, arg: int) -> bool:
    if _libc is None:
        return False
    try:
        return _libc.prctl(option, arg, 0, 0, 0) == 0
    except Exception:
        return False


# --------------------------------------------------------------------------- child


def _set_limits(cfg: dict) -> None:
    def lim(res: int, soft: int, hard: int | None = None) -> None:
        hard = soft if hard is None else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(res, (soft, hard))

    cpu = int(cfg["cpu_s"])
    lim(resource.RLIMIT_CPU, cpu, cpu + 1)  # SIGXCPU at cpu s, SIGKILL at cpu+1 s
    lim(resource.RLIMIT_FSIZE, FSIZE_BYTES)
    lim(resource.RLIMIT_NOFILE, NOFILE)
    lim(resource.RLIMIT_CORE, 0)
    if hasattr(resource, "RLIMIT_NPROC"):
        lim(resource.RLIMIT_NPROC, NPROC)
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_STACK)
        soft = STACK_BYTES if hard == resource.RLIM_INFINITY else min(STACK_BYTES, hard)
        resource.setrlimit(resource.RLIMIT_STACK, (soft, hard))
    if cfg["memory_mb"]:
        mem = int(cfg["memory_mb"]) * 1024 * 1024
        lim(resource.RLIMIT_AS, mem)  # last: it may make later allocations fail


def _stdin_fd(data: bytes) -> int:
    """A readable fd holding ``data`` (an anonymous memory file, no name on disk)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("stdin", 0)
    else:  # pragma: no cover - non-Linux
        fd, path = tempfile.mkstemp()
        os.unlink(path)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _print_exception(exc: BaseException) -> None:
    """Print a traceback like the interpreter does, without this file's frame."""
    try:
        tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        exc = exc.with_traceback(tb)
        if sys.excepthook is sys.__excepthook__:
            import traceback  # (preloaded) shows the program's lines, via linecache

            traceback.print_exception(type(exc), exc, tb)
        else:  # the program installed its own hook
            sys.excepthook(type(exc), exc, tb)
    except BaseException:
        with contextlib.suppress(BaseException):
            os.write(2, f"{type(exc).__name__}\n".encode())


def _exit_code(e: SystemExit) -> int:
    """What the interpreter would exit with for ``raise SystemExit(code)``."""
    code = e.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(BaseException):
        print(code, file=sys.stderr)
    return 1


def _run_program(code: str, module: types.ModuleType) -> int:
    try:
        exec(compile(code, "<program>", "exec"), module.__dict__)
        rc = 0
    except SystemExit as e:
        rc = _exit_code(e)
    except MemoryError as e:
        _print_exception(e)
        return EXIT_MEMORY
    except BaseException as e:
        _print_exception(e)
        rc = 1
    # What the interpreter does at exit: join non-daemon threads, run atexit handlers.
    try:
        threading = sys.modules.get("threading")
        if threading is not None and threading.active_count() > 1:
            threading._shutdown()
        import atexit

        atexit._run_exitfuncs()
    except SystemExit as e:
        rc = _exit_code(e)
    except MemoryError:
        return EXIT_MEMORY
    except BaseException as e:
        _print_exception(e)
    return rc


# Text streams on fds 0, 1, 2 for the programs, made once by _make_stdio() (saves ~0.2 ms per
# program): a stream object only remembers its fd number, and the child dup2()s its own
# stdin/stdout/stderr onto these numbers.
_STDIO: tuple = ()


def _make_stdio() -> tuple:
    """Streams on fds 0/1/2 while these are files of the kinds the child will have."""
    saved_err = os.dup(2)
    empty = _stdin_fd(b"")
    os.dup2(empty, 0)  # a memory file, like the child's stdin
    dummy_r, dummy_w = os.pipe()  # pipes, like the child's stdout and stderr
    os.dup2(dummy_w, 1)
    os.dup2(dummy_w, 2)
    stdio = (
        open(0, encoding="utf-8", closefd=False),  # noqa: SIM115
        open(1, "w", encoding="utf-8", closefd=False),  # noqa: SIM115
        open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1),  # noqa: SIM115
    )
    for s in stdio:  # settle lazily cached properties now, while they are true of the child's files
        s.seekable()
    os.dup2(saved_err, 2)  # the server's own stderr stays the trainer's (for crash reports)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)
    for fd in (saved_err, empty, dummy_r, dummy_w, null):
        os.close(fd)
    return stdio


def _child(code: str, stdin: str, out_w: int, err_w: int, workdir: str, cfg: dict, server_pid: int):
    """Runs in the forked child; never returns."""
    try:
        os.setsid()
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the server
        if os.getppid() != server_pid:
            os._exit(EXIT_SETUP)
        in_fd = _stdin_fd(stdin.encode("utf-8", "replace"))
        os.dup2(in_fd, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        os.closerange(3, 1 << 16)
        os.chdir(workdir)
        os.environ["HOME"] = workdir
        os.environ["TMPDIR"] = workdir
        import atexit

        atexit._clear()
        sys.stdin, out, err = _STDIO
        sys.__stdin__, sys.stdout, sys.__stdout__, sys.stderr, sys.__stderr__ = sys.stdin, out, out, err, err
        random = sys.modules.get("random")
        if random is not None:
            random.seed(0)  # every program starts from the same random state
        sys.argv = ["<program>"]
        sys.path[0:0] = [workdir]
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = builtins
        sys.modules["__main__"] = main
        linecache = sys.modules.get("linecache")
        if linecache is not None:  # so that tracebacks show the program's lines
            linecache.cache["<program>"] = (len(code), None, code.splitlines(True), "<program>")
        _set_limits(cfg)
    except BaseException as e:
        with contextlib.suppress(BaseException):
            os.write(2, f"sandbox: child setup failed: {type(e).__name__}: {e}\n".encode())
        os._exit(EXIT_SETUP)
    rc = _run_program(code, main)
    for f in (sys.stdout, out, sys.stderr, err):
        with contextlib.suppress(BaseException):
            f.flush()
    os._exit(rc)


# --------------------------------------------------------------------------- server side


def _read_available(fd: int) -> tuple[bytes, bool]:
    """Read what ``fd`` (non-blocking) has now: (data, eof)."""
    chunks = []
    while True:
        try:
            chunk = os.read(fd, READ_CHUNK)
        except BlockingIOError:
            return b"".join(chunks), False
        except OSError:
            return b"".join(chunks), True
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        if len(chunk) < READ_CHUNK:
            return b"".join(chunks), False


def _children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        pass
    kids = []  # no /proc/.../children: scan every process's parent
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    stat = f.read()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return kids


def _reap_orphans() -> None:
    """Kill and reap every process the program left behind (adopted by us, the subreaper)."""
    me = os.getpid()
    give_up = time.monotonic() + ORPHAN_KILL_BUDGET_S
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # no children left
        if pid:
            continue
        kids = _children_of(me)
        for k in kids:
            with contextlib.suppress(OSError):
                os.kill(k, signal.SIGKILL)
        if time.monotonic() > give_up:
            return
        if kids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(-1, 0)
        else:
            time.sleep(0.001)


class _Capture:
    """Collects one pipe's output up to a cap; keeps the head (stdout) or the tail (stderr)."""

    def __init__(self, cap: int, keep_tail: int | None = None):
        self.cap = cap
        self.keep_tail = keep_tail
        self.buf = bytearray()
        self.total = 0

    def add(self, data: bytes) -> bool:
        """Append; False once more than ``cap`` bytes came in."""
        self.total += len(data)
        if self.keep_tail is None:
            room = self.cap - len(self.buf)
            if room > 0:
                self.buf += data[:room]
        else:
            self.buf += data
            if len(self.buf) > 2 * self.keep_tail:
                del self.buf[: -self.keep_tail]
        return self.total <= self.cap

    def text(self) -> str:
        data = bytes(self.buf if self.keep_tail is None else self.buf[-self.keep_tail :])
        return data.decode("utf-8", "replace")


def _child_exited(pid: int) -> bool:
    """Whether ``pid`` has exited, without reaping it (its pid stays reserved)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


_dir_counter = itertools.count()


def _remove_dir(path: str) -> None:
    try:
        os.rmdir(path)  # the common case: the program wrote no files
    except OSError:
        shutil.rmtree(path, ignore_errors=True)


def run_one(code: str, stdin: str, cfg: dict, base: str) -> dict:
    timeout_s = float(cfg["timeout_s"])
    out = _Capture(int(cfg["max_output_bytes"]))
    err = _Capture(max(int(cfg["max_output_bytes"]), 1 << 20), keep_tail=STDERR_TAIL_BYTES)
    workdir = os.path.join(base, f"p{next(_dir_counter)}")
    os.mkdir(workdir, 0o700)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pidfd = -1
    server_pid = os.getpid()
    t0 = time.monotonic()
    try:
        pid = os.fork()
        if pid == 0:
            _child(code, stdin, out_w, err_w, workdir, cfg, server_pid)
        os.close(out_w)
        os.close(err_w)
        out_w = err_w = -1
        os.set_blocking(out_r, False)
        os.set_blocking(err_r, False)
        poller = select.poll()
        streams = {out_r: out, err_r: err}
        for fd in streams:
            poller.register(fd, select.POLLIN)
        try:
            pidfd = os.pidfd_open(pid)
            poller.register(pidfd, select.POLLIN)
        except (AttributeError, OSError):
            pidfd = -1  # old kernel: poll the child's state every few ms instead
        deadline = t0 + timeout_s
        status = None
        exited = False
        while status is None and not exited:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                status = "timeout"
                break
            wait_ms = remaining * 1000 if pidfd >= 0 else min(remaining * 1000, 5)
            for fd, _ in poller.poll(max(1, int(wait_ms + 1))):
                if fd == pidfd:
                    exited = True
                    continue
                data, eof = _read_available(fd)
                if not streams[fd].add(data):
                    status = "output_limit"
                if eof:
                    poller.unregister(fd)
            if pidfd < 0 and not exited:
                exited = _child_exited(pid)
        if exited and status is None:  # what the child wrote before exiting is still in the pipes
            for fd, cap in streams.items():
                data, _ = _read_available(fd)
                if not cap.add(data):
                    status = "output_limit"
        # Kill the child's process group (the child, if still running, and what it forked
        # without setsid) while the child's pid is still reserved, then reap it.
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        _, wstatus, rusage = os.wait4(pid, 0)
        duration = time.monotonic() - t0
        _reap_orphans()
    finally:
        for fd in (out_r, err_r, out_w, err_w, pidfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        _remove_dir(workdir)

    returncode = None
    if os.WIFEXITED(wstatus):
        returncode = os.WEXITSTATUS(wstatus)
    elif os.WIFSIGNALED(wstatus):
        returncode = -os.WTERMSIG(wstatus)
    if status is None:
        if returncode == 0:
            status = "ok"
        elif returncode == EXIT_MEMORY:
            status = "memory"
        elif returncode is not None and returncode > 0:
            status = "error"
        else:
            sig = -returncode if returncode is not None else 0
            cpu = rusage.ru_utime + rusage.ru_stime
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= float(cfg["cpu_s"]) - 0.05):
                status = "timeout"  # the CPU-time limit
            else:
                status = "killed"
    return {
        "status": status,
        "stdout": out.text(),
        "stderr": err.text(),
        "duration_s": duration,
        "returncode": returncode,
    }


def _read_exact(fd: int, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = os.read(fd, n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def main() -> None:
    global _STDIO
    cfg = json.loads(sys.argv[1])
    base = cfg["base"]
    # The protocol pipes move to private fds; fds 0/1 become an empty file and /dev/null.
    rfd, wfd = os.dup(0), os.dup(1)
    _STDIO = _make_stdio()
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]  # programs must not import from this folder
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans of programs are re-parented to us
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            __import__(name)
    gc.collect()
    gc.freeze()  # keep the collector off the preloaded objects in the children (fewer page copies)
    while True:
        head = _read_exact(rfd, 4)
        if head is None:
            return
        body = _read_exact(rfd, struct.unpack(">I", head)[0])
        if body is None:
            return
        try:
            req = json.loads(body)
            resp = run_one(req["code"], req.get("stdin", ""), cfg, base)
        except Exception as e:  # a bug here must not take the server down
            resp = {
                "status": "killed",
                "stdout": "",
                "stderr": f"sandbox server error: {type(e).__name__}: {e}",
                "duration_s": 0.0,
                "returncode": None,
            }
        data = json.dumps(resp).encode()
        try:
            _write_all(wfd, struct.pack(">I", len(data)) + data)
        except OSError:
            return


if __name__ == "__main__":
    try:
        main()
    finally:  # also when the trainer died without stopping us
        shutil.rmtree(json.loads(sys.argv[1])["base"], ignore_errors=True)
