"""The log-prob / entropy backends of ``coderlplus.kernels`` (torch, chunked, triton).

Every backend, on both the logits path and the fused linear path (hidden states and LM-head
weight), is checked against the same math done in float64 from the same inputs: the forward
values (log-probs and entropy) and the gradients of ``sum(g1 * logp + g2 * entropy)`` with
random ``g1, g2`` (and of logp or entropy alone). Shapes are chosen to hit the edges of the
chunking (N = 1, N not a multiple of the chunk) and of the Triton blocks (V below a power of
two, V over one 4096-wide block with a partial second block). On the CPU the Triton kernels run
under Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py), so shapes stay tiny.

``sequence_logprobs`` is compared with the reference ``coderlplus.ops.sequence_logprobs`` on the
tiny test model with left-padded prompts and right-padded responses, gradients w.r.t. every
model parameter included. The ``gpu`` tests run real sizes (Qwen2.5-0.5B's vocabulary) and
check the peak memory of the fused path.
"""

from __future__ import annotations

import gc
import math
import os

import pytest
import torch

import coderlplus.kernels as K
from coderlplus import ops
from coderlplus.kernels import (
    KernelsConfig,
    chunked,
    default_backend,
    logprobs_from_hidden,
    logprobs_from_logits,
    resolve_backend,
    sequence_logprobs,
)
from coderlplus.registry import ConfigError

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
BACKENDS = ["torch", "chunked", "triton"]
PATHS = ["logits", "linear"]

# Relative errors ||out - ref|| / ||ref|| allowed against the float64 reference, per input dtype.
# fp32: a few hundred ulps of rounding in sums over V (and H) terms; bf16: the inputs' (and, on the
# linear path, the logits') 8-bit mantissa.
FWD_TOL = {torch.float32: 5e-6, torch.bfloat16: 2e-2}
GRAD_TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}
MAX_ABS_FACTOR = 5.0  # max |out - ref| <= factor * tol * max |ref| (catches one bad row or column)


# --------------------------------------------------------------------------------------------
# helpers


def _skip_unless_backend_runs(backend: str, device: torch.device) -> None:
    if backend != "triton":
        return
    if not K.triton_available():
        pytest.skip("the triton package is not installed")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 before triton is imported")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    assert torch.isfinite(out).all(), f"{what}: non-finite values"
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:.3g}"
    max_abs = (out.detach().double() - ref.detach().double()).abs().max().item()
    bound = MAX_ABS_FACTOR * tol * ref.detach().double().abs().max().item()
    assert max_abs <= bound, f"{what}: max abs error {max_abs:.3g} > {bound:.3g}"


def make_inputs(path, N, V, H, seed=0, device=DEVICE, lead=(), logit_std=2.0):
    """fp32 inputs (random, never zero): logits ``[*lead, N, V]`` or hidden ``[*lead, N, H]`` and
    weight ``[V, H]`` (logits of std ``logit_std``); tokens; the weights g1, g2 of logp and
    entropy in the loss."""
    g = torch.Generator(device=device).manual_seed(seed)
    kw = dict(generator=g, device=device)
    tokens = torch.randint(0, V, (*lead, N), **kw)
    if path == "logits":
        z = logit_std * torch.randn(*lead, N, V, **kw)
        # some rows put real mass on their token, so onehot(y) - p is not just onehot(y)
        boost = 6.0 * torch.rand(*lead, N, 1, **kw)
        z.scatter_add_(-1, tokens.unsqueeze(-1), boost)
        leaves = (z,)
    else:
        h = torch.randn(*lead, N, H, **kw)
        w = torch.randn(V, H, **kw) * (logit_std / math.sqrt(H))
        leaves = (h, w)
    g1 = torch.randn(*lead, N, **kw)
    g2 = torch.randn(*lead, N, **kw)
    return leaves, tokens, g1, g2


def reference(path, leaves, tokens, temperature):
    """float64 ``(logp, entropy)`` and the fp64 leaves (requiring grad) they were computed from."""
    leaves64 = tuple(x.detach().double().requires_grad_() for x in leaves)
    z = leaves64[0] if path == "logits" else leaves64[0] @ leaves64[1].T
    logsm = torch.log_softmax(z / temperature, dim=-1)
    logp = logsm.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy, leaves64


