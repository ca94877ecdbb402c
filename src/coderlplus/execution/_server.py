"""A sandbox server: a warm Python process that forks one fresh child per program.

Started by :class:`coderlplus.execution.sandbox.Sandbox` as
``python -s -S -c BOOTSTRAP CONFIG_JSON`` (inside bubblewrap, see ``isolation.py``) or
``python -s -c ...`` (plain), with a scrubbed environment; the bootstrap reads this
file's code, compiled and marshalled by the parent, from stdin and runs it. It
imports nothing from ``coderlplus``: it is a plain script, so that it starts fast
and the programs it forks see a small interpreter.

Protocol, on the server's stdin (requests) and stdout (responses): frames of a
4-byte big-endian length followed by UTF-8 JSON. First the server sends a hello
``{"ready": true, "pid", "uid", "outer_uid", "python", "native", "native_off"}``
(``native``: the C fork loop is in use; ``native_off``: why not); then the parent sends
chunks ``{"chunk": [request, ...]}`` and the server answers each request of a chunk
with its own frame as soon as it is done, in order (so the server goes from one
program to the next without waiting for the parent, and the parent knows which
requests a server that died had finished). A request is one of

* one run: ``{"code": str, "stdin": str, "trace": null | {options, see _trace_options}}``
  -> ``{"status": str, "stdout": str, "stderr": str, "duration_s": float,
  "returncode": int | None, "anomaly": str | None, "trace": null | dict}``;
* a batch (one program, several stdin tests; see ``run_batch``):
  ``{"code": str, "stdins": [str, ...]}``
  -> ``{"runs": [one response as above per stdin], "anomaly": str | None}``.

``anomaly`` says that something was left in a bad state (processes that would
not die, a work folder that could not be removed, a child that could not be set
up): the server answers nothing more of that chunk, and the parent replaces it
with a fresh one and sends the chunk's remaining requests there.

With ``trace`` the child, after the program ends (normally, by an exception or
``sys.exit``), collects the final values of the program's variables (see
``_collect_trace``) and writes them as JSON to a third pipe.

For each request the server forks a child that becomes a session leader, sets
resource limits, moves into a fresh private temp dir, takes its stdin from a
memory file and writes stdout/stderr to pipes, then ``exec``s the program. The
server reads both pipes while the child runs (capped), enforces the wall-clock
timeout by killing the child's process group, and, being a *child subreaper*,
adopts and kills whatever the program left running (even processes that called
``setsid()``). The server never runs program code itself. It exits when its
stdin reaches EOF (the parent closed it or died).

Stretches of single runs without a trace go through ``forkrun.c`` (the library the
parent sends in the config as ``"forkrun"``, base64): the same steps in C, answers
included, so that the server runs no Python between two forks. Batches, traces and
anything the C loop hands back (see ``_serve_native``) take the Python path.
"""

from __future__ import annotations

import atexit
import builtins
import contextlib
import ctypes
import gc
import json
import os
import resource
import select
import signal
import struct
import sys
import time
import types

# Exit code the child uses for an uncaught MemoryError (mapped to status "memory").
EXIT_MEMORY = 213
# Exit code of a child that failed before the program started (a sandbox problem).
EXIT_SETUP = 214
FSIZE_BYTES = 10 * 1024 * 1024  # the largest file a program may write
NOFILE = 64  # open file descriptors
NPROC = 1024  # processes of the user, unless the config says otherwise (ignored for root)
STACK_BYTES = 64 * 1024 * 1024  # main-thread stack, for deep recursion
STDERR_TAIL_BYTES = 8192  # how much of stderr comes back (the end of it)
READ_CHUNK = 65536
TRACE_CAP_BYTES = 4 << 20  # the largest trace that comes back
ORPHAN_KILL_BUDGET_S = 2.0  # the longest we spend killing what a program left behind
PROGRAM_FILE = "program.py"  # the programs' code objects' file name (tracebacks, the tracer)
WORKDIR = "program"  # each program's cwd/HOME/TMPDIR: <base>/program, made empty for each one

# Imported once here so that programs using them start fast (the child is a fork). Not
# more: every preloaded page makes each fork dearer (page tables, copy-on-write faults).
# Left out on purpose: threading (its at-fork hook alone costs ~0.3 ms per program),
# dataclasses, datetime, decimal, fractions (rare in these programs; imported on demand).
PRELOAD = (
    "array",
    "ast",  # the tracer
    "bisect",
    "collections",
    "copy",
    "functools",
    "heapq",
    "itertools",
    "json",  # the tracer
    "linecache",
    "math",
    "operator",
    "random",
    "re",
    "string",
    "traceback",
    "typing",
)

_PR_SET_PDEATHSIG = 1
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36


def _load_libc():
    try:
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


def _limits(cfg: dict) -> list:
    """The ``(resource, (soft, hard))`` pairs every child sets, worked out once per server."""
    cpu = int(cfg["cpu_s"])
    limits = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),  # SIGXCPU at cpu s, SIGKILL at cpu+1 s
        (resource.RLIMIT_FSIZE, (FSIZE_BYTES, FSIZE_BYTES)),
        (resource.RLIMIT_NOFILE, (NOFILE, NOFILE)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    if hasattr(resource, "RLIMIT_NPROC"):
        nproc = int(cfg.get("nproc") or NPROC)
        limits.append((resource.RLIMIT_NPROC, (nproc, nproc)))
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_STACK)
        soft = STACK_BYTES if hard == resource.RLIM_INFINITY else min(STACK_BYTES, hard)
        limits.append((resource.RLIMIT_STACK, (soft, hard)))
    if cfg["memory_mb"]:
        mem = int(cfg["memory_mb"]) * 1024 * 1024
        limits.append((resource.RLIMIT_AS, (mem, mem)))  # last: it may make later allocations fail
    return limits


