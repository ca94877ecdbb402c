"""``data=humaneval``: the 164 problems as chat tasks, the harness checked with HumanEval's canonical
solutions (all pass) and broken ones (all fail), and ``coderlplus-eval data=humaneval`` end to end."""

from __future__ import annotations

import json
import re

import pytest

from coderlplus.evaluation import pass_at_k, programs_pass
from coderlplus.tasks.dataset import DatasetError
from coderlplus.tasks.humaneval import HumanEvalConfig, HumanEvalSource
from coderlplus.types import Rollout


@pytest.fixture(scope="module")
def source():
    return HumanEvalSource()


@pytest.fixture(scope="module")
def problems(source):
    return {f"humaneval/{p['task_id']}": p for p in source.problems()}


def _rollouts(tasks, completions):
    return [Rollout(t, c, [], [], []) for t, c in zip(tasks, completions)]


def _fenced(code: str) -> str:
    return f"Here it is.\n```python\n{code}```\n"


def test_164_chat_tasks_with_assert_tests(source, problems):
    tasks = source.load("test")
    assert len(tasks) == 164 == len({t.id for t in tasks})
    for t in tasks:
        p = problems[t.id]
        assert t.kind == "codegen" and p["prompt"] in t.prompt[-1]["content"]
        (test,) = t.payload["tests"]
        assert test["setup"] == p["prompt"] and test["code"].rstrip().endswith(f"check({p['entry_point']})")
    with pytest.raises(DatasetError, match="only a test split"):
        source.load("train")
    assert len(HumanEvalSource(HumanEvalConfig(max_rows=5)).load("test")) == 5


def test_canonical_solutions_pass_and_broken_ones_fail(source, problems, sandbox):
    tasks = source.load("test")
    canonical = [_fenced(problems[t.id]["prompt"] + problems[t.id]["canonical_solution"]) for t in tasks]
    assert all(programs_pass(_rollouts(tasks, canonical), sandbox))  # 164 / 164

    def broken(p):  # the right signature, a wrong body
        return _fenced(f"def {p['entry_point']}(*args, **kwargs):\n    return None\n")

    assert not any(programs_pass(_rollouts(tasks, [broken(problems[t.id]) for t in tasks]), sandbox))
    no_code = [t for t in tasks[:5]]
    assert not any(programs_pass(_rollouts(no_code, ["I don't know."] * 5), sandbox))


def test_an_answer_without_the_prompts_imports_still_runs(source, problems, sandbox):
    # Chat answers often give the bare function; the prompt (imports, helpers) runs first.
    tasks = [
        t for t in source.load("test") if re.search(r"^from typing import", problems[t.id]["prompt"], re.M)
    ]
    assert len(tasks) > 20
    bare = []
    for t in tasks:
        p = problems[t.id]
        full = p["prompt"] + p["canonical_solution"]
        bare.append(
            _fenced("\n".join(x for x in full.splitlines() if not x.startswith(("from ", "import "))) + "\n")
        )
    assert all(programs_pass(_rollouts(tasks, bare), sandbox))


def test_pass_at_k_hand_computed():
    # n=5, c=2: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10; pass@4 = 1 - 0 (n-c < k)
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert pass_at_k(5, 2, 4) == 1.0
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(10, 3, 5) == pytest.approx(1 - (7 * 6 * 5 * 4 * 3) / (10 * 9 * 8 * 7 * 6))


def test_eval_cli_on_all_of_humaneval(tiny_model_dir, tmp_path):
    from coderlplus.evaluate import run_eval

    cfg = {
        "model": {"name": "hf", "path": str(tiny_model_dir)},
        "sampler": {"name": "hf", "max_new_tokens": 16},
        "data": {"name": "humaneval"},
        "execution": {},
        "splits": ["test"],
        "max_tasks": None,
        "n_samples": 2,
        "k": [1, 2],
        "logger": {"wandb_mode": "offline"},  # a real offline W&B run
    }
    results = run_eval(cfg, tmp_path / "out")
    assert results["test/n"] == 164  # the tiny model scores ~0: the pipeline is what counts
    assert 0.0 <= results["test/pass@1"] <= 1.0
    assert 0.0 <= results["test/pass@1_sampled"] <= results["test/pass@2_sampled"] <= 1.0
    rows = [json.loads(x) for x in (tmp_path / "out" / "test.jsonl").read_text().splitlines()]
    assert len(rows) == 164 * 3 and {r["how"] for r in rows} == {"greedy", "sampled"}
    assert "| test | 164 |" in (tmp_path / "out" / "results.md").read_text()
    assert json.loads((tmp_path / "out" / "metrics.jsonl").read_text())["test/n"] == 164
    assert list((tmp_path / "out" / "wandb").glob("offline-run-*")), "no offline W&B run was written"
