"""Evaluation tasks of the paper's other two families, beside code generation:

- **code reasoning** (output prediction): a program and an input; predict what it prints /
  returns. Sources: TinyCode reference programs on their first test input (stdin -> stdout),
  CRUXEval's (function, input, output) triples (``cruxeval.jsonl``: ``f(<input>) == <output>``),
  and the literal ``assert candidate(...) == ...`` checks of HumanEval's tests;
- **test-output prediction**: a problem statement (no code) and an input; predict the expected
  output (TinyCode).

Every task asks for reasoning first and the answer on the last line as ``OUTPUT: <answer>``
(a last-line JSON object with ``final_output``, the CodeRL+ alignment format, is read too).
An answer is right when it equals the expected output: stdout text compared like a test
(trailing whitespace ignored), Python values compared as values (``ast.literal_eval``).
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from coderlplus.execution.sandbox import compare_output
from coderlplus.types import Rollout, Task

KIND = "reason"
STDIN_PROGRAM = (
    "What does this Python program print when its standard input is the text below?\n\n"
    "```python\n{code}\n```\n\nInput:\n```\n{input}\n```\n"
    "Reason step by step, then give what it prints on the last line as `OUTPUT: <printed text>` "
    "(several lines: separate them with \\n)."
)
FUNCTION_CALL = (
    "What does this call return?\n\n```python\n{code}\n```\n\nCall: `{call}`\n"
    "Reason step by step, then give the value on the last line as `OUTPUT: <Python literal>`."
)
TEST_OUTPUT = (
    "{question}\n\nFor the input below, what is the expected output?\n\nInput:\n```\n{input}\n```\n"
    "Reason step by step, then give the expected output on the last line as `OUTPUT: <text>` "
    "(several lines: separate them with \\n)."
)
_ANSWER = re.compile(r"OUTPUT:\s*(.*?)\s*$", re.S)


def _task(task_id: str, family: str, text: str, expected: str, style: str, source: str) -> Task:
    return Task(
        id=task_id,
        kind=KIND,
        prompt=[{"role": "user", "content": text}],
        payload={"expected": expected, "style": style},
        source=source,
        meta={"family": family},
    )


def tinycode_output_tasks(code_tasks: list[Task]) -> list[Task]:
    """Code reasoning from code-generation tasks with a reference program (first test's input)."""
    out = []
    for t in code_tasks:
        ref, tests = t.payload.get("reference"), t.payload.get("tests") or []
        if ref and tests and "input" in tests[0]:
            text = STDIN_PROGRAM.format(code=ref.strip("\n"), input=tests[0]["input"].rstrip("\n"))
            out.append(
                _task(f"reason/{t.id}", "code_reasoning", text, tests[0]["output"], "stdout", t.source)
            )
    return out


def output_prediction_tasks(code_tasks: list[Task]) -> list[Task]:
    """Test-output prediction: the problem statement and an input, no code (first test)."""
    out = []
    for t in code_tasks:
        tests = t.payload.get("tests") or []
        question = t.meta.get("question") or t.prompt[-1]["content"]
        if tests and "input" in tests[0]:
            text = TEST_OUTPUT.format(question=question, input=tests[0]["input"].rstrip("\n"))
            out.append(_task(f"testout/{t.id}", "test_output", text, tests[0]["output"], "stdout", t.source))
    return out


def cruxeval_tasks(path: str | Path, limit: int | None = None) -> list[Task]:
    """CRUXEval-O: predict ``f(<input>)`` for each (code, input, output) row of ``cruxeval.jsonl``."""
    out = []
    for line in Path(path).read_text().splitlines()[:limit]:
        row = json.loads(line)
        text = FUNCTION_CALL.format(code=row["code"].strip("\n"), call=f"f({row['input']})")
        out.append(_task(f"cruxeval/{row['id']}", "code_reasoning", text, row["output"], "value", "cruxeval"))
    return out


def _literal_assert(line: str) -> tuple[str, str] | None:
    """``(args, expected)`` of ``assert candidate(<literal args>) == <literal>[, msg]``, else None."""
    try:
        node = ast.parse(line.strip())
    except SyntaxError:
        return None
    if len(node.body) != 1 or not isinstance(node.body[0], ast.Assert):
        return None
    test = node.body[0].test
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return None
    call, expected = test.left, test.comparators[0]
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "candidate"):
        return None
    try:
        for arg in [*call.args, expected]:
            ast.literal_eval(arg)
    except (ValueError, SyntaxError, TypeError):
        return None  # not plain literals (e.g. a computed or tolerance check)
    if call.keywords:
        return None
    return ", ".join(ast.unparse(a) for a in call.args), ast.unparse(expected)


def humaneval_assert_tasks(problems: list[dict], per_problem: int = 1) -> list[Task]:
    """Code reasoning from HumanEval: the first ``per_problem`` ``assert candidate(<literals>) ==
    <literal>`` lines of each test, asked about the canonical solution."""
    out = []
    for p in problems:
        found = 0
        for line in p["test"].splitlines():
            parsed = _literal_assert(line) if found < per_problem else None
            if parsed is None:
                continue
            args, expected = parsed
            code = (p["prompt"] + p["canonical_solution"]).strip("\n")
            text = FUNCTION_CALL.format(code=code, call=f"{p['entry_point']}({args})")
            out.append(
                _task(
                    f"reason/humaneval/{p['task_id']}/{found}",
                    "code_reasoning",
                    text,
                    expected,
                    "value",
                    "humaneval",
                )
            )
            found += 1
    return out


def extract_answer(completion: str) -> str | None:
    """The text after the last ``OUTPUT:`` (to the end); failing that, the ``final_output`` of a
    JSON object on the last line (the CodeRL+ alignment answer format, which a model trained with
    alignment tasks uses); else None."""
    idx = completion.rfind("OUTPUT:")
    if idx >= 0:
        m = _ANSWER.match(completion[idx:])
        return m.group(1).strip().strip("`") if m else None
    lines = completion.strip().splitlines()
    try:
        obj = json.loads(lines[-1]) if lines else None
    except ValueError:
        return None
    value = obj.get("final_output") if isinstance(obj, dict) else None
    return value.replace("\n", "\\n") if isinstance(value, str) else None


def is_correct(answer: str | None, expected: str, style: str) -> bool:
    if answer is None:
        return False
    if style == "value":
        try:
            return ast.literal_eval(answer) == ast.literal_eval(expected)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return answer.strip() == expected.strip()
    return compare_output(answer.replace("\\n", "\n"), expected)


def reasoning_accuracy(rollouts: list[Rollout]) -> tuple[float, list[bool]]:
    """Share of rollouts whose ``OUTPUT:`` equals their task's expected output."""
    ok = [
        is_correct(extract_answer(r.completion), r.task.payload["expected"], r.task.payload["style"])
        for r in rollouts
    ]
    return (sum(ok) / len(ok) if ok else 0.0), ok
