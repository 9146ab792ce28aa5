"""``pool.client()``: an object with the service's methods, with failover between instances."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Set

from .connection import should_discard
from .errors import DeadlineExceeded
from .pool import Checkout

if TYPE_CHECKING:
    from .instance import InstancePool
    from .pool import ThriftPool

__all__ = ["ClientProxy"]

logger = logging.getLogger(__name__)

_CLASSES: Dict[int, type] = {}


def invoke(pool: "ThriftPool", api: str, args: Any, kwargs: Any) -> Any:
    """Call ``api`` through the pool, retrying on another instance when that is safe.

    A call is retried, up to ``retries`` times and within the retry budget, when the
    request surely never reached a server (it failed before it was flushed: the connect
    or the send failed), or, for methods listed in ``idempotent``, after any transport
    error or timeout.  IDL exceptions and ``TApplicationException`` are answers, never
    retried.  The last error propagates unchanged.  (A connect that fails at checkout
    is already moved to another instance by the checkout itself.)
    """
    config = pool.config
    budget = pool._retry_budget
    budget.deposit()
    exclude: Optional[Set["InstancePool"]] = None
    attempt = 0
    while True:
        checkout = Checkout(pool, None, exclude)
        try:
            with checkout as client:
                return client._req(api, *args, **kwargs)
        except Exception as exc:
            if (attempt >= config.retries or checkout._inst is None
                    or not should_discard(exc) or isinstance(exc, DeadlineExceeded)
                    or (checkout.sent and api not in config.idempotent)
                    or not budget.withdraw()):
                raise
            attempt += 1
            exclude = (exclude or set()) | {checkout._inst}
            logger.debug("pool %r: retrying %s() (attempt %d) after %s on %s", pool.name,
                         api, attempt + 1, type(exc).__name__, checkout._inst.key)


def _method(api: str) -> Callable[..., Any]:
    def call(self: "ClientProxy", *args: Any, **kwargs: Any) -> Any:
        return invoke(self._thriftpool_pool, api, args, kwargs)

    call.__name__ = call.__qualname__ = api
    call.__doc__ = (f"Call ``{api}`` on a pooled connection (checkout, call, checkin), "
                    "retrying on another instance when the request was not delivered.")
    return call


class ClientProxy:
    """Thread-safe stand-in for a thriftpy2 client: each method call checks a connection
    out of the pool, makes the call, and checks the connection back in, failing over to
    another instance when the request surely was not delivered (see :func:`invoke`).

    Its attribute namespace holds only the IDL's methods (an IDL method named ``close``
    is the remote call, not a pool operation); the pool is reachable as
    ``proxy._thriftpool_pool``.  Errors propagate unchanged, as from a raw client.
    """

    __slots__ = ("_thriftpool_pool",)

    def __new__(cls, pool: "ThriftPool") -> "ClientProxy":
        service = pool.service
        sub = _CLASSES.get(id(service))
        if sub is None or getattr(sub, "_thriftpool_service", None) is not service:
            namespace: Dict[str, Any] = {
                api: _method(api) for api in service.thrift_services}
            namespace["__slots__"] = ()
            namespace["_thriftpool_service"] = service
            sub = type(f"{service.__name__}Proxy", (ClientProxy,), namespace)
            _CLASSES[id(service)] = sub
        return object.__new__(sub)

    def __init__(self, pool: "ThriftPool") -> None:
        self._thriftpool_pool = pool

    def __dir__(self) -> list[str]:
        return list(self._thriftpool_pool.service.thrift_services)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} over {self._thriftpool_pool!r}>"
