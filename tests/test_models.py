"""The embedded tiny model: tokenizer ids survive save/reload, the build is cached, HF loading works."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoConfig, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from coderlplus.models.hf import HFModel, HFModelConfig
from coderlplus.models.tiny import EOS, PAD, TinyModelConfig, ensure_tiny_model, train_tokenizer
from coderlplus.registry import ConfigError

SAMPLES = [
    "Read an integer n. Print n plus 7.",
    "```python\nn = int(input())\nfor i in range(1, n + 1):\n    if i % 3 == 0:\n        print('Fizz')\n```",
    "naïve café — 数字 123 \t tabs\n\n  spaces   ",
    "x = {'a': [1, 2.5, None]}  # ünïcödé",
]


def test_tokenizer_ids_survive_save_and_reload(tmp_path):
    corpus = [s * 3 for s in SAMPLES] + [f"print({i} * {i + 1})" for i in range(300)]
    tok = train_tokenizer(corpus, vocab_size=400)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)  # transformers picks its qwen2 tokenizer class
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # independent: the tokenizers library
    for s in SAMPLES:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        assert reloaded(s, add_special_tokens=False)["input_ids"] == ids
        assert raw.encode(s, add_special_tokens=False).ids == ids
        assert reloaded.decode(ids) == s
    assert reloaded.eos_token == EOS and reloaded.pad_token == PAD
    assert reloaded.eos_token_id == tok.eos_token_id and reloaded.pad_token_id == tok.pad_token_id
    msgs = [{"role": "user", "content": SAMPLES[0]}]
    text = reloaded.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == f"<|im_start|>user\n{SAMPLES[0]}<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_model_is_built_once_and_cached(tiny_model_dir):
    info = json.loads((tiny_model_dir / "coderlplus_build.json").read_text())
    assert 100_000 < info["parameters"] < 5_000_000
    assert info["warm_start_final_loss"] < 1.0  # the warm start learned something
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "qwen2"
    from conftest import TEST_MODEL

    # same config -> same folder, no rebuild (mtime unchanged)
    before = (tiny_model_dir / "config.json").stat().st_mtime
    assert ensure_tiny_model(TinyModelConfig(**TEST_MODEL)) == tiny_model_dir
    assert (tiny_model_dir / "config.json").stat().st_mtime == before
    # a different config -> a different cache key
    assert TinyModelConfig(**{**TEST_MODEL, "seed": 1}).model_dir() != tiny_model_dir


def test_default_tiny_model_size_is_in_range():
    cfg = TinyModelConfig()
    config = Qwen2Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        tie_word_embeddings=True,
    )
    n = sum(p.numel() for p in Qwen2ForCausalLM(config).parameters())
    assert 1_000_000 <= n <= 5_000_000


def test_hf_model_loads_a_local_folder(tiny_model_dir, tiny_model):
    model, tok = HFModel(HFModelConfig(path=str(tiny_model_dir))).load()
    assert type(model).__name__ == "Qwen2ForCausalLM" and tok.padding_side == "left"
    ids = torch.tensor([tok("n = int(input())")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model[0](ids).logits)


def test_model_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        HFModelConfig(path=str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="empty"):
        HFModelConfig(path="")
    with pytest.raises(ConfigError, match="divisible"):
        TinyModelConfig(hidden_size=100, num_heads=6)
