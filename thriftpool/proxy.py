"""``pool.client()``: an object with the service's methods that checks out per call."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict

if TYPE_CHECKING:
    from .pool import ThriftPool

__all__ = ["ClientProxy"]

_CLASSES: Dict[int, type] = {}


def _method(api: str) -> Callable[..., Any]:
    def call(self: "ClientProxy", *args: Any, **kwargs: Any) -> Any:
        with self._thriftpool_pool.checkout() as client:
            return client._req(api, *args, **kwargs)

    call.__name__ = call.__qualname__ = api
    call.__doc__ = f"Call ``{api}`` on a pooled connection (checkout, call, checkin)."
    return call


class ClientProxy:
    """Thread-safe stand-in for a thriftpy2 client: each method call checks a connection
    out of the pool, makes the call, and checks the connection back in.

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
