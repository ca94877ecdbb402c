"""The outcome reward plugin (rewards/outcome.py)."""

from __future__ import annotations

import pytest

import coderlplus
from coderlplus.execution import Sandbox
from coderlplus.registry import REWARDS
from coderlplus.reward import RewardRouter
from coderlplus.types import Rollout, Task

TESTS = [
    {"input": "1\n", "output": "2\n"},
    {"input": "5\n", "output": "10\n"},
    {"input": "7\n", "output": "14"},
]
PAYLOAD = {"tests": TESTS, "reference": "print(int(input()) * 2)"}


def fenced(code: str) -> str:
    return f"Here is the program:\n```python\n{code}\n```\n"


RIGHT = fenced("n = int(input())\nprint(n * 2)")
WRONG = fenced("n = int(input())\nprint(n + 2)")
TWO_OF_THREE = fenced("n = int(input())\nprint(n * 2 if n < 7 else 0)")  # fails test 2 only
CRASH = fenced("n = int(input())\nprint(n * 2 / 0)")
LOOP = fenced("while True:\n    pass")
NO_CODE = "I think the answer is to double n."


@pytest.fixture(scope="module")
def sandbox():
    sb = Sandbox(timeout_s=1.0, workers=2)
    yield sb
    sb.close()


@pytest.fixture(scope="module")
def outcome_cls():
    coderlplus.load_plugins()
    return REWARDS.get("outcome")


def make(outcome_cls, sandbox, **opts):
    cfg = REWARDS.make_config("outcome", opts)
    return outcome_cls(cfg, sandbox=sandbox)


def rollout(completion: str, payload=PAYLOAD, kind="codegen") -> Rollout:
    task = Task(id="t/0", kind=kind, prompt=[{"role": "user", "content": "double n"}], payload=payload)
    return Rollout(task=task, completion=completion, prompt_ids=[1], response_ids=[2], logprobs=[-0.1])


def test_registered(outcome_cls):
    assert "outcome" in REWARDS
    cfg = REWARDS.make_config("outcome", {})
    assert cfg.partial is False and cfg.weight == 1.0


def test_all_or_nothing(outcome_cls, sandbox):
    reward = make(outcome_cls, sandbox)
    completions = [RIGHT, WRONG, TWO_OF_THREE, CRASH, LOOP, NO_CODE]
    outs = reward([rollout(c) for c in completions])
    assert [o.reward for o in outs] == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert [o.info["status"] for o in outs] == ["pass", "wrong", "wrong", "error", "timeout", "no_code"]
    assert [o.info["passed"] for o in outs] == [3, 0, 2, 0, 0, 0]
    assert [o.info["failed_test"] for o in outs] == [None, 0, 2, 0, 0, None]
    assert all(o.info["total"] == 3 for o in outs)


def test_partial(outcome_cls, sandbox):
    reward = make(outcome_cls, sandbox, partial=True)
    outs = reward([rollout(c) for c in [RIGHT, TWO_OF_THREE, WRONG, NO_CODE]])
    assert [o.reward for o in outs] == pytest.approx([1.0, 2 / 3, 0.0, 0.0])
    assert outs[1].info == {"status": "wrong", "passed": 2, "total": 3, "failed_test": 2}


def test_stop_at_first_failure(outcome_cls, sandbox):
    reward = make(outcome_cls, sandbox, stop_at_first_failure=True)
    first_wrong = fenced("n = int(input())\nprint(0 if n == 1 else n * 2)")  # fails test 0 only
    outs = reward([rollout(c) for c in [RIGHT, first_wrong, TWO_OF_THREE, LOOP]])
    assert [o.reward for o in outs] == [1.0, 0.0, 0.0, 0.0]
    assert [o.info["status"] for o in outs] == ["pass", "wrong", "wrong", "timeout"]
    assert outs[1].info["passed"] == 0  # the other tests were skipped
    assert outs[2].info["failed_test"] == 2


def test_score_one(outcome_cls, sandbox):
    reward = make(outcome_cls, sandbox)
    assert reward.score_one(RIGHT, PAYLOAD) == 1.0
    assert reward.score_one(WRONG, PAYLOAD) == 0.0
    assert make(outcome_cls, sandbox, partial=True).score_one(TWO_OF_THREE, PAYLOAD) == pytest.approx(2 / 3)


def test_no_tests(outcome_cls, sandbox):
    out = make(outcome_cls, sandbox)([rollout(RIGHT, payload={"tests": []})])[0]
    assert out.reward == 0.0 and out.info["status"] == "no_tests"


def test_truncated_completion(outcome_cls, sandbox):
    truncated = "```python\nn = int(input())\nprint(n * 2)\n"  # no closing fence
    assert make(outcome_cls, sandbox).score_one(truncated, PAYLOAD) == 1.0


def test_lazy_sandbox(outcome_cls):
    reward = outcome_cls()
    assert reward.sandbox is None
    try:
        assert reward.score_one(RIGHT, PAYLOAD) == 1.0
        first = reward.sandbox
        assert isinstance(first, Sandbox)
        assert reward.score_one(WRONG, PAYLOAD) == 0.0
        assert reward.sandbox is first  # shared by the reward's calls
    finally:
        if reward.sandbox is not None:
            reward.sandbox.close()


def test_through_router(outcome_cls, sandbox):
    router = RewardRouter({"codegen": {"outcome": {}}}, sandbox=sandbox)
    outs = router([rollout(RIGHT), rollout(NO_CODE), rollout(CRASH)])
    assert [o.reward for o in outs] == [1.0, 0.0, 0.0]
    assert outs[0].info["outcome"] == {
        "status": "pass",
        "passed": 3,
        "total": 3,
        "failed_test": None,
        "reward": 1.0,
    }
    assert outs[1].info["outcome"]["status"] == "no_code"
    assert outs[2].info["outcome"]["status"] == "error"


def test_router_weight_and_partial(outcome_cls, sandbox):
    router = RewardRouter({"codegen": {"outcome": {"weight": 0.5, "partial": True}}}, sandbox=sandbox)
    outs = router([rollout(TWO_OF_THREE)])
    assert outs[0].reward == pytest.approx(0.5 * 2 / 3)
