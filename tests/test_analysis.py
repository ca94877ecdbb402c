"""Multirun analysis: groups, mean ± std over seeds (hand-computed), curves and bar plots."""

from __future__ import annotations

import json

import pytest

from coderlplus.analysis import load_runs, plot_bars, plot_curves, summary_table


def _job(root, i, overrides, rows):
    job = root / str(i)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def multirun(tmp_path):
    # grpo: final pass@1 0.5, 0.7 -> mean 0.6, sample std sqrt(0.02) = 0.141; rloo: 0.4 (one seed)
    finals = {("grpo", 0): 0.5, ("grpo", 1): 0.7, ("rloo", 0): 0.4}
    for i, ((algo, seed), final) in enumerate(finals.items()):
        rows = [
            {"step": 0, "eval/pass@1": 0.3},
            {"step": 1, "reward/mean": 0.2},
            {"step": 2, "eval/pass@1": final},
        ]
        _job(tmp_path, i, [f"algorithm={algo}", f"seed={seed}", "trainer.max_steps=2"], rows)
    return tmp_path


def test_table_is_mean_and_sample_std_over_seeds(multirun):
    runs = load_runs(multirun)
    assert len(runs) == 3 and runs[0].overrides["algorithm"] == "grpo"
    table = summary_table(runs, ["algorithm"], ["eval/pass@1", "reward/mean"])
    lines = table.splitlines()
    assert lines[0] == "| algorithm | eval/pass@1 | reward/mean |"
    assert lines[2] == "| grpo | 0.600 ± 0.141 (2) | 0.200 ± 0.000 (2) |"
    assert lines[3] == "| rloo | 0.400 ± 0.000 (1) | 0.200 ± 0.000 (1) |"
    assert runs[0].curve("eval/pass@1") == ([0, 2], [0.3, 0.5])
    assert not runs[0].complete
    (runs[0].path / "summary.json").write_text("{}")
    assert runs[0].complete


def test_plots_are_written(multirun, tmp_path):
    runs = load_runs(multirun)
    plot_curves(runs, ["algorithm"], "eval/pass@1", tmp_path / "curves.png")
    plot_bars(runs, ["algorithm"], "eval/pass@1", tmp_path / "bars.png")
    for name in ("curves.png", "bars.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
