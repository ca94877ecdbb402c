"""The lean log-prob forward (``kernels.lean_forward``) against the ``transformers`` forward: the
same log-probs, entropies and parameter gradients, every projection run once over all tokens,
and the models it must refuse."""

from __future__ import annotations

import pytest
import torch
from test_shared_prefix import _batch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from coderlplus.kernels import KernelsConfig, lean_forward, sequence_logprobs


def _llama(**kw):
    torch.manual_seed(3)
    kw = {"num_key_value_heads": 2, **kw}
    cfg = LlamaConfig(
        vocab_size=200, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, **kw,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


@pytest.fixture(params=["qwen2-test-model", "llama-random", "llama-mha-bias"])
def model(request, tiny_model):
    if request.param == "qwen2-test-model":
        m = tiny_model[0]
    elif request.param == "llama-random":
        m = _llama()
    else:  # no grouped queries, biased projections
        m = _llama(num_key_value_heads=4, attention_bias=True)
    m.train()
    yield m
    m.zero_grad(set_to_none=True)
    m.eval()


def _run(model, ids, am, T, kc: KernelsConfig, temperature=0.8):
    model.zero_grad(set_to_none=True)
    logp, entropy = sequence_logprobs(
        model, ids, am, T, temperature, with_entropy=True, entropy_grad=True, kernels=kc
    )
    weights = torch.linspace(0.2, 1.0, T, device=logp.device)
    ((logp * weights).sum() + 0.1 * entropy.sum()).backward()
    return logp.detach(), entropy.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("share", [True, False])
def test_same_logprobs_and_gradients_as_the_transformers_forward(model, share):
    assert lean_forward.supports(model) is None
    T = 9
    ids, am = _batch(model.config.vocab_size, [7, 12, 3], n=3, T=T, seed=5)
    lean = _run(model, ids, am, T, KernelsConfig(lean_forward=True, shared_prefix=share))
    plain = _run(model, ids, am, T, KernelsConfig(lean_forward=False, shared_prefix=False))
    mask = am[:, -T:].bool()
    for got, ref in zip(lean[:2], plain[:2], strict=True):
        torch.testing.assert_close(got[mask], ref[mask], atol=2e-5, rtol=0)
        assert float(got[~mask].abs().max()) == 0.0  # padding gets 0
    for name, g in plain[2].items():
        assert float(g.abs().max()) > 0, name  # every parameter is trained through the lean path
        torch.testing.assert_close(lean[2][name], g, atol=1e-5 * float(g.abs().max()) + 1e-7, rtol=0)


@pytest.mark.parametrize("n_layers, T", [(1, 1), (1, 4), (2, 1), (2, 2)])
def test_edge_shapes_one_layer_and_one_response_token(n_layers, T):
    """The last layer is also the first; responses of one token have no response position to
    compute (only the prompt's last predicts): same log-probs and gradients all the same."""
    m = _llama()
    m.model.layers = m.model.layers[:n_layers]
    m.config.num_hidden_layers = n_layers
    m.train()
    ids, am = _batch(m.config.vocab_size, [7, 3], n=3, T=T, seed=4)
    plain = _run(m, ids, am, T, KernelsConfig(lean_forward=False, shared_prefix=False))
    mask = am[:, -T:].bool()
    for share in (True, False):
        lean = _run(m, ids, am, T, KernelsConfig(lean_forward=True, shared_prefix=share))
        torch.testing.assert_close(lean[0][mask], plain[0][mask], atol=2e-5, rtol=0)
        for name, g in plain[2].items():
            torch.testing.assert_close(lean[2][name], g, atol=1e-5 * float(g.abs().max()) + 1e-7, rtol=0)


def test_each_projection_runs_once_over_the_tokens_that_count(model):
    T, n, lens = 6, 4, [9, 5]
    ids, am = _batch(model.config.vocab_size, lens, n=n, T=T, seed=1)
    rows = {"first": [], "last": []}
    layers = model.model.layers
    hooks = [
        layers[i].self_attn.q_proj.register_forward_hook(
            lambda mod, inp, out, k=k: rows[k].append(inp[0].shape[0])
        )
        for i, k in ((0, "first"), (-1, "last"))
    ]
    try:
        with torch.no_grad():
            for share in (True, False):
                sequence_logprobs(model, ids, am, T, kernels=KernelsConfig(shared_prefix=share))
    finally:
        for hook in hooks:
            hook.remove()
    P, B = max(lens), am.shape[0]
    responses = int(am[:, P:].sum())  # real response tokens (ragged, each row at least one)
    # A row's last real token predicts nothing: every layer leaves it out. One call per pass over
    # 2 prompts (or 8 copies of them) + the other response tokens; the last layer's queries only
    # for each prompt's last token (it predicts the first response token) and the responses.
    assert rows["first"] == [sum(lens) + responses - B, n * sum(lens) + responses - B]
    assert rows["last"] == [len(lens) + responses - B, B + responses - B]
    assert responses < am.shape[0] * T  # the batch has padding to leave out


def test_under_cpu_autocast_close_to_the_transformers_autocast_pass(model):
    T = 8
    ids, am = _batch(model.config.vocab_size, [6, 10], n=4, T=T, seed=2)
    mask = am[:, -T:].bool()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        lean, _ = sequence_logprobs(model, ids, am, T, kernels=KernelsConfig(lean_forward=True))
        hf, _ = sequence_logprobs(model, ids, am, T, kernels=KernelsConfig(lean_forward=False))
    with torch.no_grad():
        full, _ = sequence_logprobs(model, ids, am, T, kernels=KernelsConfig(lean_forward=True))
    diff = (lean - hf)[mask].abs()
    assert float(diff.max()) < 0.06 and float(diff.mean()) < 0.01
    assert float((lean - full)[mask].abs().max()) > 0  # the matrix multiplies did run in bf16
    # gradients flow through the bf16-rounded attention inputs to fp32 parameters
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lp, _ = sequence_logprobs(model, ids, am, T, kernels=KernelsConfig(lean_forward=True))
    lp.sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_models_it_cannot_reproduce_take_the_transformers_forward():
    m = _llama(attention_dropout=0.1)
    m.train()
    assert "dropout" in lean_forward.supports(m)
    m.eval()
    assert lean_forward.supports(m) is None  # dropout is off in evaluation
    m.gradient_checkpointing_enable()
    assert "checkpointing" in lean_forward.supports(m)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2))
    assert "model_type" in lean_forward.supports(gpt2)
    m = _llama(attention_dropout=0.1)  # the refused model still gets its log-probs (the HF path)
    m.train()
    ids, am = _batch(m.config.vocab_size, [5, 4], n=2, T=4, seed=3)
    torch.manual_seed(0)
    a, _ = sequence_logprobs(m, ids, am, 4, kernels=KernelsConfig(lean_forward=True))
    torch.manual_seed(0)
    b, _ = sequence_logprobs(m, ids, am, 4, kernels=KernelsConfig(lean_forward=False))
    torch.testing.assert_close(a, b)  # same dropout draws: the same path


def test_no_prompt_columns_fall_back():
    m = _llama()
    ids = torch.randint(3, 200, (2, 5))
    mask = torch.ones_like(ids)
    assert lean_forward.response_hidden(m, ids, mask, mask.cumsum(-1) - 1, 5) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16-autocast"])
def test_gpu_same_logprobs_and_gradients_as_the_transformers_forward(amp):
    """On CUDA attention runs in the autocast dtype, as ``transformers`` runs it."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        m = _llama(attention_bias=True).cuda().train()
        T = 9
        ids, am = (t.cuda() for t in _batch(m.config.vocab_size, [7, 12, 3], n=3, T=T, seed=5))
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            lean = _run(m, ids, am, T, KernelsConfig(lean_forward=True))
            plain = _run(m, ids, am, T, KernelsConfig(lean_forward=False, shared_prefix=False))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    mask = am[:, -T:].bool()
    tol = 0.06 if amp else 2e-5
    torch.testing.assert_close(lean[0][mask], plain[0][mask], atol=tol, rtol=0)
    for name, g in plain[2].items():
        scale = float(g.abs().max())
        torch.testing.assert_close(lean[2][name], g, atol=(0.05 if amp else 1e-5) * scale + 1e-7, rtol=0)
