"""Compile a C file of the package into a shared library, once, with the system's compiler.

Used by the native decode kernels (``kernels/smallm.c``) and the sandbox server's fork loop
(``execution/forkrun.c``). The compiler is ``$CC``, else ``cc`` or ``gcc``; the library goes
to ``$CODERLPLUS_KERNEL_CACHE`` (default ``~/.cache/coderlplus/kernels``), named by a hash
of the source and the flags, so an edited source is rebuilt and an unchanged one is reused.
Every caller keeps a pure-Python/torch path for machines without a compiler.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("CODERLPLUS_KERNEL_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "coderlplus" / "kernels"


def build(source: Path, flags: Sequence[str], libs: Sequence[str] = ()) -> Path:
    """The compiled library of ``source`` (built now unless the cache has it).

    Raises RuntimeError (no compiler, or it failed: the message ends with its stderr) or
    ``subprocess.SubprocessError`` (it hung).
    """
    key = hashlib.sha256(source.read_bytes() + " ".join([*flags, *libs]).encode()).hexdigest()[:16]
    out = cache_dir() / f"{source.stem}-{key}.so"
    if out.exists():
        return out
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (set $CC, or install gcc)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")  # concurrent builders each rename their own
    cmd = [cc, *flags, "-o", str(tmp), str(source), *libs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{cc} failed: {proc.stderr.strip()[-500:]}")
    os.replace(tmp, out)
    return out
