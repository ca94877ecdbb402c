"""Shared test settings: one thread, W&B disabled, no network, a session-wide sandbox and tiny model."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _plugins():
    import coderlplus

    coderlplus.load_plugins()


@pytest.fixture(scope="session")
def sandbox():
    from coderlplus.execution import Sandbox

    sb = Sandbox(timeout_s=2.0, workers=2)
    yield sb
    sb.close()


# A smaller, faster build of the embedded model for tests (cached like the default one).
TEST_MODEL = dict(
    vocab_size=512,
    hidden_size=96,
    intermediate_size=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    n_train=1500,
    warm_start_steps=250,
    warm_start_lr=3e-3,
)


@pytest.fixture(scope="session")
def tiny_model_dir():
    """Folder of the warm-started test model (built once, cached under ~/.cache/coderlplus)."""
    from coderlplus.models.tiny import TinyModelConfig, ensure_tiny_model

    return ensure_tiny_model(TinyModelConfig(**TEST_MODEL))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from coderlplus.models.hf import load_causal_lm

    return load_causal_lm(tiny_model_dir)
