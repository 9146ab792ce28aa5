"""One pooled socket: opening it, bounding its calls, checking it is alive, closing it.

This is the only module that talks to thriftpy2's transport layer, and the only place
where seconds become thriftpy2's milliseconds.  It owns the wire: a call's whole-call
timeout and reply-size limit (:class:`WireBounds`), bounded name resolution
(:func:`resolve`), and the one classification of a call's errors (:func:`should_discard`,
:func:`is_connect_error`).
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import socket
import ssl
import struct
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Tuple, Type

from thriftpy2.protocol.compact import TCompactProtocol, TCompactProtocolFactory
from thriftpy2.protocol.exc import TProtocolException
from thriftpy2.thrift import (TApplicationException, TClient, TMessageType, TPayload,
                             args_to_kwargs)
from thriftpy2.transport import (
    TCyFramedTransport,
    TFramedTransport,
    TSocket,
    TTransportException,
)

from . import _compat
from .address import Address
from .deadlines import _CURRENT
from .errors import ClientReleased, DeadlineExceeded, ReplyMismatch, ThriftPoolError

if TYPE_CHECKING:
    from .config import PoolConfig

__all__ = [
    "APPLICATION_ERRORS",
    "BoundedCompactProtocol",
    "BoundedSocket",
    "BoundedTSocket",
    "Connection",
    "PooledClient",
    "WireBounds",
    "client_class",
    "connection_expiry",
    "is_connect_error",
    "readable",
    "resolve",
    "should_discard",
]

_MAX_SEQID = 2 ** 31 - 1
_POLL_READABLE = getattr(select, "POLLIN", 1) | getattr(select, "POLLPRI", 2) | \
    getattr(select, "POLLHUP", 16) | getattr(select, "POLLERR", 8)


def _protocol_error(kind: int, message: str) -> TProtocolException:
    return TProtocolException(kind, message)  # type: ignore[no-untyped-call]


def _ms(seconds: Optional[float]) -> Optional[float]:
    """thriftpy2's TSocket takes milliseconds; every thriftpool option is in seconds."""
    return None if seconds is None else seconds * 1000.0


#: Per service: ``{method: (args class, result class, oneway, required (position, name)s)}``.
_Api = Tuple[Any, Any, bool, Tuple[Tuple[int, str], ...]]
_CLIENT_CLASSES: Dict[int, Type["PooledClient"]] = {}


def _set_call_timeout(sock: socket.socket, seconds: Optional[float]) -> None:
    """Give an open socket of the Apache stack (thriftpool/apache.py) its per-call timeout,
    in the kernel where possible (``SO_RCVTIMEO``/``SO_SNDTIMEO``: no poll before each
    send and recv); gevent's sockets, and platforms whose ``timeval`` we do not pack, keep
    the Python-level timeout.  (The thriftpy2 stack's sockets are :class:`WireBounds`.)"""
    if seconds is None:
        sock.settimeout(None)
        return
    if not sys.platform.startswith("linux") or _compat.gevent_patched("socket"):
        sock.settimeout(seconds)
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


# -- Apache Thrift's exception types, when its optional package is installed -------------
# (thriftpool/apache.py holds the rest of that stack; only classification lives here.)
_DISCARD_TYPES: Tuple[type, ...] = (TTransportException, TProtocolException, ReplyMismatch,
                                    DeadlineExceeded, OSError)
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
    """Tell whether an exception raised by a call leaves its socket unusable (and, for
    the pool, counts against the instance like a transport error).

    Transport and protocol errors (a malformed reply raises ``TProtocolException``, see
    :meth:`PooledClient._read_reply`), socket errors and timeouts (``socket.timeout``), a
    :class:`~thriftpool.DeadlineExceeded` in the middle of a call, and reply mismatches
    leave the stream in an unknown state.  An IDL-declared exception or a
    ``TApplicationException`` means the server answered in full, so the socket is fine.
    The transport types are tested first because every thriftpy2 exception subclasses
    ``TException``.  Anything else (``gevent.Timeout``, ``KeyboardInterrupt``) that
    interrupts a call is caught by the connection's in-call flag, not here.  (A
    ``DeadlineExceeded`` raised before the request was written leaves nothing in
    flight: the pool keeps that connection, as its in-call flag is not set.)
    """
    if isinstance(exc, _DISCARD_TYPES):
        return True
    if isinstance(exc, APPLICATION_ERRORS):
        return exc.type in _STREAM_ERROR_CODES  # type: ignore[attr-defined]
    return not isinstance(exc, Exception)


def is_connect_error(exc: BaseException) -> bool:
    """The request surely never reached the server's application: the socket could not
    be opened (resolution, connect or TLS handshake failed), or a fresh TLS session was
    rejected by the server at its first read (TLS 1.3 reports a refused client
    certificate only then).  Both raise ``TTransportException(NOT_OPEN)``."""
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


