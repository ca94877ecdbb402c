"""Memory-efficient log-probs and entropy: never more than ``chunk`` rows x V at a time.

The naive path (``coderlplus.ops.logprobs``) materialises fp32 logits, their log-softmax and
the gradients of both, each ``[N, V]``: for N = 4096 tokens and a 152k vocabulary that is
2.5 GB per tensor. Here two custom autograd functions walk the rows in chunks, keep only the
per-row log-sum-exp and entropy, and recompute each chunk's softmax in the backward pass:

- ``ChunkedLogits``: from logits ``[N, V]`` (which the caller already holds);
- ``ChunkedLinear``: from the last hidden states ``[N, H]`` and the LM-head weight ``[V, H]``;
  each chunk's logits are computed, reduced and dropped, and recomputed in the backward pass
  (one extra matmul, the price of never holding ``[N, V]``).

The per-chunk row work (``RowOps``) is plain torch here (``TORCH_ROWS``) and Triton kernels in
``kernels/triton.py`` (``TRITON_ROWS``); the chunking, autograd and matmuls are shared.

Gradients (``z`` a row's logits, ``p = softmax(z)``, ``H`` its entropy, ``y`` the token):
``d logp_y / dz = onehot(y) - p`` and ``d H / dz = -p * (log p + H)``.
"""

from __future__ import annotations

from typing import Protocol

import torch

from coderlplus.ops.logprobs import upcast

DEFAULT_CHUNK = 1024


class RowOps(Protocol):
    def stats(self, z: torch.Tensor, tokens: torch.Tensor, scale: float):
        """Logits ``z [n, V]`` (any float dtype) -> fp32 ``(logp [n], entropy [n], lse [n])`` of ``softmax(scale * z)``."""

    def grad_(self, z, tokens, lse, entropy, g_logp, g_ent, scale) -> torch.Tensor:
        """Gradient of ``sum(g_logp * logp + g_ent * H)`` w.r.t. ``z [n, V]``, written over ``z``
        (same dtype) and returned. ``g_ent`` may be None (entropy not differentiated)."""


class _TorchRows:
    def stats(self, z, tokens, scale):
        z = upcast(z) * scale
        lse = torch.logsumexp(z, dim=-1)  # (n,)
        p = torch.exp(z - lse.unsqueeze(-1))  # (n, V)
        entropy = lse - (p * z).sum(-1)  # H = lse - sum_j p_j z_j
        logp = z.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - lse
        return logp, entropy, lse

    def grad_(self, z, tokens, lse, entropy, g_logp, g_ent, scale):
        log_p = upcast(z).mul_(scale).sub_(lse.unsqueeze(-1))  # (n, V) log p
        p = torch.exp(log_p)
        if g_ent is not None:  # -g_ent * p * (log p + H) - g_logp * p
            grad = log_p.add_(entropy.unsqueeze(-1)).mul_(p).mul_(-g_ent.unsqueeze(-1))
            grad.sub_(p.mul_(g_logp.unsqueeze(-1)))
        else:
            grad = p.mul_(-g_logp.unsqueeze(-1))
        grad.scatter_add_(-1, tokens.unsqueeze(-1), g_logp.unsqueeze(-1))
        return z.copy_(grad.mul_(scale))


TORCH_ROWS: RowOps = _TorchRows()


def _grads_in(g_logp, g_ent, like):
    g_logp = torch.zeros_like(like) if g_logp is None else g_logp.to(like.dtype).contiguous()
    return g_logp, None if g_ent is None else g_ent.to(like.dtype).contiguous()


def _stats_by_chunk(n, chunk, rows, tokens, scale, logits_of, like):
    """``[3, n]`` (logp, entropy, lse) of rows ``0..n`` in chunks; ``logits_of(s, e)`` gives the
    ``[e - s, V]`` logits of rows ``s..e`` (a slice, or a matmul dropped after the reduction)."""
    out = like.new_empty(3, n, dtype=torch.promote_types(like.dtype, torch.float32))
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        out[0, s:e], out[1, s:e], out[2, s:e] = rows.stats(logits_of(s, e), tokens[s:e], scale)
    return out


