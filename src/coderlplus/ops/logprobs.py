"""Log-probabilities and entropy of sampled tokens (plain, obviously-correct torch references)."""

from __future__ import annotations

import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    """``x`` in at least fp32 (bf16/fp16 -> fp32; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[tokens]``. logits ``[..., V]``, tokens ``[...]`` -> ``[...]`` (at least fp32)."""
    logits = upcast(logits)
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)``. ``[..., V]`` -> ``[...]`` (at least fp32)."""
    logits = upcast(logits)
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def logprobs_from_hidden(hidden: torch.Tensor, weight: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(hidden @ weight.T)[tokens]``: hidden ``[N, H]``, LM-head weight ``[V, H]``,
    tokens ``[N]`` -> ``[N]`` (at least fp32). Materialises the ``[N, V]`` logits."""
    return logprobs_from_logits(hidden @ weight.T, tokens)


def sequence_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    response_len: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Teacher-forced log-probs of the last ``response_len`` tokens of each row.

    input_ids, attention_mask: ``[B, P+T]`` (prompt left-padded, response
    right-padded); positions follow the attention mask as in ``generate``.
    Returns ``(logp [B, T], entropy [B, T] or None)``; the entropy carries gradients only
    when ``entropy_grad``.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=response_len + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1, :]  # (B, T, V): position j predicts token j+1
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    tokens = input_ids[:, -response_len:]  # (B, T)
    logp = logprobs_from_logits(logits, tokens)
    entropy = None
    if with_entropy:  # a detached entropy is only logged; a differentiable one feeds an entropy bonus
        entropy = entropy_from_logits(logits if entropy_grad else logits.detach())
    return logp, entropy
