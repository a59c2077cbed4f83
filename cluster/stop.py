"""Stopping a run on request: SIGINT and SIGTERM for the whole of a run's driver.

Owns: the process's SIGINT / SIGTERM handlers while a run lasts (:class:`StopGuard`).
- Before the controller loop (reading and preparing data, training the tokenizer, connecting to
  Ray, starting): a signal ends the run at once. :class:`StopRequested` is raised where the
  driver is; the run ends STOPPED with a summary.json (``moetrain train`` exits 3).
- While the loop runs: the first signal asks the controller to stop after the current step (final
  evaluation and checkpoint); a second one stops at once (StopRequested again: no final
  evaluation or checkpoint, the summary still written).
- Once StopRequested has been caught, and after the loop ended, signals are logged and ignored:
  the driver is already on its way out, and a third Ctrl-C must not turn a summary into a
  traceback.
A signal handler runs in the main thread between Python bytecodes: a long call into native code
(Ray's own connection loop, a Rust tokenizer) sees the stop when it returns.
"""

from __future__ import annotations

import logging
import signal
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("moetrain")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequested(KeyboardInterrupt):
    """Raised in the driver's main thread by a stop signal (see the module doc). A subclass of
    KeyboardInterrupt, so ``except Exception`` on the way up does not swallow it."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


class StopGuard:
    """One run's signal handlers; :meth:`install` nests (the outermost guard handles signals)."""

    _active: StopGuard | None = None

    def __init__(self) -> None:
        self._controller = None
        self._loop_ended = False
        self._unwinding = False  # a StopRequested was caught: later signals are only logged
        self.signals = 0

    @classmethod
    @contextmanager
    def install(cls) -> Iterator[StopGuard]:
        """The run's guard: the one already installed, else a new one whose handlers are set for
        the duration (main thread only; in another thread signals keep their handlers)."""
        if cls._active is not None:
            yield cls._active
            return
        guard, old = cls(), {}
        for sig in SIGNALS:
            try:
                old[sig] = signal.signal(sig, guard._handler)
            except ValueError:  # not the main thread
                pass
        cls._active = guard if old else None
        try:
            yield guard
        finally:
            if old:
                cls._active = None
            for sig, handler in old.items():
                signal.signal(sig, handler)

    @contextmanager
    def attach(self, controller) -> Iterator[StopGuard]:
        """While the controller loop runs, a first signal calls ``controller.request_stop()``."""
        self._controller = controller
        try:
            yield self
        finally:
            self._controller = None
            self._loop_ended = True

    def caught(self) -> None:
        """The StopRequested was handled: from now on signals are only logged."""
        self._unwinding = True

    def _handler(self, signum, frame) -> None:
        self.signals += 1
        name = signal.Signals(signum).name
        if self._unwinding or self._loop_ended:
            log.warning("%s: already stopping", name)
            return
        if self._controller is not None and self.signals == 1:
            log.warning("%s: stopping after the current step (again to stop at once, without a final "
                        "checkpoint)", name)
            self._controller.request_stop()
            return
        log.warning("%s: stopping now", name)
        raise StopRequested(signum)
