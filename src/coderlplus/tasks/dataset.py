"""The code-problem dataset schema, its loader, and the :class:`TaskSource` base class.

Schema: one JSON object per line of a ``.jsonl`` file (or the rows of a ``.json`` list,
a ``.parquet`` file, or a directory saved by HF ``datasets.save_to_disk``)::

    {"id": str (unique within the file),
     "question": str (problem statement),
     "tests": [{"input": str (stdin), "output": str (expected stdout)}, ...]  (at least 1),
     "solution": str | null (reference program, optional),
     "difficulty": int | null (optional), "family": str | null (optional),  any other keys kept in Task.meta}

Example line::

    {"id": "p1", "question": "Read an integer n. Print n plus 7.", "tests": [{"input": "3\\n", "output": "10\\n"}],
     "solution": "n = int(input())\\nprint(n + 7)", "difficulty": 1, "family": "arith_const"}

Each row becomes a :class:`~coderlplus.types.Task` of kind ``"codegen"`` whose user turn is
``prompt_template.format(question=row["question"])`` and whose payload is
``{"tests": [...], "reference": row["solution"]}``. Every source (the built-in TinyCode
generator included) goes through :func:`read_rows` → :func:`validate_row` → :func:`row_to_task`.
"""

from __future__ import annotations

import hashlib
import json
import os
import string
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from coderlplus.registry import ConfigError, build_config, register_task_source
from coderlplus.types import Task

SPLITS = ("train", "validation", "test")
"""The split names every task source answers to."""

DEFAULT_TEMPLATE = "{question}\nWrite a Python program that reads standard input and prints the answer, in a ```python block."
"""The user turn built from a row; ``{question}`` is the only placeholder."""

CORE_KEYS = ("id", "question", "tests", "solution", "difficulty", "family")
"""Schema keys; any other key of a row goes to ``Task.meta``."""


class DatasetError(ValueError):
    """A dataset file or row is wrong; the message says where (``file:line``) and what to do."""


# ----------------------------------------------------------------------------- reading files


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(
                    f"{where}: invalid JSON ({e.msg} at column {e.colno}). "
                    f"Each line must be one complete JSON object; fix or remove this line."
                ) from None
            if not isinstance(row, dict):
                raise DatasetError(
                    f"{where}: expected a JSON object, got {type(row).__name__}. "
                    f'Each line must look like {{"id": ..., "question": ..., "tests": [...]}}.'
                )
            out.append((where, row))
    return out


def _read_json(path: Path) -> list[tuple[str, dict]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno}). A .json dataset must be one "
            f"JSON list of objects; for one object per line, name the file .jsonl."
        ) from None
    if not isinstance(data, list):
        raise DatasetError(
            f"{path}: expected a JSON list of row objects, got {type(data).__name__}. "
            f"Write the rows as a list, or one object per line in a .jsonl file."
        )
    out = []
    for i, row in enumerate(data):
        where = f"{path}[row {i}]"
        if not isinstance(row, dict):
            raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}.")
        out.append((where, row))
    return out


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetError(
            f"{path}: reading .parquet files needs pyarrow: `pip install pyarrow` "
            f"(or `pip install coderlplus[parquet]`), or convert the file to .jsonl."
        ) from None
    rows = pq.read_table(path).to_pylist()
    return [(f"{path}[row {i}]", row) for i, row in enumerate(rows)]


def _is_hf_dir(path: Path) -> bool:
    return any((path / name).exists() for name in ("state.json", "dataset_info.json", "dataset_dict.json"))


def _read_hf_dir(path: Path) -> list[tuple[str, dict]]:
    try:
        import datasets
    except ImportError:
        raise DatasetError(
            f"{path}: this looks like a folder saved by HF `datasets.save_to_disk`; reading it needs "
            f"`pip install datasets`, or export it to .jsonl with `ds.to_json(...)`."
        ) from None
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        raise DatasetError(
            f"{path}: a DatasetDict with splits {sorted(ds)}; point at one split's folder "
            f"(e.g. {path / 'train'}), or give the parent folder as the jsonl source path."
        )
    rows = ds.to_list() if hasattr(ds, "to_list") else [dict(r) for r in ds]
    return [(f"{path}[row {i}]", row) for i, row in enumerate(rows)]