def _set_limits(limits: list) -> None:
    for res, values in limits:
        try:  # noqa: SIM105 - a plain try costs the child less than contextlib.suppress
            resource.setrlimit(res, values)
        except (ValueError, OSError):
            pass


def _stdin_fd(data: bytes) -> int:
    """A readable fd holding ``data`` (an anonymous memory file, no name on disk)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("stdin", 0)
    else:  # pragma: no cover - non-Linux
        import tempfile

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


def _run_program(code: str, module: types.ModuleType, tracer=None) -> int:
    try:
        compiled = compile(code, PROGRAM_FILE, "exec")
        if tracer is not None:
            tracer.install()
        try:
            exec(compiled, module.__dict__)
        finally:
            if tracer is not None:
                tracer.uninstall()
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
        atexit._run_exitfuncs()  # the module imported above: a program's rebinding does not matter
    except SystemExit as e:
        rc = _exit_code(e)
    except MemoryError:
        return EXIT_MEMORY
    except BaseException as e:
        _print_exception(e)
    return rc


# --------------------------------------------------------------------------- tracer (child side)

_DROP = object()  # a value with no JSON form


def _trace_options(opts: dict) -> dict:
    return {
        "entry": opts.get("entry") or None,
        "trajectory": bool(opts.get("trajectory")),
        "max_events": int(opts.get("max_events", 256)),
        "max_items": int(opts.get("max_items", 64)),
        "max_total": int(opts.get("max_total", 1000)),
        "max_depth": int(opts.get("max_depth", 4)),
        "max_str": int(opts.get("max_str", 1000)),
        "max_digits": int(opts.get("max_digits", 100)),
        "max_variables": int(opts.get("max_variables", 64)),
    }


def _json_key(key):
    """A dict key as JSON writes it, or _DROP."""
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool):
        return {None: "null", True: "true", False: "false"}[key]
    if isinstance(key, int):
        return str(key)
    if isinstance(key, float) and key == key and key not in (float("inf"), float("-inf")):
        return repr(key)
    return _DROP


def _safe(value, o: dict, depth: int = 0, budget: list | None = None):
    """``value`` as plain JSON data (tuple and set become lists, sets sorted), or _DROP.

    Kept: None, bool, int (at most ``max_digits`` digits), finite float, str (at most
    ``max_str`` characters), and list/tuple/set/frozenset/dict of those, at most
    ``max_items`` long, ``max_depth`` deep and ``max_total`` items in all. Anything
    else, or anything too big, drops the whole value: a truncated value would be a
    wrong answer to learn.
    """
    if budget is None:
        budget = [o["max_total"]]
    budget[0] -= 1
    if budget[0] < 0:
        return _DROP
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value) if len(str(abs(int(value)))) <= o["max_digits"] else _DROP
    if isinstance(value, float):
        v = float(value)
        return v if v == v and v not in (float("inf"), float("-inf")) else _DROP
    if isinstance(value, str):
        return str(value) if len(value) <= o["max_str"] else _DROP
    if depth >= o["max_depth"]:
        return _DROP
    if isinstance(value, (set, frozenset)):
        if len(value) > o["max_items"]:
            return _DROP
        try:
            value = sorted(value)
        except TypeError:
            return _DROP
    if isinstance(value, (list, tuple)):
        if len(value) > o["max_items"]:
            return _DROP
        out = []
        for item in value:
            item = _safe(item, o, depth + 1, budget)
            if item is _DROP:
                return _DROP
            out.append(item)
        return out
    if isinstance(value, dict):
        if len(value) > o["max_items"]:
            return _DROP
        out = {}
        for k, v in value.items():
            k, v = _json_key(k), _safe(v, o, depth + 1, budget)
            if k is _DROP or v is _DROP or k in out:
                return _DROP
            out[k] = v
        return out
    return _DROP


def _candidates(namespace: dict) -> dict:
    """The names a trace reports: not private, not callables, classes or modules."""
    return {
        name: value
        for name, value in namespace.items()
        if isinstance(name, str)
        and not name.startswith("_")
        and not callable(value)
        and not isinstance(value, types.ModuleType)
    }


def _convert(namespace: dict, o: dict) -> tuple[dict, list]:
    """(JSON-safe variables, names dropped because their values have no JSON form)."""
    kept, dropped = {}, []
    for name, value in _candidates(namespace).items():
        try:
            safe = _safe(value, o)
        except Exception:  # a hostile __eq__/__len__/__lt__...
            safe = _DROP
        if safe is _DROP:
            dropped.append(name)
        else:
            kept[name] = safe
    return kept, dropped


class _BindingLines:
    """Last line binding each name, per scope, from the program's syntax tree."""

    def __init__(self, code: str, entry: str | None):
        import ast

        self.ast = ast
        self.module: dict[str, int] = {}
        self.entry: dict[str, int] = {}
        try:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tree = ast.parse(code)
        except (SyntaxError, ValueError, RecursionError, MemoryError):
            return
        self._scope(tree.body, self.module)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == entry:
                self.entry = {}
                args = node.args
                for a in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                    if a is not None:
                        self.entry[a.arg] = node.lineno
                self._scope(node.body, self.entry)

    def _scope(self, body: list, lines: dict) -> None:
        ast = self.ast
        stack = list(body)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines[node.name] = max(lines.get(node.name, 0), node.lineno)
                continue  # a new scope
            if isinstance(node, ast.Lambda):
                continue
            if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
                lines[node.id] = max(lines.get(node.id, 0), node.lineno)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    name = (alias.asname or alias.name).split(".")[0]
                    lines[name] = max(lines.get(name, 0), node.lineno)
            elif isinstance(node, ast.comprehension):
                stack.extend(ast.walk(node.iter))  # the loop target is the comprehension's own
                stack.extend(n for cond in node.ifs for n in ast.walk(cond) if isinstance(n, ast.NamedExpr))
                continue
            stack.extend(ast.iter_child_nodes(node))


