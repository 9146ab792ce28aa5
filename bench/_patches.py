"""Bench-only experiments on thriftpool's hot path, applied by monkeypatching.

Each patch mirrors one hunk of ``bench/proposed.diff`` so its effect can be measured,
interleaved with the unpatched code, in one process (``bench/bench_hotpath.py``).
``install(names)`` applies patches and returns a function that undoes them; patches only
replace class attributes, so toggling them between runs is cheap.  Once the diff is
applied to thriftpool, ``applied()`` says so and the experiment measures nothing new.

- ``kernel_timeouts``: keep the socket in blocking mode and put ``socket_timeout`` in
  the kernel (``SO_RCVTIMEO``/``SO_SNDTIMEO``).  CPython runs a ``poll()`` before every
  ``send``/``recv`` on a socket that has a Python-level timeout; this removes those two
  syscalls (and two GIL releases) per call.  A timeout then surfaces as ``EAGAIN``
  (``BlockingIOError``), turned back into ``socket.timeout`` for the caller.  Not under
  gevent (its sockets need the Python-level timeout) and not for TLS.
- ``tcp_info``: tell a dead idle socket by ``getsockopt(TCP_INFO)`` (state
  ``ESTABLISHED`` or not) instead of ``poll(0)``; ``getsockopt`` does not release the GIL.
- ``lean_client``: a per-service ``PooledClient`` subclass whose IDL methods are real
  methods with their args/result classes bound once, instead of ``TClient.__getattr__``
  building a ``functools.partial`` and five ``getattr(service, name + "_args")`` per call.
- ``proxy_import``: ``pool.client()``'s per-call function runs ``from .pool import
  Checkout`` on every call; hoisted to the module.
- ``fast_checkout``: a checkout first tries the picked instance's top idle connection
  before the general loop (deadline, retries, capacity checks).
"""

from __future__ import annotations

import socket
import struct
from typing import Any, Callable, Dict, List, Sequence

from thriftpy2.thrift import TApplicationException, TMessageType, args_to_kwargs

from thriftpool import _compat
from thriftpool import connection as _connection
from thriftpool import pool as _pool
from thriftpool.errors import ClientReleased

Connection = _connection.Connection
PooledClient = _connection.PooledClient

_MAX_SEQID = 2 ** 31 - 1


# -- kernel_timeouts ----------------------------------------------------------------------

def _kernel_timeouts() -> Callable[[], None]:
    orig_open = Connection.__dict__["open"]
    orig_req = PooledClient.__dict__["_req"]
    open_func = orig_open.__func__

    def open(cls: Any, address: Any, config: Any, *args: Any, **kwargs: Any) -> Any:
        conn = open_func(cls, address, config, *args, **kwargs)
        timeout = config.socket_timeout
        sock = conn.socket.sock
        if (timeout is not None and sock is not None and not conn._tls
                and not _compat.gevent_patched("socket")):
            sec = int(timeout)
            tv = struct.pack("ll", sec, int((timeout - sec) * 1e6))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            sock.settimeout(None)
        return conn

    def _req(self: Any, _api: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return orig_req(self, _api, *args, **kwargs)
        except BlockingIOError as exc:  # SO_RCVTIMEO / SO_SNDTIMEO expired
            raise socket.timeout("timed out") from exc

    Connection.open = classmethod(open)  # type: ignore[assignment]
    PooledClient._req = _req  # type: ignore[assignment]

    def undo() -> None:
        Connection.open = orig_open  # type: ignore[assignment]
        PooledClient._req = orig_req  # type: ignore[assignment]

    return undo


# -- tcp_info -------------------------------------------------------------------------------

_TCP_ESTABLISHED = b"\x01"


def _tcp_info() -> Callable[[], None]:
    orig = Connection.__dict__["peer_closed"]

    def peer_closed(self: Any) -> bool:
        sock = self.socket.sock
        if self._fd < 0 or sock is None:
            return True
        if self._tls:
            return orig(self)
        try:
            return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1) != _TCP_ESTABLISHED
        except OSError:
            return True

    Connection.peer_closed = peer_closed  # type: ignore[assignment]

    def undo() -> None:
        Connection.peer_closed = orig  # type: ignore[assignment]

    return undo


