"""Ctrl-C / SIGTERM during a run: stop admitting rows, let in-flight ones finish, then commit and exit.

Before generation starts (reading the input, loading the model) a signal stops the run at once
(:class:`StartInterrupted`). Once it runs, the first signal stops admitting rows and arms a timer of
``grace_seconds``; a second signal, or the timer, drops the in-flight rows (:class:`Abort`) unless the run is
inside a critical section (buffering a result, committing a part), where it only asks to stop at the next
safe point. Once every row is handled (:meth:`SignalHandlers.finishing`: writing a single-file output, the
job_end hooks, the summary), a first signal is noted and the run finishes; a second one
(:class:`FinishInterrupted`) stops finishing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_SIGALRM = getattr(signal, "SIGALRM", None)


class Abort(BaseException):
    """Raised by the signal handler to leave the engine loop now (dropping in-flight rows)."""


class StartInterrupted(BaseException):
    """Raised by the signal handler before generation starts (a BaseException, so that an engine loader's
    ``except Exception`` cannot swallow it)."""

    def __init__(self, signal_name: str, phase: str) -> None:
        super().__init__(signal_name, phase)
        self.signal_name = signal_name
        self.phase = phase


class FinishInterrupted(BaseException):
    """Raised by the signal handler when a signal comes again while a run finishes (its rows all committed):
    what is left (a single-file output, job_end hooks, the summary) is not done."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


@dataclass
class RunFlags:
    """What signals and the error budget tell the run loop, and what the loop tells them."""

    # What the run is doing before generation starts (None once it has): a signal then stops it at once.
    starting: str | None = "preparing the run"
    stop_admitting: bool = False
    drop_now: bool = False
    signal_name: str | None = None
    abort_reason: str | None = None  # "error_rate" when the error budget stopped admitting
    critical: int = 0  # > 0 while a result is being buffered or a part committed: no Abort there
    in_flight: int = 0  # rows admitted and not finished
    finishing: bool = False  # every row handled: what is left is the output's end and the summary
    late_signal: str | None = None  # a signal that came while finishing (the run finished all the same)

    def stop_now(self) -> None:
        """Record an abort (a signal, or Ctrl-C surfacing as KeyboardInterrupt): drop what is in flight."""
        self.drop_now = True
        self.stop_admitting = True
        self.signal_name = self.signal_name or "SIGINT"


class SignalHandlers:
    """Installs the run's handlers for SIGINT, SIGTERM and the grace timer, and restores the old ones."""

    def __init__(self, flags: RunFlags, grace_seconds: float, say: Callable[[str], None],
                 first_stop: Callable[[str], str], install: bool = True) -> None:
        self.flags = flags
        self.grace_seconds = grace_seconds
        self.say = say
        # what the first signal does, said (the runner knows: an executor whose rows are elsewhere says its own)
        self.first_stop = first_stop
        self.install_handlers = install
        self._count = 0
        self._old: dict[int, Any] = {}

    def on_signal(self, signum: int, frame: Any) -> None:
        flags = self.flags
        if flags.starting is not None and signum in (signal.SIGINT, signal.SIGTERM):
            raise StartInterrupted(signal.Signals(signum).name, flags.starting)
        if flags.finishing:
            self._while_finishing(signum)
            return
        timer = signum == _SIGALRM
        name = "grace timeout" if timer else signal.Signals(signum).name
        self._count += 1
        if self._count == 1 and not timer:
            flags.signal_name = name
            flags.stop_admitting = True
            self.say(self.first_stop(name))
            if _SIGALRM is not None and self.grace_seconds > 0:
                signal.setitimer(signal.ITIMER_REAL, self.grace_seconds)
            return
        flags.signal_name = flags.signal_name or name
        flags.stop_admitting = True
        flags.drop_now = True
        if flags.critical == 0:
            raise Abort()

    def finishing(self) -> None:
        """Every row is handled: from now a first signal is noted (the run finishes), a second stops it."""
        if _SIGALRM is not None and self._old:
            signal.setitimer(signal.ITIMER_REAL, 0)  # the grace timer: nothing is in flight any more
        self.flags.finishing = True

    def _while_finishing(self, signum: int) -> None:
        flags = self.flags
        if signum == _SIGALRM:
            return
        name = signal.Signals(signum).name
        if flags.late_signal is not None or flags.signal_name is not None:  # a signal came before this one
            if flags.critical == 0:  # (else the summary is being written: it is written whole)
                raise FinishInterrupted(name)
            return
        flags.late_signal = name
        self.say(f"forge-batch: {name}: every row is handled and committed; finishing the output and the summary "
                 "(signal again to stop now)")

    def install(self) -> None:
        # Python delivers signals to the main thread only: elsewhere (an embedding application's worker)
        # the run leaves signals to its host.
        if not self.install_handlers or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM, _SIGALRM):
            if sig is not None:
                self._old[sig] = signal.signal(sig, self.on_signal)

    def restore(self) -> None:
        """Put the previous handlers back (a no-op the second time)."""
        if _SIGALRM is not None and self._old:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
