"""``trainer.mixed_precision=bf16``: bf16 matrix multiplies under autocast, fp32 everything else.

What is checked: the lean decoder under autocast runs its projections in bf16 and its
log-probs stay within rounding of the trainer's autocast passes, the log-probs' LM head stays
fp32 under autocast, and a bf16 training step samples under autocast, keeps fp32 parameters and
optimiser state, updates them, and gets a sampler/trainer ratio of ~1.
"""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_prompts
from test_e2e import SMOKE_LEARNS, _resolved
from test_fast_decode import _llama

from coderlplus.config import ConfigError, TrainerConfig
from coderlplus.kernels import KernelsConfig, sequence_logprobs
from coderlplus.sampler.fast_decode import FastDecoder
from coderlplus.trainer import Trainer, make_batch

AMP = {"device_type": "cpu", "dtype": torch.bfloat16}


@pytest.fixture(params=["qwen2-test-model", "llama-random"])
def model(request, tiny_model):
    return tiny_model[0] if request.param == "qwen2-test-model" else _llama()


def test_autocast_decoding_runs_bf16_projections_and_tracks_the_trainers_passes(model):
    ids, mask = left_padded_prompts(model.config.vocab_size, [5, 12, 9], seed=3)
    n, T, temp = 4, 24, 0.8
    decoder = FastDecoder(model)
    with torch.autocast(**AMP):  # greedy, with and without autocast: the same tokens, bf16 numbers
        g_amp = decoder.generate(ids, mask, 1, T, -1, 0, temperature=0)
    g_fp32 = decoder.generate(ids, mask, 1, T, -1, 0, temperature=0)
    same = (g_amp[0] == g_fp32[0]).cumprod(1).bool()  # up to the first differing token
    assert same[:, 0].all() and (g_amp[1] - g_fp32[1])[same].abs().mean() > 1e-4, "no bf16 in the decoder"
    torch.manual_seed(0)
    with torch.autocast(**AMP):
        tokens, logp = decoder.generate(ids, mask, n, T, -1, 0, temperature=temp)
    full_ids = torch.cat([ids.repeat_interleave(n, 0), tokens], 1)
    full_mask = torch.cat([mask.repeat_interleave(n, 0), torch.ones_like(tokens)], 1)
    with torch.no_grad(), torch.autocast(**AMP):
        amp, _ = sequence_logprobs(model, full_ids, full_mask, T, temp)
    assert amp.dtype == torch.float32 and logp.dtype == torch.float32
    # the sampler's log-probs are the trainer's bf16 ones up to rounding (attention order, GEMM blocking)
    assert (logp - amp).abs().max() < 0.06 and (logp - amp).abs().mean() < 0.01


def test_log_probs_under_autocast_keep_an_fp32_lm_head(tiny_model):
    model = tiny_model[0]
    ids, mask = left_padded_prompts(model.config.vocab_size, [7, 11, 4], seed=5)
    T = 5
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    kc = KernelsConfig(shared_prefix=False, lean_forward=False)  # the body compared below: transformers
    with torch.no_grad(), torch.autocast(**AMP):
        got, _ = sequence_logprobs(model, ids, mask, T, 1.0, kernels=kc)
        hidden = model.model(input_ids=ids, attention_mask=mask, position_ids=pos).last_hidden_state
    hidden = hidden[:, -T - 1 : -1].float()
    want = torch.log_softmax(hidden @ model.lm_head.weight.T, -1).gather(-1, ids[:, -T:, None])[..., 0]
    torch.testing.assert_close(got, want * mask[:, -T:], atol=1e-5, rtol=0)  # a bf16 head: ~1e-2 off
    bf16_head = torch.log_softmax((hidden.bfloat16() @ model.lm_head.weight.T.bfloat16()).float(), -1)
    assert (bf16_head.gather(-1, ids[:, -T:, None])[..., 0] - want).abs().max() > 1e-4  # the test can tell