# -- lean_client ------------------------------------------------------------------------------

_LEAN: Dict[int, type] = {}
_APIS: Dict[int, Dict[str, Any]] = {}


def _api_table(service: Any) -> Dict[str, Any]:
    """``{api: (args spec, args class, result class, oneway)}``, built once per service."""
    table = _APIS.get(id(service))
    if table is None or table.get("__service__") is not service:
        table = {"__service__": service}
        for api in service.thrift_services:
            args_cls = getattr(service, api + "_args")
            result_cls = getattr(service, api + "_result")
            table[api] = (args_cls.thrift_spec, args_cls, result_cls,
                          bool(getattr(result_cls, "oneway", False)))
        _APIS[id(service)] = table
    return table


def _lean_req(self: Any, _api: str, *args: Any, **kwargs: Any) -> Any:
    conn = self._conn
    if conn is None or conn.detached:
        raise ClientReleased(f"{_api}() called after its checkout ended; its connection "
                             "may belong to another caller now")
    service = self._service
    try:
        spec, args_cls, result_cls, oneway = _api_table(service)[_api]
    except KeyError:
        raise AttributeError(f"{service.__name__} has no method {_api!r}") from None
    try:
        kwargs = args_to_kwargs(spec, *args, **kwargs)
    except ValueError as e:
        raise TApplicationException(
            TApplicationException.UNKNOWN_METHOD,
            f"{e.args[0]} is required argument for {service.__name__}.{_api}") from None
    seqid = conn.seqid + 1
    if seqid > _MAX_SEQID:
        seqid = 1
    conn.seqid = self._seqid = seqid
    conn.in_call = True
    conn.sent = False
    oprot = self._oprot
    oprot.write_message_begin(_api, TMessageType.ONEWAY if oneway else TMessageType.CALL,
                              seqid)
    request = args_cls()
    for k, v in kwargs.items():
        setattr(request, k, v)
    request.write(oprot)
    oprot.write_message_end()
    oprot.trans.flush()
    conn.sent = True
    if oneway:
        conn.in_call = False
        return None
    return self._recv(_api)


def _lean_method(api: str) -> Callable[..., Any]:
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self._req(api, *args, **kwargs)

    call.__name__ = call.__qualname__ = api
    return call


def _lean_class(service: Any) -> type:
    """A PooledClient subclass with the IDL's methods as real methods (no __getattr__)."""
    cls = _LEAN.get(id(service))
    if cls is None or cls._service_ref is not service:  # type: ignore[attr-defined]
        ns: Dict[str, Any] = {"_service_ref": service}
        for api in service.thrift_services:
            if api not in ("close", "_req", "_recv", "_send"):
                ns[api] = _lean_method(api)
        cls = type(f"{service.__name__}PooledClient", (PooledClient,), ns)
        _LEAN[id(service)] = cls
    return cls


def _lean_client() -> Callable[[], None]:
    checkout = _pool.Checkout
    orig_enter = checkout.__dict__["__enter__"]
    orig_req = PooledClient.__dict__["_req"]

    def __enter__(self: Any) -> Any:
        if self._conn is not None:
            raise RuntimeError("a checkout can be entered only once")
        pool = self._pool
        self._inst, conn = pool._acquire(self._timeout, self._exclude)
        self._conn = conn
        self._client = client = _lean_class(pool.service)(pool.service, conn)
        return client

    checkout.__enter__ = __enter__  # type: ignore[assignment]
    PooledClient._req = _lean_req  # type: ignore[assignment]

    def undo() -> None:
        checkout.__enter__ = orig_enter  # type: ignore[assignment]
        PooledClient._req = orig_req  # type: ignore[assignment]

    return undo


