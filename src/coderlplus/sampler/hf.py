"""``sampler=hf``: batched generation in the trainer's process, sharing the policy's weights.

The sampler holds a reference to the policy module itself (colocated, no copy),
so ``update_weights`` has nothing to move: every ``generate`` call sees the
latest parameters. This is the CPU default; vLLM is the GPU default.

Qwen2/Llama models decode through ``fast_decode.FastDecoder`` (the same maths as
``transformers`` with the per-token overhead removed and each prompt prefilled once);
other architectures, or ``sampler.fast_decode=false``, through ``model.generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from coderlplus.registry import ConfigError, register_sampler
from coderlplus.sampler import fast_decode
from coderlplus.sampler.base import Sampler, SamplingParams, encode_prompts
from coderlplus.types import Rollout, Task


@dataclass
class HFSamplerConfig:
    temperature: float = 1.0
    """Sampling temperature of training rollouts (the paper uses 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling threshold of training rollouts."""
    max_new_tokens: int = 128
    """Maximum response tokens."""
    max_batch_rollouts: int = 256
    """Rollouts per ``model.generate`` call (split larger requests to bound memory)."""
    fast_decode: bool = True
    """Decode Qwen2/Llama models with the lean built-in decoder (same tokens and log-probs as
    ``model.generate``, a fraction of its per-token overhead); false, or another architecture:
    ``model.generate``."""
    native_decode: bool = True
    """In the lean decoder on a CPU with one torch thread, run each fp32 decode step of up to 16
    rows as one native call per layer (``kernels/smallm.c``, AVX2/FMA, compiled on first use)
    instead of torch ops on oneDNN-prepacked weights; falls back by itself where it cannot."""

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError("sampler.temperature must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampler.top_p={self.top_p} must be in (0, 1]")
        if self.max_new_tokens < 1 or self.max_batch_rollouts < 1:
            raise ConfigError("sampler.max_new_tokens and sampler.max_batch_rollouts must be >= 1")

    def params(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_p, self.max_new_tokens)


@register_sampler("hf")
class HFSampler(Sampler):
    Config = HFSamplerConfig

    def __init__(self, cfg: HFSamplerConfig, model, tokenizer, seed: int = 0):
        # ``seed`` is unused: generate() draws from torch's global RNG, which the trainer seeds.
        self.cfg = cfg
        self.model = model
        self.tokenizer = tokenizer
        self.fast = None
        if cfg.fast_decode and fast_decode.supports(model) is None:
            self.fast = fast_decode.FastDecoder(model, native=cfg.native_decode)

    def update_weights(self, state_dict=None) -> None:
        if state_dict is not None:  # a separate copy was handed in: load it
            self.model.load_state_dict(state_dict)

    @torch.no_grad()
    def generate(self, tasks: list[Task], n: int, params: SamplingParams | None = None) -> list[Rollout]:
        params = params or self.cfg.params()
        prompts = encode_prompts(self.tokenizer, tasks)
        per_call = max(1, self.cfg.max_batch_rollouts // n)
        rollouts: list[Rollout] = []
        for start in range(0, len(tasks), per_call):
            rollouts += self._generate_chunk(
                tasks[start : start + per_call], prompts[start : start + per_call], n, params, start
            )
        return rollouts

    def _fast_decode(self, ids, mask, n, params):
        tok = self.tokenizer
        tokens, logp = self.fast.generate(
            ids,
            mask,
            n,
            params.max_new_tokens,
            tok.eos_token_id,
            tok.pad_token_id,
            params.temperature,
            params.top_p,
        )
        return tokens.cpu(), logp.cpu()

    def _hf_generate(self, ids, mask, n, params):
        tok = self.tokenizer
        device = next(self.model.parameters()).device
        sample_kw = (
            {"do_sample": False}
            if params.greedy
            else {"do_sample": True, "temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        )
        out = self.model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=n,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
            **sample_kw,
        )
        responses = out.sequences[:, ids.shape[1] :].cpu()  # (B, T)
        logits = torch.stack(out.logits, dim=1).float().cpu()  # (B, T, V) raw logits
        if not params.greedy:
            logits = logits / params.temperature
        logp = torch.log_softmax(logits, dim=-1).gather(-1, responses.unsqueeze(-1)).squeeze(-1)  # (B, T)
        return responses, logp

    def _generate_chunk(self, tasks, prompts, n, params, group_offset) -> list[Rollout]:
        tok = self.tokenizer
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        was_training = self.model.training
        self.model.eval()
        try:
            decode = self._fast_decode if self.fast is not None else self._hf_generate
            responses, logp = decode(ids, mask, n, params)  # (B, T) each, on the CPU
        finally:
            self.model.train(was_training)
        rollouts = []
        for row in range(responses.shape[0]):
            task_idx = row // n
            resp = responses[row].tolist()
            if tok.eos_token_id in resp:
                length, finish = resp.index(tok.eos_token_id) + 1, "stop"
            else:
                length, finish = len(resp), "length"
            resp = resp[:length]
            rollouts.append(
                Rollout(
                    task=tasks[task_idx],
                    completion=tok.decode(resp, skip_special_tokens=True),
                    prompt_ids=prompts[task_idx],
                    response_ids=resp,
                    logprobs=logp[row, :length].tolist(),
                    group_id=group_offset + task_idx,
                    finish_reason=finish,
                )
            )
        return rollouts
