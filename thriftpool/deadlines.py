"""End-to-end time budgets: ``with thriftpool.deadline(0.5): ...``.

A deadline is a point on the monotonic clock kept in a :mod:`contextvars` variable, so
it belongs to the thread or greenlet that entered it (a thread or greenlet started
inside the block starts without it, like any context variable).  Nested blocks take the
smaller bound.  Inside a block every thriftpool call takes the smaller of its own
timeout and the time left; a call with no time left raises :class:`DeadlineExceeded`
without sending anything, and a call cut short by the deadline rather than by its own
timeout raises :class:`DeadlineExceeded` (its ``__cause__`` is the ``socket.timeout``).

The helpers below are what the rest of thriftpool uses to apply a deadline to any wait::

    timeout, binding = clamp(config.checkout_timeout, "checkout")
    ...wait up to timeout...
    if timed_out and binding is not None:
        raise binding.exceeded("checkout")

Reading the variable costs one ``ContextVar.get()`` when no deadline is set.
"""

from __future__ import annotations

import math
from contextvars import ContextVar, Token
from types import TracebackType
from typing import Optional, Tuple, Type

from . import _compat
from .errors import DeadlineExceeded

__all__ = ["Deadline", "DeadlineExceeded", "clamp", "current", "deadline", "remaining"]

_CURRENT: "ContextVar[Optional[Deadline]]" = ContextVar("thriftpool_deadline", default=None)


class Deadline:
    """One ``with deadline(seconds):`` block; use :func:`deadline` to make it.

    The clock starts when the block is entered.  ``expires_at`` is the effective
    ``time.monotonic()`` bound (an enclosing, tighter deadline wins) and ``seconds`` the
    budget of the deadline that binds.  An object is entered at most once at a time.
    """

    __slots__ = ("seconds", "expires_at", "_token")

    def __init__(self, seconds: Optional[float]) -> None:
        if seconds is not None:
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) \
                    or math.isnan(seconds) or seconds < 0:
                raise ValueError(f"deadline seconds must be a number >= 0 or None, "
                                 f"got {seconds!r}")
            seconds = float(seconds)
        self.seconds: Optional[float] = seconds
        self.expires_at = math.inf
        self._token: Optional[Token[Optional[Deadline]]] = None

    def __enter__(self) -> "Deadline":
        if self._token is not None:
            raise RuntimeError("this deadline is already in use; make a new one")
        outer = _CURRENT.get()
        expires = math.inf if self.seconds is None else _compat.monotonic() + self.seconds
        if outer is not None and outer.expires_at <= expires:
            self.expires_at = outer.expires_at
            self.seconds = outer.seconds
        else:
            self.expires_at = expires
        # An unbounded block with nothing around it sets no deadline at all, so the
        # calls inside keep their fast path.
        self._token = _CURRENT.set(None if expires == math.inf and outer is None else self)
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        token, self._token = self._token, None
        if token is not None:
            _CURRENT.reset(token)

    def remaining(self) -> float:
        """Seconds left, ``0.0`` once expired (``inf`` for an unbounded block)."""
        return max(0.0, self.expires_at - _compat.monotonic())

    def expired(self) -> bool:
        """No time is left."""
        return _compat.monotonic() >= self.expires_at

    def exceeded(self, what: str, detail: str = "") -> DeadlineExceeded:
        """The error to raise when ``what`` (``"checkout"``, ``"echo()"``) ran out of this
        deadline's time; ``detail`` is appended to the message."""
        budget = "" if self.seconds is None else f" of {self.seconds:g}s"
        return DeadlineExceeded(
            f"deadline{budget} exceeded: no time left for {what}{detail and ' ' + detail}",
            timeout=self.seconds, what=what)

    def __repr__(self) -> str:
        if self._token is None:
            return f"<Deadline {self.seconds}s (not entered)>"
        return f"<Deadline {self.seconds}s, {self.remaining():.3f}s left>"


def deadline(seconds: Optional[float]) -> Deadline:
    """Bound everything thriftpool does inside the ``with`` block by ``seconds`` in total.

    ::

        with thriftpool.deadline(0.5):
            a = proxy.lookup(key)        # each call gets min(its own timeout, time left)
            proxy.store(key, a + 1)      # raises DeadlineExceeded once the 0.5 s are gone

    :param seconds: the budget, counted from entering the block; ``0`` is already
        expired; ``None`` adds no bound (an enclosing deadline still applies).
    :raises ValueError: ``seconds`` is negative, NaN or not a number.
    """
    return Deadline(seconds)


def current() -> Optional[Deadline]:
    """The innermost deadline in force in this thread or greenlet, or ``None``."""
    return _CURRENT.get()


def remaining() -> Optional[float]:
    """Seconds left in the innermost deadline (``0.0`` once expired), ``None`` without one."""
    d = _CURRENT.get()
    return None if d is None else d.remaining()


def clamp(timeout: Optional[float], what: str) -> Tuple[Optional[float], Optional[Deadline]]:
    """Apply the current deadline to a wait of ``timeout`` seconds (``None``: unbounded).

    :returns: ``(seconds, binding)``: the wait to use, and the deadline when it, rather
        than ``timeout``, sets that wait (``None`` otherwise), so that a caller whose
        wait runs out raises ``binding.exceeded(what)`` instead of its usual timeout.
    :raises DeadlineExceeded: no time is left: do not start the wait at all.
    """
    d = _CURRENT.get()
    if d is None:
        return timeout, None
    left = d.expires_at - _compat.monotonic()
    if left <= 0:
        raise d.exceeded(what)
    if timeout is None or left < timeout:
        return left, d
    return timeout, None
