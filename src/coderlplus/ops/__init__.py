"""Pure tensor ops shared by the algorithms (shapes in docstrings; B rollouts, T response tokens, V vocab)."""

from coderlplus.ops.core import (
    LOSS_AGG_MODES,
    aggregate_loss,
    clipped_policy_objective,
    group_normalize,
    kl_penalty,
    masked_mean,
    masked_sum,
    masked_whiten,
    micro_batch_weight,
)
from coderlplus.ops.logprobs import entropy_from_logits, logprobs_from_logits, sequence_logprobs

__all__ = [
    "LOSS_AGG_MODES",
    "aggregate_loss",
    "clipped_policy_objective",
    "entropy_from_logits",
    "group_normalize",
    "kl_penalty",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_whiten",
    "micro_batch_weight",
    "sequence_logprobs",
]
