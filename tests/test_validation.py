"""Every input is validated with an error that says what, where and what to do: configs, dataset rows
(reference solutions that fail their own tests, with file and line), prompts longer than the model's limit."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from test_e2e import SMOKE, _resolved

from coderlplus.execution import Sandbox
from coderlplus.registry import ConfigError
from coderlplus.tasks.dataset import DatasetError, JsonlConfig, JsonlSource, check_references, write_jsonl

# ----------------------------------------------------------------------------- configs


def test_unknown_keys_name_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError, match=r"trainer: unknown option 'max_step'\. Did you mean 'max_steps'\?"):
        _resolved(["+trainer.max_step=3"])
    with pytest.raises(ConfigError, match=r"unknown top-level config keys \['lr'\]; valid keys:"):
        _resolved(["+lr=0.1"])
    with pytest.raises(ConfigCompositionException, match="max_step"):  # Hydra's own check, without +
        _resolved(["trainer.max_step=3"])


@pytest.mark.parametrize(
    "overrides, match",
    [
        # batch sizes that do not divide
        (
            ["algorithm.mini_batches=3"],
            r"mini_batches=3 does not divide the 256 rollouts .*32 x .*8.*divisor",
        ),
        (["trainer.group_size=1"], r"algorithm=grpo compares .* trainer.group_size>=2"),
        (["algorithm=rloo", "trainer.group_size=1"], r"algorithm=rloo .* trainer.group_size>=2"),
        # ratios outside [0, 1]
        (["alignment.ratio=1.5"], r"alignment.ratio=1.5 must be in \[0, 1\)"),
        (["alignment.ratio=-0.1"], r"alignment.ratio=-0.1 must be in \[0, 1\)"),
        (["sampler.top_p=1.5"], r"sampler.top_p=1.5 must be in \(0, 1\]"),
        (["algorithm.clip_low=1.2"], r"algorithm=grpo: clip_low=1.2 must be in \[0, 1\)"),
        (["model.warm_start_noise=2"], r"model=tiny: model.warm_start_noise=2 must be in \[0, 1\]"),
        (["algorithm=ppo", "algorithm.lam=1.5"], r"algorithm=ppo: gamma=1.0 and lam=1.5 must be in \[0, 1\]"),
        (
            ["reward=coderlplus", "reward.align.trace_alignment.format_bonus=2"],
            r"reward.align.trace_alignment: .*format_bonus=2 must be in \[0, 1\]",
        ),
        # options that do not apply
        (
            ["algorithm.loss_norm_tokens=128"],
            r"loss_norm_tokens=128 applies only to .*seq-mean-token-sum-norm",
        ),
        (
            ["algorithm=gspo", "algorithm.fused_loss=true"],
            r"fused_loss=true does not apply to algorithm=gspo",
        ),
        (
            ["experiment=coderlplus", "alignment.ratio=0.01"],
            r"alignment.ratio=0.01 of trainer.prompts_per_step=32 gives 0 alignment prompts",
        ),
        # paths that do not exist
        (["model=hf", "model.path=/no/such/model"], r"model.path='/no/such/model' does not exist"),
        (["model=hf", "model.path=runs/x/checkpoints/step_000001/model"], r"does not exist \(relative to"),
        (["trainer.resume=/no/such/ckpt"], r"trainer.resume='/no/such/ckpt' is not a checkpoint folder"),
    ],
)
def test_bad_configs_fail_clearly(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _resolved(overrides)


def test_options_that_apply_are_accepted():
    _resolved(["algorithm=ppo", "trainer.group_size=1"])  # PPO's critic needs no group
    _resolved(["algorithm.loss_agg=seq-mean-token-sum-norm", "algorithm.loss_norm_tokens=128"])
    _resolved(["algorithm.mini_batches=4", "model=hf", "model.path=Qwen/Qwen2.5-Coder-0.5B-Instruct"])


def test_cli_reports_a_config_error_without_a_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "coderlplus.train", "algorithm.mini_batches=3", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("coderlplus: configuration error: algorithm.mini_batches=3 does not divide")
    assert "Traceback" not in out.stderr


# ----------------------------------------------------------------------------- dataset rows


def _row(i: int, solution: str | None = None) -> dict:
    return {
        "id": f"p{i}",
        "question": f"Read an integer n. Print n plus {i}.",
        "tests": [{"input": "1\n", "output": f"{1 + i}\n"}, {"input": "5\n", "output": f"{5 + i}\n"}],
        "solution": solution if solution is not None else f"n = int(input())\nprint(n + {i})",
    }


def _write_splits(folder, train_rows):
    write_jsonl(train_rows, folder / "train.jsonl")
    for split in ("validation", "test"):
        write_jsonl([_row(i) for i in range(3)], folder / f"{split}.jsonl")


@pytest.fixture(scope="module")
def sandbox():
    sb = Sandbox(timeout_s=1.0, workers=2)
    yield sb
    sb.close()


def test_reference_solutions_that_fail_their_tests_are_reported_with_file_and_line(tmp_path, sandbox):
    rows = [_row(0), _row(1), _row(2, "n = int(input())\nprint(n + 3)"), _row(3), _row(4, "print(1/0)")]
    rows[3]["tests"][1]["output"] = "9\n"  # a wrong test: 5 + 3 is 8
    _write_splits(tmp_path, rows)
    src = JsonlSource(JsonlConfig(path=str(tmp_path)))
    tasks = src.load("train")
    with pytest.raises(DatasetError) as e:
        check_references(tasks, sandbox, src)
    msg = str(e.value)
    assert msg.startswith("3 of 5 reference solutions fail their own tests")
    train = tmp_path / "train.jsonl"
    assert f"{train}:3: id 'p2': test 0 is wrong (printed '4\\n', expected '3\\n')" in msg
    assert f"{train}:4: id 'p3': test 1 is wrong (printed '8\\n', expected '9\\n')" in msg
    assert f"{train}:5: id 'p4': test 0 is error (ZeroDivisionError: division by zero)" in msg
    assert ":1:" not in msg and ":2:" not in msg
    assert "Fix the tests or the solution" in msg and "trainer.check_references=false" in msg


def test_passing_references_are_cached(tmp_path, sandbox):
    _write_splits(tmp_path, [_row(i) for i in range(4)])
    tasks = JsonlSource(JsonlConfig(path=str(tmp_path))).load("train")
    before = sandbox.stats["programs"]
    assert check_references(tasks, sandbox, cache_dir=tmp_path / "cache") == 4
    ran = sandbox.stats["programs"] - before
    assert ran == 8  # 4 references x 2 tests
    assert check_references(tasks, sandbox, cache_dir=tmp_path / "cache") == 0  # cached: nothing ran
    assert sandbox.stats["programs"] - before == ran
    tasks[0].payload["tests"][0]["output"] = "3\n"  # another content, another cache entry
    with pytest.raises(DatasetError, match="1 of 4"):
        check_references(tasks, sandbox, cache_dir=tmp_path / "cache")


def test_the_trainer_refuses_a_dataset_with_a_wrong_reference(tiny_model_dir, tmp_path):
    from coderlplus.trainer import Trainer

    data = tmp_path / "data"
    _write_splits(data, [_row(0), _row(1, "print(0)")])
    overrides = [*SMOKE, "model=hf", f"model.path={tiny_model_dir}", "data=jsonl", f"data.path={data}"]
    with pytest.raises(DatasetError, match=rf"{data / 'train.jsonl'}:2: id 'p1': test 0 is wrong"):
        Trainer(_resolved(overrides), tmp_path / "run")
    # the check can be turned off
    trainer = Trainer(_resolved([*overrides, "trainer.check_references=false"]), tmp_path / "run2")
    trainer.close()


# ----------------------------------------------------------------------------- prompt lengths


def test_prompts_longer_than_the_limit_are_named_and_dropped(tiny_model_dir, tmp_path, caplog):
    from coderlplus.trainer import Trainer

    data = tmp_path / "data"
    long_row = _row(1)
    long_row["question"] = (
        "Read an integer n. " + "Then think about it very carefully. " * 80 + "Print n plus 1."
    )
    _write_splits(data, [_row(0), long_row, _row(2)])
    overrides = [*SMOKE, "model=hf", f"model.path={tiny_model_dir}", "data=jsonl", f"data.path={data}"]
    with caplog.at_level(logging.WARNING, logger="coderlplus.trainer"):
        trainer = Trainer(_resolved(overrides), tmp_path / "run")
    trainer.close()
    assert [t.id for t in trainer.train_tasks] == ["p0", "p2"]
    (warning,) = [r.getMessage() for r in caplog.records if "too long" in r.getMessage()]
    assert "train: dropped 1 of 3 prompts" in warning and "p1 (" in warning
    assert "model.max_prompt_tokens" in warning and "512 tokens" in warning

    with pytest.raises(ConfigError, match=r"train: every prompt is too long.*raise it"):
        Trainer(_resolved([*overrides, "model.max_prompt_tokens=5"]), tmp_path / "run3")


def test_a_response_budget_beyond_the_models_context_is_refused(tiny_model_dir, tmp_path):
    from coderlplus.trainer import Trainer

    overrides = [*SMOKE, "model=hf", f"model.path={tiny_model_dir}", "sampler.max_new_tokens=1024"]
    with pytest.raises(ConfigError, match=r"max_new_tokens=1024 leaves no room .* context is 1024 tokens"):
        Trainer(_resolved(overrides), tmp_path)


def test_jsonl_rows_that_break_the_schema_stop_the_cli_with_file_and_line(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    _write_splits(data, [_row(0)])
    with (data / "train.jsonl").open("a") as f:
        f.write(json.dumps({"id": "p9", "question": "Q", "tests": [{"input": 1, "output": "2\n"}]}) + "\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "coderlplus.train",
            *SMOKE,
            "model=hf",
            f"model.path={tiny_model_dir}",
            "data=jsonl",
            f"data.path={data}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert (
        f"coderlplus: dataset error: {data / 'train.jsonl'}:2: tests[0].input must be a string" in out.stderr
    )
    assert "Traceback" not in out.stderr
