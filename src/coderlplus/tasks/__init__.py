"""Task sources: the dataset schema and loader (:mod:`.dataset`) and the TinyCode generator (:mod:`.tinycode`).

Importing this package registers the ``jsonl``, ``tinycode`` and ``humaneval`` task sources.
"""

import sys
import warnings

if sys.argv[:1] == ["-m"]:
    # Started as ``python -m coderlplus.tasks.tinycode``: runpy warns that this package already
    # imported the module it is about to run. Harmless here (tinycode skips re-registering).
    warnings.filterwarnings("ignore", message=r"'coderlplus\.tasks\.tinycode' found in sys\.modules")

from coderlplus.tasks.dataset import (
    DEFAULT_TEMPLATE,
    SPLITS,
    DatasetError,
    JsonlConfig,
    JsonlSource,
    TaskSource,
    load_rows,
    read_rows,
    row_to_task,
    rows_to_tasks,
    validate_row,
    write_jsonl,
)
from coderlplus.tasks.humaneval import HumanEvalConfig, HumanEvalSource
from coderlplus.tasks.tinycode import (
    FAMILIES,
    TinyCodeConfig,
    TinyCodeSource,
    canonical_key,
    families_by_level,
    generate_split,
    make_problem,
    split_of_key,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "FAMILIES",
    "SPLITS",
    "DatasetError",
    "HumanEvalConfig",
    "HumanEvalSource",
    "JsonlConfig",
    "JsonlSource",
    "TaskSource",
    "TinyCodeConfig",
    "TinyCodeSource",
    "canonical_key",
    "families_by_level",
    "generate_split",
    "load_rows",
    "make_problem",
    "read_rows",
    "row_to_task",
    "rows_to_tasks",
    "split_of_key",
    "validate_row",
    "write_jsonl",
]
