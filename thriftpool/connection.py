"""One pooled socket: opening it, checking it is alive, numbering its calls, closing it.

This is the only module that talks to thriftpy2's transport layer, and the only place
where seconds become thriftpy2's milliseconds.
"""

from __future__ import annotations

import random
import select
import socket
import ssl
import struct
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Tuple, Type

from thriftpy2.protocol.exc import TProtocolException
from thriftpy2.thrift import TApplicationException, TClient, TMessageType, args_to_kwargs
from thriftpy2.transport import TSocket, TTransportException

from . import _compat
from .address import Address
from .errors import ClientReleased, ReplyMismatch

if TYPE_CHECKING:
    from types import ModuleType

    from .config import PoolConfig

__all__ = ["APPLICATION_ERRORS", "Connection", "PooledClient", "client_class",
           "connection_expiry", "is_connect_error", "readable", "should_discard"]

_MAX_SEQID = 2 ** 31 - 1
_POLL_READABLE = getattr(select, "POLLIN", 1) | getattr(select, "POLLPRI", 2) | \
    getattr(select, "POLLHUP", 16) | getattr(select, "POLLERR", 8)


def _ms(seconds: Optional[float]) -> Optional[float]:
    """thriftpy2's TSocket takes milliseconds; every thriftpool option is in seconds."""
    return None if seconds is None else seconds * 1000.0


