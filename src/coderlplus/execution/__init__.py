"""Program execution: an isolated, fast sandbox for untrusted Python programs.

* :class:`Sandbox`: run programs on inputs (``run``/``run_many``), check them
  against tests (``check``/``check_many``) and trace their final variable values
  (``trace``/``trace_many``), in parallel over warm, bubblewrap-isolated servers
  (see :mod:`coderlplus.execution.sandbox` and :mod:`coderlplus.execution.isolation`).
* :class:`ExecResult`, :class:`CheckResult`, :class:`TraceResult`, :class:`TraceOptions`.
* :func:`compare_output`: whitespace-tolerant comparison of program outputs.
* :func:`extract_code`: the last fenced Python block of a completion.
"""

from coderlplus.execution.code import extract_code
from coderlplus.execution.sandbox import (
    STATUSES,
    CheckResult,
    ExecResult,
    Sandbox,
    SandboxUnavailable,
    TraceOptions,
    TraceResult,
    compare_output,
    judge,
    program_for_test,
)

__all__ = [
    "STATUSES",
    "CheckResult",
    "ExecResult",
    "Sandbox",
    "SandboxUnavailable",
    "TraceOptions",
    "TraceResult",
    "compare_output",
    "extract_code",
    "judge",
    "program_for_test",
]