def run_backend(path, backend, leaves, tokens, temperature, chunk, with_entropy=True):
    leaves = tuple(x.detach().clone().requires_grad_() for x in leaves)
    if path == "logits":
        out = logprobs_from_logits(leaves[0], tokens, backend, with_entropy, temperature, chunk)
    else:
        out = logprobs_from_hidden(leaves[0], leaves[1], tokens, backend, with_entropy, temperature, chunk)
    logp, entropy = out if with_entropy else (out, None)
    return logp, entropy, leaves


def loss_of(mode, logp, entropy, g1, g2):
    g1, g2 = g1.to(logp.dtype), g2.to(logp.dtype)
    if mode == "both":
        return (g1 * logp + g2 * entropy).sum()
    if mode == "logp":
        return (g1 * logp).sum()
    return (g2 * entropy).sum()  # "entropy"


def grads(loss, leaves):
    return torch.autograd.grad(loss, leaves)


# --------------------------------------------------------------------------------------------
# every backend and path against float64, fp32 inputs

# (N, V, H, chunk, temperature)
SHAPES = [
    pytest.param(13, 1000, 24, 5, 1.0, id="N13-V1000-H24-chunk5-t1"),  # one masked block of 1024
    pytest.param(13, 5000, 37, 5, 0.7, id="N13-V5000-H37-chunk5-t0.7"),  # 4096 + a partial block
    pytest.param(1, 1000, 37, 5, 0.7, id="N1-V1000-H37-t0.7"),
    pytest.param(7, 4096, 24, 3, 0.7, id="N7-V4096-H24-chunk3-t0.7"),  # exactly one full block
    pytest.param(9, 3, 5, 4, 1.0, id="N9-V3-H5-chunk4-t1"),  # a tiny vocabulary
    pytest.param(16, 1000, 24, 1024, 0.7, id="N16-V1000-H24-chunk1024-t0.7"),  # one chunk
]


