"""Code reasoning and test-output prediction: answer parsing, value/stdout comparison, task ground
truth checked by executing the programs in the sandbox, and ``coderlplus-eval reasoning=[...]``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coderlplus.tasks import reasoning as R
from coderlplus.tasks.humaneval import HumanEvalSource
from coderlplus.tasks.tinycode import TinyCodeConfig, TinyCodeSource
from coderlplus.types import Rollout

CRUXEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "cruxeval" / "cruxeval.jsonl"


def test_answer_parsing_and_comparison():
    assert R.extract_answer("x is 3, so\nOUTPUT: [1, 2]") == "[1, 2]"
    assert R.extract_answer("OUTPUT: 1\nthen OUTPUT: `'ab'`  ") == "'ab'"  # the last one wins
    assert R.extract_answer("no answer") is None
    assert R.extract_answer('I run it.\n{"variables": {"n": 3}, "final_output": "3\\n4\\n"}') == "3\\n4\\n"
    assert R.is_correct(R.extract_answer('{"final_output": "3\\n4\\n"}'), "3\n4\n", "stdout")
    assert R.extract_answer('{"final_output": 5}') is None and R.extract_answer("{broken") is None
    assert R.is_correct("[1, 2]", "[1,2]", "value") and R.is_correct("(1,)", "(1, )", "value")
    assert not R.is_correct("[2, 1]", "[1, 2]", "value") and not R.is_correct(None, "1", "value")
    assert R.is_correct("'a b'", "'a b'", "value") and not R.is_correct("a b", "'a b'", "value")
    assert R.is_correct("3\\n4", "3\n4\n", "stdout") and not R.is_correct("3 4", "3\n4\n", "stdout")


def _oracle(tasks, answers):
    rollouts = [Rollout(t, f"Let me think.\nOUTPUT: {a}", [], [], []) for t, a in zip(tasks, answers)]
    return R.reasoning_accuracy(rollouts)[0]


def _values_by_running(sandbox, programs):
    """Each program prints repr(<call>): the true answers, computed independently of the tasks."""
    results = sandbox.run_many([(p, "") for p in programs])
    assert all(r.status == "ok" for r in results), [r.stderr[-300:] for r in results if r.status != "ok"][:2]
    return [r.stdout.strip() for r in results]


@pytest.mark.skipif(not CRUXEVAL.exists(), reason="needs ../shared/data/cruxeval/cruxeval.jsonl")
def test_cruxeval_tasks_have_the_executed_answers(sandbox):
    tasks = R.cruxeval_tasks(CRUXEVAL, limit=40)
    rows = [json.loads(x) for x in CRUXEVAL.read_text().splitlines()[:40]]
    truth = _values_by_running(sandbox, [f"{r['code']}\nprint(repr(f({r['input']})))" for r in rows])
    assert _oracle(tasks, truth) == 1.0
    assert _oracle(tasks, ["None"] * len(tasks)) < 0.2


def test_humaneval_assert_tasks_have_the_executed_answers(sandbox):
    problems = HumanEvalSource().problems()
    tasks = R.humaneval_assert_tasks(problems)
    assert len(tasks) > 100
    by_id = {p["task_id"]: p for p in problems}
    programs = []
    for t in tasks:
        p = by_id[t.id.split("/", 2)[2].rsplit("/", 1)[0]]
        call = t.prompt[0]["content"].split("Call: `", 1)[1].split("`\n", 1)[0]
        programs.append(f"{p['prompt']}{p['canonical_solution']}\nprint(repr({call}))")
    assert _oracle(tasks, _values_by_running(sandbox, programs)) == 1.0


def test_tinycode_reasoning_and_test_output_tasks(sandbox):
    code_tasks = TinyCodeSource(TinyCodeConfig()).load("test")[:30]
    reason = R.tinycode_output_tasks(code_tasks)
    testout = R.output_prediction_tasks(code_tasks)
    assert len(reason) == len(testout) == 30
    assert (
        "```python" in reason[0].prompt[0]["content"] and "```python" not in testout[0].prompt[0]["content"]
    )
    outputs = [
        r.stdout
        for r in sandbox.run_many(
            [(t.payload["reference"], t.payload["tests"][0]["input"]) for t in code_tasks]
        )
    ]
    answers = [o.rstrip("\n").replace("\n", "\\n") for o in outputs]
    assert _oracle(reason, answers) == 1.0 and _oracle(testout, answers) == 1.0


def test_eval_cli_reports_every_reasoning_family(tiny_model_dir, tmp_path):
    from coderlplus.evaluate import run_eval

    cfg = {
        "model": {"name": "hf", "path": str(tiny_model_dir)},
        "sampler": {"name": "hf", "max_new_tokens": 16},
        "data": {"name": "tinycode", "cache_dir": str(tmp_path / "tc"), "n_test": 6},
        "execution": {},
        "splits": ["test"],
        "max_tasks": 4,
        "reasoning": ["code", "test_output", "humaneval_asserts"]
        + (["cruxeval"] if CRUXEVAL.exists() else []),
        "cruxeval_path": str(CRUXEVAL),
    }
    results = run_eval(cfg, tmp_path / "out")
    for name in cfg["reasoning"]:
        assert results[f"reasoning/{name}/n"] == 4 and 0.0 <= results[f"reasoning/{name}/accuracy"] <= 1.0
        assert len((tmp_path / "out" / f"reasoning_{name}.jsonl").read_text().splitlines()) == 4
    assert "| reasoning task | n | accuracy |" in (tmp_path / "out" / "results.md").read_text()
