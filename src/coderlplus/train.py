"""``coderlplus-train`` (= ``python -m coderlplus.train``): the Hydra app that trains a policy.

Examples::

    coderlplus-train                                   # tiny model, TinyCode, GRPO, CPU
    coderlplus-train algorithm=grpo trainer.max_steps=2 hydra.run.dir=/tmp/x
    coderlplus-train model=hf model.path=/models/qwen2.5-coder-0.5b-instruct
    coderlplus-train --cfg job                         # print every option
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from coderlplus.config import conf_dir, register_hydra_configs, resolve_config
from coderlplus.models.hf import quiet_hf_progress_bars
from coderlplus.plugins import load_plugins
from coderlplus.registry import ConfigError, UnknownPluginError

load_plugins()
register_hydra_configs()
log = logging.getLogger("coderlplus")


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="train")
def main(cfg: DictConfig) -> dict | None:
    from coderlplus.progress import print_summary
    from coderlplus.trainer import Trainer

    quiet_hf_progress_bars()
    full = OmegaConf.to_container(cfg, resolve=True)
    try:
        resolved = resolve_config(full)
    except (ConfigError, UnknownPluginError) as e:
        print(f"coderlplus: configuration error: {e}", file=sys.stderr)
        sys.exit(2)
    run_dir = HydraConfig.get().runtime.output_dir
    trainer = Trainer(resolved, run_dir, full_config=full)
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    print_summary(summary)
    return summary


if __name__ == "__main__":
    main()