class ChunkedLogits(torch.autograd.Function):
    """``(logp [N], entropy [N])`` from logits ``[N, V]``, chunk rows at a time."""

    @staticmethod
    def forward(ctx, logits, tokens, scale, chunk, rows):
        out = _stats_by_chunk(logits.shape[0], chunk, rows, tokens, scale, lambda s, e: logits[s:e], logits)
        ctx.save_for_backward(logits, tokens, out[2], out[1])
        ctx.set_materialize_grads(False)  # an unused entropy arrives as None: its term is skipped
        ctx.scale, ctx.chunk, ctx.rows = scale, chunk, rows
        return out[0], out[1]

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        logits, tokens, lse, entropy = ctx.saved_tensors
        g_logp, g_ent = _grads_in(g_logp, g_ent, lse)
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)  # row-major rows
        for s in range(0, logits.shape[0], ctx.chunk):
            sl = slice(s, s + ctx.chunk)
            grad[sl] = logits[sl]
            ctx.rows.grad_(
                grad[sl],
                tokens[sl],
                lse[sl],
                entropy[sl],
                g_logp[sl],
                None if g_ent is None else g_ent[sl],
                ctx.scale,
            )
        return grad, None, None, None, None


class ChunkedLinear(torch.autograd.Function):
    """``(logp [N], entropy [N])`` from hidden ``[N, H]`` and LM-head weight ``[V, H]``."""

    @staticmethod
    def forward(ctx, hidden, weight, tokens, scale, chunk, rows):
        out = _stats_by_chunk(
            hidden.shape[0], chunk, rows, tokens, scale, lambda s, e: hidden[s:e] @ weight.T, hidden
        )
        ctx.save_for_backward(hidden, weight, tokens, out[2], out[1])
        ctx.set_materialize_grads(False)
        ctx.scale, ctx.chunk, ctx.rows = scale, chunk, rows
        return out[0], out[1]

    @staticmethod
    def backward(ctx, g_logp, g_ent):
        hidden, weight, tokens, lse, entropy = ctx.saved_tensors
        g_logp, g_ent = _grads_in(g_logp, g_ent, lse)
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        # fp32 accumulation of the weight's gradient over chunks (in place when the weight is fp32)
        acc = torch.promote_types(weight.dtype, torch.float32)
        grad_w = weight.new_zeros(weight.shape, dtype=acc) if want_w else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            sl = slice(s, s + ctx.chunk)
            h = hidden[sl]
            z = h @ weight.T  # recomputed (c, V)
            gz = ctx.rows.grad_(
                z,
                tokens[sl],
                lse[sl],
                entropy[sl],
                g_logp[sl],
                None if g_ent is None else g_ent[sl],
                ctx.scale,
            )
            if want_h:
                grad_h[sl] = gz @ weight
            if want_w:
                if gz.dtype == acc:
                    grad_w.addmm_(gz.T, h.to(acc))
                else:
                    grad_w.add_(gz.T @ h)
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None, None


def logprobs_from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk: int = DEFAULT_CHUNK,
    rows: RowOps = TORCH_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp [N], entropy [N])`` of ``softmax(logits / temperature)``; logits ``[N, V]``, tokens ``[N]``."""
    return ChunkedLogits.apply(logits, tokens, _scale(temperature), chunk, rows)


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk: int = DEFAULT_CHUNK,
    rows: RowOps = TORCH_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logp [N], entropy [N])`` of ``softmax(hidden @ weight.T / temperature)`` without the
    ``[N, V]`` logits. hidden ``[N, H]``, weight ``[V, H]``, tokens ``[N]``."""
    return ChunkedLinear.apply(hidden, weight, tokens, _scale(temperature), chunk, rows)


def _scale(temperature: float) -> float:
    """``1 / temperature``; a temperature <= 0 (greedy sampling) means the raw logits, as in
    ``ops.sequence_logprobs``."""
    return 1.0 / temperature if temperature > 0 else 1.0
