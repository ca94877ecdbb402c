"""Plugin discovery: import every module of ``algorithms/`` and ``rewards/`` once per process.

Where plugins come from, in order:

1. the project's plugin folders ``algorithms/`` and ``rewards/`` (next to ``src/`` in a
   source checkout or editable install);
2. extra folders listed in the ``CODERLPLUS_PLUGIN_PATH`` environment variable
   (``os.pathsep``-separated; each is scanned for ``*.py`` files);
3. modules named by the entry-point group ``coderlplus.plugins`` of installed packages.

Modules from folders are imported as ``coderlplus_plugins.<folder>.<file>``. Every
import registers its plugins with a decorator; a second call does nothing.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys
import types
from pathlib import Path

PLUGIN_FOLDERS = ("algorithms", "rewards")
ENTRY_POINT_GROUP = "coderlplus.plugins"
_loaded = False


def project_root() -> Path:
    """The checkout root (the folder holding ``src/``, ``conf/``, ``algorithms/``)."""
    return Path(__file__).resolve().parents[2]


def plugin_dirs() -> list[Path]:
    dirs = [project_root() / name for name in PLUGIN_FOLDERS]
    extra = os.environ.get("CODERLPLUS_PLUGIN_PATH", "")
    dirs += [Path(p) for p in extra.split(os.pathsep) if p]
    return [d for d in dirs if d.is_dir()]


def _import_file(path: Path, package: str) -> None:
    name = f"{package}.{path.stem}"
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import plugin file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise


def _ensure_package(name: str) -> None:
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = []  # a namespace-like package
        sys.modules[name] = pkg


def load_plugins(force: bool = False) -> None:
    """Import every plugin module once per process (idempotent)."""
    global _loaded
    if _loaded and not force:
        return
    # Built-in components that live in the package register themselves on import.
    for mod in ("coderlplus.models", "coderlplus.sampler", "coderlplus.tasks"):
        importlib.import_module(mod)
    _ensure_package("coderlplus_plugins")
    for folder in plugin_dirs():
        package = f"coderlplus_plugins.{folder.name}"
        _ensure_package(package)
        for path in sorted(folder.glob("*.py")):
            if not path.name.startswith("_"):
                _import_file(path, package)
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        ep.load()
    _loaded = True
