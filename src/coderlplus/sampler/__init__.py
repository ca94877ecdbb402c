"""Samplers: one interface shared by every task kind and every algorithm (``sampler=hf|vllm``)."""

from coderlplus.sampler.base import Sampler, SamplingParams, encode_prompts
from coderlplus.sampler.hf import HFSampler, HFSamplerConfig
from coderlplus.sampler.vllm import VLLMSampler, VLLMSamplerConfig  # imports vllm only when used

__all__ = [
    "HFSampler",
    "HFSamplerConfig",
    "Sampler",
    "SamplingParams",
    "VLLMSampler",
    "VLLMSamplerConfig",
    "encode_prompts",
]