def test_bf16_step_keeps_fp32_state_updates_and_its_sampler_agrees(tiny_model_dir, tmp_path):
    rc = _resolved(
        [*SMOKE_LEARNS, "model=hf", f"model.path={tiny_model_dir}", "trainer.mixed_precision=bf16"]
    )
    trainer = Trainer(rc, tmp_path)
    try:
        before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
        with trainer._amp():
            rollouts = trainer.sampler.generate(trainer.next_tasks()[:4], 4)
        batch = make_batch(rollouts, None, trainer.tokenizer.pad_token_id)
        amp = trainer._logprobs(trainer.policy, batch)
        rc.trainer.mixed_precision = "none"
        fp32 = trainer._logprobs(trainer.policy, batch)
        rc.trainer.mixed_precision = "bf16"
        real = batch.response_mask.bool()
        assert (amp - fp32)[real].abs().mean() > 1e-4  # the passes ran in bf16
        assert (batch.old_logp - amp)[real].abs().mean() < 0.01  # the sampler's agree with them
        seen = []  # the step samples under the same autocast
        generate = trainer.sampler.generate
        trainer.sampler.generate = lambda *a, **k: (
            seen.append(torch.is_autocast_enabled("cpu")) or generate(*a, **k)
        )
        m = trainer.train_step(1)
        m = m if m["adv/zero_frac"] < 1 else trainer.train_step(2)  # a step with a learning signal
    finally:
        trainer.close()
    assert seen and all(seen)
    after = trainer.policy.state_dict()
    assert all(v.dtype == torch.float32 for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in before), "no update"
    state = trainer.optimizer.state_dict()["state"]
    assert state and all(s["exp_avg"].dtype == torch.float32 for s in state.values())
    assert abs(m["actor/ratio_mean"] - 1.0) < 1e-2


def test_mixed_precision_accepts_none_and_bf16_only():
    TrainerConfig(mixed_precision="bf16")
    with pytest.raises(ConfigError, match="mixed_precision"):
        TrainerConfig(mixed_precision="fp16")


def test_bf16_ppo_step_trains_an_fp32_critic(tiny_model_dir, tmp_path):
    overrides = [*SMOKE_LEARNS, "model=hf", f"model.path={tiny_model_dir}", "algorithm=ppo"]
    trainer = Trainer(_resolved([*overrides, "trainer.mixed_precision=bf16"]), tmp_path)
    head = trainer.critic.head.weight.detach().clone()
    try:
        m = trainer.train_step(1)
    finally:
        trainer.close()
    assert trainer.critic.head.weight.dtype == torch.float32
    assert not torch.equal(head, trainer.critic.head.weight), "the value head did not train"
    for key in ("critic/vf_loss", "actor/pg_loss", "critic/grad_norm"):
        assert torch.isfinite(torch.tensor(m[key])), key


def test_bf16_reference_keeps_bf16_projections_and_the_same_log_probs(tiny_model_dir, tmp_path):
    """The frozen reference stores its linear layers in bf16 under mixed precision: the numbers
    autocast would compute from the fp32 weights, without the per-step casts."""
    rc = _resolved(
        [*SMOKE_LEARNS, "model=hf", f"model.path={tiny_model_dir}", "trainer.mixed_precision=bf16"]
    )
    trainer = Trainer(rc, tmp_path)
    try:
        ref = trainer.reference
        assert ref.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
        assert (
            ref.lm_head.weight.dtype == torch.float32 and ref.model.embed_tokens.weight.dtype == torch.float32
        )
        with trainer._amp():
            rollouts = trainer.sampler.generate(trainer.next_tasks()[:4], 4)
        batch = make_batch(rollouts, None, trainer.tokenizer.pad_token_id)
        got = trainer._logprobs(ref, batch)
        want = trainer._logprobs(trainer.policy, batch)  # still the reference's weights, in fp32
    finally:
        trainer.close()
    torch.testing.assert_close(got, want, atol=0, rtol=0)
