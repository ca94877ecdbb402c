"""Shared test settings: one thread, W&B disabled, no network, a session-wide sandbox and tiny model."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The Triton kernels (coderlplus.kernels.triton) run on CPU tensors only under Triton's interpreter,
# which reads TRITON_INTERPRET when triton is first imported, so it must be set here, before torch
# (or anything that may import triton) loads. Only without a CUDA device (checked without importing
# torch): on a GPU the kernels run compiled. setdefault lets a user override either way.
if not (os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi")):
    os.environ.setdefault("TRITON_INTERPRET", "1")

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
    warm_start_align_frac=0.15,
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


SERVER_MARK = b"A sandbox server: a warm Python process"  # in every sandbox process's command line

_REAPER = r"""
import ctypes, json, os, subprocess, sys, time
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER: orphans of the run come to us
rc = subprocess.call(sys.argv[2:])
time.sleep(0.3)
left = []
for name in os.listdir("/proc"):
    if name.isdigit():
        try:
            stat = open(f"/proc/{name}/stat").read().rsplit(")", 1)[1].split()
            if int(stat[1]) == os.getpid() and stat[0] != "Z":
                left.append((int(name), open(f"/proc/{name}/cmdline", "rb").read()[:200].decode(errors="replace")))
        except OSError:
            pass
json.dump(left, open(sys.argv[1], "w"))
sys.exit(rc)
"""


def run_and_find_leftovers(argv: list[str], tmp_path, **kwargs):
    """Run a command; return (CompletedProcess, processes it left running).

    The command runs under a child subreaper, so whatever it leaves behind (even
    double-forked or ``setsid`` processes) is re-parented there and found, and
    sandboxes of other processes on the machine are not counted.
    """
    report = tmp_path / "leftovers.json"
    out = subprocess.run([sys.executable, "-c", _REAPER, str(report), *argv], **kwargs)
    return out, json.loads(report.read_text()) if report.exists() else None


def train_cli(overrides: list[str], tmp_path, timeout: float, env: dict[str, str] | None = None):
    """Run ``python -m coderlplus.train *overrides``; assert it succeeded and left no process
    behind; return its CompletedProcess (text stdout/stderr)."""
    out, leftovers = run_and_find_leftovers(
        [sys.executable, "-m", "coderlplus.train", *overrides],
        tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "WANDB_MODE": "disabled", **(env or {})},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert leftovers == [], "the run left processes behind"
    return out


def sandbox_pids() -> set[int]:
    """Pids of every live sandbox process on this machine (servers, bwrap, programs)."""
    pids = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if SERVER_MARK in f.read():
                        pids.add(int(name))
            except OSError:
                pass
    return pids


# vLLM's CPU attention needs a head size of 32, 64, 80, ...: the test model's is 24.
VLLM_TEST_MODEL = dict(TEST_MODEL, hidden_size=64, intermediate_size=192, num_heads=2, num_kv_heads=1)


@pytest.fixture(scope="session")
def vllm_model_dir():
    """A warm-started tiny model whose head size vLLM's CPU engine supports (built once, cached)."""
    from coderlplus.models.tiny import TinyModelConfig, ensure_tiny_model

    return ensure_tiny_model(TinyModelConfig(**VLLM_TEST_MODEL))


HAVE_CC = shutil.which(os.environ.get("CC") or "cc") is not None or shutil.which("gcc") is not None
"""Whether native code (the sandbox's forkrun.c, the decode kernels) can be built here."""


def left_padded_prompts(vocab: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompt ids and attention mask ``[len(lengths), max(lengths)]``, left-padded with 0
    as the samplers build them."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.zeros(len(lengths), P, dtype=torch.long)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, P - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[i, P - n :] = 1
    return ids, mask


def transformers_greedy(model, ids, mask, n: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.generate``'s greedy tokens ``[rows*n, T]`` (no end of sequence) and their log-probs:
    the reference for the lean decoder."""
    out = model.generate(
        input_ids=ids.repeat_interleave(n, 0),
        attention_mask=mask.repeat_interleave(n, 0),
        max_new_tokens=T,
        min_new_tokens=T,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    tokens = out.sequences[:, ids.shape[1] :]
    logp = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).gather(-1, tokens[..., None])[..., 0]
    return tokens, logp
