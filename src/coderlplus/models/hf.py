"""Load any Hugging Face causal LM by hub id or local folder (``model=hf model.path=...``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from coderlplus.registry import ConfigError, register_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class HFModelConfig:
    path: str = ""
    """Hub id (``Qwen/Qwen2.5-Coder-0.5B-Instruct``) or local folder holding config.json and weights."""
    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""
    trust_remote_code: bool = False
    """Allow model code shipped with the checkpoint."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""
    max_prompt_tokens: int = 512
    """Prompts longer than this are dropped (with a warning) before sampling."""

    def __post_init__(self):
        if not self.path:
            raise ConfigError(
                "model.path is empty: give a hub id or a local folder, e.g. model.path=/models/qwen"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype={self.dtype!r}; choose one of {sorted(DTYPES)}")
        # a hub id is "name" or "org/name"; a path with any other slash (/x, ./x, a/b/c) is a local folder
        looks_local = "/" in self.path and not _is_hub_id(self.path)
        if looks_local and not Path(self.path).expanduser().exists():
            raise ConfigError(
                f"model.path={self.path!r} does not exist (relative to {Path.cwd()}); point it at a folder "
                f"holding config.json and the weights, or give a hub id such as Qwen/Qwen2.5-Coder-0.5B-Instruct"
            )
        if self.max_prompt_tokens < 1:
            raise ConfigError("model.max_prompt_tokens must be >= 1")


def _is_hub_id(path: str) -> bool:
    """``org/name`` with the characters the Hugging Face hub allows (and not an existing folder)."""
    parts = path.split("/")
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    return len(parts) == 2 and all(p and set(p) <= allowed and not p.startswith(".") for p in parts)


def quiet_hf_progress_bars() -> None:
    """Silence the per-file progress bars of transformers / huggingface_hub (our own bar shows progress)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    disable_progress_bars()


def load_causal_lm(path: str | Path, dtype: str = "float32", trust_remote_code: bool = False):
    """``(model, tokenizer)`` from a hub id or local folder, tokenizer padded on the left."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(Path(path).expanduser()) if Path(str(path)).expanduser().exists() else str(path)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer


@register_model("hf")
class HFModel:
    """A Hugging Face causal LM, loaded with ``AutoModelForCausalLM.from_pretrained``."""

    Config = HFModelConfig

    def __init__(self, cfg: HFModelConfig):
        self.cfg = cfg

    def load(self):
        model, tokenizer = load_causal_lm(self.cfg.path, self.cfg.dtype, self.cfg.trust_remote_code)
        if self.cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        return model, tokenizer
