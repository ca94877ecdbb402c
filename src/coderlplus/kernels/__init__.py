"""Log-probs and entropy of sampled tokens through one of three backends, chosen in one place
(``kernels=torch|chunked|triton``, or ``auto``: Triton on CUDA when installed, else chunked).

- ``torch``: the plain references of ``coderlplus.ops.logprobs`` (materialise ``[N, V]`` fp32);
- ``chunked``: custom autograd functions over chunks of rows, pure torch (CPU default,
  GPU fallback), ``kernels/chunked.py``;
- ``triton``: the same chunking with Triton kernels for the row work, ``kernels/triton.py``
  (CUDA; on CPU tensors only with ``TRITON_INTERPRET=1`` set before triton is imported).

Each takes either logits ``[..., V]`` (``logprobs_from_logits``) or the last hidden states
``[..., H]`` and the LM-head weight ``[V, H]`` (``logprobs_from_hidden``: the fused *linear*
path, which never holds the full logits), and returns per-token log-probs ``[...]`` (fp32),
plus the entropy when asked.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from coderlplus.kernels import chunked, lean_forward
from coderlplus.ops.logprobs import entropy_from_logits, upcast
from coderlplus.ops.logprobs import logprobs_from_logits as _ref_logprobs
from coderlplus.registry import ConfigError

BACKENDS = ("torch", "chunked", "triton")


@dataclass
class KernelsConfig:
    backend: str = "auto"
    """torch (reference), chunked (pure torch, memory-efficient), triton (CUDA kernels) or auto
    (triton on CUDA when the triton package is installed, else chunked)."""
    linear: bool = True
    """Stop the model's forward at the last hidden state and compute log-probs from it and the
    LM-head weight (never the full logits; chunked/triton). False: from the model's logits."""
    chunk_size: int = 1024
    """Rows (tokens) per chunk of the chunked/triton paths."""
    shared_prefix: bool = True
    """Run each distinct prompt of a micro-batch through the model once and let its responses
    attend to that one copy of its keys/values (GRPO's n samples of a prompt share it): the same
    log-probs and gradients as one forward per row, with ``n - 1`` of ``n`` prompt copies not
    computed. Applies on the ``linear`` path of models with a plain (non-sliding) KV cache."""
    lean_forward: bool = True
    """Qwen2/Llama models (not sharded, no gradient checkpointing) run the log-prob passes through
    ``kernels/lean_forward.py``: the model's own modules on one token matrix (distinct prompts,
    then responses, padding left out), one matrix multiply per projection over the real tokens
    instead of the ``transformers`` forward (two over padded rows with ``shared_prefix``). The
    same log-probs and gradients; other models ignore it."""

    def __post_init__(self):
        if self.backend not in (*BACKENDS, "auto"):
            raise ConfigError(f"kernels.backend={self.backend!r}; choose auto, {', '.join(BACKENDS)}")
        if self.chunk_size < 1:
            raise ConfigError(f"kernels.chunk_size={self.chunk_size} must be >= 1")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def default_backend(device: torch.device | str) -> str:
    """The fastest backend available for tensors on ``device``."""
    return "triton" if torch.device(device).type == "cuda" and triton_available() else "chunked"


def resolve_backend(backend: str | None, device: torch.device | str) -> str:
    backend = default_backend(device) if backend in (None, "auto") else backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernels backend {backend!r}; choose auto or one of {BACKENDS}")
    return backend


def check_backend(backend: str | None, device: torch.device | str) -> str:
    """Resolve ``backend`` for ``device`` and fail now, with what to do, if it cannot run there."""
    name = resolve_backend(backend, device)
    if name == "triton":
        _triton_rows(torch.device(device))
    return name


def _triton_rows(device: torch.device):
    if not triton_available():
        raise RuntimeError(
            "kernels=triton needs the triton package (pip install triton); or use kernels=chunked"
        )
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "Triton kernels run on CUDA tensors; on the CPU they run only under TRITON_INTERPRET=1 "
            "(set before triton is imported; slow, for tests). Use kernels=chunked on the CPU."
        )
    from coderlplus.kernels.triton import TRITON_ROWS

    return TRITON_ROWS


# The row work of each backend; None = the plain reference (full logits, autograd through them).
_ROWS: dict[str, Callable[[torch.device], chunked.RowOps | None]] = {
    "torch": lambda device: None,
    "chunked": lambda device: chunked.TORCH_ROWS,
    "triton": _triton_rows,
}


def _reference(logits, tokens, temperature, with_entropy):
    if temperature > 0 and temperature != 1.0:  # <= 0 (greedy) means the raw logits
        logits = upcast(logits) / temperature
    return _ref_logprobs(logits, tokens), (entropy_from_logits(logits) if with_entropy else None)


def _shaped(out, shape, with_entropy):
    logp, entropy = out
    return (logp.view(shape), entropy.view(shape)) if with_entropy else logp.view(shape)


