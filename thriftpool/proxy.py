"""``pool.client()``: an object with the service's methods, with failover between instances."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Set

from .checkout import Checkout
from .errors import DeadlineExceeded

if TYPE_CHECKING:
    from .checkout import Router
    from .instance import InstancePool
    from .retry import RetryPolicy

__all__ = ["ClientProxy"]

logger = logging.getLogger(__name__)

_CLASSES: Dict[int, type] = {}


def invoke(router: "Router", policy: "RetryPolicy", api: str, args: Any, kwargs: Any) -> Any:
    """Call ``api`` through the pool, retrying on another instance when
    :class:`~thriftpool.retry.RetryPolicy` says it is safe.  The last error propagates
    unchanged.  (A connect that fails at checkout is already moved to another instance by
    the checkout itself.)
    """
    policy.call_started()
    exclude: Optional[Set["InstancePool"]] = None
    attempt = 0
    while True:
        checkout = Checkout(router, None, exclude)
        try:
            with checkout as client:
                return client._req(api, *args, **kwargs)
        except Exception as exc:
            inst = checkout.instance
            if (inst is None or isinstance(exc, DeadlineExceeded)
                    or not policy.may_retry(api, exc, attempt, checkout.sent)):
                raise
            attempt += 1
            exclude = (exclude or set()) | {inst}
            logger.debug("pool %r: retrying %s() (attempt %d) after %s on %s", router.name,
                         api, attempt + 1, type(exc).__name__, inst.key)


def _method(api: str) -> Callable[..., Any]:
    def call(self: "ClientProxy", *args: Any, **kwargs: Any) -> Any:
        return invoke(self._thriftpool_router, self._thriftpool_retry, api, args, kwargs)

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

    __slots__ = ("_thriftpool_pool", "_thriftpool_router", "_thriftpool_retry")

    def __new__(cls, router: "Router", policy: "RetryPolicy", pool: Any = None
                ) -> "ClientProxy":
        spec = router.spec
        service = spec.service
        sub = _CLASSES.get(id(service))
        if sub is None or getattr(sub, "_thriftpool_service", None) is not service:
            namespace: Dict[str, Any] = {api: _method(api) for api in spec.methods}
            namespace["__slots__"] = ()
            namespace["_thriftpool_service"] = service
            sub = type(f"{spec.name}Proxy", (ClientProxy,), namespace)
            _CLASSES[id(service)] = sub
        return object.__new__(sub)

    def __init__(self, router: "Router", policy: "RetryPolicy", pool: Any = None) -> None:
        self._thriftpool_router = router
        self._thriftpool_retry = policy
        self._thriftpool_pool = pool

    def __dir__(self) -> list[str]:
        return list(self._thriftpool_router.spec.methods)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} over ThriftPool {self._thriftpool_router.name!r}>"