def read_rows(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """Rows of a dataset file with their locations, ``[("data/train.jsonl:17", row), ...]``.

    Reads ``.jsonl`` / ``.ndjson`` (blank lines skipped), ``.json`` (a list of objects),
    ``.parquet`` (needs pyarrow), or a folder saved by HF ``datasets.save_to_disk``
    (needs ``datasets``). Rows are not validated here (see :func:`validate_row`).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(
            f"{p}: no such file or folder. Check the path (relative paths start at {Path.cwd()})."
        )
    if p.is_dir():
        if _is_hf_dir(p):
            return _read_hf_dir(p)
        raise DatasetError(
            f"{p}: is a folder, not a dataset file. Give a .jsonl/.json/.parquet file, or a folder "
            f"saved by `datasets.save_to_disk`."
        )
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return _read_jsonl(p)
    if suffix == ".json":
        return _read_json(p)
    if suffix == ".parquet":
        return _read_parquet(p)
    raise DatasetError(
        f"{p}: unknown dataset format {suffix or '(no suffix)'!r}; use .jsonl, .json or .parquet."
    )


def load_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a dataset file (see :func:`read_rows` for the formats), not validated."""
    return [row for _, row in read_rows(path)]


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Write rows as JSON lines, atomically: a temporary file in the same folder, then ``os.replace``."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()


# ----------------------------------------------------------------------------- rows -> tasks


def validate_row(row: Any, where: str) -> None:
    """Raise :class:`DatasetError` ``"{where}: ..."`` if ``row`` does not follow the schema."""
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: a row must be a JSON object, got {type(row).__name__}.")
    missing = [k for k in ("id", "question", "tests") if k not in row]
    if missing:
        raise DatasetError(
            f"{where}: missing field(s) {', '.join(repr(k) for k in missing)}. Every row needs "
            f'"id" (str), "question" (str) and "tests" (a list of {{"input": str, "output": str}}).'
        )
    if not isinstance(row["id"], str) or not row["id"]:
        raise DatasetError(
            f"{where}: 'id' must be a non-empty string, got {row['id']!r}; write ids as strings."
        )
    if not isinstance(row["question"], str) or not row["question"].strip():
        raise DatasetError(
            f"{where}: 'question' must be a non-empty string (the problem statement), got {type(row['question']).__name__}."
        )
    tests = row["tests"]
    if not isinstance(tests, list):
        raise DatasetError(
            f'{where}: \'tests\' must be a list of {{"input": str, "output": str}}, got {type(tests).__name__}.'
        )
    if not tests:
        raise DatasetError(
            f'{where}: \'tests\' is empty; give at least one {{"input": ..., "output": ...}} test.'
        )
    for i, t in enumerate(tests):
        if not isinstance(t, dict) or "input" not in t or "output" not in t:
            raise DatasetError(
                f'{where}: tests[{i}] must be an object with "input" and "output" strings, got {t!r:.80}.'
            )
        for k in ("input", "output"):
            if not isinstance(t[k], str):
                raise DatasetError(
                    f"{where}: tests[{i}].{k} must be a string (the exact stdin/stdout text), "
                    f'got {type(t[k]).__name__}; write numbers as text ending with a newline, e.g. "3\\n".'
                )
    sol = row.get("solution")
    if sol is not None and not isinstance(sol, str):
        raise DatasetError(
            f"{where}: 'solution' must be a string (a Python program) or null, got {type(sol).__name__}."
        )
    diff = row.get("difficulty")
    if diff is not None and (isinstance(diff, bool) or not isinstance(diff, int)):
        raise DatasetError(f"{where}: 'difficulty' must be an integer or null, got {diff!r}.")
    fam = row.get("family")
    if fam is not None and not isinstance(fam, str):
        raise DatasetError(f"{where}: 'family' must be a string or null, got {fam!r}.")


def template_error(template: str) -> str | None:
    """Why ``template`` is not a valid prompt template, or None if it is."""
    if not isinstance(template, str):
        return f"the prompt template must be a string, got {type(template).__name__}"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:
        return f"the prompt template {template!r:.80} is not a valid format string ({e}); write literal braces as {{{{ and }}}}"
    bad = [f for f in fields if f != "question"]
    if bad:
        return (
            f"the prompt template uses placeholder(s) {', '.join('{' + f + '}' for f in bad)}; "
            f"only {{question}} is filled in (write literal braces as {{{{ and }}}})"
        )
    if "question" not in fields:
        return "the prompt template has no {question} placeholder, so the problem statement would be dropped"
    return None


def row_to_task(
    row: Mapping[str, Any],
    source: str,
    split: str,
    template: str = DEFAULT_TEMPLATE,
    index: int | None = None,
) -> Task:
    """The ``codegen`` :class:`Task` of a (validated) row; ``index`` is its position in the split."""
    err = template_error(template)
    if err:
        raise DatasetError(err)
    extra = {k: v for k, v in row.items() if k not in CORE_KEYS}
    meta = {
        **extra,
        "split": split,
        "question": row["question"],  # the statement alone (test-output prediction shows it)
        "difficulty": row.get("difficulty"),
        "family": row.get("family"),
    }
    if index is not None:
        meta["index"] = index
    return Task(
        id=row["id"],
        kind="codegen",
        prompt=[{"role": "user", "content": template.format(question=row["question"])}],
        payload={
            "tests": [{"input": t["input"], "output": t["output"]} for t in row["tests"]],
            "reference": row.get("solution"),
        },
        source=source,
        meta=meta,
    )


def rows_to_tasks(
    located: list[tuple[str, Mapping[str, Any]]],
    source: str,
    split: str,
    template: str = DEFAULT_TEMPLATE,
    max_rows: int | None = None,
) -> list[Task]:
    """Validate ``(where, row)`` pairs (schema, unique ids) and turn them into Tasks."""
    err = template_error(template)
    if err:
        raise DatasetError(err)
    if max_rows is not None:
        located = located[:max_rows]
    first_seen: dict[str, str] = {}
    tasks = []
    for i, (where, row) in enumerate(located):
        validate_row(row, where)
        if row["id"] in first_seen:
            raise DatasetError(
                f"{where}: duplicate id {row['id']!r} (first at {first_seen[row['id']]}); ids must be unique."
            )
        first_seen[row["id"]] = where
        tasks.append(row_to_task(row, source, split, template, index=i))
    return tasks


def check_references(
    tasks: list[Task],
    sandbox: Any,
    source: TaskSource | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> int:
    """Run the reference solution of every task that has one on the task's tests; return how many ran.

    A reference that fails its own tests means a wrong test or a wrong solution (the reward of a
    correct program would be 0): raise :class:`DatasetError` naming each such row (``file:line``
    when ``source`` reads files, via the task's ``meta["index"]``), the first failing test and its
    status. Failures are run once more before they are reported, so a reference that only timed out
    on a busy machine is not. With ``cache_dir``, a set of tasks whose references all passed is
    remembered by a hash of the references and tests, and not run again.
    """
    todo = [t for t in tasks if t.payload.get("reference") and t.payload.get("tests")]
    if not todo:
        return 0
    items = [(t.payload["reference"], t.payload["tests"]) for t in todo]
    key = hashlib.sha256(json.dumps(items, sort_keys=True, default=str).encode()).hexdigest()[:32]
    marker = Path(cache_dir).expanduser() / f"{key}.ok" if cache_dir is not None else None
    if marker is not None and marker.exists():
        return 0
    checks = sandbox.check_many(items, stop_at_first_failure=True)
    failed = [i for i, c in enumerate(checks) if not c.passed]
    if failed:  # once more: a timeout under load is not a wrong row
        again = sandbox.check_many([items[i] for i in failed], stop_at_first_failure=True)
        for i, c in zip(failed, again):
            checks[i] = c
        failed = [i for i in failed if not checks[i].passed]
    if failed:
        lines = [_reference_failure(todo[i], checks[i], source) for i in failed[:10]]
        more = f"\n  ... and {len(failed) - 10} more" if len(failed) > 10 else ""
        raise DatasetError(
            f"{len(failed)} of {len(todo)} reference solutions fail their own tests:\n  "
            + "\n  ".join(lines)
            + more
            + "\nFix the tests or the solution of these rows (or remove them); "
            "trainer.check_references=false trains on them anyway."
        )
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"{len(todo)} references passed\n")
    return len(todo)


def _reference_failure(task: Task, check: Any, source: TaskSource | None) -> str:
    j = check.first_failure
    status = check.status
    detail = ""
    result = check.results[j] if j is not None else None
    if result is not None and status not in ("pass", "wrong"):
        tail = (result.stderr or "").strip().splitlines()[-1:]
        detail = f" ({tail[0][:160]})" if tail else ""
    elif result is not None and status == "wrong" and "output" in task.payload["tests"][j]:
        expected = task.payload["tests"][j]["output"]
        detail = f" (printed {result.stdout[:60]!r}, expected {expected[:60]!r})"
    return f"{locate_task(task, source)}: id {task.id!r}: test {j} is {status}{detail}"


def locate_task(task: Task, source: TaskSource | None) -> str:
    """Where a task's row is (``file:line``, or ``source:split[row i]``); its id when unknown."""
    split, index = task.meta.get("split"), task.meta.get("index")
    if source is not None and isinstance(index, int) and split in SPLITS:
        try:
            return source.located_rows(split)[index][0]
        except Exception:  # a source without located rows (e.g. humaneval): fall back to the id
            pass
    return f"{task.source}:{split}"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}.")


