"""CodeRL+ execution-semantics alignment: harvest, buffer and mix alignment tasks.

The method (arXiv 2510.18471, DESIGN.md §1), one class per part:

* :class:`AlignmentHarvester` — after a step's rewards, turn code-generation
  rollouts into alignment tasks: by default only failed ones, the last fenced
  python block, run on the task's first test input in the sandbox with the tracer
  (:meth:`Sandbox.trace_many`, one batch). Dropped, each reason counted:
  ``passed`` (with ``failed_only``), ``no_code``, ``syntax``, ``complexity`` (outside
  the optional cyclomatic-complexity range), ``no_input`` (no stdin test),
  ``error`` / ``timeout`` (the run did not end normally), ``empty_output``,
  ``unserialisable`` (a variable has no JSON form), ``no_variables``, ``duplicate``
  (same (input, actual output) earlier in the step), ``too_long`` (the prompt
  exceeds the model's limit). The label is what the program *did*, not what it
  should have done. At most ``max_variables`` targets (the last three bound).
* :class:`AlignmentBuffer` — a capacity-bounded FIFO, sampled ``recent`` (the
  latest step's additions first), ``random`` or ``balanced`` (half from rollouts
  that passed, half from failed ones).
* :class:`Alignment` — what the trainer talks to: how many alignment prompts the
  next batch gets (``ratio`` of it once the buffer holds ``min_buffer``), the
  samples, and after each step the harvest, with ``align/*`` metrics.

Every choice is a field of :class:`AlignmentConfig` (Hydra group ``alignment``).
"""

from __future__ import annotations

import ast
import random
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from coderlplus.execution import Sandbox, TraceOptions, TraceResult, extract_code
from coderlplus.registry import ConfigError
from coderlplus.types import RewardOutput, Rollout, Task

KIND = "align"  # the task kind of alignment tasks (the reward group routes it)

TEMPLATES = {
    # The paper's instruction, compact enough for the tiny model's 256-token prompts.
    "default": (
        "Run this Python program in your head.\n\n```python\n{code}\n```\n\n"
        "Input (stdin):\n```\n{input}\n```\n\n"
        "What does it print, and what are the final values of {names}? Reason step by step, "
        'then write on the last line only a JSON object: {{"final_output": ..., "variables": {{...}}}}'
    ),
    # The same question without asking for reasoning.
    "direct": (
        "```python\n{code}\n```\nInput:\n```\n{input}\n```\n"
        "Give the printed output and the final values of {names} as one JSON line: "
        '{{"final_output": ..., "variables": {{...}}}}'
    ),
}
STRATEGIES = ("recent", "random", "balanced")
VARIABLE_CHOICES = ("last", "first", "random")
REASONS = (
    "passed",
    "no_code",
    "syntax",
    "complexity",
    "no_input",
    "error",
    "timeout",
    "empty_output",
    "unserialisable",
    "no_variables",
    "duplicate",
    "too_long",
)