def _decode_error(exc: Exception, api: str, conn: Optional["Connection"]) -> TProtocolException:
    """The ``TProtocolException`` for whatever a decoder raised on a malformed reply.

    thriftpy2's Cython codec lets bad bytes out as ``MemoryError`` (a length it could not
    allocate), ``SystemError`` (a negative length), ``RecursionError`` (nesting deeper
    than its limit) and ``cybin.ProtocolError`` (a plain ``Exception``); the pure-Python
    codecs as ``struct.error``, ``KeyError``, ``TException`` and more.
    """
    where = f"the reply to {api}() from {conn.address if conn is not None else '?'}"
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, MemoryError):
        kind = TProtocolException.SIZE_LIMIT
        text = f"{where} claims a length that cannot be allocated ({detail})"
    elif isinstance(exc, RecursionError):
        kind = DEPTH_LIMIT
        text = f"{where} nests too deep ({detail})"
    elif isinstance(exc, SystemError) and "egative" in str(exc):
        kind = TProtocolException.NEGATIVE_SIZE
        text = f"{where} has a negative length ({detail})"
    elif "version" in str(exc):
        kind = TProtocolException.BAD_VERSION
        text = f"{where} is not a Thrift message of this protocol ({detail})"
    else:
        kind = TProtocolException.INVALID_DATA
        text = f"cannot decode {where} ({detail})"
    return _protocol_error(kind, text)


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
    _service: Any = None  # the service of a client_class() subclass

    def __init__(self, conn: "Connection") -> None:
        # One attribute per checkout: the protocol and the sequence id live on ``conn``.
        self._conn: Optional[Connection] = conn

    # Each IDL method goes through _req, which refuses to run once the checkout has ended.

    def _req(self, _api: str, *args: Any, **kwargs: Any) -> Any:
        conn = self._conn
        if conn is None or conn.detached:
            raise ClientReleased(
                f"{_api}() called after its checkout ended; its connection may belong "
                "to another caller now")
        api = self._apis.get(_api)
        if api is None:
            api = _api_entry(self._service, _api)
        args_cls, result_cls, oneway, required = api
        # The request: the args struct's own __init__ takes the arguments in IDL order
        # (one call instead of thriftpy2's args_to_kwargs loop and a setattr each).  A
        # positional None ("the default") and names the struct does not have take the raw
        # client's way.
        request = None
        for value in args:
            if value is None:
                break
        else:
            try:
                request = args_cls(*args, **kwargs)
            except TypeError:
                pass
        if request is None:
            request = self._args_slow(_api, args_cls, args, kwargs)
        if required:
            for index, name in required:  # given positionally, or by name
                if index >= len(args) and name not in kwargs:
                    raise TApplicationException(
                        TApplicationException.UNKNOWN_METHOD,
                        f"{name} is required argument for {self._service.__name__}.{_api}")
        # The call's timeout: its method's, or the connection's, and no more than the
        # time left in a thriftpool.deadline() block (one ContextVar read without one).
        timeouts = conn.timeouts
        timeout = conn.timeout if timeouts is None else timeouts.get(_api, conn.timeout)
        binding = _CURRENT.get()
        if binding is not None:
            left = binding.expires_at - _monotonic()
            if left <= 0:
                raise binding.exceeded(f"{_api}()", "(the request was not sent)")
            if timeout is None or left < timeout:
                timeout = left
            else:
                binding = None
        # (Connection.begin_call, inlined: the hot path.)
        seqid = conn.seqid + 1
        if seqid > _MAX_SEQID:
            seqid = 1
        conn.seqid = seqid
        # From the first byte written until the reply is read in full the stream is in
        # an unknown state: whatever interrupts the call, the socket must not be reused.
        conn.in_call = True
        conn.sent = False
        conn.socket.begin(timeout)
        try:
            prot = conn.protocol
            prot.write_message_begin(
                _api, TMessageType.ONEWAY if oneway else TMessageType.CALL, seqid)
            request.write(prot)
            prot.write_message_end()
            prot.trans.flush()
            conn.sent = True
            if oneway:
                conn.in_call = False
                return None
            return self._read_reply(_api, conn, seqid, result_cls)
        except socket.timeout as exc:
            conn.failed_calls += 1  # the error paths only: free for calls that succeed
            if binding is not None and not isinstance(exc, DeadlineExceeded):
                raise binding.exceeded(f"{_api}()", f"(timed out on {conn.address})"
                                       ) from exc
            raise
        except TTransportException as exc:
            conn.failed_calls += 1
            if exc.type == TTransportException.NOT_OPEN:
                conn.sent = False  # a TLS session refused before the request was read
            raise
        except BaseException:
            conn.failed_calls += 1
            raise

    def _args_slow(self, _api: str, args_cls: Any, args: Tuple[Any, ...],
                   kwargs: Dict[str, Any]) -> Any:
        """The request as thriftpy2's own client builds it (positional ``None`` skipped,
        unknown names set as attributes and never sent)."""
        try:
            kwargs = args_to_kwargs(args_cls.thrift_spec, *args, **kwargs)
        except ValueError as e:
            raise TApplicationException(
                TApplicationException.UNKNOWN_METHOD,
                f"{e.args[0]} is required argument for {self._service.__name__}.{_api}"
            ) from None
        request = args_cls()
        for k, v in kwargs.items():
            setattr(request, k, v)
        return request

    def _read_reply(self, _api: str, conn: "Connection", seqid: int, result_cls: Any) -> Any:
        """Read and decode the reply to ``_api`` (request ``seqid`` on ``conn``).

        A reply that cannot be decoded raises ``TProtocolException`` with the decoder's
        error as ``__cause__``, and one cut off raises ``TTransportException``; either
        way the connection is discarded (:func:`should_discard`).
        """
        iprot = conn.protocol
        try:
            fname, mtype, rseqid = iprot.read_message_begin()
            if rseqid != seqid or fname != _api:
                raise ReplyMismatch(
                    f"reply {fname!r} seqid {rseqid} does not answer request {_api!r} "
                    f"seqid {seqid} on {conn}; the connection was dropped")
            if mtype == TMessageType.REPLY:
                result = result_cls()
                result.read(iprot)
                iprot.read_message_end()
            elif mtype == TMessageType.EXCEPTION:
                x = TApplicationException()
                x.read(iprot)
                iprot.read_message_end()
                conn.in_call = False
                raise x
            else:
                raise _protocol_error(
                    TProtocolException.INVALID_DATA,
                    f"the reply to {_api}() from {conn.address} has "
                    f"message type {mtype}, neither REPLY nor EXCEPTION")
        except (TTransportException, TProtocolException, TApplicationException, OSError,
                ThriftPoolError):
            raise
        except Exception as exc:
            raise _decode_error(exc, _api, conn) from exc
        conn.in_call = False

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

    def _trial(self, timeout: Optional[float]) -> None:
        """Prove the server answers calls on this connection without running any of its
        methods: call a method no service has; a Thrift server answers that with
        ``TApplicationException(UNKNOWN_METHOD)``, which is success here.  A TLS session
        the server refused, a hang-up or no answer within ``timeout`` raises."""
        conn = self._conn
        assert conn is not None
        seqid = conn.begin_call(timeout)
        prot = conn.protocol
        prot.write_message_begin(TRIAL_METHOD, TMessageType.CALL, seqid)
        _TrialArgs().write(prot)
        prot.write_message_end()
        prot.trans.flush()
        conn.sent = True
        iprot = prot
        fname, mtype, rseqid = iprot.read_message_begin()
        if rseqid != seqid or fname != TRIAL_METHOD or mtype != TMessageType.EXCEPTION:
            raise ReplyMismatch(f"trial call on {conn}: reply {fname!r} seqid {rseqid} "
                                f"type {mtype}")
        x = TApplicationException()
        x.read(iprot)
        iprot.read_message_end()
        conn.in_call = False

    def close(self) -> None:
        """Does nothing: the pool owns the socket.  Use ``tclose()`` for an IDL ``close``."""

    def __repr__(self) -> str:
        state = "released" if self._conn is None else str(self._conn.address)
        name = getattr(self._service, "__name__", "?")
        return f"<PooledClient {name} {state}>"


