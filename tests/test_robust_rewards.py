"""No completion text can crash a reward; a reward or sandbox failure on one rollout scores it 0, is
counted in ``errors/*``, is logged once, and the step goes on."""

from __future__ import annotations

import json
import logging
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coderlplus.execution import Sandbox, extract_code
from coderlplus.registry import REWARDS, register_reward
from coderlplus.reward import Reward, RewardRouter
from coderlplus.types import RewardOutput, Rollout, Task

CODE_TASK = {"tests": [{"input": "3\n", "output": "6\n"}, {"input": "0\n", "output": "0\n"}]}
ALIGN_TRUTH = {"expected_output": "6\n", "expected_variables": {"n": 3, "xs": [1, 2.5], "d": {"a": None}}}


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


# Texts a policy might emit, from plain noise to things aimed at the parsers.
junk = st.one_of(
    st.text(),  # any unicode, surrogates included
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1000, max_size=5000),
    st.binary(max_size=2000).map(lambda b: b.decode("latin-1")),  # binary junk, NUL bytes and all
    st.binary(max_size=500).map(lambda b: b.decode("utf-8", errors="surrogateescape")),
    st.integers(1, 100_000).map(deep_json),  # JSON nested deeper than the recursion limit
    st.sampled_from(
        [
            '{"final_output": NaN, "variables": {"n": Infinity, "xs": -Infinity}}',
            '{"final_output": 1e999, "variables": {"n": 1e999}}',
            '{"final_output": "6", "variables": [1, 2]}',
            '{"final_output": {"a": [1, {"b": NaN}]}, "variables": {"n": {"x": []}}}',
            '{"final_output": ' + "9" * 5000 + ', "variables": {}}',  # a huge integer
            "```python\n```",  # a fence without code
            "```\n\n\n```",
            "```python",  # an open fence
            "``````",
            "```python\n" + "x" * 200_000 + "\n```",
            "\x00\x00```python\nprint(\x00)\n```",
            "```python\nimport sys; sys.setrecursionlimit(10**9)\ndef f(): f()\nf()\n```",
            "```python\nprint(float('nan'))\n```",
        ]
    ),
)
# ... and the same wrapped in the ways answers are written, so the parsers reach the junk.
completions = st.one_of(
    junk,
    junk.map(lambda s: f"reasoning...\n{s}"),
    junk.map(lambda s: f"```python\n{s}\n```"),
    junk.map(lambda s: '{"final_output": ' + json.dumps(s) + ', "variables": {"n": ' + json.dumps(s) + "}}"),
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
        max_leaves=30,
    ).map(lambda v: json.dumps({"final_output": v, "variables": {"n": v, "xs": v}})),
)


@settings(max_examples=400, deadline=None)
@given(completions)
def test_trace_alignment_never_crashes_and_stays_in_range(completion):
    reward = REWARDS.get("trace_alignment")()
    out = reward.score(completion, ALIGN_TRUTH)
    assert math.isfinite(out.reward) and 0.0 <= out.reward <= 1.0
    assert out.reward == 0.0 or out.info["format"]


@settings(max_examples=400, deadline=None)
@given(completions)
def test_extract_code_never_crashes(completion):
    code = extract_code(completion)
    assert code is None or (isinstance(code, str) and code.strip())


@pytest.fixture(scope="module")
def sandbox():
    sb = Sandbox(timeout_s=1.0, workers=2)
    yield sb
    sb.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(completions)
def test_outcome_never_crashes(sandbox, completion):
    """Through the real sandbox: whatever the program does, the reward is 0 or 1."""
    reward = REWARDS.get("outcome")(REWARDS.make_config("outcome", {}), sandbox=sandbox)
    out = reward.score([completion], [CODE_TASK])[0]
    assert out.reward in (0.0, 1.0)
    assert out.info["status"] in (
        "pass",
        "wrong",
        "no_code",
        "error",
        "timeout",
        "memory",
        "output_limit",
        "killed",
    )


# ----------------------------------------------------------------------------- failures in the router