class _Tracer:
    """Collects, for one program run, what ``_collect_trace`` reports."""

    def __init__(self, code: str, opts: dict):
        self.o = opts
        self.entry_locals: dict | None = None
        self.entry_dropped: list = []
        self.events: list | None = [] if opts["trajectory"] else None
        self.truncated = False
        self.code = code

    def install(self) -> None:
        if self.o["entry"]:
            sys.setprofile(self._profile)
        if self.events is not None:
            sys.settrace(self._global_trace)

    def uninstall(self) -> None:
        sys.setprofile(None)
        sys.settrace(None)

    def _profile(self, frame, event, arg):
        # The entry function returning (or raising) to module level: keep its locals.
        if (
            event == "return"
            and frame.f_code.co_name == self.o["entry"]
            and frame.f_code.co_filename == PROGRAM_FILE
            and frame.f_back is not None
            and frame.f_back.f_code.co_name == "<module>"
            and frame.f_back.f_code.co_filename == PROGRAM_FILE
        ):
            self.entry_locals, self.entry_dropped = _convert(frame.f_locals, self.o)

    def _global_trace(self, frame, event, arg):
        if frame.f_code.co_filename != PROGRAM_FILE or self.truncated:
            return None
        state = {"line": frame.f_code.co_firstlineno, "prev": {}}

        def local(frame, event, arg):
            if self.truncated:
                return None
            if event in ("line", "return"):
                current = {}
                for name, value in _convert(frame.f_locals, self.o)[0].items():
                    current[name] = json.dumps(value, sort_keys=True)
                    if state["prev"].get(name) != current[name]:
                        if len(self.events) >= self.o["max_events"]:
                            self.truncated = True
                            sys.settrace(None)
                            return None
                        self.events.append([state["line"], frame.f_code.co_name, name, value])
                state["prev"] = current
                state["line"] = frame.f_lineno
            return local

        return local

    def result(self, module: types.ModuleType) -> dict:
        o = self.o
        lines = _BindingLines(self.code, o["entry"])
        variables, dropped = _convert(module.__dict__, o)
        scope = {name: ("module", lines.module.get(name, 0)) for name in variables}
        if self.entry_locals is not None:
            dropped += [n for n in self.entry_dropped if n not in variables]
            for name, value in self.entry_locals.items():
                if name not in variables:  # a module-level name wins
                    variables[name] = value
                    scope[name] = ("entry", lines.entry.get(name, 0))
        # Ordered by the last line that binds each name (the last bound last).
        order = sorted(variables, key=lambda n: scope[n][1])[-o["max_variables"] :]
        return {
            "variables": {n: variables[n] for n in order},
            "lines": {n: scope[n][1] for n in order},
            "scopes": {n: scope[n][0] for n in order},
            "dropped": sorted(set(dropped)),
            "entry_found": self.entry_locals is not None,
            "trajectory": self.events,
            "truncated": self.truncated,
        }


def _write_trace(fd: int, tracer: _Tracer, module: types.ModuleType) -> None:
    try:
        data = json.dumps(tracer.result(module), allow_nan=False)
    except BaseException as e:  # never let the tracer change the program's outcome
        data = json.dumps({"error": f"{type(e).__name__}: {e}"[:500]})
    with contextlib.suppress(OSError):
        _write_all(fd, data.encode())


# Text streams on fds 0, 1, 2 for the programs, made once by _make_stdio() (saves ~0.2 ms per
# program): a stream object only remembers its fd number, and the child dup2()s its own
# stdin/stdout/stderr onto these numbers.
_STDIO: tuple = ()
_MAIN: types.ModuleType | None = None  # the first run's __main__ in every child (see _one_run)
_SOURCE = ""  # the program this child runs (see _program_source)
_LIMITS: list = []  # see _limits
_CPU_S = 0  # the CPU seconds of one run
_RECURSION_LIMIT = 1000  # the interpreter's, restored between the runs of a batch


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