#: The method name of a trial call (see :meth:`PooledClient._trial`): no IDL has it.
TRIAL_METHOD = "__thriftpool_trial__"


class _TrialArgs(TPayload):
    """The empty arguments of a trial call."""

    thrift_spec = {}  # type: ignore[var-annotated]
    default_spec = []  # type: ignore[var-annotated]


def _api_entry(service: Any, api: str) -> _Api:
    """The spec and classes of one IDL method (the slow path, for a bare PooledClient)."""
    args_cls = getattr(service, api + "_args")
    result_cls = getattr(service, api + "_result")
    spec = getattr(args_cls, "thrift_spec", None) or {}
    required = tuple((index, item[1]) for index, item in enumerate(spec.values()) if item[-1])
    return args_cls, result_cls, bool(getattr(result_cls, "oneway", False)), required


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
        namespace["_for_service"] = namespace["_service"] = service
        cls = type(f"{service.__name__}PooledClient", (PooledClient,), namespace)
        _CLIENT_CLASSES[id(service)] = cls
    return cls


# -- the wire: whole-call timeouts and reply-size limits at the socket --------------------
#
# A per-read timeout does not bound a call: a server that sends one byte every half
# second keeps every recv() short and the call running forever.  So each call has a
# deadline (``begin``), and every send and recv gets the time left, not a fresh timeout.
# Setting a timeout is a system call (setsockopt, or the fcntl behind settimeout()), so
# the socket is only re-armed when the time left is shorter, by more than _SLACK, than
# what the socket would wait anyway: the first send and the first read of a call, right
# after ``begin`` armed the whole timeout, cost no extra system call, and neither does
# any read that waited less than _SLACK.  A call therefore ends within its timeout plus
# _SLACK (and the scheduler's latency).
#
# The same place sees every byte of the reply before the decoder does, so it enforces
# ``max_message_size``: a frame header above it (framed transports) is refused before
# the transport allocates the frame, a read that asks for more than the reply's frame
# holds is refused at once (the decoder believes a length the frame does not contain),
# and an unframed reply stops at the limit.  thriftpy2's Cython transports ask their
# socket for as many bytes as the length they just decoded claims (their buffer grows
# to it first, which reserves address space without touching it), so a read request
# far beyond the limit is refused at once too, and no single recv() asks for more than
# _RECV_MAX bytes, so the socket layer never allocates what a header claims.

_INF = float("inf")
_SLACK = 0.001
_RECV_MAX = 1 << 20
_CLAIM_SLACK = 1 << 16
_FRAME_SIZE = struct.Struct("!i")
#: thriftpy2's TProtocolException has no DEPTH_LIMIT; Apache Thrift's value is 6.
DEPTH_LIMIT = getattr(TProtocolException, "DEPTH_LIMIT", 6)
_monotonic = time.monotonic