# ----------------------------------------------------------------------------- sources


class TaskSource:
    """Base class of task sources (the Hydra ``data`` group).

    A subclass declares ``Config`` (a dataclass), registers with
    ``@register_task_source("name")`` and overrides :meth:`rows` (plain dicts) or
    :meth:`located_rows` (dicts with ``file:line`` locations for better errors).
    :meth:`load` validates the rows and turns them into ``codegen`` Tasks.
    """

    Config: ClassVar[type | None] = None
    registry_name: ClassVar[str | None] = None

    def __init__(self, cfg: Any = None):
        if cfg is None and self.Config is not None:
            cfg = self.Config()
        elif isinstance(cfg, Mapping) and self.Config is not None:
            cfg = build_config(self.Config, cfg, where=f"data={self.name}")
        self.cfg = cfg

    @property
    def name(self) -> str:
        """The ``Task.source`` of this source's tasks."""
        return self.registry_name or type(self).__name__

    @property
    def prompt_template(self) -> str:
        return getattr(self.cfg, "prompt_template", DEFAULT_TEMPLATE)

    def rows(self, split: str) -> list[dict]:
        """The raw rows of ``split`` (one of ``train``, ``validation``, ``test``)."""
        if type(self).located_rows is TaskSource.located_rows:
            raise NotImplementedError(f"{type(self).__name__} must override rows() or located_rows()")
        return [row for _, row in self.located_rows(split)]

    def located_rows(self, split: str) -> list[tuple[str, dict]]:
        """``(where, row)`` pairs of ``split``; ``where`` names the row in error messages."""
        return [(f"{self.name}:{split}[row {i}]", row) for i, row in enumerate(self.rows(split))]

    def load(self, split: str) -> list[Task]:
        """The validated ``codegen`` Tasks of ``split`` (``train``, ``validation`` or ``test``)."""
        check_split(split)
        return rows_to_tasks(
            self.located_rows(split),
            source=self.name,
            split=split,
            template=self.prompt_template,
            max_rows=getattr(self.cfg, "max_rows", None),
        )


