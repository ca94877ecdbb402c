"""The native decode kernels (``kernels/smallm``): products against ``F.linear``, whole decoder
layers against the torch path of the lean decoder and ``transformers``, and the fallbacks."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from conftest import left_padded_prompts, transformers_greedy
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from coderlplus.kernels import smallm
from coderlplus.sampler.fast_decode import FastDecoder

# Where the kernel should build (an x86-64 Linux CPU with AVX2/FMA and a C compiler: CI, this
# machine) its absence is a failure, not a skip.
_SHOULD_BUILD = smallm._cpu_reason() is None and shutil.which("cc") is not None
needs_kernel = pytest.mark.skipif(
    not _SHOULD_BUILD, reason=f"no AVX2/FMA x86-64 CPU or C compiler: {smallm._cpu_reason()}"
)


@needs_kernel
def test_the_kernel_builds_here():
    assert smallm.available(), smallm.unavailable_reason()
    assert smallm.unavailable_reason() is None


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 12, 16])
@pytest.mark.parametrize("k", [8, 40, 61])  # 61: a tail after the 8-wide steps
def test_linear_equals_f_linear(rows, k):
    g = torch.Generator().manual_seed(rows * 100 + k)
    x, w, b = torch.randn(rows, k, generator=g), torch.randn(13, k, generator=g), torch.randn(13, generator=g)
    for bias in (b, None):
        torch.testing.assert_close(smallm.linear(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)
    # a non-contiguous input is read through a copy
    xt = torch.randn(k, rows, generator=g).t()
    torch.testing.assert_close(smallm.linear(xt, w), F.linear(xt, w), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_linear_refuses_what_it_cannot_read():
    w = torch.randn(6, 16)
    with pytest.raises(ValueError):
        smallm.linear(torch.randn(2, 15), w)  # K mismatch
    with pytest.raises(ValueError):
        smallm.linear(torch.randn(2, 16), w.t().contiguous().t())  # not contiguous
    with pytest.raises(ValueError):
        smallm.linear(torch.randn(2, 16), w.double())
    assert not smallm.usable(w.bfloat16())


def _qwen2(bias_seed=0):
    torch.manual_seed(bias_seed)
    cfg = Qwen2Config(
        vocab_size=200, hidden_size=64, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    m = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # q/k/v biases that matter (they start at zero)
        for layer in m.model.layers:
            for p in (layer.self_attn.q_proj.bias, layer.self_attn.k_proj.bias, layer.self_attn.v_proj.bias):
                p.normal_(0, 0.5)
    return m


def _llama():
    torch.manual_seed(3)
    cfg = LlamaConfig(
        vocab_size=150, hidden_size=48, intermediate_size=72, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=3, head_dim=8, max_position_embeddings=128,
        tie_word_embeddings=False,
    )  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@needs_kernel
@pytest.mark.parametrize("make", [_qwen2, _llama], ids=["qwen2-biases", "llama"])
@pytest.mark.parametrize(("lengths", "n"), [([5, 11], 2), ([9], 7), ([4, 12, 7], 4)])
def test_native_layers_decode_as_the_torch_path_and_transformers(make, lengths, n):
    """Row counts 4, 7 (kernel blocks 4+2+1) and 12 (8+4); padded prompts (masked keys)."""
    model = make()
    ids, mask = left_padded_prompts(model.config.vocab_size, lengths, seed=len(lengths) * n)
    native, torch_path = FastDecoder(model), FastDecoder(model, native=False, pack=False)
    assert all(layer.native is not None for layer in native._weights(None, len(lengths) * n)[1])
    assert all(layer.native is None for layer in torch_path._weights(None, len(lengths) * n)[1])
    T = 12
    a_tok, a_lp = native.generate(ids, mask, n, T, eos_token_id=-1, pad_token_id=0, temperature=0)
    b_tok, b_lp = torch_path.generate(ids, mask, n, T, eos_token_id=-1, pad_token_id=0, temperature=0)
    assert torch.equal(a_tok, b_tok)
    torch.testing.assert_close(a_lp, b_lp, atol=1e-5, rtol=0)
    ref, ref_lp = transformers_greedy(model, ids, mask, n, T)  # and transformers itself
    assert torch.equal(a_tok, ref)
    torch.testing.assert_close(a_lp, ref_lp, atol=1e-4, rtol=0)


@needs_kernel
def test_sampled_rollouts_match_the_torch_path_with_the_same_seed():
    model = _qwen2(1)
    ids, mask = left_padded_prompts(model.config.vocab_size, [6, 10], seed=5)
    outs = []
    for dec in (FastDecoder(model), FastDecoder(model, native=False, pack=False)):
        torch.manual_seed(11)
        outs.append(dec.generate(ids, mask, 4, 16, eos_token_id=7, pad_token_id=0, temperature=1.0))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-5, rtol=0)


def test_falls_back_to_torch_when_it_should_not_or_cannot_run(monkeypatch, tmp_path):
    model = _qwen2()
    ids, mask = left_padded_prompts(model.config.vocab_size, [5, 8], seed=2)
    ref = FastDecoder(model, native=False, pack=False).generate(ids, mask, 2, 6, -1, 0, temperature=0)

    def layers_of(dec):
        return dec._weights(None, 4)[1]

    # several torch threads: the single-threaded kernel steps aside
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert all(layer.native is None for layer in layers_of(FastDecoder(model)))
    finally:
        torch.set_num_threads(threads)
    # bf16 projections (autocast): torch
    assert all(layer.native is None for layer in FastDecoder(model)._weights(torch.bfloat16, 4)[1])
    # no compiler: unavailable, with the reason, and the decoder still decodes
    monkeypatch.setattr(smallm, "_state", {})
    monkeypatch.setenv("CODERLPLUS_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert not smallm.available()
    assert smallm.unavailable_reason()
    dec = FastDecoder(model)
    assert all(layer.native is None for layer in layers_of(dec))
    got = dec.generate(ids, mask, 2, 6, -1, 0, temperature=0)
    assert torch.equal(got[0], ref[0])


@needs_kernel
def test_a_fresh_cache_builds_the_library_once(monkeypatch, tmp_path):
    monkeypatch.setattr(smallm, "_state", {})
    monkeypatch.setenv("CODERLPLUS_KERNEL_CACHE", str(tmp_path))
    assert smallm.available(), smallm.unavailable_reason()
    built = list(tmp_path.glob("smallm-*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("*.tmp"))
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(smallm, "_state", {})
    assert smallm.available()
    assert built[0].stat().st_mtime_ns == stamp  # reused, not rebuilt


@needs_kernel
def test_decode_layer_checks_its_tensors():
    model = _qwen2()
    dec = FastDecoder(model)
    layer = dec._weights(None, 2)[1][0].native
    B, hidden, S, d = 2, 64, 10, 16
    x = torch.randn(B, hidden)
    keys, values = torch.zeros(B, 2, S, d), torch.zeros(B, 2, S, d)
    cos, sin = torch.ones(B, d), torch.zeros(B, d)
    scratch = torch.empty(smallm.scratch_size(B, hidden, 4, 2, d, 80, S))
    mask = torch.ones(B, S, dtype=torch.bool)
    smallm.decode_layer(x, layer, cos, sin, keys, values, mask, 0, 1e-6, scratch)  # fine
    assert keys[:, :, 0].abs().sum() > 0 and keys[:, :, 1:].abs().sum() == 0  # slot 0 written, only
    for bad in (
        dict(mask=mask.long()),
        dict(start=S),
        dict(keys=torch.zeros(B, 2, S, 8)),
        dict(scratch=torch.empty(10)),
        dict(x=torch.randn(hidden, B).t()),
    ):
        args = dict(x=x, cos=cos, sin=sin, keys=keys, values=values, mask=mask, start=0, scratch=scratch)
        args.update(bad)
        with pytest.raises(ValueError):
            smallm.decode_layer(weights=layer, eps=1e-6, **args)
