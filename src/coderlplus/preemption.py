"""Stop a run cleanly on SIGINT / SIGTERM (Ctrl-C, a cluster's pre-emption notice).

Inside ``with StopOnSignals() as stop:`` the first SIGINT or SIGTERM only records itself
(``stop.signum``): the training loop finishes the step it is in, saves a checkpoint and
returns, and ``coderlplus-train`` exits with ``128 + signal number`` (130, 143: what a shell
reports for a process ended by that signal, so a scheduler sees the job did not finish)
after printing the command that resumes it. A second signal raises ``KeyboardInterrupt``
at once (no checkpoint). Outside the main thread (where Python cannot install handlers)
it does nothing. Sending a signal a few minutes before a hard kill gives the step time to
end (Slurm: ``#SBATCH --signal=TERM@120``).
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignals:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.signum = signum
        log.warning(
            "received %s: finishing this step, then saving a checkpoint and stopping "
            "(send it again to stop at once, without a checkpoint)",
            self.name,
        )

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
