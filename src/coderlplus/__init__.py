"""coderlplus: a pluggable research sandbox for RL of code LLMs (CodeRL+ and friends)."""

from coderlplus.plugins import load_plugins

__version__ = "0.1.0"
__all__ = ["__version__", "load_plugins"]
