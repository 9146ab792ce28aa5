"""Exceptions raised by thriftpool.

Thrift's own exceptions (transport, protocol, application and IDL-declared ones) pass
through thriftpool unchanged; these are the pool's own failures.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = [
    "ClientReleased",
    "DeadlineExceeded",
    "NoAvailableInstance",
    "PoolClosed",
    "PoolExhausted",
    "ReplyMismatch",
    "ThriftPoolError",
    "TooManyWaiters",
]


class ThriftPoolError(Exception):
    """Base class of every error that thriftpool itself raises."""


class PoolExhausted(ThriftPoolError):
    """No connection became free within the checkout timeout."""

    def __init__(self, message: str, *, address: Optional[str] = None,
                 timeout: Optional[float] = None) -> None:
        super().__init__(message)
        self.address = address
        self.timeout = timeout


class TooManyWaiters(PoolExhausted):
    """The checkout would have made more than ``max_waiting`` checkouts wait: it failed at
    once instead of queueing (overload shedding)."""

    def __init__(self, message: str, *, waiting: int = 0, max_waiting: int = 0) -> None:
        super().__init__(message, timeout=0.0)
        self.waiting = waiting
        self.max_waiting = max_waiting

    def __reduce__(self) -> Any:
        return (_rebuild_too_many, (str(self), self.waiting, self.max_waiting))


def _rebuild_too_many(message: str, waiting: int, max_waiting: int) -> TooManyWaiters:
    return TooManyWaiters(message, waiting=waiting, max_waiting=max_waiting)


class NoAvailableInstance(ThriftPoolError):
    """Discovery knows no instance that can serve a checkout."""


class PoolClosed(ThriftPoolError):
    """The pool was closed."""


class ClientReleased(ThriftPoolError):
    """A pooled client was used after its ``with pool.checkout()`` block ended."""


class ReplyMismatch(ThriftPoolError):
    """A reply's sequence id or method name did not match the request; the socket was dropped."""


class DeadlineExceeded(ThriftPoolError, TimeoutError):
    """The time left in a :func:`thriftpool.deadline` block ran out.

    Also a :class:`TimeoutError` (so ``except socket.timeout`` catches it).  ``timeout`` is
    the whole budget of the innermost deadline in seconds, when known; ``what`` names the
    step that had no time left (``"echo()"``, ``"checkout"``, ...).
    """

    def __init__(self, message: str, *, timeout: Optional[float] = None,
                 what: Optional[str] = None) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.what = what

    def __reduce__(self) -> Any:
        return (_rebuild_deadline_exceeded, (str(self), self.timeout, self.what))


def _rebuild_deadline_exceeded(message: str, timeout: Optional[float],
                               what: Optional[str]) -> DeadlineExceeded:
    return DeadlineExceeded(message, timeout=timeout, what=what)
