"""The hf sampler: shapes, EOS handling, and log-probs equal to the model's own teacher-forced ones."""

from __future__ import annotations

import pytest
import torch

from coderlplus.ops import sequence_logprobs
from coderlplus.sampler import HFSampler, HFSamplerConfig, SamplingParams
from coderlplus.tasks.tinycode import TinyCodeConfig, TinyCodeSource
from coderlplus.trainer import make_batch
from coderlplus.types import RewardOutput


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    src = TinyCodeSource(TinyCodeConfig(cache_dir=str(tmp_path_factory.mktemp("tc")), n_test=6))
    return src.load("test")[:5]  # prompts of different lengths -> left padding is exercised


@pytest.mark.parametrize("fast", [True, False], ids=["fast_decode", "generate"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_sampler_logprobs_match_teacher_forcing(tiny_model, tasks, temperature, fast):
    model, tok = tiny_model
    torch.manual_seed(0)
    sampler = HFSampler(HFSamplerConfig(max_new_tokens=48, fast_decode=fast), model, tok)
    assert (sampler.fast is not None) == fast
    n = 1 if temperature == 0 else 3
    rollouts = sampler.generate(tasks, n, SamplingParams(temperature=temperature, max_new_tokens=48))
    assert len(rollouts) == len(tasks) * n
    assert [r.task.id for r in rollouts] == [t.id for t in tasks for _ in range(n)]
    assert len({r.group_id for r in rollouts}) == len(tasks)
    for r in rollouts:
        assert len(r.response_ids) == len(r.logprobs) >= 1
        if r.finish_reason == "stop":
            assert r.response_ids[-1] == tok.eos_token_id and tok.eos_token_id not in r.response_ids[:-1]
        else:
            assert len(r.response_ids) == 48
    batch = make_batch(rollouts, [RewardOutput(0.0)] * len(rollouts), tok.pad_token_id)
    with torch.no_grad():
        logp, _ = sequence_logprobs(
            model, batch.input_ids, batch.attention_mask, batch.response_mask.shape[1], temperature
        )
    mask = batch.response_mask.bool()
    assert (batch.old_logp[mask] <= 0).all()
    assert torch.allclose(logp[mask], batch.old_logp[mask], atol=1e-4), (
        (logp[mask] - batch.old_logp[mask]).abs().max()
    )


def test_greedy_is_deterministic_and_decodes_completion(tiny_model, tasks):
    model, tok = tiny_model
    sampler = HFSampler(HFSamplerConfig(), model, tok)
    a = sampler.generate(tasks, 1, SamplingParams(temperature=0, max_new_tokens=32))
    b = sampler.generate(tasks, 1, SamplingParams(temperature=0, max_new_tokens=32))
    assert [r.response_ids for r in a] == [r.response_ids for r in b]
    for r in a:
        assert r.completion == tok.decode(r.response_ids, skip_special_tokens=True)


def test_sampler_splits_large_requests(tiny_model, tasks):
    model, tok = tiny_model
    sampler = HFSampler(HFSamplerConfig(max_batch_rollouts=4), model, tok)  # 2 prompts x 2 per call
    out = sampler.generate(tasks, 2, SamplingParams(temperature=1.0, max_new_tokens=8))
    assert len(out) == 10 and len({r.group_id for r in out}) == 5
