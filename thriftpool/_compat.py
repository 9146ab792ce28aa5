"""Concurrency primitives, routed through one module so gevent patching applies.

Every primitive is looked up in ``threading`` and ``time`` when it is made or called, not
when this module is imported, so a process that gevent patches after importing thriftpool
(gunicorn ``--preload -k gevent``) gets gevent's lock, event and greenlets from then on.
gevent itself is never imported here: whether it patched this process is read from
``sys.modules``.
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

monotonic = time.monotonic  # never patched by gevent


def Lock() -> Any:  # noqa: N802 - stands for the class
    """A new ``threading.Lock`` (gevent's once ``threading`` is patched)."""
    return threading.Lock()


def RLock() -> Any:  # noqa: N802
    """A new ``threading.RLock`` (gevent's once patched)."""
    return threading.RLock()


def Condition(lock: Any = None) -> Any:  # noqa: N802
    """A new ``threading.Condition`` (gevent's once patched)."""
    return threading.Condition(lock)


def Event() -> Any:  # noqa: N802
    """A new ``threading.Event`` (gevent's once patched)."""
    return threading.Event()


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
    """``select.poll`` exists (gevent's patching may remove it)."""
    return hasattr(select, "poll")
