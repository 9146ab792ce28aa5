"""Concurrency primitives, routed through one module so gevent patching applies.

thriftpool uses only ``threading``, ``time``, ``socket`` and ``select`` objects that
``gevent.monkey.patch_all()`` replaces, looked up at call time, so the same code runs
in plain threads and in gevent-patched workers.  gevent itself is never imported here:
whether it patched this process is read from ``sys.modules``.
"""

from __future__ import annotations

import select
import sys
import threading
import time
from typing import Any, Callable

__all__ = [
    "Condition",
    "Event",
    "Lock",
    "RLock",
    "gevent_patched",
    "monotonic",
    "sleep",
    "spawn",
]

Lock = threading.Lock
RLock = threading.RLock
Condition = threading.Condition
Event = threading.Event
monotonic = time.monotonic


def sleep(seconds: float) -> None:
    """``time.sleep``, looked up at call time (gevent patches it)."""
    time.sleep(seconds)


def gevent_patched(module: str = "socket") -> bool:
    """Tell whether gevent monkey-patched ``module`` in this process."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None:
        return False
    try:
        return bool(monkey.is_module_patched(module))
    except Exception:  # pragma: no cover - very old gevent
        return False


def spawn(target: Callable[..., Any], name: str, *args: Any) -> threading.Thread:
    """Start a named daemon thread (a greenlet when gevent patched ``threading``)."""
    thread = threading.Thread(target=target, name=name, args=args, daemon=True)
    thread.start()
    return thread


def has_poll() -> bool:
    """``select.poll`` exists (gevent's patching removes it)."""
    return hasattr(select, "poll")