def _near(wanted: float, held: Optional[float]) -> bool:
    """A socket holding ``held`` times out no earlier, and at most _SLACK later."""
    return held is not None and wanted <= held <= wanted + _SLACK


def _timeval(seconds: Optional[float]) -> bytes:
    if seconds is None:
        return struct.pack("@ll", 0, 0)  # a zero timeval: never time out
    whole = int(seconds)
    micros = round((seconds - whole) * 1e6)
    if micros >= 1_000_000:
        whole, micros = whole + 1, micros - 1_000_000
    if whole == 0 and micros == 0:
        micros = 1  # a zero timeval means "never" to the kernel
    return struct.pack("@ll", whole, micros)


def _kernel_timeouts_possible(tls: bool) -> bool:
    """Whether timeouts can live in the kernel (``SO_RCVTIMEO``/``SO_SNDTIMEO``).

    With a Python-level timeout CPython polls the socket before every send and every
    recv: two more system calls, each releasing the GIL, per call, which with several
    threads costs more than the whole pool (bench/README.md).  A blocking socket with
    kernel timeouts times out just the same, with ``EAGAIN``, which the wire turns into
    ``socket.timeout``.  gevent's sockets and TLS sockets need the Python-level timeout,
    and so do platforms whose ``timeval`` we do not pack.
    """
    return not tls and sys.platform.startswith("linux") and not _compat.gevent_patched("socket")


