"""Log-probs with each distinct prompt computed once (``kernels.shared_prefix``) against one
full forward per row: the same values and the same gradients, with fewer tokens through the model.
These run the ``transformers`` forward (``lean_forward=False``); ``test_lean_forward.py`` covers the
lean one, which shares prompts the same way."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from coderlplus.kernels import KernelsConfig, sequence_logprobs
from coderlplus.ops import sequence_logprobs as reference_logprobs


def _llama():
    torch.manual_seed(2)
    cfg = LlamaConfig(
        vocab_size=200, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def _batch(vocab, prompt_lens, n, T, seed=0):
    """Groups of ``n`` rows sharing a left-padded prompt, ragged right-padded responses, shuffled."""
    g = torch.Generator().manual_seed(seed)
    P = max(prompt_lens)
    rows, masks = [], []
    for plen in prompt_lens:
        prompt = torch.randint(3, vocab, (plen,), generator=g)
        for _ in range(n):
            rlen = int(torch.randint(1, T + 1, (1,), generator=g))
            ids = torch.zeros(P + T, dtype=torch.long)
            mask = torch.zeros(P + T, dtype=torch.long)
            ids[P - plen : P], mask[P - plen : P + rlen] = prompt, 1
            ids[P : P + rlen] = torch.randint(3, vocab, (rlen,), generator=g)
            rows.append(ids)
            masks.append(mask)
    order = torch.randperm(len(rows), generator=g)
    return torch.stack(rows)[order], torch.stack(masks)[order]


@pytest.fixture(params=["qwen2-test-model", "llama-random"])
def model(request, tiny_model):
    m = tiny_model[0] if request.param == "qwen2-test-model" else _llama()
    m.train()
    yield m
    m.zero_grad(set_to_none=True)
    m.eval()


def _logp_and_grads(model, ids, am, T, shared, backend="chunked", temperature=1.0):
    model.zero_grad(set_to_none=True)
    kc = KernelsConfig(backend=backend, shared_prefix=shared, lean_forward=False)
    logp, entropy = sequence_logprobs(
        model, ids, am, T, temperature, with_entropy=True, entropy_grad=True, kernels=kc
    )
    weights = torch.linspace(0.2, 1.0, T)
    ((logp * weights).sum() + 0.1 * entropy.sum()).backward()
    return logp.detach(), entropy.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["torch", "chunked"])
def test_shared_prompts_give_the_same_logprobs_and_gradients(model, backend):
    T = 10
    ids, am = _batch(model.config.vocab_size, [7, 13, 4], n=3, T=T)
    lp, ent, grads = _logp_and_grads(model, ids, am, T, shared=True, backend=backend, temperature=0.8)
    ref_lp, ref_ent, ref_grads = _logp_and_grads(
        model, ids, am, T, shared=False, backend=backend, temperature=0.8
    )
    torch.testing.assert_close(lp, ref_lp, atol=2e-5, rtol=0)
    torch.testing.assert_close(ent, ref_ent, atol=2e-5, rtol=0)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=1e-5 * float(g.abs().max()) + 1e-7, rtol=0)
    with torch.no_grad():  # and both agree with the plain reference op (full logits)
        plain, _ = reference_logprobs(model, ids, am, T, 0.8)
    mask = am[:, -T:].bool()
    torch.testing.assert_close(lp[mask], plain[mask], atol=2e-5, rtol=0)


def test_each_prompt_goes_through_the_model_once(model):
    T, n, lens = 6, 4, [9, 5]
    ids, am = _batch(model.config.vocab_size, lens, n=n, T=T, seed=1)
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    try:
        with torch.no_grad():
            sequence_logprobs(
                model, ids, am, T, kernels=KernelsConfig(shared_prefix=True, lean_forward=False)
            )
            shared = list(seen)
            seen.clear()
            sequence_logprobs(
                model, ids, am, T, kernels=KernelsConfig(shared_prefix=False, lean_forward=False)
            )
    finally:
        hook.remove()
    P, B = max(lens), len(lens) * n
    assert shared == [torch.Size([len(lens), P]), torch.Size([B, T])]  # 2 prompts, then 8 responses
    assert seen == [torch.Size([B, P + T])]


def test_rows_with_distinct_prompts_take_the_plain_forward(model):
    T = 5
    ids, am = _batch(model.config.vocab_size, [6, 8, 3], n=1, T=T, seed=4)
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape))
    try:
        with torch.no_grad():
            sequence_logprobs(
                model, ids, am, T, kernels=KernelsConfig(shared_prefix=True, lean_forward=False)
            )
    finally:
        hook.remove()
    assert seen == [ids.shape]
