"""Named registries of plugins: algorithms, rewards, models, samplers, task sources.

A plugin registers itself with a decorator next to its config dataclass::

    @register_algorithm("grpo")
    class GRPO(Algorithm):
        Config = GRPOConfig
        ...

The registry name is the file name (``algorithms/grpo.py``) and the Hydra option
(``algorithm=grpo``). Registering a name twice raises; asking for an unknown name
raises :class:`UnknownPluginError`, which lists the valid names and suggests the
closest one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownPluginError(KeyError):
    """An unknown plugin name; the message lists the valid names."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text.
        return str(self.args[0])


class DuplicatePluginError(ValueError):
    """Two plugins registered under the same name."""


class Registry(Generic[T]):
    """A name -> plugin table for one kind of component.

    Each entry is the decorated object (usually a class). If it has a ``Config``
    attribute (a dataclass), that is the plugin's config schema.
    """

    def __init__(self, kind: str):
        self.kind = kind  # e.g. "algorithm"; also the Hydra group name
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"invalid {self.kind} name {name!r}: use letters, digits, '_' or '-'")

        def decorator(obj: T) -> T:
            origin = f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"
            if name in self._entries:
                raise DuplicatePluginError(
                    f"{self.kind} {name!r} is registered twice: by {self._origins[name]} and by {origin}. "
                    f"Rename one of them (the registry name must equal the file name)."
                )
            self._entries[name] = obj
            self._origins[name] = origin
            if getattr(obj, "registry_name", None) is None:
                with contextlib.suppress(AttributeError, TypeError):  # e.g. a builtin
                    obj.registry_name = name  # type: ignore[attr-defined]
            return obj

        return decorator

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise UnknownPluginError(self._unknown_message(name))
        return self._entries[name]

    def _unknown_message(self, name: str) -> str:
        valid = sorted(self._entries)
        msg = f"unknown {self.kind} {name!r}. Valid {self.kind}s: {', '.join(valid) or '(none registered)'}."
        close = difflib.get_close_matches(str(name), valid, n=1)
        if close:
            msg += f" Did you mean {close[0]!r}?"
        return msg

    def config_class(self, name: str) -> type | None:
        return getattr(self.get(name), "Config", None)

    def make_config(
        self, name: str, values: Mapping[str, Any] | None = None, where: str | None = None
    ) -> Any:
        """Build and validate the plugin's config dataclass from ``values``."""
        cls = self.config_class(name)
        if cls is None:
            if values:
                raise ConfigError(
                    f"{where or self.kind}: {self.kind} {name!r} takes no options, got {sorted(values)}"
                )
            return None
        return build_config(cls, values or {}, where=where or f"{self.kind}={name}")

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


class ConfigError(ValueError):
    """A configuration value is wrong; the message says where and what to do."""


def build_config(cls: type, values: Mapping[str, Any], where: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys.

    Unknown keys raise :class:`ConfigError` naming the valid fields (with a
    suggestion). The dataclass's ``__post_init__`` does the value checks.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in values if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, list(fields), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{where}: unknown option {key!r}.{hint} Valid options: {', '.join(sorted(fields))}."
        )
    try:
        return cls(**dict(values))
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def config_defaults(cls: type) -> dict[str, Any]:
    """The default values of a config dataclass as a plain dict (for Hydra), without validating them
    (a default may be a placeholder the user must fill, like ``model.path``)."""
    out = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            raise TypeError(f"{cls.__name__}.{f.name} has no default: every config field needs one")
    return out


ALGORITHMS: Registry[Any] = Registry("algorithm")
REWARDS: Registry[Any] = Registry("reward")
MODELS: Registry[Any] = Registry("model")
SAMPLERS: Registry[Any] = Registry("sampler")
TASK_SOURCES: Registry[Any] = Registry("data")

register_algorithm = ALGORITHMS.register
register_reward = REWARDS.register
register_model = MODELS.register
register_sampler = SAMPLERS.register
register_task_source = TASK_SOURCES.register

__all__ = [
    "ALGORITHMS",
    "MODELS",
    "REWARDS",
    "SAMPLERS",
    "TASK_SOURCES",
    "ConfigError",
    "DuplicatePluginError",
    "Registry",
    "UnknownPluginError",
    "build_config",
    "config_defaults",
    "register_algorithm",
    "register_model",
    "register_reward",
    "register_sampler",
    "register_task_source",
]