class WireBounds:
    """The whole-call deadline and the reply-size limit over one socket (a mixin).

    ``sock`` is the real socket (or ``ssl.SSLSocket``, or gevent's).  Call
    :meth:`bound` once the socket is connected, :meth:`begin` at the start of every call,
    and read and write through :meth:`_recv` and :meth:`_send`.  Two classes use it:
    :class:`BoundedTSocket` for thriftpy2's transports and :class:`BoundedSocket`, a
    socket-like object for transports that call ``handle.recv()`` (Apache Thrift's
    ``TSocket.setHandle``).

    Errors: a timeout raises ``socket.timeout``; a reply over the limit or asking past
    its frame raises :meth:`_protocol_error`; a TLS error before the first byte of the
    first reply (TLS 1.3 reports a refused client certificate only at the first read or
    write after the handshake) raises :meth:`_not_open`.  Subclasses for another Thrift
    library override those two.
    """

    sock: Any

    _kernel = False
    _rcv: Optional[float] = None  # the timeout the socket holds for reads
    _snd: Optional[float] = None  # ... and for writes
    _ends = _INF  # monotonic deadline of the current call
    _limit: Optional[int] = None
    _framed = False
    _seen = 0  # bytes of the current call's reply received so far
    _room: float = _INF  # ... and how many it may have: the limit, or the frame's end
    _room0: float = _INF  # the room at the start of a call
    _frame_end = -1  # where the reply's frame ends (framed), once its header is read
    _head = b""  # a frame header split over reads
    _fresh = False  # TLS: nothing received yet on this connection
    _eof_raises = False  # EOF raises TTransportException (a transport) or reads b"" (a socket)
    _peer = ""

    def bound(self, timeout: Optional[float], limit: Optional[int] = None,
              framed: bool = False, tls: bool = False, peer: str = "") -> None:
        """Set up a connected socket: its per-call timeout, and the reply-size checks.

        :param timeout: the default per-call timeout (seconds, ``None``: never).
        :param limit: the largest reply in bytes (``None``: no limit).
        :param framed: replies come in Thrift frames (a 4-byte length first).
        :param tls: ``sock`` is an ``ssl.SSLSocket``: a TLS error before the first reply
            byte is a refused session (see :meth:`_rejected`).
        """
        self._kernel = _kernel_timeouts_possible(tls)
        self._limit = limit
        self._framed = framed
        # A reply may take the limit; a framed one first its 4-byte header, then its frame.
        self._room0 = 4 if framed else (_INF if limit is None else limit)
        self._frame_end = 0
        self._fresh = tls
        self._peer = peer
        self.force_timeout(timeout)
        self.begin(timeout)
        self._ends = _INF  # no call yet

    def force_timeout(self, seconds: Optional[float]) -> None:
        """Set the socket's timeout now, whatever the wire believes it holds."""
        self._arm(seconds, True, True)

    def _arm(self, seconds: Optional[float], rcv: bool, snd: bool) -> None:
        sock = self.sock
        if sock is None:
            return
        if self._kernel:
            timeval = _timeval(seconds)
            try:
                if rcv:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
                if snd:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
                if sock.gettimeout() is not None:
                    sock.settimeout(None)
            except OSError:
                self._kernel = False  # keep CPython's timeout from now on
            else:
                if rcv:
                    self._rcv = seconds
                if snd:
                    self._snd = seconds
                return
        sock.settimeout(seconds)  # one timeout for both directions
        self._rcv = self._snd = seconds

    def begin(self, timeout: Optional[float]) -> None:
        """Start a call that may take ``timeout`` seconds in all (``None``: no bound)."""
        if timeout != self._rcv or timeout != self._snd:
            # A socket timeout up to _SLACK longer is as good (a deadline that leaves a
            # hair less than the usual timeout costs no system call).
            if timeout is None or not (_near(timeout, self._rcv) and _near(timeout, self._snd)):
                self._arm(timeout, True, True)
        self._ends = _INF if timeout is None else _monotonic() + timeout
        self._seen = 0
        self._room = self._room0
        if self._framed:
            self._frame_end = -1  # until the header is read (see _past_room)
            self._head = b""

    def time_left(self) -> Optional[float]:
        """Seconds left in the current call (``None``: unbounded)."""
        ends = self._ends
        return None if ends == _INF else ends - _monotonic()

    def _recv(self, n: int) -> bytes:
        """Receive up to ``n`` bytes within the current call's deadline; at EOF ``b""``
        (or ``TTransportException(END_OF_FILE)`` when ``_eof_raises``)."""
        ends = self._ends
        if ends != _INF:
            left = ends - _monotonic()
            rcv = self._rcv
            if rcv is None or left < rcv - _SLACK:
                if left <= 0:
                    raise socket.timeout("timed out")
                self._arm(left, True, False)
        if n > _RECV_MAX:
            n = self._clip(n)
        seen = self._seen
        if seen >= self._room:  # the reply wants more than it may have
            raise self._no_room()
        try:
            data: bytes = self.sock.recv(n)
        except BlockingIOError as exc:  # SO_RCVTIMEO expired
            raise socket.timeout("timed out") from exc
        except ssl.SSLError as exc:
            if self._fresh:
                raise self._rejected(exc, "read") from exc
            raise
        if data:
            seen += len(data)
            self._seen = seen
            if self._frame_end == -1 and seen == len(data) >= 4:
                # A framed reply's first read, holding the whole frame header (the
                # common case; _past_room does the others and raises for bad sizes).
                size = _FRAME_SIZE.unpack_from(data)[0]
                limit = self._limit
                if size <= 0 or (limit is not None and size > limit):
                    self._frame_size(data[:4])  # raises
                self._frame_end = self._room = room = 4 + size
                if seen > room:
                    self._past_room(data)
            elif seen > self._room or self._frame_end == -1:
                self._past_room(data)
            if self._fresh:
                self._fresh = False
        elif self._eof_raises:
            raise TTransportException(type=TTransportException.END_OF_FILE,
                                      message="TSocket read 0 bytes")
        return data

    def _clip(self, n: int) -> int:
        limit = self._limit
        # A Cython buffer asks for at most its (grown) size; it grows to a multiple of its
        # previous size that covers the claim, so a request above twice the limit (plus a
        # margin) means a claimed length above the limit.
        if limit is not None and n > 2 * limit + _CLAIM_SLACK:
            raise self._protocol_error(
                TProtocolException.SIZE_LIMIT,
                f"the reply from {self._peer} claims a length of about {n} bytes, more "
                f"than max_message_size ({limit})")
        return _RECV_MAX

    def _no_room(self) -> Exception:
        if self._framed:
            return self._protocol_error(
                TProtocolException.INVALID_DATA,
                f"the reply from {self._peer} asks for more bytes than its frame of "
                f"{self._frame_end - 4} holds")
        return self._too_long()

    def _too_long(self) -> Exception:
        return self._protocol_error(
            TProtocolException.SIZE_LIMIT,
            f"the reply from {self._peer} is longer than max_message_size ({self._limit})")

    def _past_room(self, data: bytes) -> None:
        """Bytes of a frame header (framed), or more bytes than the reply may have: too
        long (unframed), or past the end of its frame."""
        seen = self._seen
        if not self._framed:
            raise self._too_long()
        if self._frame_end == -1:
            if seen < 4:
                self._head += data
                return
            # The header is complete: the frame's size sets the room.
            header = (self._head + data)[:4] if self._head else data[:4]
            self._head = b""
            self._frame_end = self._room = 4 + self._frame_size(header)
            if seen <= self._room:
                return
        raise self._protocol_error(
            TProtocolException.INVALID_DATA,
            f"{seen - self._frame_end} unexpected bytes from {self._peer} after the reply's "
            f"frame")

    def _frame_size(self, header: bytes) -> int:
        size = int.from_bytes(header, "big", signed=True)
        limit = self._limit
        if size < 0:
            raise self._protocol_error(TProtocolException.NEGATIVE_SIZE,
                                       f"negative frame size {size} from {self._peer}")
        if size == 0:
            raise self._protocol_error(TProtocolException.INVALID_DATA,
                                       f"empty frame from {self._peer}")
        if limit is not None and size > limit:
            raise self._protocol_error(
                TProtocolException.SIZE_LIMIT,
                f"frame of {size} bytes from {self._peer} is larger than max_message_size "
                f"({limit})")
        return size

    def _send(self, data: bytes) -> None:
        """Send all of ``data`` within the current call's deadline."""
        sock = self.sock
        try:
            sent = sock.send(data)
            if sent < len(data):
                self._send_rest(memoryview(data), sent)
        except BlockingIOError as exc:  # SO_SNDTIMEO expired
            raise socket.timeout("timed out") from exc
        except ssl.SSLError as exc:
            if self._fresh:
                raise self._rejected(exc, "write") from exc
            raise

    def _send_rest(self, view: memoryview, sent: int) -> None:
        sock = self.sock
        total = len(view)
        while sent < total:
            ends = self._ends
            if ends != _INF:
                left = ends - _monotonic()
                snd = self._snd
                if snd is None or left < snd - _SLACK:
                    if left <= 0:
                        raise socket.timeout("timed out")
                    self._arm(left, False, True)
            sent += sock.send(view[sent:])

    def _rejected(self, exc: ssl.SSLError, step: str) -> Exception:
        # TLS 1.3 completes the client's side of the handshake before the server has
        # checked the client's certificate; a refusal arrives as an alert (or an EOF) at
        # the first read or write.  The server's application never saw a byte of the
        # request: to the pool, that is a failed connect.
        return self._not_open(
            f"TLS session with {self._peer} rejected by the server at the first {step} "
            f"(before any request was read): {exc}")

    def _protocol_error(self, kind: int, message: str) -> Exception:
        return _protocol_error(kind, message)

    def _not_open(self, message: str) -> Exception:
        return TTransportException(type=TTransportException.NOT_OPEN, message=message)