def _set_call_timeout(sock: socket.socket, seconds: Optional[float]) -> None:
    """Give an open socket its per-call timeout, in the kernel where possible.

    With a Python-level timeout CPython polls the socket before every send and every
    recv: two more syscalls, each releasing the GIL, per call, which with several
    threads costs more than the whole pool (bench/README.md).  A blocking socket with
    ``SO_RCVTIMEO``/``SO_SNDTIMEO`` times out just the same, with ``EAGAIN``, which
    :class:`PooledClient` turns back into ``socket.timeout``.  gevent's sockets need the
    Python-level timeout, and so do platforms whose ``timeval`` we do not pack.
    """
    if seconds is None:
        # thriftpy2's TSocket.open() leaves the connect timeout on the socket when there
        # is no socket timeout: every call would time out after it.
        sock.settimeout(None)
        return
    if not sys.platform.startswith("linux") or _compat.gevent_patched("socket"):
        return
    whole = int(seconds)
    micros = round((seconds - whole) * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    if whole == 0 and micros == 0:
        micros = 1  # a zero timeval means "never" to the kernel
    timeval = struct.pack("@ll", whole, micros)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        sock.settimeout(None)
    except OSError:
        sock.settimeout(seconds)  # keep CPython's timeout


#: Per service: ``{method: (args spec, args class, result class, oneway)}``.
_Api = Tuple[Any, Any, Any, bool]
_CLIENT_CLASSES: Dict[int, Type["PooledClient"]] = {}


# -- Apache Thrift's exception types, when its optional package is installed -------------
# (thriftpool/apache.py holds the rest of that stack; only classification lives here.)
_DISCARD_TYPES: Tuple[type, ...] = (TTransportException, TProtocolException, ReplyMismatch,
                                    OSError)
_NOT_OPEN_TYPES: Tuple[type, ...] = (TTransportException,)
#: The "the server answered" exceptions of both stacks.
APPLICATION_ERRORS: Tuple[type, ...] = (TApplicationException,)
#: TApplicationException codes that mean the stream itself went wrong (the same numbers
#: in both stacks; 8-10 are Apache's THeader ones).
_STREAM_ERROR_CODES = frozenset({
    TApplicationException.BAD_SEQUENCE_ID, TApplicationException.PROTOCOL_ERROR,
    TApplicationException.INVALID_MESSAGE_TYPE, 8, 9, 10})
try:
    from thrift.protocol.TProtocol import TProtocolException as _ApacheProtocolError
    from thrift.Thrift import TApplicationException as _ApacheApplicationError
    from thrift.transport.TTransport import TTransportException as _ApacheTransportError
except ImportError:
    pass
else:
    _DISCARD_TYPES += (_ApacheTransportError, _ApacheProtocolError)
    _NOT_OPEN_TYPES += (_ApacheTransportError,)
    APPLICATION_ERRORS += (_ApacheApplicationError,)


def should_discard(exc: BaseException) -> bool:
    """Tell whether an exception raised by a call leaves its socket unusable.

    Transport and protocol errors, socket errors and timeouts (thriftpy2 lets a read
    timeout out as a bare ``socket.timeout``), and reply mismatches leave the stream in an
    unknown state.  An IDL-declared exception or a ``TApplicationException`` means the
    server answered in full, so the socket is fine.  The transport types are tested
    first because every thriftpy2 exception subclasses ``TException``.  Anything else
    (``gevent.Timeout``, ``KeyboardInterrupt``) that interrupts a call is caught by the
    connection's in-call flag, not here.
    """
    if isinstance(exc, _DISCARD_TYPES):
        return True
    if isinstance(exc, APPLICATION_ERRORS):
        return exc.type in _STREAM_ERROR_CODES  # type: ignore[attr-defined]
    return not isinstance(exc, Exception)


def is_connect_error(exc: BaseException) -> bool:
    """The request surely never left: the socket could not even be opened."""
    return isinstance(exc, _NOT_OPEN_TYPES) and \
        exc.type == TTransportException.NOT_OPEN  # type: ignore[attr-defined]


def readable(conns: "list[Connection]") -> "set[Connection]":
    """The idle connections among ``conns`` that have something to read (the peer hung up,
    or sent bytes nobody asked for), or no socket at all; one ``poll`` for all of them.

    It never blocks and reads nothing, so it may run while the connections sit in an idle
    stack that checkouts take from: a checkout only ever polls through the connection's own
    poll object, never this one.
    """
    out: "set[Connection]" = set()
    if not conns:
        return out
    if _compat.has_poll():
        poller = select.poll()
        by_fd: Dict[int, Connection] = {}
        for conn in conns:
            fd = conn.fileno
            if fd < 0:
                out.add(conn)
            else:
                by_fd[fd] = conn
                poller.register(fd, _POLL_READABLE)
        try:
            events = poller.poll(0)
        except (OSError, ValueError):  # pragma: no cover - a descriptor closed meanwhile
            return out | set(conns)
        for fd, _ in events:
            found = by_fd.get(fd)
            if found is not None:
                out.add(found)
        return out
    for conn in conns:  # pragma: no cover - platforms without poll
        if conn.peer_closed():
            out.add(conn)
    return out


class PooledClient(TClient):
    """The generated thriftpy2 client, bound to one pooled connection for one checkout.

    It numbers its requests and checks each reply's sequence id and method name, so a
    reply meant for an earlier, abandoned call can never be read as this call's answer.
    After its ``with`` block ends it refuses every call with :class:`ClientReleased`.
    Build it through :func:`client_class`, whose subclass has the IDL's methods as real
    methods (``TClient.__getattr__`` builds a ``functools.partial`` on every call).
    """

    _apis: Dict[str, _Api] = {}  # filled by client_class()
    _for_service: Any = None

    def __init__(self, service: ModuleType, conn: "Connection") -> None:
        protocol = conn.protocol
        self._service = service
        self._iprot = self._oprot = protocol
        self._seqid = 0
        self._conn: Optional[Connection] = conn

    # Each IDL method goes through _req, which refuses to run once the checkout has ended.

    def _req(self, _api: str, *args: Any, **kwargs: Any) -> Any:
        conn = self._conn
        if conn is None or conn.detached:
            raise ClientReleased(
                f"{_api}() called after its checkout ended; its connection may belong "
                "to another caller now")
        service = self._service
        api = self._apis.get(_api)
        if api is None:
            api = _api_entry(service, _api)
        spec, args_cls, _, oneway = api
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
        # From the first byte written until the reply is read in full the stream is in
        # an unknown state: whatever interrupts the call, the socket must not be reused.
        conn.in_call = True
        conn.sent = False
        try:
            oprot = self._oprot
            oprot.write_message_begin(
                _api, TMessageType.ONEWAY if oneway else TMessageType.CALL, seqid)
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
        except BlockingIOError as exc:
            # SO_RCVTIMEO / SO_SNDTIMEO expired (see _set_call_timeout): the same
            # socket.timeout that a Python-level socket timeout raises.
            conn.failed_calls += 1
            raise socket.timeout("timed out") from exc
        except BaseException:
            conn.failed_calls += 1  # the error path only: free for calls that succeed
            raise

    def _recv(self, _api: str) -> Any:
        iprot = self._iprot
        fname, mtype, rseqid = iprot.read_message_begin()
        if rseqid != self._seqid or fname != _api:
            raise ReplyMismatch(
                f"reply {fname!r} seqid {rseqid} does not answer request {_api!r} seqid "
                f"{self._seqid} on {self._conn}; the connection was dropped")
        if mtype == TMessageType.EXCEPTION:
            x = TApplicationException()
            x.read(iprot)
            iprot.read_message_end()
            self._mark_complete()
            raise x
        api = self._apis.get(_api) or _api_entry(self._service, _api)
        result = api[2]()
        result.read(iprot)
        iprot.read_message_end()
        self._mark_complete()

        success = getattr(result, "success", None)
        if success is not None:
            return success
        if len(result.thrift_spec) == 0:
            return None
        for k, v in result.__dict__.items():
            if k != "success" and v:
                raise v
        if hasattr(result, "success"):
            raise TApplicationException(TApplicationException.MISSING_RESULT)
        return None

    def _mark_complete(self) -> None:
        conn = self._conn
        if conn is not None:
            conn.in_call = False

    def close(self) -> None:
        """Does nothing: the pool owns the socket.  Use ``tclose()`` for an IDL ``close``."""

    def __repr__(self) -> str:
        state = "released" if self._conn is None else str(self._conn.address)
        return f"<PooledClient {self._service.__name__} {state}>"


def _api_entry(service: Any, api: str) -> _Api:
    """The spec and classes of one IDL method (the slow path, for a bare PooledClient)."""
    args_cls = getattr(service, api + "_args")
    result_cls = getattr(service, api + "_result")
    return args_cls.thrift_spec, args_cls, result_cls, bool(getattr(result_cls, "oneway", False))


def _method(api: str) -> Callable[..., Any]:
    def call(self: PooledClient, *args: Any, **kwargs: Any) -> Any:
        return self._req(api, *args, **kwargs)

    call.__name__ = call.__qualname__ = api
    call.__doc__ = f"Call ``{api}`` on this checkout's connection."
    return call


def client_class(service: Any) -> Type[PooledClient]:
    """The :class:`PooledClient` subclass for ``service``, built once per service.

    Its IDL methods are real methods, and each method's args and result classes are
    looked up once here rather than five times per call.  An IDL method whose name
    :class:`PooledClient` already uses (``close``) stays reachable as ``tclose()``.
    """
    cls = _CLIENT_CLASSES.get(id(service))
    if cls is None or cls._for_service is not service:
        namespace: Dict[str, Any] = {
            api: _method(api) for api in service.thrift_services
            if not hasattr(PooledClient, api)}
        namespace["_apis"] = {api: _api_entry(service, api) for api in service.thrift_services}
        namespace["_for_service"] = service
        cls = type(f"{service.__name__}PooledClient", (PooledClient,), namespace)
        _CLIENT_CLASSES[id(service)] = cls
    return cls


class TLSSocket(TSocket):
    """A thriftpy2 ``TSocket`` over TLS with the caller's ``ssl.SSLContext``.

    Verification follows the context.  The handshake happens inside ``open()``, before any
    byte of Thrift is written, so nothing is ever sent in plaintext to a server that fails
    it, and a failure raises ``TTransportException(NOT_OPEN)`` whose message carries the
    TLS error (thriftpy2's own ``TSSLSocket`` reduces it to "Could not connect").
    """

    def __init__(self, host: str, port: int, ssl_context: ssl.SSLContext,
                 server_hostname: Optional[str], **kwargs: Any) -> None:
        super().__init__(host, port, **kwargs)  # type: ignore[no-untyped-call]
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or host

    def _init_sock(self) -> None:
        super()._init_sock()  # type: ignore[no-untyped-call]
        self.sock = self.ssl_context.wrap_socket(self.sock,
                                                 server_hostname=self.server_hostname)

    def open(self) -> None:
        self._init_sock()
        sock = self.sock
        addr = f"{self.host}:{self.port}"
        try:
            sock.settimeout(self.connect_timeout)
            sock.connect((self.host, self.port))
            sock.settimeout(self.socket_timeout)
        except ssl.SSLError as exc:
            self.close()  # type: ignore[no-untyped-call]
            raise TTransportException(
                type=TTransportException.NOT_OPEN,
                message=f"TLS handshake with {addr} failed: {exc}") from exc
        except OSError as exc:
            self.close()  # type: ignore[no-untyped-call]
            raise TTransportException(
                type=TTransportException.NOT_OPEN,
                message=f"Could not connect to {addr}: {exc}") from exc


def connection_expiry(config: "PoolConfig", now: float) -> float:
    """When a connection opened ``now`` is to be replaced (``max_lifetime``, jittered so
    connections opened together do not all expire together)."""
    if config.max_lifetime is None:
        return float("inf")
    return now + config.max_lifetime * (1.0 - random.uniform(0, config.lifetime_jitter))


class Connection:
    """One open socket to one instance, with the bookkeeping the pool needs.

    Not thread-safe by itself: the pool hands it to one caller at a time.
    """

    __slots__ = ("address", "socket", "transport", "protocol", "created_at", "expires_at",
                 "idle_since", "seqid", "in_call", "sent", "detached", "_poller", "_fd",
                 "_tls", "uses", "last_beat", "gen", "out_at", "out_thread", "out_stack",
                 "leak_reported", "failed_calls")

    def __init__(self, address: Address, tsocket: TSocket, transport: Any, protocol: Any,
                 created_at: float, expires_at: float) -> None:
        self.address = address
        self.socket = tsocket
        self.transport = transport
        self.protocol = protocol
        self.created_at = created_at
        self.expires_at = expires_at
        self.idle_since = created_at
        self.last_beat = created_at  # the last heartbeat (heartbeats keep idle_since)
        self.uses = 0  # checkouts so far: tells the watchdog a socket stayed idle
        self.seqid = 0
        self.in_call = False
        self.sent = True  # False from the start of a call until its request was flushed
        self.detached = False  # set in a forked child: the socket belongs to the parent
        self.gen = 0  # the pool's drain generation when it opened (PoolState.opened)
        # The current checkout: when it got the connection (0.0: not handed out), and with
        # leak_timeout its thread and stack (thriftpool.checkout.Router._checked_out).
        self.out_at = 0.0
        self.out_thread = ""
        self.out_stack: Any = None
        self.leak_reported = False
        self.failed_calls = 0  # calls that raised, ever (a checkout takes the difference)
        sock = tsocket.sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._fd = sock.fileno() if sock is not None else -1
        self._poller: Any = None
        if _compat.has_poll() and self._fd >= 0:
            # One poll object per connection: a poll object is not safe to share between
            # threads, and select.select() fails for descriptors >= 1024.
            self._poller = select.poll()
            self._poller.register(self._fd, _POLL_READABLE)

    @classmethod
    def open(cls, address: Address, config: "PoolConfig", tls_required: bool = False,
             timeout: Optional[float] = None) -> "Connection":
        """Connect to ``address`` (and do the TLS handshake when the pool has an
        ``ssl_context``); blocks up to ``timeout`` (default ``config.connect_timeout``).

        :param tls_required: the instance advertises TLS; refuse to connect in plaintext.
        :raises TTransportException: ``NOT_OPEN`` when the connect or the handshake fails
            or times out, or when plaintext would go to an instance that requires TLS.
        """
        if config.spec is not None and config.spec.stack == "apache":
            from .apache import open_connection  # the Apache stack (optional package)
            return open_connection(cls, address, config, tls_required, timeout)
        connect_timeout = config.connect_timeout if timeout is None else timeout
        family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
        tsocket: TSocket
        if config.ssl_context is not None:
            tsocket = TLSSocket(address.host, address.port, config.ssl_context,
                                config.server_hostname, socket_family=family,
                                socket_timeout=_ms(config.socket_timeout),
                                connect_timeout=_ms(connect_timeout))
        elif tls_required:
            raise TTransportException(
                type=TTransportException.NOT_OPEN,
                message=f"instance {address} requires TLS and the pool has no ssl_context: "
                        "refusing to send plaintext")
        else:
            tsocket = TSocket(  # type: ignore[no-untyped-call]
                address.host, address.port, socket_family=family,
                socket_timeout=_ms(config.socket_timeout),
                connect_timeout=_ms(connect_timeout))
        transport = config.transport_factory.get_transport(tsocket)
        protocol = config.protocol_factory.get_protocol(transport)
        transport.open()
        if not isinstance(tsocket, TLSSocket) and tsocket.sock is not None:
            # (TLSSocket.open() already left socket_timeout on the socket.)
            _set_call_timeout(tsocket.sock, config.socket_timeout)
        now = _compat.monotonic()
        if config.max_lifetime is None:
            expires = float("inf")
        else:
            # Jitter the lifetime so connections opened together do not all expire together.
            expires = now + config.max_lifetime * (1.0 - random.uniform(0, config.lifetime_jitter))
        return cls(address, tsocket, transport, protocol, now, expires)

    def set_call_timeout(self, seconds: Optional[float]) -> None:
        """Set the per-call timeout again (after a temporary one, e.g. a heartbeat's)."""
        sock = self.socket.sock
        if sock is None:
            return
        if self._tls:
            sock.settimeout(seconds)
        else:
            _set_call_timeout(sock, seconds)

    def peer_closed(self) -> bool:
        """Tell, without blocking, whether the idle socket is unusable.

        An idle socket has nothing to read; readable means the peer hung up (EOF or RST)
        or sent bytes nobody asked for.  Either way it must not be handed out.
        """
        if self._fd < 0 or self.socket.sock is None:
            return True
        poller = self._poller
        if poller is not None:
            try:
                readable = bool(poller.poll(0))
            except (OSError, ValueError):
                return True
        else:
            try:
                readable = bool(select.select([self._fd], [], [], 0)[0])
            except (OSError, ValueError):
                return True
        if readable and self._tls:
            return self._tls_peer_closed()
        return readable

    def _tls_peer_closed(self) -> bool:
        """A readable TLS socket may only hold protocol records (TLS 1.3 session tickets
        arrive after the handshake): read without blocking to tell them from EOF or data."""
        sock = self.socket.sock
        if sock is None:
            return True
        if sock.pending():
            return True  # decrypted application data that nobody asked for
        timeout = sock.gettimeout()
        try:
            sock.settimeout(0.0)
            sock.recv(1)
        except ssl.SSLWantReadError:
            return False  # only records for the TLS layer: the connection is fine
        except (OSError, ValueError):
            return True
        finally:
            try:
                sock.settimeout(timeout)
            except OSError:
                pass
        return True  # EOF, or an unexpected byte

    @property
    def fileno(self) -> int:
        """The socket's descriptor (-1 once closed or detached)."""
        return self._fd if self.socket.sock is not None else -1

    @property
    def tls(self) -> bool:
        return self._tls

    def is_expired(self, now: float) -> bool:
        """The connection outlived ``max_lifetime`` (jittered)."""
        return now >= self.expires_at

    def close(self) -> None:
        """Shut the socket down and close it; never raises."""
        self._poller = None
        try:
            self.transport.close()
        except Exception:
            try:
                self.socket.close()  # type: ignore[no-untyped-call]
            except Exception:
                pass

    def detach(self) -> None:
        """Forget the socket without a shutdown, for a forked child.

        The descriptor is closed in this process only; the connection it shares with the
        parent stays open there and nothing is written to it.
        """
        self._poller = None
        self.detached = True
        sock = self.socket.sock
        self.socket.sock = None
        if sock is not None:
            try:
                sock.close()  # close() without shutdown() leaves the parent's side intact
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"<Connection {self.address} fd={self._fd}>"