def _child(code, stdins, out_w, err_w, trace_w, ctl_w, ack_r, trace_opts, workdir, cfg, server_pid):
    """Runs in the forked child; never returns.

    Runs ``code`` once per entry of ``stdins``, in order. After every run but the last
    it reports the run's exit code on the control pipe (``ctl_w``) and waits for the
    server's go-ahead on ``ack_r`` (the server first collects that run's output).

    Kept short: every line here is paid by every program (the process-wide settings
    they share, std streams, HOME, sys.path, are made once by ``_prepare_for_children``).
    """
    tracer = None
    try:
        os.setsid()
        if not cfg.get("contained"):  # inside bwrap the PID namespace ends with the server anyway
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the server's handler is not the program's
            _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the server
            if os.getppid() != server_pid:
                os._exit(EXIT_SETUP)
        _set_stdin(stdins[0])
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        keep = 3
        if trace_w >= 0:
            os.dup2(trace_w, 3)
            tracer = _Tracer(code, _trace_options(trace_opts or {}))
            keep = 4
        if len(stdins) > 1:
            os.dup2(ctl_w, 3)
            os.dup2(ack_r, 4)
            keep = 5
        os.closerange(keep, 1 << 16)
        os.chdir(workdir)
        _cache_lines(code)
        _set_limits(_LIMITS if len(stdins) == 1 else _batch_limits(len(stdins)))
    except BaseException as e:
        with contextlib.suppress(BaseException):
            os.write(2, f"sandbox: child setup failed: {type(e).__name__}: {e}\n".encode())
        os._exit(EXIT_SETUP)
    last = len(stdins) - 1
    for i, stdin in enumerate(stdins):
        if i:
            try:
                _next_run(stdin, workdir)
            except BaseException:
                os._exit(EXIT_SETUP)
        rc = _one_run(code, tracer, _MAIN if i == 0 else None)
        # Threads end a batch: the interpreter's thread shutdown has run and cannot run twice
        # (threads, executors, their at-exit hooks); the next runs go to a fresh child.
        if i == last or rc == EXIT_MEMORY or "threading" in sys.modules:
            os._exit(rc)
        try:  # report this run; the server answers once it has collected the run's output
            os.write(3, struct.pack(">i", rc))
            if os.read(4, 1) != b"+":
                os._exit(rc)
        except BaseException:  # the program closed our pipes: end here, the server reruns the rest
            os._exit(rc)


def _new_main() -> types.ModuleType:
    """A fresh, empty ``__main__`` module, installed in ``sys.modules``."""
    main = types.ModuleType("__main__")
    main.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main
    return main


def _one_run(code: str, tracer=None, main: types.ModuleType | None = None) -> int:
    """Run the program once in ``main`` (default: a new ``__main__``), flush its streams;
    its exit code. A child's first run uses ``_MAIN``: made once by the server and never
    touched there, so every forked child starts from an empty copy of it, for free."""
    atexit._clear()
    if main is None:
        main = _new_main()
    rc = _run_program(code, main, tracer)
    for f in (sys.stdout, _STDIO[1], sys.stderr, _STDIO[2]):
        try:  # noqa: SIM105 - a plain try costs the child less than contextlib.suppress
            f.flush()
        except BaseException:
            pass
    if tracer is not None and rc != EXIT_MEMORY:
        with contextlib.suppress(BaseException):
            _write_trace(3, tracer, main)
    return rc


def _cache_lines(code: str) -> None:
    """Make ``code`` the source linecache gives for PROGRAM_FILE (see _program_source)."""
    global _SOURCE
    _SOURCE = code


def _program_source() -> str:
    """linecache's lazy loader for PROGRAM_FILE (installed by the server, once).

    Tracebacks, ``warnings`` and ``inspect.getsource`` read a program's lines through
    linecache. The server puts a lazy entry there (a 1-tuple holding this function), so a
    child only sets ``_SOURCE``: splitting and caching the lines, which allocates and so
    copies pages, happens only when something asks for them. (linecache skips lazy
    entries for names like "<program>": hence a file name, which does not exist.)
    """
    return _SOURCE


def _set_stdin(stdin: str) -> None:
    if stdin:
        fd = _stdin_fd(stdin.encode("utf-8", "replace"))
        os.dup2(fd, 0)
        os.close(fd)
    else:
        fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(fd, 0)
        os.close(fd)


def _next_run(stdin: str, workdir: str) -> None:
    """Between two runs of a batch: a fresh stdin and streams, cwd, limits, random state.

    What a run changed elsewhere in the interpreter (its own imports, monkeypatching)
    is seen by the next runs of the same program; other programs never share a child.
    """
    global _STDIO
    _set_stdin(stdin)
    stdin_, stdout, stderr = _STDIO
    stdin_ = open(0, encoding="utf-8", closefd=False)  # noqa: SIM115 - nothing read ahead from the last run
    if stdout.closed:
        stdout = open(1, "w", encoding="utf-8", closefd=False)  # noqa: SIM115
    if stderr.closed:
        stderr = open(2, "w", encoding="utf-8", errors="backslashreplace", closefd=False, buffering=1)  # noqa: SIM115
    _STDIO = (stdin_, stdout, stderr)  # what the child flushes after the run
    sys.stdin, sys.stdout, sys.stderr = _STDIO
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = _STDIO
    os.chdir(workdir)
    sys.setrecursionlimit(_RECURSION_LIMIT)
    random = sys.modules.get("random")
    if random is not None:
        random.seed(0)  # the state every program starts from (see _preload)
    cpu = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    with contextlib.suppress(ValueError, OSError):  # this run's CPU seconds start now
        resource.setrlimit(resource.RLIMIT_CPU, (min(hard, int(cpu) + 1 + _CPU_S), hard))


def _batch_limits(n_runs: int) -> list:
    """The limits of a child running ``n_runs`` programs: CPU time can grow run by run."""
    total = n_runs * (_CPU_S + 1) + 1
    return [(res, (_CPU_S, total) if res == resource.RLIMIT_CPU else v) for res, v in _LIMITS]


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


def _reap_orphans() -> bool:
    """Kill and reap every process the program left behind (adopted by us, the subreaper).

    False when some were still alive after ``ORPHAN_KILL_BUDGET_S`` (a fork bomb
    outrunning us): an anomaly, the server is then replaced.
    """
    me = os.getpid()
    give_up = time.monotonic() + ORPHAN_KILL_BUDGET_S
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return True  # no children left
        if pid:
            continue
        kids = _children_of(me)
        for k in kids:
            with contextlib.suppress(OSError):
                os.kill(k, signal.SIGKILL)
        if time.monotonic() > give_up:
            return False
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


