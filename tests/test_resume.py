"""Crash safety: a run killed with SIGKILL and resumed equals an uninterrupted one; SIGTERM saves and
stops cleanly; checkpoints are atomic, keep the last K plus the best, and survive a full disk."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import _REAPER
from safetensors.torch import load_file

from coderlplus.checkpoint import (
    CheckpointError,
    best_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from coderlplus.logger import truncate_metrics

# A small CodeRL+ run that exercises every part of the state a checkpoint must hold: the policy
# and AdamW, a cosine schedule, torch's RNG (sampling, mini-batch shuffles), the data order, the
# alignment buffer and its RNGs, the reference model (KL), evaluations (best checkpoint).
RUN = [
    "experiment=smoke",
    "reward=coderlplus",
    "alignment.enabled=true",
    "alignment.ratio=0.5",
    "alignment.failed_only=false",  # the buffer fills whatever the model does
    "reward.codegen.outcome.partial=true",  # denser rewards: the test model rarely passes every test
    "trainer.max_steps=6",
    "trainer.prompts_per_step=8",
    "trainer.group_size=4",
    "trainer.save_every=1",
    "trainer.keep_last=2",
    "trainer.eval_every=2",
    "trainer.eval_splits=[validation]",
    "trainer.eval_max_tasks=2",
    "trainer.deterministic=true",
    "trainer.threads=1",
    "algorithm.mini_batches=2",
    "optim.schedule=cosine",
    "seed=3",
]


def _env():
    return {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _argv(tiny_model_dir, run_dir, *extra):
    return [
        sys.executable,
        "-m",
        "coderlplus.train",
        *RUN,
        "model=hf",
        f"model.path={tiny_model_dir}",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, env=_env())


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 240) -> None:
    """Return as soon as metrics.jsonl has the training row of ``step``."""
    path = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended early: {proc.stderr.read()[-3000:]}"
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if row["step"] >= step and "reward/mean" in row:
                    return
        time.sleep(0.02)
    raise AssertionError(f"no step {step} in {path} after {timeout} s")


def _comparable(rows: list[dict]) -> list[dict]:
    """Metrics rows without wall-clock timings (everything else must be equal)."""
    return [{k: v for k, v in r.items() if not k.startswith("timing/")} for r in rows]


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out |= load_file(f)
    return out


def test_sigkill_then_resume_equals_an_uninterrupted_run(tiny_model_dir, tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    out = _run(_argv(tiny_model_dir, straight))
    assert out.returncode == 0, out.stderr[-3000:]

    proc = _start(_argv(tiny_model_dir, crashed))
    try:
        _wait_for_step(proc, crashed, 3)
    finally:
        proc.kill()  # SIGKILL, whatever it is doing: saving step 3, or sampling step 4
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    before_resume = latest_checkpoint(crashed)
    assert before_resume is not None and before_resume.name in ("step_000002", "step_000003")

    out = _run(_argv(tiny_model_dir, crashed, "trainer.resume=auto"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {before_resume}" in out.stdout + out.stderr  # it continued, not restarted

    a, b = _rows(straight), _rows(crashed)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4, 5, 6, 6]  # no step lost, none repeated
    assert _comparable(b) == _comparable(a)
    assert a[4]["batch/align_share"] == 0.5 and a[4]["align/buffer_size"] > 0  # the buffer was in play
    assert all(a[i]["actor/grad_norm"] > 0.05 for i in (4, 6))  # the resumed steps learned something
    assert b[-2]["sandbox/programs"] == a[-2]["sandbox/programs"] > 0  # counters carried over the resume

    wa = _weights(straight / "checkpoints/step_000006/model")
    wb = _weights(crashed / "checkpoints/step_000006/model")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    initial = _weights(tiny_model_dir)
    assert any(not torch.equal(wa[k], initial[k]) for k in wa)  # equal because resumed, not because frozen
    for run in (straight, crashed):
        assert not list((run / "checkpoints").glob(".tmp-*"))
        kept = [p.name for p in list_checkpoints(run)]
        best = best_checkpoint(run, "eval/validation/pass@1")
        assert kept[-2:] == ["step_000005", "step_000006"] and best is not None and best.name in kept
        assert len(kept) <= 3


def _children(pid: int) -> list[int]:
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    report = tmp_path / "leftovers.json"
    argv = _argv(tiny_model_dir, run_dir, "trainer.max_steps=50", "trainer.save_every=0")
    # The run goes under a child subreaper (conftest), which reports the processes it left behind.
    reaper = _start([sys.executable, "-c", _REAPER, str(report), *argv])
    try:
        _wait_for_step(reaper, run_dir, 2)
        (trainer_pid,) = _children(reaper.pid)
        os.kill(trainer_pid, signal.SIGTERM)
        _, stderr = reaper.communicate(timeout=120)
    finally:
        reaper.kill()
    assert reaper.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert json.loads(report.read_text()) == [], "the run left processes behind"
    assert "Traceback" not in stderr
    assert "stopped by SIGTERM" in stderr and "trainer.resume=auto" in stderr and str(run_dir) in stderr
    assert not (run_dir / "summary.json").exists()  # not a finished run

    rows = _rows(run_dir)
    last = rows[-1]["step"]
    assert 2 <= last < 50
    # save_every=0, but an evaluation (every 2 steps) with a new best validation pass@1 saves too:
    # when the signal lands after such a step's save, that best checkpoint stays beside the stop's
    *best, ckpt = list_checkpoints(run_dir)
    assert ckpt.name == f"step_{last:06d}"  # the last finished step, nothing lost
    assert all(int(b.name.removeprefix("step_")) % 2 == 0 for b in best), best
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == last and state["metrics_lines"] == len(rows)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt / "model")
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    assert load_checkpoint(ckpt, model, optimizer, scheduler)["step"] == last
    assert optimizer.state  # the AdamW moments are there

    # and the run goes on from there
    out = _run(_argv(tiny_model_dir, run_dir, f"trainer.max_steps={last + 1}", "trainer.resume=auto"))
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [r["step"] for r in _rows(run_dir)]
    assert steps == [0, *range(1, last + 2), last + 1]


# ----------------------------------------------------------------------------- checkpoint files


class _Tok:
    def save_pretrained(self, path):
        Path(path, "tokenizer.json").write_text("{}")


def _small_model():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def _train_once(model, opt, sched):
    loss = model(torch.arange(8)[None], labels=torch.arange(8)[None]).loss
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _save(run_dir, step, model, opt, sched, **kw):
    return save_checkpoint(run_dir, step, model, _Tok(), opt, sched, {"seed": 0}, **kw)


def test_disk_full_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    model, opt, sched = _small_model()
    _train_once(model, opt, sched)
    first = _save(tmp_path, 1, model, opt, sched)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    _train_once(model, opt, sched)

    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if str(f).endswith("scheduler.pt"):  # the weights and optimizer.pt are already written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError) as err:
        _save(tmp_path, 2, model, opt, sched)
    msg = str(err.value)
    assert "step_000002" in msg and "No space left on device" in msg  # what
    assert f"previous checkpoint {first} is intact" in msg  # what is safe
    assert "Free space" in msg and "trainer.resume=auto" in msg  # what to do
    monkeypatch.setattr(torch, "save", real_save)

    assert list_checkpoints(tmp_path) == [first] and not list((tmp_path / "checkpoints").glob(".tmp-*"))
    fresh, fresh_opt, fresh_sched = _small_model()
    assert load_checkpoint(first, fresh, fresh_opt, fresh_sched)["step"] == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved[k]), k

    # the same failure when re-saving an existing step leaves that step as it was
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError):
        _save(tmp_path, 1, model, opt, sched)
    monkeypatch.setattr(torch, "save", real_save)
    assert load_checkpoint(first, fresh, fresh_opt, fresh_sched)["step"] == 1


def test_a_failed_sharded_save_keeps_the_previous_sharded_checkpoint(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from coderlplus.distributed import TrainState

    model, opt, sched = _small_model()
    _train_once(model, opt, sched)
    first = _save(tmp_path, 1, model, None, sched, sharded={"policy": TrainState(model, opt)})
    assert (first / "dcp" / ".metadata").exists() and not (first / "optimizer.pt").exists()
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = {k: v["exp_avg"].clone() for k, v in opt.state_dict()["state"].items()}
    _train_once(model, opt, sched)

    def crash(self, plan, planner):  # as if the disk filled while the shards were written
        (Path(self.path) / "__0_0.distcp").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", crash)
    with pytest.raises(CheckpointError, match=rf"step_000002.*previous checkpoint {first} is intact"):
        _save(tmp_path, 2, model, None, sched, sharded={"policy": TrainState(model, opt)})
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == [first] and not list((tmp_path / "checkpoints").glob(".tmp-*"))
    assert latest_checkpoint(tmp_path) == first

    fresh, fresh_opt, fresh_sched = _small_model()  # an optimiser without state: DCP fills it
    with pytest.raises(CheckpointError, match="sharded"):
        load_checkpoint(first, fresh, fresh_opt, fresh_sched)  # no DCP entries to load into
    state = load_checkpoint(first, fresh, None, fresh_sched, sharded={"policy": TrainState(fresh, fresh_opt)})
    assert state["step"] == 1
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, saved_model[k]), k
    for k, v in fresh_opt.state_dict()["state"].items():
        assert torch.equal(v["exp_avg"], saved_opt[k]), k


def test_keep_last_plus_the_best(tmp_path):
    model, opt, sched = _small_model()
    metric = "eval/validation/pass@1"
    values = {1: 0.2, 2: 0.5, 3: 0.3, 4: None, 5: 0.5, 6: 0.1}  # the best (first to reach 0.5) is step 2
    for step, v in values.items():
        s = {"seed": 0, "eval": {metric: v} if v is not None else {}}
        save_checkpoint(tmp_path, step, model, _Tok(), opt, sched, s, keep_last=2, best_metric=metric)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000005", "step_000006"]
    assert best_checkpoint(tmp_path, metric).name == "step_000002"
    _save(tmp_path, 7, model, opt, sched, keep_last=2)  # without best_metric: only the last 2
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000006", "step_000007"]


def test_incomplete_checkpoints_are_skipped_and_stale_temporaries_removed(tmp_path):
    model, opt, sched = _small_model()
    good = _save(tmp_path, 1, model, opt, sched)
    broken = tmp_path / "checkpoints" / "step_000002"  # e.g. copied by hand, half-way
    (broken / "model").mkdir(parents=True)
    (broken / "state.json").write_text('{"step": 2}')
    assert latest_checkpoint(tmp_path) == good
    with pytest.raises(CheckpointError, match=r"missing .*optimizer.pt.*trainer.resume=auto"):
        load_checkpoint(broken, *_small_model())
    stale = tmp_path / "checkpoints" / ".tmp-step_000003"  # a run killed while saving
    stale.mkdir()
    _save(tmp_path, 3, model, opt, sched)
    assert not stale.exists() and latest_checkpoint(tmp_path).name == "step_000003"


def test_truncate_metrics_cuts_rows_after_the_checkpoint_and_a_partial_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"step": 3, "x"')  # killed mid-write
    assert truncate_metrics(path, 2) == 2
    assert path.read_text() == '{"step": 0}\n{"step": 1}\n'
    assert truncate_metrics(path, 5) == 0 and truncate_metrics(tmp_path / "none.jsonl", 0) == 0


def test_resume_with_another_seed_is_refused(tiny_model_dir, tmp_path):
    from test_e2e import SMOKE, _resolved

    from coderlplus.config import ConfigError
    from coderlplus.trainer import Trainer

    base = [*SMOKE, "model=hf", f"model.path={tiny_model_dir}", "trainer.max_steps=1"]
    base += ["trainer.eval_max_tasks=2", "trainer.eval_splits=[test]"]
    trainer = Trainer(_resolved(base), tmp_path)
    try:
        trainer.fit()
    finally:
        trainer.close()
    with pytest.raises(ConfigError, match=r"seed=1, this run has 2.*Resume with the run's own config"):
        Trainer(_resolved([*base, "seed=2", "trainer.resume=auto"]), tmp_path)


def test_disk_full_during_a_run_stops_it_and_resume_continues_from_the_last_good_checkpoint(
    tiny_model_dir, tmp_path, monkeypatch
):
    from test_e2e import SMOKE, _resolved

    from coderlplus.trainer import Trainer

    base = [*SMOKE, "model=hf", f"model.path={tiny_model_dir}", "trainer.max_steps=3", "trainer.save_every=1"]
    base += ["trainer.eval_max_tasks=2", "trainer.eval_splits=[test]"]
    real_save = torch.save

    def full_at_step_2(obj, f, *a, **kw):
        if ".tmp-step_000002" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_at_step_2)
    trainer = Trainer(_resolved(base), tmp_path)
    try:
        with pytest.raises(CheckpointError, match=r"step_000002: OSError: .*No space left on device"):
            trainer.fit()
    finally:
        trainer.close()
    monkeypatch.setattr(torch, "save", real_save)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000001"]

    trainer = Trainer(_resolved([*base, "trainer.resume=auto"]), tmp_path)
    try:
        assert trainer.step == 1
        trainer.fit()
    finally:
        trainer.close()
    assert [r["step"] for r in _rows(tmp_path)] == [0, 1, 2, 3, 3]  # step 2 logged once, by the resumed run


def test_sigint_in_process_finishes_the_step_and_saves(tiny_model_dir, tmp_path):
    from test_e2e import SMOKE, _resolved

    from coderlplus.trainer import Trainer

    base = [*SMOKE, "model=hf", f"model.path={tiny_model_dir}", "trainer.max_steps=5"]
    trainer = Trainer(_resolved([*base, "trainer.eval_max_tasks=2", "trainer.eval_splits=[test]"]), tmp_path)
    train_step = trainer.train_step

    def step_then_ctrl_c(step):
        metrics = train_step(step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # as if Ctrl-C were pressed during step 2
        return metrics

    trainer.train_step = step_then_ctrl_c
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the test runs as a background job
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    assert summary["interrupted"] == "SIGINT" and summary["step"] == 2
    assert summary["checkpoint"].endswith("step_000002") and [r["step"] for r in _rows(tmp_path)] == [0, 1, 2]
    assert signal.getsignal(signal.SIGINT) is before  # the handlers are restored
