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
  traceback (``moetrain train`` keeps ignoring them until the process exits).
A signal handler runs in the main thread between Python bytecodes: a long call into native code
(Ray's own connection loop, a Rust tokenizer) sees the stop when it returns.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("moetrain")

SIGNALS = (signal.SIGINT, signal.SIGTERM)
REDELIVER_S = 0.05  # a stop raised where Python ignores exceptions is delivered again after this long


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
        self._redelivered = False  # the next signal is our own re-delivery of a dropped stop
        self.signals = 0

    @classmethod
    @contextmanager
    def install(cls, *, until_exit: bool = False) -> Iterator[StopGuard]:
        """The run's guard: the one already installed, else a new one whose handlers are set for
        the duration (main thread only; in another thread signals keep their handlers). With
        ``until_exit`` (the CLI) they stay after the block, only logging: a Ctrl-C while Ray shuts
        down at exit is not a traceback."""
        if cls._active is not None:
            yield cls._active
            return
        guard, old = cls(), {}
        for sig in SIGNALS:
            try:
                old[sig] = signal.signal(sig, guard._handler)
            except ValueError:  # not the main thread
                pass
        hook = sys.unraisablehook
        if old:
            cls._active = guard
            sys.unraisablehook = lambda unraisable: guard._unraisable(unraisable, hook)
        try:
            yield guard
        finally:
            cls._active = None if old else cls._active
            if until_exit:
                guard._unwinding = True
            else:
                sys.unraisablehook = hook if old else sys.unraisablehook
                for sig, handler in old.items():
                    signal.signal(sig, handler)

    @classmethod
    @contextmanager
    def keep(cls) -> Iterator[None]:
        """Around code that sets its own handlers (``ray.init`` sets SIGTERM to ``sys.exit(15)``):
        a SIGTERM it turns into SystemExit is a StopRequested, and the guard's handlers are set
        again afterwards. Without an installed guard, a plain block."""
        guard = cls._active
        try:
            yield
        except SystemExit as exc:
            if guard is None or exc.code != signal.SIGTERM or guard._unwinding or guard._loop_ended:
                raise
            guard.signals += 1
            log.warning("SIGTERM: stopping now")
            raise StopRequested(signal.SIGTERM) from None
        finally:
            if guard is not None:
                for sig in SIGNALS:
                    signal.signal(sig, guard._handler)

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

    def _unraisable(self, unraisable, hook) -> None:
        """A StopRequested raised inside a ``__del__`` or a weakref callback (importlib has some) is
        printed and dropped by Python: deliver the signal again instead, a moment later."""
        exc = unraisable.exc_value
        if not isinstance(exc, StopRequested):
            hook(unraisable)
            return
        self._redelivered = True
        threading.Timer(REDELIVER_S, os.kill, (os.getpid(), exc.signum)).start()

    def _handler(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        redelivered, self._redelivered = self._redelivered, False
        if self._unwinding or self._loop_ended:
            if not redelivered:
                log.warning("%s: already stopping", name)
            return
        if redelivered:
            raise StopRequested(signum)
        self.signals += 1
        if self._controller is not None and self.signals == 1:
            log.warning("%s: stopping after the current step (again to stop at once, without a final checkpoint)", name)
            self._controller.request_stop()
            return
        log.warning("%s: stopping now", name)
        raise StopRequested(signum)