@register_reward("test_fragile")
class FragileReward(Reward):
    """Raises on a batch holding a completion with "boom", returns NaN for "nan", else 1."""

    def __call__(self, rollouts):
        if any("boom" in r.completion for r in rollouts):
            raise ZeroDivisionError("boom")
        return [RewardOutput(float("nan") if "nan" in r.completion else 1.0) for r in rollouts]


def _rollout(i: int, completion: str, kind: str = "codegen") -> Rollout:
    task = Task(id=f"t/{i}", kind=kind, prompt=[{"role": "user", "content": "double n"}], payload=CODE_TASK)
    return Rollout(task=task, completion=completion, prompt_ids=[1], response_ids=[2], logprobs=[-0.1])


def test_a_failing_rollout_scores_0_the_others_are_scored_and_it_is_logged_once(caplog):
    router = RewardRouter({"codegen": {"test_fragile": {}}})
    rollouts = [_rollout(i, c) for i, c in enumerate(["ok", "boom 1", "ok", "nan", "boom 2"])]
    with caplog.at_level(logging.DEBUG, logger="coderlplus.reward"):
        scores = router(rollouts)
    assert [s.reward for s in scores] == [1.0, 0.0, 1.0, 0.0, 0.0]
    errors = [s.info["test_fragile"].get("reward_error") for s in scores]
    assert errors[0] is None and errors[2] is None
    assert errors[1] == errors[4] == "ZeroDivisionError: boom"
    assert errors[3] == "ValueError: non-finite reward nan"
    assert all(s.info["test_fragile"].get("error_origin") in (None, "reward") for s in scores)
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(logged) == 2  # once per kind (ZeroDivisionError, non-finite), not per rollout
    text = logged[0].getMessage()
    assert "t/1" in text and "boom 1" in text and "Traceback" in text and "errors/reward" in text


def test_a_sandbox_failure_is_counted_as_a_sandbox_error(caplog):
    from coderlplus.trainer import reward_metrics

    dead = Sandbox(timeout_s=1.0, workers=1)
    dead.close()  # every use now raises inside coderlplus.execution
    router = RewardRouter({"codegen": {"outcome": {}}, "align": {"test_fragile": {}}}, sandbox=dead)
    rollouts = [_rollout(0, "```python\nprint(6)\n```"), _rollout(1, "x"), _rollout(2, "boom", "align")]
    rollouts += [_rollout(3, "y", "align")]
    with caplog.at_level(logging.ERROR, logger="coderlplus.reward"):
        scores = router(rollouts)
    assert [s.reward for s in scores] == [0.0, 0.0, 0.0, 1.0]
    assert scores[0].info["outcome"]["error_origin"] == "sandbox"
    assert "Sandbox is closed" in scores[0].info["outcome"]["reward_error"]
    m = reward_metrics(rollouts, scores, group_size=2)
    assert (m["errors/sandbox"], m["errors/reward"]) == (2.0, 1.0)
    assert len([r for r in caplog.records if "errors/sandbox" in r.getMessage()]) == 1


def test_a_training_step_goes_on_when_the_sandbox_is_gone(tiny_model_dir, tmp_path):
    """A real trainer whose sandbox dies after start-up: every code rollout scores 0, the CodeRL+
    harvest is skipped, the failures are counted, and the update still runs."""
    from test_e2e import SMOKE, _resolved

    from coderlplus.trainer import Trainer

    overrides = [*SMOKE, "model=hf", f"model.path={tiny_model_dir}", "reward=coderlplus"]
    overrides += ["alignment.enabled=true", "trainer.eval_max_tasks=2", "trainer.eval_splits=[test]"]
    trainer = Trainer(_resolved(overrides), tmp_path)
    try:
        trainer.sandbox.close()
        m = trainer.train_step(1)
    finally:
        trainer.close()
    rollouts = 8 * 4
    assert m["errors/sandbox"] == rollouts and m["errors/reward"] == 0
    assert m["errors/align_harvest"] == 1.0 and m["reward/mean"] == 0.0
    assert math.isfinite(m["actor/pg_loss"]) and math.isfinite(m["actor/kl_loss"])