def _remove_dir(path: str) -> bool:
    try:
        os.rmdir(path)  # the common case: the program wrote no files
    except OSError:
        import shutil  # rare (the program wrote files): not imported up front, forks stay cheap

        shutil.rmtree(path, ignore_errors=True)
    return not os.path.exists(path)


_running_child = 0  # pid of the program running now (0: none)


def run_one(code: str, stdin: str, cfg: dict, base: str, trace_opts: dict | None = None) -> dict:
    """Run ``code`` on ``stdin`` in a fresh child; the response dict (see the protocol).

    The Python loop: the main loop sends stretches of single runs to ``_serve_native``
    when the C loop is loaded; traces and malformed requests come here."""
    return _run_child(code, [stdin], cfg, base, trace_opts)[0]


def run_batch(code: str, stdins: list, cfg: dict, base: str) -> list:
    """Run ``code`` once per stdin, as few children as possible: one, unless a run ends it.

    A run that times out, crashes the child, overflows its output or leaves the child
    unable to go on ends that child; the runs after it go to a fresh one.
    """
    results: list = []
    while len(results) < len(stdins):
        results += _run_child(code, stdins[len(results) :], cfg, base, None)
        if results[-1]["anomaly"]:  # this server is about to be replaced: run nothing more here
            skipped = _result("killed", _Capture(0), _Capture(0), None, 0.0)
            skipped["stderr"] = "sandbox: not run (an earlier run of this program upset the sandbox)"
            results += [dict(skipped) for _ in range(len(stdins) - len(results))]
    return results


def _run_child(code: str, stdins: list, cfg: dict, base: str, trace_opts: dict | None) -> list:
    """Fork one child for ``stdins`` (several: a batch, see ``_child``); results of the runs it ended.

    At least one result; fewer than ``len(stdins)`` when a run ended the child early.
    """
    global _running_child
    timeout_s = float(cfg["timeout_s"])
    cap = int(cfg["max_output_bytes"])
    batched = len(stdins) > 1
    out = _Capture(cap)
    err = _Capture(max(cap, 1 << 20), keep_tail=STDERR_TAIL_BYTES)
    trace = _Capture(TRACE_CAP_BYTES)
    workdir = os.path.join(base, WORKDIR)
    os.mkdir(workdir, 0o700)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    trace_r, trace_w = os.pipe() if trace_opts is not None else (-1, -1)
    ctl_r, ctl_w = os.pipe() if batched else (-1, -1)
    ack_r, ack_w = os.pipe() if batched else (-1, -1)
    pidfd = -1
    anomaly = None
    results: list = []
    status = None
    server_pid = os.getpid()
    t0 = time.monotonic()
    try:
        pid = os.fork()
        if pid == 0:
            _child(code, stdins, out_w, err_w, trace_w, ctl_w, ack_r, trace_opts, workdir, cfg, server_pid)
        _running_child = pid
        for fd in (out_w, err_w, trace_w, ctl_w, ack_r):
            if fd >= 0:
                os.close(fd)
        out_w = err_w = trace_w = ctl_w = ack_r = -1
        streams = {out_r: out, err_r: err}
        if trace_r >= 0:
            streams[trace_r] = trace
        for fd in streams:
            os.set_blocking(fd, False)
        poller = select.poll()
        for fd in streams:
            poller.register(fd, select.POLLIN)
        if ctl_r >= 0:
            poller.register(ctl_r, select.POLLIN)
        try:
            pidfd = os.pidfd_open(pid)
            poller.register(pidfd, select.POLLIN)
        except (AttributeError, OSError):
            pidfd = -1  # old kernel: poll the child's state every few ms instead
        deadline = t0 + timeout_s
        exited = False
        reports = b""
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
                if fd == ctl_r:
                    data, eof = _read_available(ctl_r)
                    reports += data
                    if eof:
                        poller.unregister(ctl_r)
                    continue
                data, eof = _read_available(fd)
                if not streams[fd].add(data) and fd != trace_r:
                    status = "output_limit"
                if eof:
                    poller.unregister(fd)
            # A batched run reported its end: its output is all in the pipes now (the child
            # waits for our go-ahead before the next run).
            while status is None and len(reports) >= 4 and len(results) < len(stdins) - 1:
                (rc,) = struct.unpack(">i", reports[:4])
                reports = reports[4:]
                for fd, capture in streams.items():
                    data, _ = _read_available(fd)
                    if not capture.add(data):
                        status = "output_limit"
                if status is not None:
                    break
                now = time.monotonic()
                results.append(_result(_status_of_exit(rc), out, err, rc, now - t0))
                out = streams[out_r] = _Capture(cap)
                err = streams[err_r] = _Capture(max(cap, 1 << 20), keep_tail=STDERR_TAIL_BYTES)
                t0, deadline = now, now + timeout_s
                try:
                    os.write(ack_w, b"+")
                except OSError:
                    exited = True  # the child is gone; its exit status tells the rest
        if exited and status is None:  # what the child wrote before exiting is still in the pipes
            for fd, capture in streams.items():
                data, _ = _read_available(fd)
                if not capture.add(data) and fd != trace_r:
                    status = "output_limit"
        # Kill the child's process group (the child, if still running, and what it forked
        # without setsid) while the child's pid is still reserved, then reap it.
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        _, wstatus, rusage = os.wait4(pid, 0)
        _running_child = 0
        duration = time.monotonic() - t0
        if not _reap_orphans():
            anomaly = "processes left by the program would not die"
    finally:
        for fd in (out_r, err_r, trace_r, ctl_r, ack_w, out_w, err_w, trace_w, ctl_w, ack_r, pidfd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if not _remove_dir(workdir):
            anomaly = anomaly or "could not remove the program's work folder"

    cpu_kill = float(cfg["cpu_s"]) if not batched else len(stdins) * (_CPU_S + 1)
    status, returncode, anomaly = _finish(
        status, wstatus, rusage.ru_utime + rusage.ru_stime, cpu_kill, anomaly
    )
    last = _result(status, out, err, returncode, duration)
    last["trace"] = _parse_trace(trace) if trace_opts is not None else None
    last["anomaly"] = anomaly  # reported once per request: the parent replaces this server
    results.append(last)
    return results


def _finish(status: str | None, wstatus: int, cpu: float, cpu_kill: float, anomaly: str | None) -> tuple:
    """(status, returncode, anomaly) of a reaped child; ``status`` if the server already knows it."""
    returncode = None
    if os.WIFEXITED(wstatus):
        returncode = os.WEXITSTATUS(wstatus)
    elif os.WIFSIGNALED(wstatus):
        returncode = -os.WTERMSIG(wstatus)
    if returncode == EXIT_SETUP:
        anomaly = anomaly or "the child could not be set up"
    if status is None:
        status = _status_of_exit(returncode)
        if status == "killed":
            sig = -returncode if returncode is not None else 0
            if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= cpu_kill - 0.05):
                status = "timeout"  # the CPU-time limit
    return status, returncode, anomaly


