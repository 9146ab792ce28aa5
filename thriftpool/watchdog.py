"""The one background thread of each pool: reaping, recycling, refilling, probing.

The work of a pass is in :mod:`thriftpool.maintenance`; this module only runs it.  The
thread survives any exception of a pass (a listener raising ``SystemExit`` included),
logging each distinct failure once with its traceback.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Optional

from . import _compat

if TYPE_CHECKING:
    from .pool import ThriftPool

__all__ = ["Watchdog"]

logger = logging.getLogger(__name__)


class _Run:
    """One run of the thread: its own wake event and stop flag, so a thread that is
    replaced (after fork, or late gevent patching) can never be revived by the next run."""

    __slots__ = ("wake", "stopped", "thread")

    def __init__(self) -> None:
        self.wake = _compat.Event()
        self.stopped = False
        self.thread: Optional[threading.Thread] = None


class Watchdog:
    """Runs ``pool._maintain()`` every ``interval`` seconds, or at once when woken.

    The thread holds only a weak reference to its pool, so an abandoned pool can still
    be collected; it waits on an event, so :meth:`stop` ends it at once.
    """

    def __init__(self, pool: "ThriftPool", interval: float, name: str) -> None:
        self._pool_ref = weakref.ref(pool)
        self._interval = interval
        self._name = name
        self._last_failure: Optional[str] = None
        self._state_lock = _compat.Lock()
        self._run = _Run()
        self._closed = False

    def start(self) -> None:
        """Start the thread; idempotent (and a no-op once stopped)."""
        with self._state_lock:
            run = self._run
            if run.thread is not None or run.stopped:
                return
            run.thread = _compat.spawn(self._loop, self._name, run)

    def wake(self) -> None:
        """Run a pass now (after discovery changed, or a connection was needed)."""
        self._run.wake.set()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop the thread and wait up to ``timeout`` for it; idempotent.

        :returns: True when the thread has ended (or never ran).
        """
        with self._state_lock:
            run = self._run
            run.stopped = True
            thread = run.thread
        run.wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, timeout))
            if thread.is_alive():
                if timeout > 0:
                    logger.warning("%s did not stop within %.1fs", self._name, timeout)
                return False
        return True

    def renew(self) -> None:
        """Start over with fresh primitives (gevent's, once gevent patched) after the
        thread was stopped or vanished in a fork; :meth:`start` runs it again."""
        old = self._run
        old.stopped = True
        self._state_lock = _compat.Lock()
        self._run = _Run()

    after_fork = renew

    @property
    def alive(self) -> bool:
        thread = self._run.thread
        return thread is not None and thread.is_alive()

    def _loop(self, run: _Run) -> None:
        while not run.stopped:
            run.wake.wait(self._interval)
            run.wake.clear()
            if run.stopped:
                return
            pool = self._pool_ref()
            if pool is None:
                return
            try:
                pool._maintain()
            except BaseException as exc:  # noqa: B036 - the thread must outlive any failure
                if type(exc).__name__ == "GreenletExit":
                    raise  # gevent is killing this greenlet: end quietly
                self._log_failure(exc)
            del pool

    def _log_failure(self, exc: BaseException) -> None:
        """Log a failed pass with its traceback once; the same failure again only at DEBUG."""
        key = f"{type(exc).__name__}: {exc}"
        if key != self._last_failure:
            self._last_failure = key
            logger.error("%s: maintenance pass failed (the thread goes on)", self._name,
                         exc_info=exc)
        else:
            logger.debug("%s: maintenance pass failed again: %s", self._name, key)