@dataclass
class AlignmentConfig:
    enabled: bool = False
    """Turn execution-semantics alignment on (``experiment=coderlplus`` does)."""
    ratio: float = 0.4
    """Share of each batch's prompts that are alignment tasks, once the buffer holds enough."""
    min_buffer: int | None = None
    """Alignment tasks the buffer must hold before they enter batches (null: one batch's worth)."""
    buffer_size: int = 20000
    """Capacity of the buffer (oldest dropped first)."""
    strategy: str = "recent"
    """How batches draw from the buffer: recent, random or balanced."""
    failed_only: bool = True
    """Harvest only code-generation rollouts that failed (the paper); false: all of them."""
    n_inputs: int = 1
    """How many of a task's test inputs each program is traced on (one alignment task each)."""
    max_variables: int = 3
    """At most this many target variables per alignment task."""
    min_variables: int = 1
    """Drop programs with fewer traced variables than this."""
    variable_choice: str = "last"
    """Which variables become targets: last (the last bound), first, or random."""
    drop_unserialisable: bool = True
    """Drop a program when any of its variables has no JSON form (the paper); false: skip those names."""
    dedup: bool = True
    """Drop an alignment task whose (input, actual output) already came up in the step."""
    min_complexity: int | None = None
    """Drop programs of lower cyclomatic complexity (null: no bound)."""
    max_complexity: int | None = None
    """Drop programs of higher cyclomatic complexity (null: no bound)."""
    template: str = "default"
    """Prompt: a name in TEMPLATES (default, direct) or a format string with {code}, {input}, {names}."""
    entry: str | None = None
    """Also trace the locals of this function (e.g. main) for programs that keep state there."""

    def __post_init__(self):
        if not 0.0 <= self.ratio < 1.0:
            raise ConfigError(
                f"alignment.ratio={self.ratio} must be in [0, 1): the share of alignment prompts"
            )
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"alignment.strategy={self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if self.variable_choice not in VARIABLE_CHOICES:
            raise ConfigError(
                f"alignment.variable_choice={self.variable_choice!r}: choose one of {', '.join(VARIABLE_CHOICES)}"
            )
        for name in ("buffer_size", "n_inputs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"alignment.{name}={getattr(self, name)} must be >= 1")
        if self.max_variables < 0 or self.min_variables < 0 or self.min_variables > self.max_variables:
            raise ConfigError("alignment: need 0 <= min_variables <= max_variables")
        if self.min_buffer is not None and self.min_buffer < 1:
            raise ConfigError("alignment.min_buffer must be >= 1 (or null)")
        lo, hi = self.min_complexity, self.max_complexity
        if lo is not None and hi is not None and lo > hi:
            raise ConfigError(f"alignment: min_complexity={lo} > max_complexity={hi}")
        template_text(self.template)  # raises on a bad template


def template_text(template: str) -> str:
    """The format string of a template name or literal; ConfigError when unusable."""
    text = TEMPLATES.get(template, template)
    try:
        text.format(code="c", input="i", names="n")
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(
            f"alignment.template: {template!r:.60} is neither one of {sorted(TEMPLATES)} nor a format "
            f"string with only {{code}}, {{input}}, {{names}} ({type(e).__name__}: {e}); "
            "write literal braces as {{ and }}"
        ) from e
    if "{code}" not in text:
        raise ConfigError(f"alignment.template {template!r:.60} has no {{code}} placeholder")
    return text


def cyclomatic_complexity(code: str) -> int | None:
    """McCabe complexity of a whole program: 1 + its decision points; None if it does not parse."""
    try:
        with warnings.catch_warnings():  # model-written code: no SyntaxWarnings on the console
            warnings.simplefilter("ignore")
            tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    score = 1
    for node in ast.walk(tree):
        if isinstance(
            node, (ast.If, ast.IfExp, ast.For, ast.AsyncFor, ast.While, ast.ExceptHandler, ast.Assert)
        ):
            score += 1
        elif isinstance(node, ast.BoolOp):
            score += len(node.values) - 1
        elif isinstance(node, ast.comprehension):
            score += 1 + len(node.ifs)
        elif isinstance(node, ast.match_case):
            score += 1
    return score


def choose_variables(trace: TraceResult, k: int, how: str, rng: random.Random) -> dict[str, Any]:
    """Up to ``k`` target variables, in program order (the trace lists them by last binding line)."""
    names = list(trace.variables)
    if how == "last":
        chosen = names[-k:] if k else []
    elif how == "first":
        chosen = names[:k]
    else:
        chosen = set(rng.sample(names, min(k, len(names))))
    return {n: trace.variables[n] for n in names if n in chosen}


def make_alignment_task(
    code: str, stdin: str, stdout: str, variables: dict[str, Any], template: str, task_id: str, meta: dict
) -> Task:
    names = ", ".join(variables) if variables else "no variables (give an empty object)"
    text = template_text(template).format(code=code.strip("\n"), input=stdin.rstrip("\n"), names=names)
    return Task(
        id=task_id,
        kind=KIND,
        prompt=[{"role": "user", "content": text}],
        payload={"expected_output": stdout, "expected_variables": variables, "code": code, "input": stdin},
        source="alignment",
        meta=meta,
    )


class AlignmentHarvester:
    """Failed rollouts → alignment tasks (see the module docstring)."""

    def __init__(
        self,
        cfg: AlignmentConfig,
        sandbox: Sandbox,
        prompt_tokens: Callable[[Task], int] | None = None,
        max_prompt_tokens: int | None = None,
        seed: int = 0,
    ):
        self.cfg = cfg
        self.sandbox = sandbox
        self.prompt_tokens = prompt_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.rng = random.Random(seed)

    def harvest(
        self, rollouts: list[Rollout], scores: list[RewardOutput], step: int
    ) -> tuple[list[Task], dict[str, int]]:
        """Alignment tasks from one step's code-generation rollouts, and the count per drop reason."""
        cfg = self.cfg
        counts = dict.fromkeys(REASONS, 0)
        jobs = []  # (rollout, passed, code, stdin)
        for r, s in zip(rollouts, scores):
            if r.task.kind != "codegen":
                continue
            passed = s.reward > 0
            if passed and cfg.failed_only:
                counts["passed"] += 1
                continue
            code = extract_code(r.completion)
            if code is None:
                counts["no_code"] += 1
                continue
            cc = cyclomatic_complexity(code)
            if cc is None:
                counts["syntax"] += 1
                continue
            if (cfg.min_complexity is not None and cc < cfg.min_complexity) or (
                cfg.max_complexity is not None and cc > cfg.max_complexity
            ):
                counts["complexity"] += 1
                continue
            inputs = [
                t["input"] for t in r.task.payload.get("tests") or [] if isinstance(t.get("input"), str)
            ]
            if not inputs:
                counts["no_input"] += 1
                continue
            jobs += [(r, passed, code, stdin) for stdin in inputs[: cfg.n_inputs]]

        traces = self.sandbox.trace_many(
            [(code, stdin) for _, _, code, stdin in jobs], TraceOptions(entry=cfg.entry)
        )
        seen: set[tuple[str, str]] = set()
        tasks = []
        for (r, passed, code, stdin), t in zip(jobs, traces):
            reason = self._reject(t)
            if reason is None:
                variables = choose_variables(t, cfg.max_variables, cfg.variable_choice, self.rng)
                if len(variables) < cfg.min_variables:
                    reason = "no_variables"
                elif cfg.dedup and (stdin, t.stdout) in seen:
                    reason = "duplicate"
            if reason is not None:
                counts[reason] += 1
                continue
            meta = {"step": step, "source_task": r.task.id, "source_passed": passed, "group_id": r.group_id}
            task = make_alignment_task(
                code, stdin, t.stdout, variables, cfg.template, f"align/{step}/{len(tasks)}/{r.task.id}", meta
            )
            if (
                self.max_prompt_tokens
                and self.prompt_tokens
                and self.prompt_tokens(task) > self.max_prompt_tokens
            ):
                counts["too_long"] += 1
                continue
            seen.add((stdin, t.stdout))
            tasks.append(task)
        return tasks, counts

    def _reject(self, t: TraceResult) -> str | None:
        if t.status == "timeout":
            return "timeout"
        if t.status != "ok" or t.error:
            return "error"
        if not t.stdout.strip():
            return "empty_output"
        if t.dropped and self.cfg.drop_unserialisable:
            return "unserialisable"
        return None


class AlignmentBuffer:
    """Alignment tasks waiting to be trained on; see the module docstring for the strategies."""

    def __init__(self, capacity: int, strategy: str = "recent", seed: int = 0):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        self.capacity = capacity
        self.strategy = strategy
        self.items: deque[tuple[int, Task]] = deque()  # (step added, task), oldest first
        self.rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, tasks: list[Task], step: int) -> None:
        for t in tasks:
            self.items.append((step, t))
        while len(self.items) > self.capacity:
            self.items.popleft()

    def sample(self, n: int) -> list[Task]:
        """``n`` distinct tasks (fewer if the buffer holds fewer); they stay in the buffer."""
        n = min(n, len(self.items))
        if n <= 0:
            return []
        return getattr(self, f"_{self.strategy}")(n)  # the strategy names a method (checked in __init__)

    def _random(self, n: int) -> list[Task]:
        return [t for _, t in self.rng.sample(list(self.items), n)]

    def _recent(self, n: int) -> list[Task]:
        out: list[Task] = []
        by_step: dict[int, list[Task]] = {}
        for step, t in self.items:
            by_step.setdefault(step, []).append(t)
        for step in sorted(by_step, reverse=True):  # the latest step first, then older ones
            pool = by_step[step]
            take = min(n - len(out), len(pool))
            out += self.rng.sample(pool, take)
            if len(out) == n:
                break
        return out

    def _balanced(self, n: int) -> list[Task]:
        passed = [t for _, t in self.items if t.meta.get("source_passed")]
        failed = [t for _, t in self.items if not t.meta.get("source_passed")]
        half = min(n // 2 + n % 2 * self.rng.randint(0, 1), len(passed))
        take_failed = min(n - half, len(failed))
        take_passed = min(n - take_failed, len(passed))
        out = self.rng.sample(passed, take_passed) + self.rng.sample(failed, take_failed)
        self.rng.shuffle(out)
        return out

    def state_dict(self) -> dict:
        return {
            "items": [[step, asdict(t)] for step, t in self.items],
            "rng": _rng_to_json(self.rng.getstate()),
        }

    def load_state_dict(self, state: dict) -> None:
        self.items = deque((int(step), Task(**t)) for step, t in state["items"])
        self.rng.setstate(_rng_from_json(state["rng"]))


def _rng_to_json(state: tuple) -> list:
    return [state[0], list(state[1]), state[2]]


def _rng_from_json(state: list) -> tuple:
    return (state[0], tuple(state[1]), state[2])


class Alignment:
    """The CodeRL+ addition as the trainer sees it: batch shares, samples, and the harvest."""

    def __init__(
        self,
        cfg: AlignmentConfig,
        sandbox: Sandbox,
        prompt_tokens: Callable[[Task], int] | None = None,
        max_prompt_tokens: int | None = None,
        seed: int = 0,
    ):
        self.cfg = cfg
        self.harvester = AlignmentHarvester(cfg, sandbox, prompt_tokens, max_prompt_tokens, seed)
        self.buffer = AlignmentBuffer(cfg.buffer_size, cfg.strategy, seed + 1)
        self.added_total = 0

    def n_align(self, prompts_per_step: int) -> int:
        """Alignment prompts in the next batch: ``round(ratio * prompts)`` once the buffer holds enough."""
        k = round(self.cfg.ratio * prompts_per_step)
        need = self.cfg.min_buffer if self.cfg.min_buffer is not None else k
        return k if k > 0 and len(self.buffer) >= max(need, k) else 0

    def sample(self, n: int) -> list[Task]:
        return self.buffer.sample(n)

    def after_step(self, rollouts: list[Rollout], scores: list[RewardOutput], step: int) -> dict[str, float]:
        """Harvest this step's code-generation rollouts into the buffer; ``align/*`` metrics."""
        tasks, counts = self.harvester.harvest(rollouts, scores, step)
        self.buffer.add(tasks, step)
        self.added_total += len(tasks)
        return {
            "align/added": float(len(tasks)),
            "align/added_total": float(self.added_total),
            "align/buffer_size": float(len(self.buffer)),
            **{f"align/filtered/{reason}": float(n) for reason, n in counts.items()},
        }

    def eval_tasks(self, tasks: list[Task], limit: int | None = None) -> list[Task]:
        """Held-out alignment tasks: the reference programs of ``tasks``, traced like harvested ones."""
        refs = [t for t in tasks if t.kind == "codegen" and t.payload.get("reference")]
        rollouts = [Rollout(t, f"```python\n{t.payload['reference']}\n```", [], [], []) for t in refs]
        held_out, _ = self.harvester.harvest(rollouts, [RewardOutput(0.0) for _ in rollouts], step=0)
        return held_out[:limit]

    def state_dict(self) -> dict:
        return {
            "buffer": self.buffer.state_dict(),
            "harvester_rng": _rng_to_json(self.harvester.rng.getstate()),
            "added_total": self.added_total,
        }

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.harvester.rng.setstate(_rng_from_json(state["harvester_rng"]))
        self.added_total = int(state["added_total"])


def alignment_metrics(rollouts: list[Rollout], scores: list[RewardOutput]) -> dict[str, float]:
    """``align/accuracy`` (fully correct), ``align/format_rate``, ``align/item_accuracy`` of align rollouts.

    Read from the info of whichever reward reports alignment counts (``items``/``correct``,
    like ``trace_alignment``).
    """
    infos = []
    for r, s in zip(rollouts, scores):
        if r.task.kind == KIND:
            found = [v for v in s.info.values() if isinstance(v, dict) and "items" in v and "correct" in v]
            infos += found[:1]
    if not infos:
        return {}
    return {
        "align/accuracy": sum(bool(i.get("all_correct")) for i in infos) / len(infos),
        "align/format_rate": sum(bool(i.get("format")) for i in infos) / len(infos),
        "align/item_accuracy": sum(i["correct"] for i in infos) / max(1, sum(i["items"] for i in infos)),
        "align/output_accuracy": sum(bool(i.get("output_correct")) for i in infos) / len(infos),
    }