# --------------------------------------------------------------------------- native path

# forkrun.c runs stretches of single runs: fork, the child's set-up, the collection of its
# output and the answer, in C (after a fork every page the server writes is a page fault:
# the Python of _run_child and the answer touched ~170 per program, fr_serve ~15). The
# trainer compiles it and sends the library in the config (the sandbox cannot see the
# trainer's files); without it, or for batches and traces, _run_child does the same.


class _Limit(ctypes.Structure):
    _fields_ = [("resource", ctypes.c_int), ("soft", ctypes.c_long), ("hard", ctypes.c_long)]


class _Job(ctypes.Structure):  # forkrun.c's fr_job, field for field
    _fields_ = [
        ("workdir", ctypes.c_char_p),
        ("stdin_data", ctypes.c_char_p),
        ("stdin_len", ctypes.c_long),
        ("limits", ctypes.POINTER(_Limit)),
        ("n_limits", ctypes.c_int),
        ("contained", ctypes.c_int),
        ("server_pid", ctypes.c_int),
        ("timeout_s", ctypes.c_double),
        ("out_cap", ctypes.c_long),
        ("err_cap", ctypes.c_long),
        ("err_keep", ctypes.c_long),
        ("out_buf", ctypes.c_void_p),
        ("err_buf", ctypes.c_void_p),
        ("check_signals", ctypes.c_void_p),
        ("cpu_kill", ctypes.c_double),
        ("index", ctypes.c_int),
        ("out_len", ctypes.c_long),
        ("out_total", ctypes.c_long),
        ("err_len", ctypes.c_long),
        ("err_total", ctypes.c_long),
        ("pid", ctypes.c_int),
        ("running", ctypes.c_int),
        ("wstatus", ctypes.c_int),
        ("timed_out", ctypes.c_int),
        ("output_limit", ctypes.c_int),
        ("others_left", ctypes.c_int),
        ("workdir_left", ctypes.c_int),
        ("cpu_s", ctypes.c_double),
        ("duration_s", ctypes.c_double),
    ]


class _Req(ctypes.Structure):  # forkrun.c's fr_req
    _fields_ = [("stdin_data", ctypes.c_char_p), ("stdin_len", ctypes.c_long)]


_NATIVE = None  # (the library, the job fr_serve fills) once _load_native succeeded


def _load_native(cfg: dict, base: str) -> str | None:
    """Load the library sent in ``cfg["forkrun"]`` (base64); None, or why it is not used."""
    global _NATIVE
    blob = cfg.get("forkrun")
    if not blob:
        return "not sent"
    try:
        import binascii

        fd = os.memfd_create("forkrun", os.MFD_CLOEXEC)
        try:
            _write_all(fd, binascii.a2b_base64(blob))
            lib = ctypes.PyDLL(f"/proc/self/fd/{fd}")  # PyDLL: the GIL stays held (no threads here)
        finally:
            os.close(fd)
        lib.fr_serve.argtypes = [
            ctypes.POINTER(_Job),
            ctypes.POINTER(_Req),
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
        ]
        lib.fr_serve.restype = ctypes.c_int
        lib.fr_alloc.argtypes = [ctypes.c_long]
        lib.fr_alloc.restype = ctypes.c_void_p
        cap = int(cfg["max_output_bytes"])
        limits = (_Limit * len(_LIMITS))(*[_Limit(res, soft, hard) for res, (soft, hard) in _LIMITS])
        job = _Job(
            workdir=os.path.join(base, WORKDIR).encode(),
            limits=limits,
            n_limits=len(_LIMITS),
            contained=1 if cfg.get("contained") else 0,
            server_pid=os.getpid(),
            timeout_s=float(cfg["timeout_s"]),
            out_cap=cap,
            err_cap=max(cap, 1 << 20),
            err_keep=STDERR_TAIL_BYTES,
            out_buf=lib.fr_alloc(cap),
            err_buf=lib.fr_alloc(2 * STDERR_TAIL_BYTES + 65536),  # forkrun.c: 2 * err_keep + a read
            check_signals=ctypes.cast(ctypes.pythonapi.PyErr_CheckSignals, ctypes.c_void_p),
            cpu_kill=float(cfg["cpu_s"]),
        )
        if not job.out_buf or not job.err_buf:
            return "no memory for the output buffers"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    _NATIVE = (lib, job)
    return None


