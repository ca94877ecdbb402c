"""Start bubblewrap as an unprivileged user when the trainer runs as root.

Run by :mod:`coderlplus.execution.isolation` as ``python -I -S -c <this file> SPEC``
(a plain script: it imports nothing from ``coderlplus``). Why it exists: bwrap run
by root maps the sandbox's uid to root outside (uid 0), where ``RLIMIT_NPROC`` is
ignored and files that only root may read stay readable through the binds. Run by
``nobody`` instead it cannot even reach an interpreter under ``/root``. So this
launcher, still root:

1. enters a private mount namespace (nothing it mounts is seen by the host);
2. opens every path the sandbox needs (bwrap's folder, the interpreter, the
   read-only binds) and re-mounts each on a fresh tmpfs at ``/tmp``, where any
   user can reach it;
3. drops to uid/gid ``SPEC["uid"]`` (no groups, no capabilities left) and ``exec``s
   bwrap with the staged paths as sources.

If step 1 or 2 is not allowed (a container without ``CAP_SYS_ADMIN``) it says so
on stderr and runs bwrap directly as root; the server reports the outside uid, and
the Sandbox warns. SPEC (JSON)::

    {"bwrap": path, "bwrap_root": what to stage for it (the binary, or a folder holding it
     and its libraries),
     "pre_args": [bwrap arguments before the binds], "ro_binds": [[source, dest], ...],
     "args": [bwrap arguments after the binds, then "--" and the command],
     "uid": int, "gid": int}
"""

import ctypes
import json
import os
import sys

CLONE_NEWNS = 0x00020000
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
STAGE = "/tmp"


class _Refused(Exception):
    pass


def _check(rc, what):
    if rc != 0:
        raise _Refused(f"{what}: {os.strerror(ctypes.get_errno())}")


def _stage(spec, libc):
    """Mount namespace + staged binds; returns (bwrap path, [[staged source, dest]])."""
    sources = [src for src, _ in spec["ro_binds"]] + [spec["bwrap_root"]]
    _check(libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    # Opened in the new namespace (binds need its mounts), before /tmp is covered.
    fds = [os.open(src, os.O_PATH) for src in sources]
    _check(libc.mount(b"tmpfs", STAGE.encode(), b"tmpfs", 0, b"mode=0755,size=64k"), "mount tmpfs")
    staged = []
    for i, fd in enumerate(fds):
        via = f"/proc/self/fd/{fd}"
        dest = f"{STAGE}/s{i}"
        if os.path.isdir(via):
            os.mkdir(dest)
        else:
            open(dest, "w").close()
        _check(libc.mount(via.encode(), dest.encode(), None, MS_BIND | MS_REC, None), f"bind {sources[i]}")
        os.close(fd)
        staged.append(dest)
    binds = [[staged[i], dest] for i, (_, dest) in enumerate(spec["ro_binds"])]
    return staged[-1] + spec["bwrap"][len(spec["bwrap_root"]) :], binds


def main():
    spec = json.loads(sys.argv[1])
    libc = ctypes.CDLL(None, use_errno=True)
    outer_uid = spec["uid"]
    try:
        bwrap, binds = _stage(spec, libc)
        os.setgroups([])
        os.setgid(spec["gid"])
        os.setuid(spec["uid"])
    except (_Refused, OSError) as e:
        sys.stderr.write(
            f"coderlplus sandbox: cannot drop to uid {spec['uid']} for bwrap ({e}); running bwrap as root\n"
        )
        bwrap, binds, outer_uid = spec["bwrap"], spec["ro_binds"], os.getuid()
    argv = [bwrap, *spec["pre_args"]]
    for src, dest in binds:
        argv += ["--ro-bind", src, dest]
    args = spec["args"]
    cut = args.index("--")  # after --clearenv, before the command
    argv += [*args[:cut], "--setenv", "CODERLPLUS_SANDBOX_OUTER_UID", str(outer_uid), *args[cut:]]
    os.execv(argv[0], argv)


main()