# -- proxy_import ---------------------------------------------------------------------------

def _proxy_import() -> Callable[[], None]:
    """``invoke`` without its function-level ``from .pool import Checkout``.

    An import statement inside a function runs the import machinery on every call
    (about 1 us here, as much as a third of a checkout); the diff moves it to the top
    of proxy.py.  The patched function is invoke's own source minus that line.
    """
    import inspect
    import textwrap

    from thriftpool import proxy

    orig = proxy.invoke
    source = textwrap.dedent(inspect.getsource(orig))
    line = "    from .pool import Checkout\n"
    if line not in source:
        return lambda: None  # already applied
    namespace: Dict[str, Any] = {}
    exec(compile(source.replace(line, ""), proxy.__file__, "exec"),  # noqa: S102
         proxy.__dict__, namespace)
    had = "Checkout" in proxy.__dict__
    proxy.Checkout = _pool.Checkout  # type: ignore[attr-defined]
    proxy.invoke = namespace["invoke"]

    def undo() -> None:
        proxy.invoke = orig
        if not had:
            del proxy.Checkout  # type: ignore[attr-defined]

    return undo


# -- fast_checkout ----------------------------------------------------------------------------

def _fast_checkout() -> Callable[[], None]:
    """A checkout first tries the picked instance's top idle connection (one lock, the
    liveness and expiry checks) before the general loop with its deadline, retries and
    capacity checks.  Here a miss falls back to the unpatched ``_acquire``, which picks
    again; the diff hands the first pick to the loop instead.
    """
    from thriftpool import instance as _instance

    InstancePool = _instance.InstancePool
    ThriftPool = _pool.ThriftPool
    orig_acquire = ThriftPool.__dict__["_acquire"]
    had_take_idle = "take_idle" in InstancePool.__dict__
    monotonic = _compat.monotonic

    def take_idle(self: Any) -> Any:
        with self._lock:
            if self._closed or not self._idle:
                return None
            conn = self._idle.pop()
            self._in_use.add(conn)
        if conn.peer_closed():
            self.release(conn, discard=True, reason="peer_closed")
            return None
        if conn.is_expired(monotonic()):
            self.release(conn, discard=True, reason="expired")
            return None
        return conn

    def _acquire(self: Any, timeout: Any, exclude: Any = None) -> Any:
        if not exclude and not self._closed and not self._forked:
            now = monotonic()
            self._last_checkout = now
            picked = self._balancer.pick(self._ring)
            if picked is not None:
                conn = picked.take_idle()
                if conn is not None:
                    if self._events:
                        self._events.emit("checkout", picked.key, monotonic() - now)
                    return picked, conn
        return orig_acquire(self, timeout, exclude)

    if not had_take_idle:
        InstancePool.take_idle = take_idle  # type: ignore[attr-defined]
    ThriftPool._acquire = _acquire  # type: ignore[assignment]

    def undo() -> None:
        ThriftPool._acquire = orig_acquire  # type: ignore[assignment]
        if not had_take_idle:
            del InstancePool.take_idle  # type: ignore[attr-defined]

    return undo


PATCHES: Dict[str, Callable[[], Callable[[], None]]] = {
    "lean_client": _lean_client,
    "tcp_info": _tcp_info,
    "kernel_timeouts": _kernel_timeouts,
    "proxy_import": _proxy_import,
    "fast_checkout": _fast_checkout,
}


def install(names: Sequence[str]) -> Callable[[], None]:
    """Apply the named patches; return the function that undoes them (in reverse)."""
    undos: List[Callable[[], None]] = []
    # lean_client replaces PooledClient._req, which kernel_timeouts wraps: lean first.
    order = list(PATCHES)
    try:
        for name in sorted(names, key=order.index):
            undos.append(PATCHES[name]())
    except BaseException:
        for undo in reversed(undos):
            undo()
        raise

    def undo_all() -> None:
        for undo in reversed(undos):
            undo()

    return undo_all
