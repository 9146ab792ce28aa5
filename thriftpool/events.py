"""Events that the pool reports to user callbacks, and the callbacks' types."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["ExhaustedCallback", "ExhaustedEvent"]


@dataclass(frozen=True)
class ExhaustedEvent:
    """A checkout gave up waiting for a connection: enough detail for an operator alert.

    :param pool: the pool's name.
    :param address: ``"host:port"`` of the instance the checkout waited on.
    :param timeout: how long the checkout waited, in seconds.
    :param max_size: the per-instance connection cap.
    :param in_use: connections of that instance checked out when it gave up.
    :param idle: idle connections of that instance (normally 0).
    :param opening: connections of that instance being opened.
    :param waiting: other checkouts still waiting on that instance.
    """

    pool: str
    address: str
    timeout: float
    max_size: int
    in_use: int
    idle: int
    opening: int
    waiting: int


ExhaustedCallback = Callable[[ExhaustedEvent], None]
