"""Memory stays flat over a long run: 300 CPU steps of a tiny CodeRL+ run (sampling, rewards in the
sandbox, the alignment harvest with a full buffer, updates, evaluations, checkpoints)."""

from __future__ import annotations

import os
import statistics

import pytest
from test_e2e import _resolved

from coderlplus.trainer import Trainer


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.slow  # ~35 s on 2 CPU cores
def test_rss_is_flat_over_300_steps(tiny_model_dir, tmp_path):
    overrides = [
        "experiment=smoke",
        "model=hf",
        f"model.path={tiny_model_dir}",
        "trainer.max_steps=300",
        "trainer.prompts_per_step=4",
        "trainer.group_size=2",
        "sampler.max_new_tokens=16",
        "trainer.eval_every=100",
        "trainer.eval_max_tasks=2",
        "trainer.eval_splits=[validation]",
        "trainer.save_every=50",
        "reward=coderlplus",
        "alignment.enabled=true",
        "alignment.ratio=0.5",
        "alignment.failed_only=false",
        "alignment.buffer_size=40",  # full after a few dozen steps: then it must drop as much as it adds
    ]
    trainer = Trainer(_resolved(overrides), tmp_path)
    rss: dict[int, float] = {}
    record = trainer._record

    def record_and_measure(metrics, step):
        record(metrics, step)
        rss[step] = rss_mb()

    trainer._record = record_and_measure
    try:
        trainer.fit()
    finally:
        trainer.close()
    assert sorted(rss) == list(range(301))
    # after a warm-up (allocator pools, the buffer filling up), the median RSS of the last 25 steps
    # may not exceed that of steps 51-75 by more than 20 MB: a leak of one step's logits
    # (8 x 16 x 512 floats) would add ~55 MB over these 225 steps, a retained autograd graph far more.
    early = statistics.median(rss[s] for s in range(51, 76))
    late = statistics.median(rss[s] for s in range(276, 301))
    assert late - early < 20, f"RSS grew from {early:.1f} MB to {late:.1f} MB over 225 steps"
