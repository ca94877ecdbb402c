"""Samplers: one interface shared by every task kind and every algorithm."""

from coderlplus.sampler.base import Sampler, SamplingParams, encode_prompts
from coderlplus.sampler.hf import HFSampler, HFSamplerConfig

__all__ = ["HFSampler", "HFSamplerConfig", "Sampler", "SamplingParams", "encode_prompts"]
