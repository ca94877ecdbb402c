"""Program execution: a fast sandbox for untrusted Python programs and code extraction.

* :class:`Sandbox` / :class:`ExecResult`: run programs on inputs with limits, in
  parallel over warm server processes (see :mod:`coderlplus.execution.sandbox`).
* :func:`compare_output`: whitespace-tolerant comparison of program outputs.
* :func:`extract_code`: the last fenced Python block of a completion.
"""

from coderlplus.execution.code import extract_code
from coderlplus.execution.sandbox import ExecResult, Sandbox, compare_output

__all__ = ["ExecResult", "Sandbox", "compare_output", "extract_code"]