_FR_DONE, _FR_CHILD, _FR_PYTHON, _FR_GONE = 0, 1, 2, 3  # fr_serve's answers


def _native_ok(req) -> bool:
    """Whether fr_serve can run ``req``: one run without a trace, well formed."""
    return (
        isinstance(req, dict)
        and isinstance(req.get("code"), str)
        and isinstance(req.get("stdin", ""), str)
        and "stdins" not in req
        and not req.get("trace")
    )


def _requests_array(requests: list):
    stdins = [req.get("stdin", "").encode("utf-8", "replace") for req in requests]
    return (_Req * len(stdins))(*[_Req(data, len(data)) for data in stdins])


def _serve_native(requests: list, cfg: dict, base: str, wfd: int) -> bool | None:
    """Run and answer ``requests`` (all ``_native_ok``) through fr_serve.

    fr_serve hands a run back to Python when its answer needs Python: orphans still
    running or files in the work folder (``_reap_orphans``, ``_remove_dir``), a child that
    failed its set-up (an anomaly), output that is not valid UTF-8 (decoded with
    "replace" here), a child that could not be started (an error answer). True: all
    answered; False: one left an anomaly (the rest of the chunk goes to a fresh
    server); None: the trainer is gone.
    """
    lib, job = _NATIVE
    reqs = _requests_array(requests)
    start = 0
    while start < len(requests):
        rc = lib.fr_serve(ctypes.byref(job), reqs, start, len(requests), wfd)
        i = job.index
        if rc == _FR_CHILD:
            _native_child(requests[i]["code"])
        if rc == _FR_DONE:
            return True
        if rc == _FR_GONE:
            return None
        try:  # (a signal handler that raised, e.g. KeyboardInterrupt, is raised by ctypes)
            if rc < 0:
                raise OSError(-rc, f"forkrun: {os.strerror(-rc)}")
            resp = _native_response(job, cfg, base)
        except Exception as e:
            resp = _error_response(e, requests[i])
        if not _send(wfd, resp):
            return None
        if resp["anomaly"]:
            return False
        start = i + 1
    return True


def _native_child(code: str) -> None:
    """In the child fr_serve set up: run the program; never returns."""
    _cache_lines(code)
    os._exit(_one_run(code, None, _MAIN))


def _native_response(job: _Job, cfg: dict, base: str) -> dict:
    """The answer to a run fr_serve handed back: clean-up and statuses as ``_run_child``."""
    anomaly = None
    if job.others_left and not _reap_orphans():
        anomaly = "processes left by the program would not die"
    if job.workdir_left and not _remove_dir(os.path.join(base, WORKDIR)):
        anomaly = anomaly or "could not remove the program's work folder"
    status = "timeout" if job.timed_out else "output_limit" if job.output_limit else None
    status, returncode, anomaly = _finish(status, job.wstatus, job.cpu_s, job.cpu_kill, anomaly)
    err = ctypes.string_at(job.err_buf, job.err_len)[-STDERR_TAIL_BYTES:]
    return {
        "status": status,
        "stdout": ctypes.string_at(job.out_buf, job.out_len).decode("utf-8", "replace"),
        "stderr": err.decode("utf-8", "replace"),
        "duration_s": job.duration_s,
        "returncode": returncode,
        "anomaly": anomaly,
        "trace": None,
    }


def _status_of_exit(returncode: int | None) -> str:
    if returncode == 0:
        return "ok"
    if returncode == EXIT_MEMORY:
        return "memory"
    if returncode is not None and returncode > 0:
        return "error"
    return "killed"


def _result(status: str, out: _Capture, err: _Capture, returncode: int | None, duration: float) -> dict:
    return {
        "status": status,
        "stdout": out.text(),
        "stderr": err.text(),
        "duration_s": duration,
        "returncode": returncode,
        "anomaly": None,
        "trace": None,
    }