class BoundedSocket(WireBounds):
    """A socket-like object whose ``recv``/``send``/``sendall`` honour a whole-call
    deadline and a reply-size limit (see :class:`WireBounds`).

    For transports that take a socket and call ``handle.recv()`` (Apache Thrift's
    ``TSocket.setHandle``): wrap the connected socket, call :meth:`bound` once and
    :meth:`begin` before each call.  Anything else is passed to the wrapped socket.
    ``recv`` with flags (``MSG_PEEK``, a liveness check) bypasses the bounds.
    """

    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def recv(self, n: int, flags: int = 0) -> bytes:
        if flags:
            data: bytes = self.sock.recv(n, flags)
            return data
        return self._recv(n)

    def send(self, data: bytes, flags: int = 0) -> int:
        if flags:
            sent: int = self.sock.send(data, flags)
            return sent
        self._send(data)
        return len(data)

    def sendall(self, data: bytes, flags: int = 0) -> None:
        if flags:
            self.sock.sendall(data, flags)
        else:
            self._send(data)

    def settimeout(self, seconds: Optional[float]) -> None:
        self.sock.settimeout(seconds)
        self._rcv = self._snd = seconds
        self._kernel = False

    def gettimeout(self) -> Optional[float]:
        timeout: Optional[float] = self.sock.gettimeout()
        return timeout

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


# -- name resolution, bounded -------------------------------------------------------------

_AddrInfo = Tuple[Any, Any, int, str, Any]
_MIN_ATTEMPT = 0.5  # seconds: the least time one address gets while others wait
#: In-flight lookups by (host, port): concurrent connects to one name share one helper.
_LOOKUPS: Dict[Tuple[str, int], "_Lookup"] = {}
if hasattr(os, "register_at_fork"):
    # A forked child has none of the parent's helper threads: their lookups never end.
    os.register_at_fork(after_in_child=_LOOKUPS.clear)


