"""The plain dataclasses that cross module boundaries (DESIGN §3).

Dimensions: B rollouts, T response tokens. ``mask`` is 1 for real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": str}


@dataclass
class Task:
    """One prompt to sample from.

    Attributes:
        id: stable identifier, e.g. ``"tinycode/test/00017"``.
        kind: what the task asks for; the reward router picks a reward by it
            (``"codegen"``; later ``"align"``, ``"reason"``...).
        prompt: chat messages, ending with the user turn.
        payload: what the reward needs. For ``codegen``: ``{"tests": [{"input": str,
            "output": str}, ...], "reference": str | None}``.
        source: dataset name, e.g. ``"tinycode"``.
        meta: free-form (difficulty, split, family...), never used for scoring.
    """

    id: str
    kind: str
    prompt: list[Message]
    payload: dict[str, Any]
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Rollout:
    """One sampled completion of a task.

    ``logprobs[i]`` is the sampler's log-probability of ``response_ids[i]`` under
    the policy at the sampling temperature (before top-p truncation).
    Rollouts of the same prompt in one step share ``group_id``.
    """

    task: Task
    completion: str
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    group_id: int = 0
    finish_reason: str = "stop"  # "stop" (EOS) or "length"


@dataclass
class RewardOutput:
    """A scalar reward plus structured information on how it was reached."""

    reward: float
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RolloutBatch:
    """Tensors for one policy update. B rollouts, P prompt tokens, T response tokens.

    Attributes:
        input_ids: ``[B, P+T]`` prompt (left-padded) then response (right-padded).
        attention_mask: ``[B, P+T]`` 1 for real tokens.
        response_mask: ``[B, T]`` 1 for real response tokens (the tokens we train on).
        rewards: ``[B]`` scalar reward of each rollout.
        group_ids: ``[B]`` rollouts of the same prompt share an id.
        old_logp: ``[B, T]`` log-probs under the policy that sampled (behaviour policy).
        ref_logp: ``[B, T]`` log-probs under the frozen reference, or None.
        values: ``[B, T]`` critic values (PPO only), or None.
        task_kinds: ``B`` task kinds, e.g. ``"codegen"``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor
    group_ids: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None
    task_kinds: list[str] = field(default_factory=list)

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.response_mask.shape[1]

    def __len__(self) -> int:
        return self.rewards.shape[0]

    def select(self, idx: torch.Tensor | list[int]) -> RolloutBatch:
        """The sub-batch of rows ``idx`` (for micro-batches)."""
        idx = torch.as_tensor(idx, dtype=torch.long)

        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[idx]

        return RolloutBatch(
            input_ids=self.input_ids[idx],
            attention_mask=self.attention_mask[idx],
            response_mask=self.response_mask[idx],
            rewards=self.rewards[idx],
            group_ids=self.group_ids[idx],
            old_logp=self.old_logp[idx],
            ref_logp=pick(self.ref_logp),
            values=pick(self.values),
            task_kinds=[self.task_kinds[i] for i in idx.tolist()] if self.task_kinds else [],
        )
