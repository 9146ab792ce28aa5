"""The one background thread of each pool: reaping, recycling, refilling, probing."""

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


class Watchdog:
    """Runs ``pool._maintain()`` every ``interval`` seconds, or at once when woken.

    The thread holds only a weak reference to its pool, so an abandoned pool can still
    be collected; it waits on an event, so :meth:`stop` ends it at once.
    """

    def __init__(self, pool: "ThriftPool", interval: float, name: str) -> None:
        self._pool_ref = weakref.ref(pool)
        self._interval = interval
        self._name = name
        self._wake = _compat.Event()
        self._stopped = False
        self._state_lock = _compat.Lock()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start the thread; idempotent."""
        with self._state_lock:
            if self._thread is not None or self._stopped:
                return
            self._thread = _compat.spawn(self._run, self._name)

    def wake(self) -> None:
        """Run a pass now (after discovery changed, or a connection was needed)."""
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait up to ``timeout`` for it; idempotent."""
        with self._state_lock:
            self._stopped = True
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("%s did not stop within %.1fs", self._name, timeout)

    def after_fork(self) -> None:
        """In a forked child the thread is gone: forget it so :meth:`start` starts anew."""
        self._state_lock = _compat.Lock()
        self._wake = _compat.Event()
        self._thread = None

    @property
    def alive(self) -> bool:
        thread = self._thread
        return thread is not None and thread.is_alive()

    def _run(self) -> None:
        while not self._stopped:
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stopped:
                return
            pool = self._pool_ref()
            if pool is None:
                return
            try:
                pool._maintain()
            except Exception:
                logger.exception("%s: maintenance pass failed", self._name)
            del pool