class _Lookup:
    """One getaddrinfo() running in a helper thread (a greenlet under gevent)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.done = _compat.Event()
        self.result: List[_AddrInfo] = []
        self.error: Optional[BaseException] = None

    def run(self) -> None:
        try:
            self.result = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_STREAM)
        except BaseException as exc:  # handed to the waiters, never lost
            self.error = exc
        finally:
            _LOOKUPS.pop((self.host, self.port), None)
            self.done.set()


def resolve(host: str, port: int, timeout: float, pool_name: str = "") -> List[_AddrInfo]:
    """Every address of ``host`` for a TCP connect, in the resolver's order, within
    ``timeout`` seconds.

    An IP literal is parsed in place.  A name is looked up by ``getaddrinfo()`` in a
    daemon helper thread (``thriftpool-<pool>-resolver``; under gevent a greenlet, so
    gevent's resolver runs it) while the caller waits at most ``timeout``; the helper
    finishes on its own if the system resolver hangs.  Concurrent lookups of one name
    share one helper.

    :raises TTransportException: ``NOT_OPEN`` when the host is invalid, unknown, or not
        resolved in time.
    """
    where = f"{host}:{port}"
    # IP literals without getaddrinfo(): gevent's resolver would start its thread pool
    # for them, and they need no lookup.
    try:
        socket.inet_pton(socket.AF_INET, host)
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
    except OSError:
        pass
    except (UnicodeError, ValueError, TypeError) as exc:  # e.g. a NUL byte
        raise TTransportException(type=TTransportException.NOT_OPEN,
                                  message=f"invalid host {host!r}: {exc}") from exc
    try:
        socket.inet_pton(socket.AF_INET6, host)
        return [(socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                 (host, port, 0, 0))]
    except OSError:
        pass  # a name to look up (or an IPv6 literal with a scope: getaddrinfo() parses it)
    key = (host, port)
    lookup = _LOOKUPS.get(key)
    if lookup is None:
        new = _Lookup(host, port)
        lookup = _LOOKUPS.setdefault(key, new)
        if lookup is new:
            _compat.spawn(new.run, f"thriftpool-{pool_name}-resolver")
    if not lookup.done.wait(max(timeout, 0.0)):
        raise TTransportException(
            type=TTransportException.NOT_OPEN,
            message=f"Could not connect to {where}: resolving {host!r} took more than "
                    f"{timeout:.3g}s")
    if lookup.error is not None:
        raise TTransportException(
            type=TTransportException.NOT_OPEN,
            message=f"Could not connect to {where}: cannot resolve {host!r}: "
                    f"{lookup.error}") from lookup.error
    if not lookup.result:
        raise TTransportException(type=TTransportException.NOT_OPEN,
                                  message=f"Could not connect to {where}: no address")
    return list(lookup.result)


class BoundedTSocket(WireBounds, TSocket):
    """thriftpy2's client ``TSocket`` with whole-call deadlines and reply-size limits.

    ``open()`` resolves the host within the connect budget (:func:`resolve`), tries every
    address it returns in order, each with a share of the time left, and does the TLS
    handshake (with an ``ssl_context``) before any byte of Thrift is written, so nothing
    is ever sent in plaintext to a server that fails it.  Every failure raises
    ``TTransportException(NOT_OPEN)`` with the cause chained and named in the message
    (thriftpy2's own ``TSSLSocket`` reduces it to "Could not connect").  Verification
    follows the context.
    """

    def __init__(self, host: str, port: int, config: "PoolConfig",
                 timeout: Optional[float] = None) -> None:
        super().__init__(host, port,  # type: ignore[no-untyped-call]
                         socket_timeout=_ms(config.socket_timeout),
                         connect_timeout=_ms(config.connect_timeout))
        self._host = host
        self._port = port
        self.ssl_context = config.ssl_context
        self.server_hostname = config.server_hostname or host
        self.tls = config.ssl_context is not None
        self._config = config
        budget = config.connect_timeout if timeout is None else min(
            timeout, config.connect_timeout)
        self._connect_budget = max(budget, 0.0)

    def open(self) -> None:
        config = self._config
        budget = self._connect_budget
        ends = _monotonic() + budget
        host, port = self._host, self._port
        where = str(Address(host, port))
        infos = resolve(host, port, budget, config.name)
        last: Optional[BaseException] = None
        sock: Optional[socket.socket] = None
        for i, (family, socktype, proto, _, sockaddr) in enumerate(infos):
            left = ends - _monotonic()
            if left <= 0:
                break
            share = left / (len(infos) - i)
            if share < _MIN_ATTEMPT:
                share = min(left, _MIN_ATTEMPT)
            candidate = socket.socket(family, socktype, proto)
            try:
                candidate.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                candidate.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                candidate.settimeout(share)
                candidate.connect(sockaddr)
            except OSError as exc:
                candidate.close()
                last = exc
                continue
            sock = candidate
            break
        if sock is None:
            tried = f"{len(infos)} addresses" if len(infos) > 1 else "its address"
            raise TTransportException(
                type=TTransportException.NOT_OPEN,
                message=f"Could not connect to {where} (tried {tried} in "
                        f"{budget:.3g}s): {last or 'timed out'}") from last
        if self.ssl_context is not None:
            try:
                sock.settimeout(max(ends - _monotonic(), 1e-3))
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.server_hostname)
            except ssl.SSLError as exc:
                sock.close()
                raise TTransportException(
                    type=TTransportException.NOT_OPEN,
                    message=f"TLS handshake with {where} failed: {exc}") from exc
            except OSError as exc:
                sock.close()
                raise TTransportException(
                    type=TTransportException.NOT_OPEN,
                    message=f"TLS handshake with {where} failed: {exc}") from exc
        self.sock = sock

    # thriftpy2's transports call read() and write(): the wire's own, with no frame
    # in between (EOF raises, as thriftpy2's TSocket.read does).
    _eof_raises = True
    read = WireBounds._recv  # type: ignore[assignment]
    write = WireBounds._send  # type: ignore[assignment]


class BoundedCompactProtocol(TCompactProtocol):
    """thriftpy2's (pure-Python) compact protocol with every length checked against
    ``max_message_size`` before anything is read or allocated for it, and struct
    nesting bounded as thriftpy2's Cython binary protocol bounds it."""

    def __init__(self, trans: Any, limit: Optional[int], decode_response: bool = True,
                 strict_decode: bool = False, max_depth: int = 64) -> None:
        super().__init__(trans, decode_response=decode_response,  # type: ignore[no-untyped-call]
                         strict_decode=strict_decode)
        self._limit = limit
        self._max_depth = max_depth
        self._depth = 0

    def _read_size(self) -> int:
        # A size is a varint of at most 5 bytes (32 bits); read_varint() would take any.
        result = shift = 0
        read = self.trans.read
        for _ in range(5):
            byte = ord(read(1))
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
        else:
            raise _protocol_error(TProtocolException.INVALID_DATA,
                                     "a compact size longer than 5 bytes")
        if result > 0x7FFFFFFF:
            raise _protocol_error(TProtocolException.NEGATIVE_SIZE,
                                     f"negative compact size {result - (1 << 32)}")
        limit = self._limit
        if limit is not None and result > limit:
            raise _protocol_error(
                TProtocolException.SIZE_LIMIT,
                f"a length of {result} is more than max_message_size ({limit})")
        return result

    def read_struct(self, obj: Any) -> Any:
        depth = self._depth + 1
        if depth > self._max_depth:
            raise _protocol_error(DEPTH_LIMIT,
                                     f"structs nested more than {self._max_depth} deep")
        self._depth = depth
        try:
            return super().read_struct(obj)  # type: ignore[no-untyped-call]
        finally:
            self._depth = depth - 1

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
                 "idle_since", "seqid", "in_call", "sent", "detached", "timeout", "timeouts",
                 "_poller", "idle_poll", "_fd", "_tls", "uses", "last_beat", "gen", "out_at",
                 "out_thread", "out_stack", "leak_reported", "failed_calls")

    def __init__(self, address: Address, tsocket: BoundedTSocket, transport: Any,
                 protocol: Any, created_at: float, expires_at: float,
                 timeout: Optional[float] = None,
                 timeouts: Optional[Dict[str, Optional[float]]] = None) -> None:
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
        #: The whole-call timeout of every call, and per method (``None``: none differ).
        self.timeout = timeout
        self.timeouts = timeouts
        self._tls = bool(getattr(tsocket, "tls", False))
        sock = tsocket.sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._fd = sock.fileno() if sock is not None else -1
        self._poller: Any = None
        #: ``poll(0)`` of the socket, when that alone is :meth:`peer_closed` (a plain socket
        #: with a poll object): a checkout calls it directly, one Python call less.
        self.idle_poll: Optional[Callable[[int], List[Any]]] = None
        if _compat.has_poll() and self._fd >= 0:
            # One poll object per connection: a poll object is not safe to share between
            # threads, and select.select() fails for descriptors >= 1024.
            self._poller = select.poll()
            self._poller.register(self._fd, _POLL_READABLE)
            if not self._tls:
                self.idle_poll = self._poller.poll

    @classmethod
    def open(cls, address: Address, config: "PoolConfig", tls_required: bool = False,
             timeout: Optional[float] = None) -> "Connection":
        """Resolve, connect to ``address`` and, when the pool has an ``ssl_context``, do
        the TLS handshake, all within ``config.connect_timeout`` in total (or ``timeout``
        when smaller: pass the time left in a deadline); every address the host resolves
        to is tried in order (see :class:`BoundedTSocket`).

        :param tls_required: the instance advertises TLS; refuse to connect in plaintext.
        :param timeout: a tighter bound than ``connect_timeout`` for this connect.
        :raises TTransportException: ``NOT_OPEN`` when anything in the connect fails or
            times out, or when plaintext would go to an instance that requires TLS.
        """
        if config.spec is not None and config.spec.stack == "apache":
            from .apache import open_connection  # the Apache stack (optional package)
            return open_connection(cls, address, config, tls_required, timeout)
        if config.ssl_context is None and tls_required:
            raise TTransportException(
                type=TTransportException.NOT_OPEN,
                message=f"instance {address} requires TLS and the pool has no ssl_context: "
                        "refusing to send plaintext")
        tsocket = BoundedTSocket(address.host, address.port, config, timeout)
        transport = config.transport_factory.get_transport(tsocket)
        factory = config.protocol_factory
        limit = config.max_message_size
        if type(factory) is TCompactProtocolFactory:
            protocol: Any = BoundedCompactProtocol(
                transport, limit, decode_response=factory.decode_response,
                strict_decode=factory.strict_decode)
        else:
            protocol = factory.get_protocol(transport)
        try:
            transport.open()
        except TTransportException:
            raise
        except Exception as exc:  # whatever fails in a connect is a connect failure
            tsocket.close()  # type: ignore[no-untyped-call]
            raise TTransportException(
                type=TTransportException.NOT_OPEN,
                message=f"Could not connect to {address}: {type(exc).__name__}: {exc}"
            ) from exc
        tsocket.bound(config.socket_timeout, limit,
                      framed=isinstance(transport, (TCyFramedTransport, TFramedTransport)),
                      tls=tsocket.tls, peer=str(address))
        now = _compat.monotonic()
        if config.max_lifetime is None:
            expires = float("inf")
        else:
            # Jitter the lifetime so connections opened together do not all expire together.
            expires = now + config.max_lifetime * (1.0 - random.uniform(0, config.lifetime_jitter))
        return cls(address, tsocket, transport, protocol, now, expires, config.socket_timeout,
                   dict(config.method_timeouts) or None)

    def set_call_timeout(self, seconds: Optional[float]) -> None:
        """Make ``seconds`` the whole-call timeout of the calls that follow (methods with
        a ``method_timeouts`` entry keep theirs), and put it on the socket now."""
        self.timeout = seconds
        self.socket.force_timeout(seconds)

    def begin_call(self, timeout: Optional[float]) -> int:
        """Start a call that may take ``timeout`` seconds: its sequence id (returned), the
        in-call flag (the stream is in an unknown state until the reply is read in full),
        not sent yet, and the socket's whole-call deadline."""
        seqid = self.seqid + 1
        if seqid > _MAX_SEQID:
            seqid = 1
        self.seqid = seqid
        self.in_call = True
        self.sent = False
        self.socket.begin(timeout)
        return seqid

    @contextlib.contextmanager
    def call_timeout(self, seconds: Optional[float]) -> Iterator[None]:
        """Bound every call inside the block by ``seconds`` in all, whatever its method
        (for a heartbeat); the connection's timeouts are back after the block.  A
        ``deadline()`` still applies."""
        saved = self.timeout, self.timeouts
        self.timeout, self.timeouts = seconds, None
        try:
            yield
        finally:
            self.timeout, self.timeouts = saved

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
        self._poller = self.idle_poll = None
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
        self._poller = self.idle_poll = None
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
