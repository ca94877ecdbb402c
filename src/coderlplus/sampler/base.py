"""The sampler interface: ``generate(tasks, n, params) -> rollouts``; ``update_weights(state_dict)``."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coderlplus.types import Rollout, Task


@dataclass
class SamplingParams:
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling threshold (1.0 = off)."""
    max_new_tokens: int = 128
    """Response length limit; a response cut here has finish_reason "length"."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


class Sampler:
    """Base class of sampler backends (``sampler=hf``, ``sampler=vllm``).

    ``generate`` returns ``len(tasks) * n`` rollouts, task-major (the n samples of
    task i are rows ``i*n .. i*n+n-1``), each with prompt/response token ids and
    the log-probs of the response tokens under the sampling distribution
    (``log_softmax(logits / temperature)``; raw logits when greedy), before
    top-p truncation — the same quantity the trainer computes.
    """

    def generate(self, tasks: list[Task], n: int, params: SamplingParams) -> list[Rollout]:
        raise NotImplementedError

    def update_weights(self, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Make the sampler use the policy's current weights."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the sampler holds (an engine, its processes); idempotent."""


def encode_prompts(tokenizer, tasks: list[Task]) -> list[list[int]]:
    """Token ids of each task's chat prompt, with the assistant turn opened."""
    out = []
    for t in tasks:
        ids = tokenizer.apply_chat_template(t.prompt, add_generation_prompt=True, tokenize=True)
        if not isinstance(ids, list):  # BatchEncoding in some transformers versions
            ids = ids["input_ids"]
        out.append(list(ids))
    return out