def _parse_trace(capture: _Capture) -> dict | None:
    if not capture.total:
        return None  # the child ended before writing it (os._exit, a signal)
    if capture.total > capture.cap:
        return {"error": f"trace larger than {capture.cap} bytes"}
    try:
        return json.loads(bytes(capture.buf))
    except ValueError as e:
        return {"error": f"unreadable trace: {e}"}


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
    global _STDIO, _CPU_S, _RECURSION_LIMIT
    cfg = json.loads(sys.argv[1])
    base = cfg["base"]
    os.makedirs(base, mode=0o700, exist_ok=True)
    # The protocol pipes move to private fds; fds 0/1 become an empty file and /dev/null.
    rfd, wfd = os.dup(0), os.dup(1)
    _STDIO = _make_stdio()
    # No '' (the cwd) on the path; the trainer's site-packages only when the config offers them.
    sys.path[:] = [p for p in sys.path if p not in ("", ".")] + list(cfg.get("site_dirs") or [])
    _prepare_for_children(base)
    _prctl(_PR_SET_CHILD_SUBREAPER, 1)  # orphans of programs are re-parented to us
    if not cfg.get("contained"):
        # When the trainer dies, take the running program and everything it left down with us
        # (inside bwrap, the PID namespace does that).
        parent = os.getppid()
        signal.signal(signal.SIGTERM, _on_parent_death)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            _on_parent_death()
    _prctl(_PR_SET_DUMPABLE, 0)  # programs (same uid) cannot ptrace us or open /proc/<us>/fd
    _preload()
    _LIMITS[:] = _limits(cfg)
    _CPU_S, _RECURSION_LIMIT = int(cfg["cpu_s"]), sys.getrecursionlimit()
    native_off = _load_native(cfg, base)
    gc.collect()
    gc.freeze()  # keep the collector off the preloaded objects in the children (fewer page copies)
    os.environ.pop("PWD", None)  # bwrap's; each program gets its own folder
    hello = {
        "ready": True,
        "pid": os.getpid(),
        "uid": os.getuid(),
        "outer_uid": os.environ.pop("CODERLPLUS_SANDBOX_OUTER_UID", None),  # not for programs
        "python": sys.version.split()[0],
        "native": native_off is None,
        "native_off": native_off,
    }
    _send(wfd, hello)
    while True:
        head = _read_exact(rfd, 4)
        if head is None:
            return
        body = _read_exact(rfd, struct.unpack(">I", head)[0])
        if body is None:
            return
        try:
            requests = json.loads(body)["chunk"]
            if not isinstance(requests, list) or not requests:
                raise ValueError("'chunk' is not a non-empty list")
        except Exception as e:  # a malformed frame: answer once, the parent replaces us
            if not _send(wfd, _error_response(e, None)):
                return
            continue
        i = 0
        while i < len(requests):
            if _NATIVE is not None and _native_ok(requests[i]):  # a stretch of single runs: in C
                j = i + 1
                while j < len(requests) and _native_ok(requests[j]):
                    j += 1
                go_on = _serve_native(requests[i:j], cfg, base, wfd)
                if go_on is None:
                    return
                if not go_on:  # an anomaly: the rest of the chunk goes to a fresh server
                    break
                i = j
                continue
            resp = _serve(requests[i], cfg, base)
            if not _send(wfd, resp):
                return
            if resp["anomaly"]:  # the rest of the chunk goes to a fresh server
                break
            i += 1


def _serve(req, cfg: dict, base: str) -> dict:
    """The response to one request of a chunk (see the protocol)."""
    try:
        if "stdins" in req:
            runs = run_batch(req["code"], list(req["stdins"]), cfg, base)
            return {"runs": runs, "anomaly": next((r["anomaly"] for r in runs if r["anomaly"]), None)}
        return run_one(req["code"], req.get("stdin", ""), cfg, base, req.get("trace"))
    except Exception as e:  # a bug here must not take the server down
        return _error_response(e, req)


def _error_response(e: Exception, req) -> dict:
    """The answer to a request the server could not handle (an anomaly: it gets replaced)."""
    resp = {
        "status": "killed",
        "stdout": "",
        "stderr": f"sandbox server error: {type(e).__name__}: {e}",
        "duration_s": 0.0,
        "returncode": None,
        "anomaly": "server error",
        "trace": None,
    }
    if isinstance(req, dict) and isinstance(req.get("stdins"), list):
        resp = {"runs": [resp] * len(req["stdins"]), "anomaly": "server error"}
    return resp


def _preload() -> None:
    """Import PRELOAD; ``random`` without its at-fork hook, seeded here once instead.

    ``random`` reseeds itself from the OS in every forked child (an ``os.register_at_fork``
    hook): ~40 page faults, a tenth of a program's cost. Imported with that hook suppressed
    and seeded once, every child inherits the same state, so every program starts from the
    same random state for free.
    """
    register = os.register_at_fork
    os.register_at_fork = lambda **_: None
    try:
        with contextlib.suppress(ImportError):
            import random

            random.seed(0)
    finally:
        os.register_at_fork = register
    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            __import__(name)
    linecache = sys.modules.get("linecache")
    if linecache is not None:  # the programs' source, read when asked for (see _program_source)
        linecache.cache[PROGRAM_FILE] = (_program_source,)


def _prepare_for_children(base: str) -> None:
    """Process-wide settings every program shares, made once here instead of in each child."""
    workdir = os.path.join(base, WORKDIR)
    os.environ["HOME"] = workdir
    os.environ["TMPDIR"] = workdir
    sys.argv = ["<program>"]
    global _MAIN
    _MAIN = _new_main()  # (see _one_run); the server's own globals stay those of its functions
    sys.path.insert(0, workdir)  # programs may import modules they wrote into their folder
    sys.stdin, sys.stdout, sys.stderr = _STDIO  # the server itself writes to raw fds only
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = _STDIO


def _on_parent_death(*_) -> None:
    running = _running_child or (_NATIVE[1].running if _NATIVE is not None else 0)
    with contextlib.suppress(OSError):
        if running:
            os.killpg(running, signal.SIGKILL)
    for _ in range(3):
        for pid in _children_of(os.getpid()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    os._exit(0)


def _send(fd: int, message: dict) -> bool:
    data = json.dumps(message).encode()
    try:
        _write_all(fd, struct.pack(">I", len(data)) + data)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    _base = json.loads(sys.argv[1])["base"]  # (main() replaces sys.argv with the programs')
    try:
        main()
    finally:  # also when the trainer died without stopping us
        import shutil

        shutil.rmtree(_base, ignore_errors=True)