@pytest.mark.parametrize("mode", ["both", "logp", "entropy"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("N", "V", "H", "chunk", "temperature"), SHAPES)
def test_matches_float64_reference(backend, path, mode, N, V, H, chunk, temperature):
    _skip_unless_backend_runs(backend, DEVICE)
    leaves, tokens, g1, g2 = make_inputs(path, N, V, H, seed=N * 7919 + V)
    ref_logp, ref_ent, leaves64 = reference(path, leaves, tokens, temperature)
    logp, entropy, leaves = run_backend(path, backend, leaves, tokens, temperature, chunk)

    assert logp.dtype == entropy.dtype == torch.float32
    assert_close(logp, ref_logp, FWD_TOL[torch.float32], "logp")
    assert_close(entropy, ref_ent, FWD_TOL[torch.float32], "entropy")
    assert (logp <= 1e-6).all() and (entropy >= -1e-5).all() and (entropy <= math.log(V) + 1e-4).all()

    got = grads(loss_of(mode, logp, entropy, g1, g2), leaves)
    want = grads(loss_of(mode, ref_logp, ref_ent, g1.double(), g2.double()), leaves64)
    for name, a, b in zip(("d/logits",) if path == "logits" else ("d/hidden", "d/weight"), got, want):
        assert a.dtype == torch.float32
        assert_close(a, b, GRAD_TOL[torch.float32], f"{mode}: {name}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_logp_only_without_entropy(backend, path):
    """``with_entropy=False``: only the log-probs come back, with the reference's gradients."""
    _skip_unless_backend_runs(backend, DEVICE)
    leaves, tokens, g1, _ = make_inputs(path, 11, 1000, 24, seed=5)
    ref_logp, _, leaves64 = reference(path, leaves, tokens, 0.7)
    logp, entropy, leaves = run_backend(path, backend, leaves, tokens, 0.7, 4, with_entropy=False)
    assert entropy is None and isinstance(logp, torch.Tensor)
    assert_close(logp, ref_logp, FWD_TOL[torch.float32], "logp")
    got = grads((g1 * logp).sum(), leaves)
    want = grads((g1.double() * ref_logp).sum(), leaves64)
    for a, b in zip(got, want):
        assert_close(a, b, GRAD_TOL[torch.float32], "grad")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_and_noncontiguous_inputs(backend, path):
    """Leading dims are kept (``[B, T, V] -> [B, T]``) and strided views give the same answers."""
    _skip_unless_backend_runs(backend, DEVICE)
    B, T, V, H = 2, 5, 1000, 24
    leaves, tokens, g1, g2 = make_inputs(path, T, V, H, seed=11, lead=(B,))
    ref_logp, ref_ent, leaves64 = reference(path, leaves, tokens, 0.7)
    # the same values behind strided views: padded last dim (rows of stride V+3 / H+3)
    if path == "logits":
        big = torch.full((B, T, V + 3), 1e4, device=DEVICE)
        big[..., :V] = leaves[0]
        views = (big[..., :V],)
    else:
        hb = torch.full((B, T, H + 3), 1e4, device=DEVICE)
        hb[..., :H] = leaves[0]
        wt = leaves[1].T.contiguous().T  # [V, H] stored column-major
        views = (hb[..., :H], wt)
    assert not views[0].is_contiguous()
    views = tuple(v.requires_grad_() for v in views)
    if path == "logits":
        logp, entropy = logprobs_from_logits(views[0], tokens, backend, True, 0.7, 3)
    else:
        logp, entropy = logprobs_from_hidden(views[0], views[1], tokens, backend, True, 0.7, 3)
    assert logp.shape == entropy.shape == (B, T)
    assert_close(logp, ref_logp, FWD_TOL[torch.float32], "logp")
    assert_close(entropy, ref_ent, FWD_TOL[torch.float32], "entropy")
    got = grads(loss_of("both", logp, entropy, g1, g2), views)
    want = grads(loss_of("both", ref_logp, ref_ent, g1.double(), g2.double()), leaves64)
    for a, b in zip(got, want):
        assert_close(a, b, GRAD_TOL[torch.float32], "grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_column_major_logits(backend):
    """Logits stored column-major (``x.T`` of a contiguous ``[V, N]``) are valid ``[N, V]`` input."""
    _skip_unless_backend_runs(backend, DEVICE)
    (z,), tokens, g1, g2 = make_inputs("logits", 6, 1000, 0, seed=12)
    ref_logp, ref_ent, (z64,) = reference("logits", (z,), tokens, 1.0)
    zt = z.T.contiguous().T.requires_grad_()
    assert zt.stride() == (1, 6)
    logp, entropy = logprobs_from_logits(zt, tokens, backend, True, 1.0, 4)
    assert_close(logp, ref_logp, FWD_TOL[torch.float32], "logp")
    (gz,) = grads(loss_of("both", logp, entropy, g1, g2), (zt,))
    (want,) = grads(loss_of("both", ref_logp, ref_ent, g1.double(), g2.double()), (z64,))
    assert_close(gz, want, GRAD_TOL[torch.float32], "d/logits")


# --------------------------------------------------------------------------------------------
# the row kernels themselves, and what autograd hands them


class _SpyRows:
    """A RowOps that records the ``g_ent`` each ``grad_`` call receives."""

    def __init__(self, rows):
        self.rows, self.g_ents = rows, []

    def stats(self, z, tokens, scale):
        return self.rows.stats(z, tokens, scale)

    def grad_(self, z, tokens, lse, entropy, g_logp, g_ent, scale):
        self.g_ents.append(g_ent)
        return self.rows.grad_(z, tokens, lse, entropy, g_logp, g_ent, scale)


@pytest.mark.parametrize("path", PATHS)
def test_undifferentiated_entropy_reaches_the_rows_as_none(path):
    """When only logp is differentiated (entropy detached or unused), ``RowOps.grad_`` gets
    ``g_ent=None`` (its documented contract; the kernels then skip the entropy term) and the
    gradients are still right."""
    leaves, tokens, g1, _ = make_inputs(path, 9, 1000, 24, seed=21)
    ref_logp, _, leaves64 = reference(path, leaves, tokens, 0.7)
    leaves = tuple(x.clone().requires_grad_() for x in leaves)
    spy = _SpyRows(chunked.TORCH_ROWS)
    if path == "logits":
        logp, entropy = chunked.logprobs_from_logits(leaves[0], tokens, 0.7, 4, spy)
    else:
        logp, entropy = chunked.logprobs_from_hidden(leaves[0], leaves[1], tokens, 0.7, 4, spy)
    entropy = entropy.detach()  # as sequence_logprobs does without entropy_grad
    got = grads((g1 * logp).sum(), leaves)
    want = grads((g1.double() * ref_logp).sum(), leaves64)
    for a, b in zip(got, want):
        assert_close(a, b, GRAD_TOL[torch.float32], "grad")
    assert len(spy.g_ents) == 3  # chunks of 4 rows: 4 + 4 + 1
    kinds = [None if g is None else f"tensor(max |g|={g.abs().max().item():g})" for g in spy.g_ents]
    assert all(g is None for g in spy.g_ents), f"grad_ got g_ent={kinds}, expected None"


def _rows(name):
    if name == "torch":
        return chunked.TORCH_ROWS
    _skip_unless_backend_runs("triton", DEVICE)
    from coderlplus.kernels.triton import TRITON_ROWS

    return TRITON_ROWS


@pytest.mark.parametrize("with_g_ent", [True, False])
@pytest.mark.parametrize("V", [1000, 5000])
@pytest.mark.parametrize("rows", ["torch", "triton"])
def test_row_ops_against_float64(rows, V, with_g_ent):
    """``stats`` and ``grad_`` (in place, with and without the entropy term) on one chunk."""
    ops_ = _rows(rows)
    (z,), tokens, g1, g2 = make_inputs("logits", 6, V, 0, seed=V + with_g_ent)
    scale = 1 / 0.7
    ref_logp, ref_ent, (z64,) = reference("logits", (z,), tokens, 0.7)
    logp, entropy, lse = ops_.stats(z, tokens, scale)
    assert_close(logp, ref_logp, FWD_TOL[torch.float32], "logp")
    assert_close(entropy, ref_ent, FWD_TOL[torch.float32], "entropy")
    assert_close(lse, torch.logsumexp(z64.detach() * scale, -1), FWD_TOL[torch.float32], "lse")

    zc = z.clone()
    out = ops_.grad_(zc, tokens, lse, entropy, g1, g2 if with_g_ent else None, scale)
    assert out.data_ptr() == zc.data_ptr() and out.dtype == z.dtype  # written over z
    loss = (g1.double() * ref_logp).sum() + ((g2.double() * ref_ent).sum() if with_g_ent else 0)
    (want,) = grads(loss, (z64,))
    assert_close(out, want, GRAD_TOL[torch.float32], "grad_")


# --------------------------------------------------------------------------------------------
# bf16 inputs


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize(("N", "V", "H", "chunk", "temperature"), [SHAPES[0], SHAPES[1]])
def test_bf16_inputs(backend, path, N, V, H, chunk, temperature):
    """bf16 in: fp32 out, close to the float64 math on the same (upcast) bf16 inputs, and (Liger
    style) both the plain torch path on bf16 and the kernel on bf16 are close to the fp32 path,
    the kernel no further from it than about the torch path is."""
    _skip_unless_backend_runs(backend, DEVICE)
    leaves32, tokens, g1, g2 = make_inputs(path, N, V, H, seed=N + V + 1, logit_std=1.0)
    leaves16 = tuple(x.bfloat16() for x in leaves32)
    tol_f, tol_g = FWD_TOL[torch.bfloat16], GRAD_TOL[torch.bfloat16]

    ref_logp, ref_ent, leaves64 = reference(path, leaves16, tokens, temperature)
    ref_grads = grads(loss_of("both", ref_logp, ref_ent, g1.double(), g2.double()), leaves64)

    def run(backend, leaves):
        logp, entropy, leaves = run_backend(path, backend, leaves, tokens, temperature, chunk)
        return logp, entropy, grads(loss_of("both", logp, entropy, g1, g2), leaves)

    logp, entropy, got = run(backend, leaves16)
    assert logp.dtype == entropy.dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in got)
    assert_close(logp, ref_logp, tol_f, "logp vs fp64(bf16 inputs)")
    assert_close(entropy, ref_ent, tol_f, "entropy vs fp64(bf16 inputs)")
    for a, b in zip(got, ref_grads):
        assert_close(a, b, tol_g, "grad vs fp64(bf16 inputs)")

    fp32 = run("torch", leaves32)  # the fp32 path
    torch_bf16 = run("torch", leaves16)  # the plain reference on bf16
    for name, out in (("torch-bf16", torch_bf16), (f"{backend}-bf16", (logp, entropy, got))):
        assert_close(out[0], fp32[0], tol_f, f"{name} logp vs fp32")
        assert_close(out[1], fp32[1], tol_f, f"{name} entropy vs fp32")
        for a, b in zip(out[2], fp32[2]):
            assert_close(a, b, tol_g, f"{name} grad vs fp32")
    # no worse than rounding the inputs (and the logits) to bf16 already costs
    for i, what in ((0, "logp"), (1, "entropy")):
        e_kernel, e_torch = rel_err((logp, entropy)[i], fp32[i]), rel_err(torch_bf16[i], fp32[i])
        assert e_kernel <= 2 * e_torch + 1e-4, (what, e_kernel, e_torch)
    for a, t, b in zip(got, torch_bf16[2], fp32[2]):
        e_kernel, e_torch = rel_err(a, b), rel_err(t, b)
        assert e_kernel <= 2 * e_torch + 1e-3, ("grad", e_kernel, e_torch)


# --------------------------------------------------------------------------------------------
# sequence_logprobs on a real (tiny) model with padding


@pytest.fixture(scope="module")
def fp32_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return model.to(DEVICE).eval()


def padded_batch(prompt_lens, response_lens, vocab, pad_id, seed=0):
    """Like ``trainer.make_batch``: prompts left-padded to P, responses right-padded to T."""
    g = torch.Generator().manual_seed(seed)
    P, T = max(prompt_lens), max(1, max(response_lens))
    input_ids = torch.full((len(prompt_lens), P + T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, (p, n) in enumerate(zip(prompt_lens, response_lens)):
        input_ids[i, P - p : P + n] = torch.randint(3, vocab, (p + n,), generator=g)
        attention_mask[i, P - p : P + n] = 1
    return input_ids.to(DEVICE), attention_mask.to(DEVICE), T


class _HeadCalls:
    def __init__(self, model):
        self.n = 0
        self.handle = model.get_output_embeddings().register_forward_hook(self)

    def __call__(self, *args):
        self.n += 1


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("linear", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs_matches_reference_with_padding(fp32_model, backend, linear, temperature):
    _skip_unless_backend_runs(backend, DEVICE)
    model = fp32_model
    assert model.config.tie_word_embeddings == (
        model.get_output_embeddings().weight is model.get_input_embeddings().weight
    )
    input_ids, attention_mask, T = padded_batch([4, 9, 6], [7, 1, 4], model.config.vocab_size, 0)
    real = attention_mask[:, -T:].bool()
    assert (~real).any() and (attention_mask[:, :-T] == 0).any()  # both kinds of padding present
    g = torch.Generator().manual_seed(1)
    g1, g2 = torch.randn(2, *real.shape, generator=g).to(DEVICE)
    params = [p for p in model.parameters() if p.requires_grad]

    ref_logp, ref_ent = ops.sequence_logprobs(
        model, input_ids, attention_mask, T, temperature, with_entropy=True, entropy_grad=True
    )
    m = real.to(ref_logp.dtype)
    ref_grads = grads((m * (g1 * ref_logp + g2 * ref_ent)).sum(), params)

    calls = _HeadCalls(model)
    try:
        kc = KernelsConfig(backend=backend, linear=linear, chunk_size=4)  # 12 tokens: 3 chunks
        logp, ent = sequence_logprobs(
            model, input_ids, attention_mask, T, temperature, True, True, kernels=kc
        )
    finally:
        calls.handle.remove()
    assert calls.n == (0 if linear else 1)  # the linear path never runs the LM head on its own

    assert logp.shape == ent.shape == real.shape and logp.dtype == ent.dtype == torch.float32
    assert_close(logp[real], ref_logp[real], 1e-5, "logp on real tokens")
    assert_close(ent[real], ref_ent[real], 1e-5, "entropy on real tokens")
    assert (logp[~real] == 0).all() and (ent[~real] == 0).all()
    got = grads((g1 * logp + g2 * ent).sum(), params)  # no mask: padding must contribute nothing
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, a, b in zip(names, got, ref_grads):
        assert_close(a, b, 1e-4, f"d/{name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs_logp_only_and_detached_entropy(fp32_model, backend):
    _skip_unless_backend_runs(backend, DEVICE)
    model = fp32_model
    input_ids, attention_mask, T = padded_batch([3, 5, 8], [2, 6, 5], model.config.vocab_size, 0, seed=3)
    real = attention_mask[:, -T:].bool()
    params = [model.get_input_embeddings().weight, model.model.layers[0].mlp.down_proj.weight]
    ref_logp, ref_ent = ops.sequence_logprobs(model, input_ids, attention_mask, T, 0.7, with_entropy=True)
    ref_grads = grads(ref_logp[real].sum(), params)
    for linear in (True, False):
        kc = KernelsConfig(backend=backend, linear=linear, chunk_size=5)
        logp, none = sequence_logprobs(model, input_ids, attention_mask, T, 0.7, kernels=kc)
        assert none is None
        logp2, ent = sequence_logprobs(
            model, input_ids, attention_mask, T, 0.7, with_entropy=True, kernels=kc
        )
        assert not ent.requires_grad and logp2.requires_grad
        assert_close(ent[real], ref_ent[real], 1e-5, "entropy")
        for lp in (logp, logp2):
            assert_close(lp[real], ref_logp[real], 1e-5, "logp")
            for a, b in zip(grads(lp.sum(), params), ref_grads):
                assert_close(a, b, 1e-4, "grad")


@pytest.mark.parametrize("linear", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs_greedy_temperature_zero(fp32_model, backend, linear):
    """``sampler.temperature=0`` (greedy) is a valid setting, and the trainer passes it on: the
    reference then uses the raw logits (as the sampler does), and so must every backend."""
    _skip_unless_backend_runs(backend, DEVICE)
    model = fp32_model
    input_ids, attention_mask, T = padded_batch([4, 6], [3, 5], model.config.vocab_size, 0, seed=4)
    real = attention_mask[:, -T:].bool()
    with torch.no_grad():
        ref, _ = ops.sequence_logprobs(model, input_ids, attention_mask, T, 0.0)
        kc = KernelsConfig(backend=backend, linear=linear)
        logp, _ = sequence_logprobs(model, input_ids, attention_mask, T, 0.0, kernels=kc)
    assert_close(logp[real], ref[real], 1e-5, "logp at temperature 0")


# --------------------------------------------------------------------------------------------
# backend selection and config


def test_backend_resolution(monkeypatch):
    assert default_backend("cpu") == "chunked"
    assert resolve_backend("auto", torch.device("cpu")) == "chunked"
    assert resolve_backend(None, "cpu") == "chunked"
    for name in BACKENDS:
        assert resolve_backend(name, "cpu") == name
    with pytest.raises(ValueError, match="nope"):
        resolve_backend("nope", "cpu")
    with pytest.raises(ValueError):
        logprobs_from_logits(torch.randn(2, 5), torch.tensor([0, 1]), backend="cuda")
    # auto on CUDA is triton when the package is there, else chunked (no GPU needed to decide)
    monkeypatch.setattr(K, "triton_available", lambda: True)
    assert default_backend("cuda") == "triton" and resolve_backend("auto", "cuda:0") == "triton"
    assert default_backend("cpu") == "chunked"
    monkeypatch.setattr(K, "triton_available", lambda: False)
    assert default_backend(torch.device("cuda")) == "chunked"


def test_kernels_config_validation():
    assert KernelsConfig().backend == "auto" and KernelsConfig().linear is True
    for name in (*BACKENDS, "auto"):
        KernelsConfig(backend=name)
    with pytest.raises(ConfigError, match="nope"):
        KernelsConfig(backend="nope")
    with pytest.raises(ConfigError):
        KernelsConfig(chunk_size=0)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    if not K.triton_available():
        pytest.skip("the triton package is not installed")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="chunked"):
        logprobs_from_logits(torch.randn(2, 5), torch.tensor([0, 1]), backend="triton")


# --------------------------------------------------------------------------------------------
# real sizes on a GPU


needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")

# (N, H, V, dtype, temperature, logit std); fp32 without TF32 keeps the fp32 tolerances of the
# brief's budget (1e-5 / 1e-4), looser than the small cases' for sums over 32k-152k terms.
GPU_CASES = [
    pytest.param(4096, 896, 151936, torch.bfloat16, 1.0, 1.0, id="N4096-H896-V151936-bf16"),  # Qwen2.5-0.5B
    pytest.param(1024, 512, 32000, torch.float32, 0.7, 2.0, id="N1024-H512-V32000-fp32"),
]
GPU_FWD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
GPU_GRAD_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


@pytest.fixture
def no_tf32():
    """fp32 matmuls in full fp32 (the fp32 tolerances assume it)."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def _gpu_inputs(N, H, V, dtype, seed, logit_std):
    leaves, tokens, g1, g2 = make_inputs(
        "linear", N, V, H, seed=seed, device=torch.device("cuda"), logit_std=logit_std
    )
    h, w = (x.to(dtype) for x in leaves)
    return h, w, tokens, g1, g2


def _fp32_reference(path, leaves, tokens, g1, g2, temperature):
    """fp32 torch math on the (upcast) inputs: ``(logp, entropy, grads)``."""
    leaves = tuple(x.detach().float().requires_grad_() for x in leaves)
    z = leaves[0] if path == "logits" else leaves[0] @ leaves[1].T
    logsm = torch.log_softmax(z / temperature, dim=-1)
    logp = logsm.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    gr = grads((g1 * logp + g2 * entropy).sum(), leaves)
    return logp.detach(), entropy.detach(), gr


@pytest.mark.gpu
@needs_cuda
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", ["chunked", "triton"])
@pytest.mark.parametrize(("N", "H", "V", "dtype", "temperature", "logit_std"), GPU_CASES)
def test_gpu_real_sizes_match_fp32_reference(backend, path, N, H, V, dtype, temperature, logit_std):
    """Forward and gradients against fp32 torch math on the same (upcast) inputs; for bf16 the
    plain torch path on bf16 must pass too (Liger style), and the kernel may not be much worse."""
    _skip_unless_backend_runs(backend, torch.device("cuda"))
    h, w, tokens, g1, g2 = _gpu_inputs(N, H, V, dtype, seed=0, logit_std=logit_std)
    with torch.no_grad():
        inputs = (h @ w.T,) if path == "logits" else (h, w)  # logits in the input dtype
    del h, w
    ref = _fp32_reference(path, inputs, tokens, g1, g2, temperature)
    tol_f, tol_g = GPU_FWD_TOL[dtype], GPU_GRAD_TOL[dtype]
    names = ("d/logits",) if path == "logits" else ("d/hidden", "d/weight")

    def run(backend):
        logp, entropy, leaves = run_backend(path, backend, inputs, tokens, temperature, 1024)
        gr = grads(loss_of("both", logp, entropy, g1, g2), leaves)
        return logp.detach(), entropy.detach(), gr

    out = run(backend)
    assert out[0].dtype == out[1].dtype == torch.float32 and all(g.dtype == dtype for g in out[2])
    checks = [(backend, out)]
    if dtype != torch.float32:
        checks.append(("torch", run("torch")))  # the plain path on bf16
    for name, (logp, entropy, gr) in checks:
        assert_close(logp, ref[0], tol_f, f"{name} logp")
        assert_close(entropy, ref[1], tol_f, f"{name} entropy")
        for gname, a, b in zip(names, gr, ref[2]):
            assert_close(a, b, tol_g, f"{name} {gname}")
    if dtype != torch.float32:  # no worse than rounding to bf16 already costs the plain path
        kern, plain = checks[0][1], checks[1][1]
        for what, a, t, b, floor in (
            ("logp", kern[0], plain[0], ref[0], 1e-4),
            ("entropy", kern[1], plain[1], ref[1], 1e-4),
            *((gname, a, t, b, 1e-3) for gname, a, t, b in zip(names, kern[2], plain[2], ref[2])),
        ):
            e_kernel, e_plain = rel_err(a, b), rel_err(t, b)
            assert e_kernel <= 2 * e_plain + floor, (what, e_kernel, e_plain)


def _peak_bytes(fn) -> int:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


@pytest.mark.gpu
@needs_cuda
def test_gpu_fused_linear_peak_memory():
    """The Triton linear path (fwd + bwd, entropy included) peaks at <= 30% of the plain torch
    path's memory at Qwen2.5-0.5B's sizes; both counts include the same resident inputs."""
    _skip_unless_backend_runs("triton", torch.device("cuda"))
    N, H, V = 4096, 896, 151936
    h, w, tokens, g1, g2 = _gpu_inputs(N, H, V, torch.bfloat16, seed=1, logit_std=1.0)

    def step(backend):
        hh, ww = h.detach().requires_grad_(), w.detach().requires_grad_()
        logp, entropy = logprobs_from_hidden(hh, ww, tokens, backend, True, 1.0, 1024)
        gh, gw = torch.autograd.grad((g1 * logp + g2 * entropy).sum(), (hh, ww))
        assert torch.isfinite(gh).all() and torch.isfinite(gw).all()
        del logp, entropy, gh, gw

    step("triton")  # warm-up: compile the kernels outside the measurement
    triton_peak = _peak_bytes(lambda: step("triton"))
    torch_peak = _peak_bytes(lambda: step("torch"))
    assert triton_peak <= 0.3 * torch_peak, (
        f"triton peak {triton_peak / 2**30:.2f} GiB vs torch {torch_peak / 2**30:.2f} GiB"
    )
