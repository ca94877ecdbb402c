"""Triton kernels for the per-row work of the fused log-prob / entropy paths (CUDA; on CPU
tensors only under ``TRITON_INTERPRET=1``, for tests).

One program per row walks the vocabulary in blocks of ``BLOCK_V`` with an *online*
log-sum-exp (running max ``m``, ``s = sum exp(z - m)``, ``t = sum exp(z - m) * z``), so a
row is read once in the forward pass: ``lse = m + log s``, ``H = lse - t / s``,
``logp = z_y - lse``. The backward kernel reads the row once more and writes
``g_logp * (onehot(y) - p) - g_ent * p * (log p + H)`` over it, in the logits' dtype.

The matmuls of the linear path stay with cuBLAS (``torch.matmul`` on chunks of rows, in
``chunked.ChunkedLinear``): they are already at the chip's peak, and what the naive path
wastes is the fp32 ``[N, V]`` traffic around them, which these kernels remove.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _stats_kernel(z_ptr, stride_z, tok_ptr, out_ptr, N, scale, V: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    cols = tl.arange(0, BLOCK_V)
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        z = tl.load(z_row + start + cols, mask=mask, other=float("-inf")).to(tl.float32) * scale
        m_new = tl.maximum(m, tl.max(z, 0))
        alpha = tl.exp(m - m_new)
        e = tl.where(mask, tl.exp(z - m_new), 0.0)
        s = s * alpha + tl.sum(e, 0)
        t = t * alpha + tl.sum(e * tl.where(mask, z, 0.0), 0)
        m = m_new
    lse = m + tl.log(s)
    tok = tl.load(tok_ptr + row)
    z_tok = tl.load(z_row + tok).to(tl.float32) * scale
    tl.store(out_ptr + row, z_tok - lse)  # logp
    tl.store(out_ptr + N + row, lse - t / s)  # entropy
    tl.store(out_ptr + 2 * N + row, lse)


@triton.jit
def _grad_kernel(
    z_ptr, stride_z, tok_ptr, lse_ptr, ent_ptr, glogp_ptr, gent_ptr, scale, V: tl.constexpr,
    HAS_GENT: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * stride_z
    cols = tl.arange(0, BLOCK_V)
    lse = tl.load(lse_ptr + row)
    g_logp = tl.load(glogp_ptr + row)
    tok = tl.load(tok_ptr + row)
    if HAS_GENT:
        H = tl.load(ent_ptr + row)
        g_ent = tl.load(gent_ptr + row)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        z = tl.load(z_row + start + cols, mask=mask, other=0.0)
        log_p = z.to(tl.float32) * scale - lse
        p = tl.exp(log_p)
        g = -g_logp * p
        if HAS_GENT:
            g -= g_ent * p * (log_p + H)
        g = tl.where(start + cols == tok, g + g_logp, g)
        tl.store(z_row + start + cols, (g * scale).to(z.dtype), mask=mask)


def _block(V: int) -> int:
    return min(4096, triton.next_power_of_2(V))


def _warps(block: int) -> int:
    return 8 if block >= 2048 else 4


class _TritonRows:
    def stats(self, z, tokens, scale):
        n, V = z.shape
        if z.stride(-1) != 1:
            z = z.contiguous()
        out = torch.empty(3, n, dtype=torch.float32, device=z.device)
        if n:
            _stats_kernel[(n,)](
                z, z.stride(0), tokens.contiguous(), out, n, float(scale),
                V=V, BLOCK_V=_block(V), num_warps=_warps(_block(V)),
            )  # fmt: skip
        return out[0], out[1], out[2]

    def grad_(self, z, tokens, lse, entropy, g_logp, g_ent, scale):
        n, V = z.shape
        if z.stride(-1) != 1:
            raise ValueError("grad_ needs rows with unit stride (a row-major chunk)")
        if n:
            _grad_kernel[(n,)](
                z, z.stride(0), tokens.contiguous(), lse.contiguous(), entropy.contiguous(),
                g_logp.contiguous(), g_logp if g_ent is None else g_ent.contiguous(), float(scale), V=V,
                HAS_GENT=g_ent is not None, BLOCK_V=_block(V), num_warps=_warps(_block(V)),
            )  # fmt: skip
        return z


TRITON_ROWS = _TritonRows()