@dataclass
class JsonlConfig:
    """Options of the ``jsonl`` source (``data=jsonl``)."""

    path: str = ""
    """Where the splits are: a file pattern with ``{split}`` (e.g. ``data/{split}.jsonl``), or a folder
    holding ``train.jsonl``, ``validation.jsonl`` and ``test.jsonl`` (``.json``/``.parquet`` or HF
    ``save_to_disk`` folders named after the split also work)."""
    prompt_template: str = DEFAULT_TEMPLATE
    """The user turn; ``{question}`` is replaced by the row's question."""
    max_rows: int | None = None
    """Keep only the first ``max_rows`` rows of each split (None: all)."""

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError(
                "path is empty: set data.path to a file pattern with {split} (e.g. data/{split}.jsonl) "
                "or a folder holding train.jsonl, validation.jsonl and test.jsonl"
            )
        err = template_error(self.prompt_template)
        if err:
            raise ConfigError(f"prompt_template: {err}")
        if self.max_rows is not None and (isinstance(self.max_rows, bool) or self.max_rows < 1):
            raise ConfigError(f"max_rows must be a positive integer or null, got {self.max_rows!r}")


@register_task_source("jsonl")
class JsonlSource(TaskSource):
    """Code problems read from files that follow the schema of this module."""

    Config = JsonlConfig

    def split_path(self, split: str) -> Path:
        """The file (or HF folder) holding ``split``."""
        check_split(split)
        pattern = self.cfg.path
        if "{split}" in pattern:
            p = Path(pattern.replace("{split}", split)).expanduser()
            if not p.exists():
                raise DatasetError(
                    f"no {split} split: {p} does not exist (data.path={pattern!r}). "
                    f"Create it, or point data.path at the folder that holds the split files."
                )
            return p
        root = Path(pattern).expanduser()
        if not root.is_dir():
            raise DatasetError(
                f"data.path={pattern!r} is neither a pattern with {{split}} nor an existing folder; "
                f"use e.g. data/{{split}}.jsonl or a folder holding train.jsonl, validation.jsonl, test.jsonl."
            )
        candidates = [root / f"{split}{ext}" for ext in (".jsonl", ".json", ".parquet", "")]
        for c in candidates:
            if c.is_file() or (c.is_dir() and _is_hf_dir(c)):
                return c
        present = sorted(x.name for x in root.iterdir())[:20]
        raise DatasetError(
            f"no {split} split in {root}: looked for {', '.join(c.name for c in candidates[:3])} "
            f"or a {split}/ folder saved by datasets; found {present or 'nothing'}."
        )

    def located_rows(self, split: str) -> list[tuple[str, dict]]:
        return read_rows(self.split_path(split))


__all__ = [
    "CORE_KEYS",
    "DEFAULT_TEMPLATE",
    "SPLITS",
    "DatasetError",
    "JsonlConfig",
    "JsonlSource",
    "TaskSource",
    "check_references",
    "check_split",
    "load_rows",
    "locate_task",
    "read_rows",
    "row_to_task",
    "rows_to_tasks",
    "template_error",
    "validate_row",
    "write_jsonl",
]
