"""Per-call events: the client class a pool hands out when a listener wants them.

A pool whose listeners override :meth:`~thriftpool.PoolListener.call_started` or
:meth:`~thriftpool.PoolListener.call_finished` builds, once, a subclass of the service's
pooled client whose calls are wrapped by :func:`call_client_factory`; every other pool
hands out the plain client, so calls cost nothing more when nobody listens.  The proxy
(``pool.client()``) calls through a checked-out client, so its calls, retries included,
are reported the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict

from . import _compat

if TYPE_CHECKING:
    from .connection import Connection
    from .events import Emitter
    from .service import ServiceSpec

__all__ = ["call_client_factory"]


def _proxy_method(api: str) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self._req(api, *args, **kwargs)

    call.__name__ = call.__qualname__ = api
    return call


def call_client_factory(spec: "ServiceSpec", events: "Emitter"
                        ) -> Callable[["Connection"], Any]:
    """``make_client(conn)`` for a pool with call listeners (see the module docstring).

    :param events: an emitter over the listeners that override a call event.
    """
    base = spec.client_class
    base_req = base._req  # type: ignore[attr-defined]
    started = events.only(("call_started",))
    finished = events.only(("call_finished",))

    def _req(self: Any, _api: str, *args: Any, **kwargs: Any) -> Any:
        conn = self._conn
        if conn is None or conn.detached:
            return base_req(self, _api, *args, **kwargs)  # raises ClientReleased
        address = str(conn.address)
        began = False
        start = _compat.monotonic()
        try:
            if started:
                headers: Dict[str, str] = {}
                started.emit("call_started", address, _api, headers)
                if headers:
                    _send_headers(conn, headers)
                start = _compat.monotonic()
            began = True
            result = base_req(self, _api, *args, **kwargs)
        except BaseException as exc:
            if finished:
                finished.emit("call_finished", address, _api, _compat.monotonic() - start,
                              exc, began and conn.sent)
            raise
        if finished:
            finished.emit("call_finished", address, _api, _compat.monotonic() - start, None,
                          True)
        return result

    namespace: Dict[str, Any] = {"_req": _req, "__module__": base.__module__,
                                 "__doc__": base.__doc__}
    if spec.stack == "apache":
        # A generated Apache client's methods call send_/recv_ themselves: route them
        # through _req (the pooled mixin's _req calls the generated ones).
        for api in spec.methods:
            if api in getattr(base, "_calls", {}) and api not in ("set_header", "get_headers",
                                                                 "clear_headers"):
                namespace[api] = _proxy_method(api)
    return type(f"Reported{base.__name__}", (base,), namespace)  # cls(conn) makes one


def _send_headers(conn: "Connection", headers: Dict[str, str]) -> None:
    """Put ``headers`` on the next request, where the protocol carries headers (THeader)."""
    set_header = getattr(conn.protocol, "set_header", None)
    if set_header is None:
        return
    for key, value in headers.items():
        set_header(key.encode() if isinstance(key, str) else key,
                   value.encode() if isinstance(value, str) else value)
