"""Models: any Hugging Face causal LM (``model=hf``) and the embedded tiny default (``model=tiny``)."""

from coderlplus.models.hf import HFModel, HFModelConfig, load_causal_lm
from coderlplus.models.tiny import TinyModel, TinyModelConfig, build_tiny_model

__all__ = [
    "HFModel",
    "HFModelConfig",
    "TinyModel",
    "TinyModelConfig",
    "build_tiny_model",
    "load_causal_lm",
]
