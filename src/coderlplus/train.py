"""``coderlplus-train`` (= ``python -m coderlplus.train``): the Hydra app that trains a policy.

Examples::

    coderlplus-train                                   # tiny model, TinyCode, GRPO, CPU
    coderlplus-train algorithm=grpo trainer.max_steps=2 hydra.run.dir=/tmp/x
    coderlplus-train model=hf model.path=/models/qwen2.5-coder-0.5b-instruct
    coderlplus-train --cfg job                         # print every option
    coderlplus-train -m algorithm=grpo,rloo seed=0,1 hydra/launcher=joblib hydra.launcher.n_jobs=2
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from coderlplus.checkpoint import CheckpointError
from coderlplus.config import LoggerConfig, conf_dir, register_hydra_configs, resolve_config
from coderlplus.models.hf import quiet_hf_progress_bars
from coderlplus.plugins import load_plugins
from coderlplus.registry import ConfigError, UnknownPluginError
from coderlplus.tasks.dataset import DatasetError

load_plugins()
register_hydra_configs()
log = logging.getLogger("coderlplus")


def swept_keys(sweep_dir: str) -> set[str] | None:
    """The keys a multirun sweeps (``algorithm=grpo,rloo`` -> ``algorithm``; and the keys of
    ``hydra.sweeper.params``), read from the ``multirun.yaml`` Hydra writes in the sweep folder
    before launching; None if it is not there."""
    path = Path(sweep_dir) / "multirun.yaml"
    if not path.exists():
        return None
    hydra_cfg = OmegaConf.load(path).hydra
    sweep_fns = ("range(", "choice(", "interval(", "glob(", "tag(", "shuffle(", "sort(")
    keys = set()
    for o in hydra_cfg.overrides.task:
        key, _, value = o.partition("=")
        if ("," in value and not value.startswith(("[", "{"))) or value.startswith(sweep_fns):  # not a list
            keys.add(key)
    params = OmegaConf.select(hydra_cfg, "sweeper.params") or {}  # sweeps declared in a config file
    return keys | {str(k) for k in params}


def sweep_logger(lc: LoggerConfig, sweep_dir: str, overrides: list[str]) -> LoggerConfig:
    """The logger config of one job of a multirun: group = the sweep (unless set), name = this
    job's values of the swept keys (``algorithm=ppo,seed=1``), tags = the same (W&B caps a tag at 64)."""
    keys = swept_keys(sweep_dir)
    swept = [o for o in overrides if keys is None or o.split("=", 1)[0] in keys]
    return dataclasses.replace(
        lc,
        group=lc.group or f"sweep-{Path(sweep_dir).name}",
        name=lc.name or (",".join(swept) or None),
        tags=[*lc.tags, *(o[:64] for o in swept)],
    )


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
def main(cfg: DictConfig) -> dict | None:
    from coderlplus.progress import print_summary
    from coderlplus.trainer import Trainer

    quiet_hf_progress_bars()
    load_plugins()  # again (a no-op here): a joblib worker runs main() without importing this module
    full = OmegaConf.to_container(cfg, resolve=True)
    try:
        resolved = resolve_config(full)
    except (ConfigError, UnknownPluginError) as e:
        print(f"coderlplus: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    hc = HydraConfig.get()
    run_dir = hc.runtime.output_dir
    if hc.mode == RunMode.MULTIRUN:  # one W&B group per sweep; readable run names; swept values as tags
        resolved.logger = sweep_logger(resolved.logger, hc.sweep.dir, list(hc.overrides.task))
    try:
        trainer = Trainer(resolved, run_dir, full_config=full)
        try:
            summary = trainer.fit()
        finally:
            trainer.close()
    except (ConfigError, UnknownPluginError, DatasetError, CheckpointError) as e:  # say it, no traceback
        kind = {DatasetError: "dataset", CheckpointError: "checkpoint"}.get(type(e), "configuration")
        print(f"coderlplus: {kind} error: {e}", file=sys.stderr)
        sys.exit(1 if isinstance(e, CheckpointError) else 2)
    if summary.get("interrupted"):  # SIGINT/SIGTERM: checkpoint saved; say how to go on
        print(
            f"coderlplus: stopped by {summary['interrupted']} after step {summary['step']}; checkpoint "
            f"{summary['checkpoint']}.\nResume with:\n  {resume_command(list(hc.overrides.task), run_dir)}",
            file=sys.stderr,
        )
        sys.exit(128 + (summary["signum"] or signal.SIGTERM))  # a rank the signal did not reach
    if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0 prints the summary
        print_summary(summary)
    return summary


def resume_command(overrides: list[str], run_dir: str) -> str:
    """The command line that continues a run: its overrides, ``trainer.resume=auto`` and its run dir."""
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("trainer.resume=", "hydra.run.dir="))]
    quoted = [f"'{o}'" if any(c in o for c in " []{},*?$") else o for o in keep]
    return " ".join(["coderlplus-train", *quoted, "trainer.resume=auto", f"hydra.run.dir={run_dir}"])


if __name__ == "__main__":
    main()
