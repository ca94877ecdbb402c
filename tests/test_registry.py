from dataclasses import dataclass

import pytest

from coderlplus.registry import (
    ALGORITHMS,
    REWARDS,
    ConfigError,
    DuplicatePluginError,
    Registry,
    UnknownPluginError,
    build_config,
)


@dataclass
class _Cfg:
    alpha: float = 0.5
    """A ratio."""
    steps: int = 3

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"alpha={self.alpha} must be in [0, 1]")


def test_register_and_get():
    reg = Registry("widget")

    @reg.register("foo")
    class Foo:
        Config = _Cfg

    assert reg.get("foo") is Foo
    assert Foo.registry_name == "foo"
    assert "foo" in reg and reg.names() == ["foo"] and len(reg) == 1
    assert reg.make_config("foo", {"alpha": 0.25}).alpha == 0.25


def test_duplicate_name_raises():
    reg = Registry("widget")
    reg.register("foo")(type("A", (), {}))
    with pytest.raises(DuplicatePluginError, match="registered twice"):
        reg.register("foo")(type("B", (), {}))


def test_unknown_name_lists_valid_names_and_suggests():
    reg = Registry("algorithm")
    for name in ("grpo", "rloo", "ppo"):
        reg.register(name)(type(name, (), {}))
    with pytest.raises(UnknownPluginError) as e:
        reg.get("grp")
    msg = str(e.value)
    assert "grpo, ppo, rloo" in msg and "Did you mean 'grpo'" in msg
    assert isinstance(e.value, KeyError)


def test_build_config_rejects_unknown_and_bad_values():
    with pytest.raises(ConfigError, match=r"unknown option 'stepz'.*Did you mean 'steps'"):
        build_config(_Cfg, {"stepz": 1}, where="x")
    with pytest.raises(ConfigError, match=r"x: alpha=2 must be in \[0, 1\]"):
        build_config(_Cfg, {"alpha": 2}, where="x")


def test_invalid_names_rejected():
    with pytest.raises(ValueError):
        Registry("x").register("has space")


def test_builtin_plugins_are_discovered():
    assert "grpo" in ALGORITHMS
    assert "outcome" in REWARDS
    from coderlplus.registry import MODELS, SAMPLERS, TASK_SOURCES

    assert {"tiny", "hf"} <= set(MODELS.names())
    assert "hf" in SAMPLERS
    assert {"tinycode", "jsonl"} <= set(TASK_SOURCES.names())


def test_load_plugins_is_idempotent_and_reads_extra_folders(tmp_path, monkeypatch):
    import coderlplus
    from coderlplus import plugins

    plugin = tmp_path / "myalgo_xyz.py"
    plugin.write_text(
        "from coderlplus.registry import register_algorithm\n"
        "from coderlplus.algorithm import Algorithm\n"
        "@register_algorithm('myalgo_xyz')\n"
        "class MyAlgo(Algorithm):\n    pass\n"
    )
    monkeypatch.setenv("CODERLPLUS_PLUGIN_PATH", str(tmp_path))
    coderlplus.load_plugins()  # already loaded once: no-op, no error
    coderlplus.load_plugins(force=True)  # re-scan: existing modules are not imported twice
    assert "myalgo_xyz" in ALGORITHMS
    assert plugins._loaded
