"""The lean decoder of ``sampler=hf`` against ``transformers`` itself: the same greedy tokens and
log-probs, the sampling distribution, end-of-sequence handling, and what it refuses."""

from __future__ import annotations

import pytest
import torch
from conftest import left_padded_prompts, transformers_greedy
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from coderlplus.sampler import HFSampler, HFSamplerConfig, SamplingParams, fast_decode
from coderlplus.sampler.fast_decode import FastDecoder, supports


def _llama():
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(params=["qwen2-test-model", "llama-random"])
def model(request, tiny_model):
    return tiny_model[0] if request.param == "qwen2-test-model" else _llama()


def test_greedy_tokens_and_logprobs_equal_transformers_generate(model):
    ids, mask = left_padded_prompts(model.config.vocab_size, [9, 23, 16])
    n, T = 2, 24
    tokens, logp = FastDecoder(model).generate(
        ids, mask, n, T, eos_token_id=-1, pad_token_id=0, temperature=0
    )
    ref_tokens, ref_logp = transformers_greedy(model, ids, mask, n, T)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logp, ref_logp, atol=1e-5, rtol=0)


def test_sampled_logprobs_equal_a_teacher_forced_forward(model):
    ids, mask = left_padded_prompts(model.config.vocab_size, [5, 12], seed=3)
    torch.manual_seed(0)
    tokens, logp = FastDecoder(model).generate(ids, mask, 3, 16, -1, 0, temperature=0.8)
    full_ids = torch.cat([ids.repeat_interleave(3, 0), tokens], 1)
    full_mask = torch.cat([mask.repeat_interleave(3, 0), torch.ones_like(tokens)], 1)
    with torch.no_grad():
        logits = model(
            input_ids=full_ids, attention_mask=full_mask, position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)
        ).logits[:, ids.shape[1] - 1 : -1]
    ref = torch.log_softmax(logits / 0.8, -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(logp, ref, atol=1e-4, rtol=0)


def test_first_tokens_follow_the_softmax_and_top_p_keeps_the_nucleus(tiny_model):
    model = tiny_model[0]
    ids, mask = left_padded_prompts(model.config.vocab_size, [12], seed=5)
    with torch.no_grad():
        p = (model(ids).logits[0, -1] / 0.7).softmax(-1)
    N = 3000
    torch.manual_seed(0)
    tokens, _ = FastDecoder(model).generate(ids, mask, N, 1, -1, 0, temperature=0.7)
    counts = torch.bincount(tokens[:, 0], minlength=p.numel()).double()
    expected = p.double() * N
    big = expected > 5  # Pearson's chi-square over the frequent tokens (the rest pooled)
    chi2 = (((counts[big] - expected[big]) ** 2) / expected[big]).sum()
    pooled = counts[~big].sum() - expected[~big].sum()
    chi2 += pooled**2 / expected[~big].sum().clamp(min=1e-9)
    df = int(big.sum())  # (big + 1 pooled cell) - 1
    assert chi2 < df + 4 * (2 * df) ** 0.5, (float(chi2), df)  # mean df, sd sqrt(2 df): far beyond chance
    # top-p: only the smallest set of most likely tokens reaching 0.5 appears
    sp, order = p.sort(descending=True)
    nucleus = set(order[: int((sp.cumsum(0) < 0.5).sum()) + 1].tolist())
    tokens, _ = FastDecoder(model).generate(ids, mask, 500, 1, -1, 0, temperature=0.7, top_p=0.5)
    assert set(tokens[:, 0].tolist()) == nucleus


def test_rows_stop_at_eos_and_decoding_ends_when_all_have():
    model = _llama()
    ids, mask = left_padded_prompts(model.config.vocab_size, [6, 6])
    greedy, _ = FastDecoder(model).generate(ids, mask, 1, 12, -1, 0, temperature=0)
    eos = int(greedy[0, 3])  # row 0 emits it at step 3 (or earlier, if it repeats)
    first = [row.tolist().index(eos) if eos in row.tolist() else None for row in greedy]
    tokens, logp = FastDecoder(model).generate(ids, mask, 1, 12, eos, 0, temperature=0)
    for row, stop in enumerate(first):
        if stop is None:
            assert torch.equal(tokens[row], greedy[row, : tokens.shape[1]])
        else:
            assert torch.equal(tokens[row, : stop + 1], greedy[row, : stop + 1])
            assert (tokens[row, stop + 1 :] == 0).all() and (logp[row, stop + 1 :] == 0).all()
    if all(s is not None for s in first):
        assert tokens.shape[1] == max(first) + 1  # no step after the last row's end


def test_unsupported_models_go_through_generate(tiny_model):
    tok = tiny_model[1]
    cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
               num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    sliding = Qwen2ForCausalLM(
        Qwen2Config(**cfg, use_sliding_window=True, sliding_window=8, max_window_layers=0)
    )
    scaled = LlamaForCausalLM(LlamaConfig(**cfg, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    gelu = LlamaForCausalLM(LlamaConfig(**cfg, hidden_act="gelu"))
    for m in (sliding, scaled, gelu):
        assert supports(m) is not None
        with pytest.raises(ValueError, match="does not support"):
            FastDecoder(m)
        sampler = HFSampler(HFSamplerConfig(max_new_tokens=4), m, tok)
        assert sampler.fast is None
    assert supports(Qwen2ForCausalLM(Qwen2Config(**cfg))) is None


def test_the_sampler_gives_the_same_greedy_rollouts_either_way(tiny_model):
    from coderlplus.tasks.tinycode import TinyCodeConfig, TinyCodeSource

    model, tok = tiny_model
    tasks = TinyCodeSource(TinyCodeConfig(n_test=6)).load("test")[:4]
    params = SamplingParams(temperature=0, max_new_tokens=40)
    fast = HFSampler(HFSamplerConfig(), model, tok).generate(tasks, 1, params)
    slow = HFSampler(HFSamplerConfig(fast_decode=False), model, tok).generate(tasks, 1, params)
    assert [r.response_ids for r in fast] == [r.response_ids for r in slow]
    assert [r.finish_reason for r in fast] == [r.finish_reason for r in slow]
    for a, b in zip(fast, slow):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


@pytest.mark.parametrize("amp", [False, True])
def test_prepacked_projections_give_the_unpacked_results(model, amp, monkeypatch):
    """Without the native kernels (``native=False``, or several threads, or bf16) a CPU's decode
    steps use oneDNN-prepacked weights (``_pack``; here for every size): the same tokens, and
    log-probs to rounding, as plain ``F.linear``."""
    ids, mask = left_padded_prompts(model.config.vocab_size, [6, 13], seed=7)
    packed, plain = FastDecoder(model, native=False), FastDecoder(model, pack=False, native=False)
    assert packed._weights(None, 4)[1][0].qkv.packed is None  # small weights: the plain kernel
    monkeypatch.setattr(fast_decode, "_PACK_MIN", 0)
    dtype = torch.bfloat16 if amp else torch.float32
    layer = packed._weights(dtype if amp else None, 4)[1][0]
    if fast_decode._PACKABLE[dtype]:
        assert layer.qkv.packed is not None and layer.down.packed is not None, "nothing was prepacked"
    else:  # this CPU's oneDNN has no packed kernel for the dtype (bf16 needs AVX-512 or AVX-NE-CONVERT)
        assert dtype == torch.bfloat16 and layer.qkv.packed is None and layer.down.packed is None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        a = packed.generate(ids, mask, 2, 20, -1, 0, temperature=0)
        b = plain.generate(ids, mask, 2, 20, -1, 0, temperature=0)
    assert torch.equal(a[0], b[0])
    torch.testing.assert_close(a[1], b[1], atol=1e-2 if amp else 1e-5, rtol=0)
