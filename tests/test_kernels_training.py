"""Switching ``kernels=`` changes nothing but rounding: a 3-step CPU training run gives the same
losses and parameters with the torch reference, the chunked path and the Triton kernels
(interpreted on the CPU), and ``fused_loss`` gives the same run as the ops-built loss."""

from __future__ import annotations

import math
import os

import pytest
import torch
from test_e2e import SMOKE, _resolved, _rows

from coderlplus.trainer import Trainer

KEYS = ("actor/pg_loss", "actor/kl_loss", "actor/kl_ref", "actor/entropy", "reward/mean")


def _run(tiny_model_dir, tmp_path, *overrides):
    run_dir = tmp_path / "_".join(o.replace("=", "-").replace("/", "") for o in overrides)
    rc = _resolved(
        [
            *SMOKE,
            "model=hf",
            f"model.path={tiny_model_dir}",
            "trainer.max_steps=3",
            "trainer.eval_max_tasks=1",
            "trainer.eval_splits=[test]",
            "algorithm.kl_coef=0.01",
            "algorithm.epochs=2",  # the second epoch is off-policy: ratios and clipping matter
            "algorithm.entropy_coef=0.01",  # a gradient at every step, through the entropy too
            "reward.codegen.outcome.partial=true",  # more groups with a signal
            *overrides,
        ]
    )
    trainer = Trainer(rc, run_dir)
    start = {k: v.detach().clone() for k, v in trainer.policy.state_dict().items()}
    try:
        trainer.fit()
    finally:
        trainer.close()
    rows = [r for r in _rows(run_dir) if "reward/mean" in r]
    end = trainer.policy.state_dict()
    return rows, torch.cat([(end[k] - start[k]).flatten() for k in start])  # the whole update


def _same(a, b):
    (rows_a, params_a), (rows_b, params_b) = a, b  # params: the flattened update
    assert len(rows_a) == len(rows_b) == 3
    assert all(r["actor/grad_norm"] > 1e-3 for r in rows_a), (
        "no learning signal: the test would prove nothing"
    )
    for ra, rb in zip(rows_a, rows_b):
        assert ra["response/length_mean"] == rb["response/length_mean"]  # the same samples
        for k in KEYS:
            assert math.isclose(ra[k], rb[k], rel_tol=1e-4, abs_tol=1e-6), (k, ra[k], rb[k])
    # Adam divides by sqrt(v): on weights whose gradient is ~0, rounding noise can flip a step of
    # size lr, so the updates are compared as a whole, not element by element.
    diff = float((params_a - params_b).norm() / params_a.norm())
    assert diff < 1e-3, f"updates differ by {diff:.2e} (relative)"


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, tmp_path_factory):
    return _run(tiny_model_dir, tmp_path_factory.mktemp("ref"), "kernels=torch")


def test_chunked_kernels_give_the_same_training_run(reference_run, tiny_model_dir, tmp_path):
    _same(reference_run, _run(tiny_model_dir, tmp_path, "kernels=chunked"))
    _same(reference_run, _run(tiny_model_dir, tmp_path, "kernels=chunked", "kernels.linear=false"))


@pytest.mark.slow  # ~2 min: the interpreter runs one Python program per token row
def test_triton_kernels_give_the_same_training_run(reference_run, tiny_model_dir, tmp_path):
    pytest.importorskip("triton")
    if not (os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()):
        pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1 (tests/conftest.py sets it without a GPU)")
    _same(reference_run, _run(tiny_model_dir, tmp_path, "kernels=triton"))


def test_fused_policy_loss_gives_the_same_training_run(tiny_model_dir, tmp_path):
    reference = _run(tiny_model_dir, tmp_path, "kernels=chunked")
    _same(reference, _run(tiny_model_dir, tmp_path, "kernels=chunked", "algorithm.fused_loss=true"))