def logprobs_from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    backend: str | None = None,
    with_entropy: bool = False,
    temperature: float = 1.0,
    chunk: int = chunked.DEFAULT_CHUNK,
):
    """``log softmax(logits / temperature)[tokens]``: logits ``[..., V]``, tokens ``[...]`` ->
    ``[...]`` fp32; with ``with_entropy`` also the entropy ``[...]``."""
    rows = _ROWS[resolve_backend(backend, logits.device)](logits.device)
    z, y = logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)
    if rows is None:
        out = _reference(z, y, temperature, with_entropy)
    else:
        out = chunked.logprobs_from_logits(z, y, temperature, chunk, rows)
    return _shaped(out, tokens.shape, with_entropy)


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    backend: str | None = None,
    with_entropy: bool = False,
    temperature: float = 1.0,
    chunk: int = chunked.DEFAULT_CHUNK,
):
    """``log softmax(hidden @ weight.T / temperature)[tokens]``: hidden ``[..., H]``, weight
    ``[V, H]``, tokens ``[...]`` -> ``[...]`` fp32 (and the entropy with ``with_entropy``)."""
    rows = _ROWS[resolve_backend(backend, hidden.device)](hidden.device)
    h, y = hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1)
    if rows is None:
        out = _reference(h @ weight.T, y, temperature, with_entropy)
    else:
        out = chunked.logprobs_from_hidden(h, weight, y, temperature, chunk, rows)
    return _shaped(out, tokens.shape, with_entropy)


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_len: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
    kernels: KernelsConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced log-probs ``[B, T]`` of the last ``response_len`` tokens of each row, through
    the configured backend (``coderlplus.ops.sequence_logprobs`` is the reference).

    input_ids, attention_mask: ``[B, P+T]`` (prompt left-padded, response right-padded).
    Only real response tokens are computed (padding gets 0). With ``kernels.linear`` the model
    runs to its last hidden state and the LM head is applied chunk by chunk inside the kernel.
    Returns ``(logp [B, T], entropy [B, T] or None)``; the entropy carries gradients only when
    ``entropy_grad``.
    """
    kc = kernels or KernelsConfig()
    B, T = input_ids.shape[0], response_len
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    real = attention_mask[:, -T:].bool()  # (B, T) real response tokens
    tokens = input_ids[:, -T:][real]  # (N,)
    head = model.get_output_embeddings()
    linear = kc.linear and getattr(head, "bias", None) is None and not _has_softcap(model)
    if linear:
        hidden = None
        if kc.lean_forward and lean_forward.supports(model) is None:
            hidden = lean_forward.response_hidden(
                model, input_ids, attention_mask, position_ids, T, share=kc.shared_prefix
            )
        elif kc.shared_prefix:
            hidden = _shared_prefix_hidden(model.base_model, input_ids, attention_mask, position_ids, T)
        if hidden is None:
            out = model.base_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
            hidden = out.last_hidden_state[:, -T - 1 : -1]  # (B, T, H): position j predicts token j+1
        hidden = hidden[real]  # (N, H)
        with _full_precision(hidden):  # the LM head and log-softmax in fp32, also under autocast
            out = logprobs_from_hidden(
                hidden.to(head.weight.dtype),
                head.weight,
                tokens,
                kc.backend,
                with_entropy,
                temperature,
                kc.chunk_size,
            )
    else:
        out = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=T + 1,
            use_cache=False,
        )
        logits = out.logits[:, :-1][real]  # (N, V)
        with _full_precision(logits):
            out = logprobs_from_logits(
                logits.float(), tokens, kc.backend, with_entropy, temperature, kc.chunk_size
            )
    logp, entropy = out if with_entropy else (out, None)  # the reference skips an unused entropy
    full = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
    logp = full.masked_scatter(real, logp)
    if not with_entropy:
        return logp, None
    entropy = full.masked_scatter(real, entropy if entropy_grad else entropy.detach())
    return logp, entropy


def _shared_prefix_hidden(base, input_ids, attention_mask, position_ids, T: int) -> torch.Tensor | None:
    """The hidden states that predict each response token, ``[B, T, H]``, with every distinct
    prompt computed once; None where nothing is shared (or the model's cache cannot be shared).

    The prompts ``[U, P]`` run first and keep their keys/values; the cache is indexed out to the
    ``B`` rows (a differentiable gather: gradients of all of a prompt's rows meet in its one
    copy); the responses ``[B, T]`` then run against it. Position ``P - 1`` of a prompt predicts
    its first response token, response position ``j`` the token ``j + 1``.
    """
    P = input_ids.shape[1] - T
    p_ids, p_mask, inverse = lean_forward.distinct_prompts(input_ids, attention_mask, P)
    if len(p_ids) == len(input_ids) or P == 0:
        return None
    out = base(
        input_ids=p_ids,
        attention_mask=p_mask,
        position_ids=(p_mask.long().cumsum(-1) - 1).clamp(min=0),
        use_cache=True,
    )
    cache = out.past_key_values
    if not hasattr(cache, "batch_select_indices") or any(getattr(cache, "is_sliding", None) or ()):
        return None
    cache.batch_select_indices(inverse)
    rest = base(
        input_ids=input_ids[:, P:],
        attention_mask=attention_mask,
        position_ids=position_ids[:, P:],
        past_key_values=cache,
        use_cache=True,
    )
    first = out.last_hidden_state[inverse, -1:]  # (B, 1, H)
    return torch.cat([first, rest.last_hidden_state[:, :-1]], 1)


def _full_precision(t: torch.Tensor):
    """Autocast off on ``t``'s device (``trainer.mixed_precision=bf16`` runs the body's matrix
    multiplies in bf16; the log-probs' LM head stays fp32, as the hf sampler's)."""
    return torch.autocast(t.device.type, enabled=False)


def _has_softcap(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "final_logit_softcapping", None))


__all__ = [
    "BACKENDS",
    "KernelsConfig",
    "check_backend",
    "default_backend",
    "logprobs_from_hidden",
    "logprobs_from_logits",
    "resolve_backend",
    "sequence_logprobs",
    "triton_available",
]
