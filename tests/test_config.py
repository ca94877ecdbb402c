"""Every option of every Hydra group composes, validates and instantiates; bad configs fail clearly."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from coderlplus.config import PLUGIN_GROUPS, STATIC_GROUPS, conf_dir, register_hydra_configs, resolve_config
from coderlplus.registry import ConfigError, UnknownPluginError
from coderlplus.reward import RewardRouter

GROUPS = [*PLUGIN_GROUPS, *STATIC_GROUPS, "reward", "experiment"]


@pytest.fixture(scope="module")
def hydra_ctx():
    register_hydra_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        yield GlobalHydra.instance().config_loader()
    GlobalHydra.instance().clear()


def _compose(overrides):
    return OmegaConf.to_container(compose(config_name="train", overrides=overrides), resolve=True)


def _options(loader, group):
    return loader.get_group_options(group)


def test_every_group_has_options(hydra_ctx):
    for group in GROUPS:
        assert _options(hydra_ctx, group), f"group {group} has no options"
    assert "grpo" in _options(hydra_ctx, "algorithm")
    assert {"tiny", "hf"} <= set(_options(hydra_ctx, "model"))


def test_every_option_composes_and_instantiates(hydra_ctx, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    extra = {"model=hf": [f"model.path={tmp_path}"], "data=jsonl": [f"data.path={tmp_path}"]}
    seen = 0
    for group in GROUPS:
        for option in _options(hydra_ctx, group):
            choice = f"{group}={option}"
            cfg = _compose([choice, *extra.get(choice, [])])
            rc = resolve_config(cfg)
            # instantiate each component (loading weights and data happens later, in Trainer)
            assert rc.algorithm is not None
            PLUGIN_GROUPS["algorithm"].get(rc.algorithm_name)()
            PLUGIN_GROUPS["model"].get(rc.model_name)(rc.model)
            PLUGIN_GROUPS["data"].get(rc.data_name)(rc.data)
            RewardRouter(rc.reward)
            seen += 1
    assert seen >= len(GROUPS)


def test_defaults_are_the_embedded_setup(hydra_ctx):
    rc = resolve_config(_compose([]))
    assert (rc.algorithm_name, rc.model_name, rc.sampler_name, rc.data_name) == (
        "grpo",
        "tiny",
        "hf",
        "tinycode",
    )
    assert rc.algorithm.kl_estimator == "k3" and rc.algorithm.loss_agg == "token-mean"
    assert rc.seed == 0 and rc.trainer.resume is False


def test_researcher_keys(hydra_ctx):
    rc = resolve_config(
        _compose(["seed=7", "trainer.max_steps=3", "trainer.eval_every=2", "trainer.save_every=1"])
    )
    assert (rc.seed, rc.trainer.max_steps, rc.trainer.eval_every, rc.trainer.save_every) == (7, 3, 2, 1)


def test_bad_values_fail_with_the_key(hydra_ctx):
    with pytest.raises(ConfigError, match=r"algorithm=grpo: kl_estimator='k7'"):
        resolve_config(_compose(["algorithm.kl_estimator=k7"]))
    with pytest.raises(ConfigError, match=r"trainer.group_size=0 must be >= 1"):
        resolve_config(_compose(["trainer.group_size=0"]))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_config(_compose(["model=hf", "model.path=/no/such/model"]))
    cfg = _compose([])
    cfg["algorithm"]["name"] = "grpoo"
    with pytest.raises(UnknownPluginError, match="Did you mean 'grpo'"):
        resolve_config(cfg)
    cfg = _compose([])
    cfg["optim"]["lrr"] = 1.0
    with pytest.raises(ConfigError, match="Did you mean 'lr'"):
        resolve_config(cfg)


def test_unknown_algorithm_fails_fast_on_the_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "coderlplus.train", "algorithm=nope"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "nope" in out.stderr and "grpo" in out.stderr  # Hydra lists the available options


def test_python_m_and_console_script_are_the_same_app():
    import importlib.metadata

    (ep,) = [
        e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "coderlplus-train"
    ]
    assert ep.value == "coderlplus.train:main"
    from coderlplus import train

    assert ep.load() is train.main


def test_coderlplus_composes_with_every_algorithm(hydra_ctx):
    from coderlplus.registry import ALGORITHMS

    for name in ALGORITHMS.names():
        rc = resolve_config(_compose([f"algorithm={name}", "experiment=coderlplus"]))
        assert rc.algorithm_name == name and rc.alignment.enabled
        assert set(rc.reward) == {"codegen", "align"}
        cpu = resolve_config(_compose([f"algorithm={name}", "experiment=coderlplus_cpu"]))
        assert (
            cpu.algorithm_name == name and cpu.alignment.enabled and set(cpu.reward) == {"codegen", "align"}
        )
    # The CPU preset is coderlplus (its reward group) plus its own changes.
    cpu = resolve_config(_compose(["experiment=coderlplus_cpu"]))
    assert (cpu.data.n_train, cpu.alignment.strategy, cpu.alignment.max_variables) == (16, "random", 1)
    assert cpu.reward["align"]["trace_alignment"]["format_bonus"] == 0.1
    rlvr = resolve_config(_compose(["experiment=rlvr"]))
    assert not rlvr.alignment.enabled and set(rlvr.reward) == {"codegen"}
