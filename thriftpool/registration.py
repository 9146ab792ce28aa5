"""Announcing a server instance in ZooKeeper, and serving a thriftpy2 service while announced.

:class:`ServiceRegistration` keeps one ephemeral node, ``<path>/<host>:<port>`` holding
``{"host", "port", "weight"}`` as JSON, alive for as long as it is started: through
connection losses, server restarts, leader elections and session expiry, with no action
from the application.  :class:`RegisteredServer` (and :func:`serve`) serve a thriftpy2
service on a TCP port and keep it registered while it accepts connections; stopping
deregisters first, so pools stop routing to it before it stops accepting.

Threads: kazoo runs its connection and callback threads; callbacks only record what
changed and wake one named daemon worker, ``thriftpool-registration-<node>``, which does
every ZooKeeper write.  :meth:`ServiceRegistration.stop` ends both.
"""

from __future__ import annotations

import errno
import logging
import selectors
import signal
import socket
import threading
from types import TracebackType
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Set, Type

from kazoo.client import KazooClient
from kazoo.exceptions import BadVersionError, NoAuthError, NodeExistsError, NoNodeError
from kazoo.protocol.states import EventType, KazooState, WatchedEvent
from thriftpy2.thrift import TApplicationException, TProcessor
from thriftpy2.transport import TSocket, TTransportException

from . import _compat
from ._zookeeper import (
    RETRY_INITIAL,
    AuthData,
    ClientSupervisor,
    HostsLike,
    check_acl,
    check_auth_data,
    check_hosts,
    check_kazoo_options,
    check_node_name,
    check_path,
    check_seconds,
    client_gave_up,
    close_client,
    encode_record,
    make_client,
)
from .address import Address, host_problem, weight_problem
from .config import PROTOCOLS, TRANSPORTS
from .errors import ThriftPoolError
from .service import is_apache_module

__all__ = ["RegisteredServer", "RegistrationConflict", "ServiceRegistration", "serve"]

logger = logging.getLogger(__name__)

#: How often an idle worker checks that kazoo is still trying to connect.
_SUPERVISE_INTERVAL = 5.0
_RESERVED_KEYS = frozenset({"host", "port", "weight", "tls"})


class RegistrationConflict(ThriftPoolError):
    """The registration's node exists and belongs to another live ZooKeeper session."""

    def __init__(self, message: str, *, path: str, owner: int) -> None:
        super().__init__(message)
        self.path = path
        self.owner = owner


def _owner_text(owner: int) -> str:
    return "a persistent node" if owner == 0 else f"live session 0x{owner:x}"


class ServiceRegistration:
    """Keep ``<path>/<node_name>`` registered in ZooKeeper while started.

    ::

        with thriftpool.ServiceRegistration(hosts="127.0.0.1:2181", path="/services/echo",
                                            host="10.0.0.5", port=9090):
            server.serve()

    The node is ephemeral and holds ``{"host": host, "port": port, "weight": weight}``
    (plus ``metadata``) as JSON.  ``path`` is created when it is missing, with its
    missing parents.  The node is kept in place by a background worker:

    - after the session expired and a new one was established, the node is created
      again with the same data;
    - if the node already exists, its ephemeral owner decides: our current session's
      node is kept, a node left by one of our earlier sessions is replaced, and a node
      owned by any other session (another process registered the same name, or this
      server restarted before its old session expired) is not touched: the conflict is
      logged once as an error and exposed as :attr:`conflict`, and the node is taken
      over as soon as it goes away;
    - if someone else deletes the node while the session lives, it is created again.

    :meth:`stop` deletes the node at once, so pools stop routing to the instance before
    the server stops (graceful drain), then closes the session.  Construction does no
    I/O; inspect a running registration with :attr:`registered`, :attr:`conflict`,
    :attr:`session_id`, :attr:`node_path`, :attr:`data` and ``registrations`` (how many
    times the node was created).

    :param hosts: the ZooKeeper ensemble, ``"host:port,host:port[/chroot]"`` or a list.
    :param path: the service path (shared by every instance of the service).
    :param host: the host clients connect to (announced, not bound).
    :param port: the port clients connect to.
    :param weight: relative share of traffic, an integer in 1..1,000,000.
    :param auth_data: credentials sent on every connection, e.g.
        ``[("digest", "user:password")]``.
    :param acl: kazoo ACL objects for the nodes this registration creates for its
        service: its own node, and ``path`` when it is missing, e.g.
        ``[make_digest_acl("svc", "secret", all=True),
        make_acl("world", "anyone", read=True)]``: only the service's credentials can
        then create or delete nodes under ``path``, while anyone can discover it.  The
        missing parents of ``path`` (``/services`` for ``/services/echo``) are shared
        with other services, so they get ZooKeeper's open ACL (kazoo's default), never
        this one: another service must still be able to create its path there.  When
        ``path`` already exists with another ACL, a warning says so (ZooKeeper checks
        create and delete rights on the parent).
    :param node_name: the node's name (default ``"host:port"``).
    :param tls: advertise that the endpoint speaks only TLS (``"tls": true`` in its data):
        pools connect to it only with an ``ssl_context``.
    :param metadata: more JSON fields for the node's data (``host``, ``port`` and
        ``weight`` are reserved).
    :param session_timeout: the ZooKeeper session timeout, in seconds: after a crash the
        node disappears at most this long after the last heartbeat.
    :param reconnect_max_delay: the longest wait, in seconds, between attempts to reach
        ZooKeeper.
    :param kazoo_options: more ``KazooClient`` arguments (TLS, ``sasl_options``, ...).
    :raises ValueError: naming the option, when an option is invalid.
    """

    def __init__(
        self,
        hosts: HostsLike,
        path: str,
        host: str,
        port: int,
        weight: int = 1,
        *,
        auth_data: Optional[AuthData] = None,
        acl: Optional[Sequence[Any]] = None,
        node_name: Optional[str] = None,
        metadata: Optional[Mapping[str, Any]] = None,
        session_timeout: float = 10.0,
        reconnect_max_delay: float = 2.0,
        kazoo_options: Optional[Mapping[str, Any]] = None,
        tls: bool = False,
    ) -> None:
        self.hosts = check_hosts(hosts)
        if not isinstance(tls, bool):
            raise ValueError(f"tls must be True or False, got {tls!r}")
        self.tls = tls
        self.path = check_path(path)
        if not isinstance(host, str) or not host.strip() or any(c.isspace() for c in host):
            raise ValueError(f"host must be a host name or IP address, got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port must be an integer in 1-65535, got {port!r}")
        problem = weight_problem(weight)
        if problem is not None:
            raise ValueError(f"weight: {problem}")
        problem = host_problem(host)
        if problem is not None:
            raise ValueError(f"host: {problem}")
        self.host = host
        self.port = port
        self.weight = weight
        self.node_name = check_node_name(
            str(Address(host, port)) if node_name is None else node_name)
        if metadata is not None:
            if not isinstance(metadata, Mapping) or not all(isinstance(k, str)
                                                            for k in metadata):
                raise ValueError(f"metadata must be a dict with string keys, got {metadata!r}")
            reserved = sorted(_RESERVED_KEYS.intersection(metadata))
            if reserved:
                raise ValueError(f"metadata cannot set {', '.join(reserved)}")
        try:
            extra = dict(metadata or {})
            if tls:
                extra["tls"] = True  # pools refuse to send plaintext to this instance
            self.data: bytes = encode_record(host, port, weight, extra)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata must be JSON-serializable: {exc}") from None
        self.node_path = self.path.rstrip("/") + "/" + self.node_name
        self._auth_data = check_auth_data(auth_data)
        self._acl = check_acl(acl)
        self.session_timeout = check_seconds("session_timeout", session_timeout)
        self._reconnect_max_delay = check_seconds("reconnect_max_delay", reconnect_max_delay)
        self._kazoo_options = check_kazoo_options(kazoo_options)
        self._state_lock = _compat.Lock()  # start/stop transitions
        self._lock = _compat.Lock()        # the flags shared with kazoo callbacks
        self._wake = _compat.Event()
        self._registered_event = _compat.Event()
        self._client: Optional[KazooClient] = None
        self._worker: Optional[threading.Thread] = None
        self._running = False
        self._stopping = False
        self._connected = False
        self._registered = False
        self._conflict: Optional[int] = None
        self._conflict_logged: Optional[int] = None
        self._sessions: Set[int] = set()   # every session id our clients have held
        self._path_checked: Optional[int] = None
        self._acl_warned = False
        self._node_deleted = False
        # Runs the worker; its client_closed flag (kazoo gave up: restart it) is
        # guarded by self._lock too.
        self._supervisor = ClientSupervisor(
            logger, self._wake, self._lock, self._state_lock, lambda: self._stopping,
            self._register, self._register_failed, back_off_after_restart=True)
        self.registrations = 0             # nodes created, in all (for inspection)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> bool:
        """Connect and register; keep the node registered in the background from now on.

        Waits up to ``timeout`` seconds for the node to be in place.  If ZooKeeper cannot
        be reached in that time, it logs a warning and returns ``False``: registration
        goes on in the background (see :meth:`wait_registered`).  With ``timeout=0`` it
        returns at once.

        :param timeout: seconds to wait for the node (include the session timeout, so
            that a node left by a crashed predecessor can expire meanwhile).
        :returns: whether the node is registered.
        :raises RegistrationConflict: after ``timeout``, the node still belongs to
            another session (the registration is then stopped).
        :raises RuntimeError: the registration is already started.
        :raises ValueError: ``timeout`` is negative.
        """
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) \
                or not timeout >= 0:
            raise ValueError(f"timeout must be >= 0 seconds, got {timeout!r}")
        with self._state_lock:
            if self._running:
                raise RuntimeError(f"{self!r} is already started")
            client = make_client(self.hosts, self.session_timeout, self._auth_data,
                                 self._reconnect_max_delay, self._kazoo_options)
            client.add_listener(self._on_state)
            with self._lock:
                self._connected = False
                self._registered = False
                self._conflict = None
                self._node_deleted = False
                self._supervisor.client_closed = False
            self._registered_event.clear()
            self._path_checked = None
            self._client = client
            self._running = True
            self._stopping = False
            self._wake.clear()
            self._worker = _compat.spawn(
                self._supervisor.run, f"thriftpool-registration-{self.node_name}", client,
                f"registration {self.node_path}", _SUPERVISE_INTERVAL)
        try:
            client.start_async()  # never start(timeout): it closes the client on timeout
        except BaseException:
            self.stop()
            raise
        if timeout == 0:
            return self._registered
        if self._registered_event.wait(timeout):
            return True
        owner = self._conflict
        if owner is not None:
            self.stop()
            raise RegistrationConflict(
                f"cannot register {self.node_path}: the node belongs to {_owner_text(owner)}",
                path=self.node_path, owner=owner)
        logger.warning("registration %s: not registered within %.1fs (is ZooKeeper at %s "
                       "reachable?); still trying in the background", self.node_path,
                       timeout, self.hosts)
        return False

    def wait_registered(self, timeout: Optional[float] = None) -> bool:
        """Wait until the node is registered; ``None`` waits forever.

        :returns: whether it is registered.
        """
        return bool(self._registered_event.wait(timeout))

    def stop(self, timeout: float = 5.0) -> None:
        """Delete the node at once, then close the session; idempotent.

        Clients watching the path drop the instance as soon as the node is gone.  If
        ZooKeeper is unreachable the node cannot be deleted now; it disappears when the
        server expires the session (within ``session_timeout``).

        :param timeout: seconds to wait in all, for the worker, the deletion and the
            close (a close still blocked by a connection attempt finishes in the
            background).
        """
        with self._state_lock:
            if not self._running or self._stopping:
                return
            self._stopping = True
            client, worker = self._client, self._worker
        self._wake.set()
        deadline = _compat.monotonic() + timeout

        def remaining() -> float:
            return max(0.1, deadline - _compat.monotonic())

        # Let the worker finish first: a create it sent after our delete would bring the
        # node back (until the session closes just below).
        if worker is not None and worker is not threading.current_thread():
            worker.join(remaining())
        deleted = False
        if client is not None:
            client.remove_listener(self._on_state)
            deleted = self._delete_own_node(client, remaining)
            close_client(client, f"thriftpool-registration-{self.node_name}-close",
                         remaining())
        if worker is not None and worker is not threading.current_thread():
            worker.join(remaining())  # at once: a pending call failed with the close
            if worker.is_alive():
                logger.warning("%s did not stop within %.1fs", worker.name, timeout)
        with self._lock:
            was_registered = self._registered
            self._registered = False
            self._connected = False
        self._registered_event.clear()
        with self._state_lock:
            self._running = False
            self._client = None
            self._worker = None
        if deleted:
            logger.info("registration %s: deregistered", self.node_path)
        elif was_registered:
            logger.warning("registration %s: could not delete the node; it goes when "
                           "ZooKeeper expires the session (within %.0fs)", self.node_path,
                           self.session_timeout)

    def _delete_own_node(self, client: KazooClient, remaining: Callable[[], float]) -> bool:
        if not client.connected:
            return False
        client_id = client.client_id
        try:
            _data, stat = client.get_async(self.node_path).get(timeout=remaining())
            if client_id is None or stat.owner_session_id != client_id[0]:
                return False  # not ours: leave it alone
            client.delete_async(self.node_path, version=stat.version) \
                .get(timeout=remaining())
            return True
        except NoNodeError:
            return False
        except Exception as exc:
            logger.debug("registration %s: delete failed: %s", self.node_path, exc)
            return False

    def __enter__(self) -> "ServiceRegistration":
        self.start()
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.stop()

    # -- inspection --------------------------------------------------------------------

    @property
    def registered(self) -> bool:
        """The node is in place, as of the last word from ZooKeeper."""
        return self._registered

    @property
    def conflict(self) -> Optional[int]:
        """While another session holds the node: its session id (0 for a persistent
        node); else ``None``."""
        return self._conflict

    @property
    def running(self) -> bool:
        """Started and not stopped."""
        return self._running and not self._stopping

    @property
    def client(self) -> Optional[KazooClient]:
        """The kazoo client while started (for inspection; do not stop it), else ``None``."""
        return self._client

    @property
    def session_id(self) -> Optional[int]:
        """The current ZooKeeper session id, while connected."""
        client = self._client
        client_id = client.client_id if client is not None else None
        return client_id[0] if client_id else None

    def __repr__(self) -> str:
        state = ("registered" if self._registered else
                 "conflict" if self._conflict is not None else
                 "running" if self.running else "stopped")
        return f"<ServiceRegistration {self.hosts}{self.node_path} {state}>"

    # -- kazoo callbacks: record and wake, never block ----------------------------------

    def _on_state(self, state: str) -> None:
        if state == KazooState.CONNECTED:
            with self._lock:
                self._connected = True
            self._wake.set()
        elif state == KazooState.SUSPENDED:
            with self._lock:
                self._connected = False
            logger.warning("registration %s: lost the ZooKeeper connection; the node stays "
                           "while the session lives", self.node_path)
        else:  # LOST: the session expired or was closed, and the node with it
            closed = client_gave_up(self._client)
            with self._lock:
                self._connected = False
                self._registered = False
                self._supervisor.client_closed = closed
            self._registered_event.clear()
            if not self._stopping:
                logger.warning("registration %s: ZooKeeper session lost; registering again "
                               "when a new session is established", self.node_path)
            if closed:
                self._wake.set()  # the worker restarts the client

    def _on_node(self, event: WatchedEvent) -> None:
        if event.type == EventType.NONE:
            return
        if event.type == EventType.DELETED:
            with self._lock:
                self._node_deleted = True
        self._wake.set()

    # -- the worker --------------------------------------------------------------------

    def _register(self, client: KazooClient) -> Optional[float]:
        """Put our node in place, or watch the conflicting one.  Runs on the worker only.

        :returns: seconds until the next attempt, or ``None`` to wait for a callback.
        """
        with self._lock:
            if not self._connected:
                return None
            deleted, self._node_deleted = self._node_deleted, False
        client_id = client.client_id
        if client_id is None:
            return None  # disconnected meanwhile; CONNECTED wakes us
        session = client_id[0]
        self._sessions.add(session)
        timeout = self.session_timeout
        if self._path_checked != session:
            self._ensure_service_path(client, timeout)
            self._check_path_acl(client, timeout)
            self._path_checked = session
        if deleted and self._registered and not self._stopping:
            logger.warning("registration %s: the node was deleted by another client; "
                           "registering again", self.node_path)
        for _attempt in range(5):
            if self._stopping:
                return None
            created = False
            try:
                # Not makepath: kazoo would give the missing parents our ACL.
                client.create_async(self.node_path, self.data, acl=self._acl,
                                    ephemeral=True).get(timeout=timeout)
                created = True
                self.registrations += 1
            except NoNodeError:
                # Someone deleted the service path since we made sure of it.
                self._ensure_service_path(client, timeout)
                continue
            except NodeExistsError:
                try:
                    data, stat = client.get_async(self.node_path).get(timeout=timeout)
                except NoNodeError:
                    continue
                owner = stat.owner_session_id or 0
                if owner == session:
                    # Ours: a create retried after a lost reply, or a check after a
                    # reconnect.  Keep it, with our data.
                    if data != self.data:
                        client.set_async(self.node_path, self.data, version=stat.version) \
                            .get(timeout=timeout)
                elif owner in self._sessions:
                    logger.info("registration %s: replacing the node left by our expired "
                                "session 0x%x", self.node_path, owner)
                    try:
                        client.delete_async(self.node_path, version=stat.version) \
                            .get(timeout=timeout)
                    except (NoNodeError, BadVersionError):
                        pass
                    continue
                else:
                    self._report_conflict(owner)
                    if client.exists_async(self.node_path, watch=self._on_node) \
                            .get(timeout=timeout) is None:
                        continue  # it went away meanwhile: try again now
                    return None  # the watch wakes us when it goes
            # Watch our node, so that a deletion by someone else is repaired.
            stat = client.exists_async(self.node_path, watch=self._on_node) \
                .get(timeout=timeout)
            if stat is None or stat.owner_session_id != session:
                continue
            self._mark_registered(session, created)
            return None
        return RETRY_INITIAL  # it kept changing under us; look again shortly

    def _register_failed(self, exc: Exception, problem: str, quiet: bool,
                         retry: float) -> None:
        if quiet:
            logger.debug("registration %s: %s; retrying in %.1fs", self.node_path, problem,
                         retry)
        elif isinstance(exc, NoAuthError):
            logger.error("registration %s: not allowed to create the node (check auth_data "
                         "and the ACL of %s); retrying", self.node_path, self.path)
        else:
            logger.exception("registration %s failed; retrying", self.node_path)

    def _mark_registered(self, session: int, created: bool) -> None:
        with self._lock:
            if self._stopping or not self._connected:
                return
            had_conflict = self._conflict is not None
            self._registered = True
            self._conflict = None
        self._conflict_logged = None
        self._registered_event.set()
        if created:
            logger.info("registration %s: registered (session 0x%x)%s", self.node_path,
                        session, " after the conflicting node went away" if had_conflict
                        else "")

    def _report_conflict(self, owner: int) -> None:
        with self._lock:
            self._registered = False
            self._conflict = owner
        self._registered_event.clear()
        if self._conflict_logged != owner:
            self._conflict_logged = owner
            logger.error("registration %s: the node already exists and belongs to %s; "
                         "not overwriting it (is another server registered under this "
                         "name?); taking it over when it goes away", self.node_path,
                         _owner_text(owner))

    def _ensure_service_path(self, client: KazooClient, timeout: float) -> None:
        """Create ``path`` with our ACL if missing, and its missing parents with the
        open ACL: they are shared with other services (see the ``acl`` option)."""
        if self.path == "/":
            return
        if client.exists_async(self.path).get(timeout=timeout) is not None:
            return
        parent = self.path.rsplit("/", 1)[0] or "/"
        if parent != "/":
            client.ensure_path_async(parent).get(timeout=timeout)
        try:
            client.create_async(self.path, b"", acl=self._acl).get(timeout=timeout)
        except NodeExistsError:
            pass  # another instance of the service made it meanwhile

    def _check_path_acl(self, client: KazooClient, timeout: float) -> None:
        if self._acl is None or self._acl_warned:
            return
        try:
            acls, _stat = client.get_acls_async(self.path).get(timeout=timeout)
        except NoAuthError:
            return
        if set(acls) != set(self._acl):
            self._acl_warned = True
            logger.warning("registration %s: %s already exists with ACL %s, not the requested "
                           "%s; whoever that ACL allows can create or delete instances "
                           "there", self.node_path, self.path, list(acls), self._acl)


# -- serving -------------------------------------------------------------------------------

class _Processor(TProcessor):
    """thriftpy2's processor, except that an undeclared exception from the handler is
    logged and answered with ``TApplicationException(INTERNAL_ERROR)`` instead of
    killing the connection (a pool would have to reconnect)."""

    def process(self, iprot: Any, oprot: Any) -> None:
        api, seqid, result, call = self.process_in(iprot)
        if isinstance(result, TApplicationException):
            return self.send_exception(oprot, api, result, seqid)
        assert call is not None
        try:
            result.success = call()
        except TApplicationException as exc:
            return self.send_exception(oprot, api, exc, seqid)
        except Exception as exc:
            if not self.handle_exception(exc, result):
                logger.exception("handler of %s() raised an undeclared exception", api)
                if result.oneway:
                    return None
                return self.send_exception(oprot, api, TApplicationException(
                    TApplicationException.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}"),
                    seqid)
        if not result.oneway:
            self.send_result(oprot, api, result, seqid)
        return None


def _factory(value: Any, table: Dict[str, Any], option: str, method: str) -> Any:
    if isinstance(value, str):
        try:
            return table[value]()
        except KeyError:
            raise ValueError(f"{option} must be one of {', '.join(table)} or a factory, "
                             f"got {value!r}") from None
    if not hasattr(value, method):
        raise ValueError(f"{option} must be one of {', '.join(table)} or a factory with "
                         f"{method}(), got {value!r}")
    return value


_WILDCARDS = ("", "0.0.0.0", "::")


def _is_apache_processor(obj: Any) -> bool:
    """An Apache Thrift processor (``Echo.Processor(handler)``), told without importing
    ``thrift`` when it is not loaded."""
    return callable(getattr(obj, "process", None)) and isinstance(
        getattr(obj, "_processMap", None), dict)


class RegisteredServer:
    """Serve a Thrift service on a TCP port, registered in ZooKeeper while it serves.

    ::

        server = thriftpool.RegisteredServer(echo.Echo, Handler(), "10.0.0.5", 9090,
                                             hosts="zk1:2181,zk2:2181", path="/services/echo")
        server.start()      # listen, then register
        ...
        server.stop()       # deregister, drain, stop accepting, close connections

    :meth:`start` listens first and registers second, so nobody is sent to a port that
    does not accept yet.  :meth:`stop` deregisters first; pools drop the instance, close
    their idle connections to it at once and in-use ones at checkin, while the server
    still serves; after that drain (``drain_timeout`` at most) it stops accepting and
    closes the connections left.  Each connection gets a daemon thread; connections are
    not timed out while idle (pools keep them open on purpose).  The accept loop waits
    on a ``selectors`` selector (epoll on Linux), so it serves with descriptors above
    1023; should it ever die of an unexpected error, it logs the error and deregisters,
    so pools stop routing to a server that no longer accepts.

    The service may be written for either stack: a thriftpy2 service and its handler,
    an Apache Thrift module generated by ``thrift --gen py`` and its handler (served by
    the module's ``Processor``), or an Apache processor itself with ``handler=None``
    (``RegisteredServer(Echo.Processor(handler), None, ...)``, a
    ``TMultiplexedProcessor`` too).  Either way it registers and drains the same.

    :param service: the thriftpy2 service (``thriftpy2.load("echo.thrift").Echo``), an
        Apache generated service module (``from echo import Echo``), or an Apache
        processor.
    :param handler: the object implementing the service's methods (``None`` when
        ``service`` is a processor).
    :param host: the address to listen on (loopback by default).
    :param port: the port to listen on; 0 picks a free one (see :attr:`port`).
    :param hosts: the ZooKeeper ensemble (required, keyword).
    :param path: the service path to register under (required, keyword).
    :param advertise_host: the host to register, when clients must use another address
        than ``host`` (required when ``host`` is a wildcard such as ``"0.0.0.0"``).
    :param weight: see :class:`ServiceRegistration`; so are ``auth_data``, ``acl``,
        ``node_name``, ``metadata``, ``session_timeout``, ``reconnect_max_delay`` and
        ``kazoo_options``.
    :param transport: ``"buffered"`` or ``"framed"``, or a transport factory of the
        service's stack.
    :param protocol: ``"binary"`` or ``"compact"``, or a protocol factory of the
        service's stack; for an Apache service also ``"header"`` (THeader, which also
        answers framed and unframed binary and compact clients in their own dialect).
    :param drain_timeout: seconds :meth:`stop` keeps serving after deregistering while
        clients still hold connections.
    :param register_timeout: seconds :meth:`start` waits for the registration (see
        :meth:`ServiceRegistration.start`); the server serves either way.
    :param backlog: the listen backlog.
    :raises ValueError: naming the option, when an option is invalid.
    """

    def __init__(
        self,
        service: Any,
        handler: Any = None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        hosts: HostsLike,
        path: str,
        advertise_host: Optional[str] = None,
        weight: int = 1,
        auth_data: Optional[AuthData] = None,
        acl: Optional[Sequence[Any]] = None,
        node_name: Optional[str] = None,
        metadata: Optional[Mapping[str, Any]] = None,
        session_timeout: float = 10.0,
        reconnect_max_delay: float = 2.0,
        kazoo_options: Optional[Mapping[str, Any]] = None,
        transport: Any = "buffered",
        protocol: Any = "binary",
        drain_timeout: float = 5.0,
        register_timeout: float = 15.0,
        backlog: int = 128,
    ) -> None:
        processor: Any = None
        if _is_apache_processor(service):
            if handler is not None:
                raise ValueError(f"handler must be None when service is a processor, "
                                 f"got {handler!r}")
            processor = service
        elif is_apache_module(service):
            if handler is None:
                raise ValueError("handler is required")
            processor = service.Processor(handler)
        elif not hasattr(service, "thrift_services"):
            raise ValueError(f"service must be a thriftpy2 service, an Apache Thrift "
                             f"service module or processor, got {service!r}")
        elif handler is None:
            raise ValueError("handler is required")
        if not isinstance(host, str):
            raise ValueError(f"host must be an address to listen on, got {host!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
            raise ValueError(f"port must be an integer in 0-65535, got {port!r}")
        if advertise_host is None:
            if host in _WILDCARDS:
                raise ValueError(f"advertise_host is required when host is {host!r}")
            advertise_host = host
        for name, value in (("drain_timeout", drain_timeout),
                            ("register_timeout", register_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not value >= 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
        if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 1:
            raise ValueError(f"backlog must be an integer >= 1, got {backlog!r}")
        self.service = service
        self.handler = handler
        self.host = host
        self.port = port
        self.advertise_host = advertise_host
        self._apache: Any = None
        if processor is not None:
            from .apache import ServerSide  # the Apache stack (optional package)

            self._apache = ServerSide(processor, transport, protocol)
        else:
            self._transport = _factory(transport, TRANSPORTS, "transport", "get_transport")
            self._protocol = _factory(protocol, PROTOCOLS, "protocol", "get_protocol")
        self.drain_timeout = float(drain_timeout)
        self.register_timeout = float(register_timeout)
        self._backlog = backlog
        self._registration_options: Dict[str, Any] = dict(
            hosts=hosts, path=path, weight=weight, auth_data=auth_data, acl=acl,
            node_name=node_name, metadata=metadata, session_timeout=session_timeout,
            reconnect_max_delay=reconnect_max_delay, kazoo_options=kazoo_options)
        # Checks every registration option now (no I/O); the real one is made at start,
        # when the port is known.
        ServiceRegistration(host=advertise_host, port=port or 1, **self._registration_options)
        self.registration: Optional[ServiceRegistration] = None
        self._processor = _Processor(service, handler) if processor is None else None
        self._state_lock = _compat.Lock()
        self._lock = _compat.Lock()  # guards _conns
        self._conns: Dict[socket.socket, threading.Thread] = {}
        self._listener: Optional[socket.socket] = None
        self._wake_r: Optional[socket.socket] = None
        self._wake_w: Optional[socket.socket] = None
        self._accept_thread: Optional[threading.Thread] = None
        self._running = False
        self._closing = False
        self._stopped = _compat.Event()
        self.accepted = 0
        #: The error that ended the accept loop, if one did (the server deregistered).
        self.accept_error: Optional[BaseException] = None

    @property
    def address(self) -> str:
        """``"host:port"`` as registered (after :meth:`start`)."""
        return str(Address(self.advertise_host, self.port))

    @property
    def open_connections(self) -> int:
        """Client connections open now."""
        with self._lock:
            return len(self._conns)

    def start(self) -> "RegisteredServer":
        """Listen, start accepting, then register (waiting up to ``register_timeout``).

        :raises OSError: the address cannot be bound.
        :raises RegistrationConflict: another session holds the node (the server is
            stopped again).
        :raises RuntimeError: already started.
        """
        with self._state_lock:
            if self._running:
                raise RuntimeError(f"{self!r} is already started")
            family, _, _, _, sockaddr = socket.getaddrinfo(
                self.host or None, self.port, type=socket.SOCK_STREAM,
                flags=socket.AI_PASSIVE)[0]
            listener = socket.socket(family, socket.SOCK_STREAM)
            try:
                listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                listener.bind(sockaddr)
                listener.listen(self._backlog)
                listener.setblocking(False)
            except BaseException:
                listener.close()
                raise
            self.port = listener.getsockname()[1]
            self._listener = listener
            self._wake_r, self._wake_w = socket.socketpair()
            self._closing = False
            self._stopped.clear()
            self._running = True
            self._accept_thread = _compat.spawn(
                self._accept_loop, f"thriftpool-server-{self.address}")
            self.registration = ServiceRegistration(
                host=self.advertise_host, port=self.port, **self._registration_options)
        logger.info("serving %s on %s", self._service_name(), self.address)
        try:
            self.registration.start(timeout=self.register_timeout)
        except BaseException:
            self.stop(drain_timeout=0)
            raise
        return self

    def stop(self, drain_timeout: Optional[float] = None) -> None:
        """Deregister, keep serving while clients still hold connections (up to
        ``drain_timeout``, default the constructor's), then stop accepting and close the
        connections left.  Idempotent."""
        with self._state_lock:
            if not self._running or self._closing:
                return
            self._closing = True
            registration = self.registration
        drain = self.drain_timeout if drain_timeout is None else drain_timeout
        if registration is not None:
            registration.stop()
        deadline = _compat.monotonic() + drain
        while self.open_connections and _compat.monotonic() < deadline:
            self._stopped.wait(0.02)
        # Now stop accepting.
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        thread = self._accept_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        with self._lock:
            conns = list(self._conns.items())
        if conns:
            logger.info("server %s: closing %d connections still open after the drain",
                        self.address, len(conns))
        for sock, _thread in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in recv
            except OSError:
                pass
        for _sock, conn_thread in conns:
            if conn_thread is not threading.current_thread():
                conn_thread.join(2.0)
        for own in (self._listener, self._wake_r, self._wake_w):
            if own is not None:
                own.close()
        with self._state_lock:
            self._listener = self._wake_r = self._wake_w = None
            self._running = False
        self._stopped.set()
        logger.info("server %s stopped", self.address)

    def serve_forever(self) -> None:
        """:meth:`start` if needed, then block until :meth:`stop` is called."""
        if not self._running:
            self.start()
        while not self._stopped.wait(0.5):
            pass

    def __enter__(self) -> "RegisteredServer":
        return self.start()

    def __exit__(self, exc_type: Optional[Type[BaseException]],
                 exc: Optional[BaseException], tb: Optional[TracebackType]) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "serving" if self._running and not self._closing else "stopped"
        return f"<RegisteredServer {self.address} {state} open={self.open_connections}>"

    # -- threads -------------------------------------------------------------------------

    def _service_name(self) -> str:
        if self._apache is not None:
            return str(self._apache.name)
        return getattr(self.service, "__name__", "thrift")

    def _accept_loop(self) -> None:
        try:
            self._accept_until_stopped()
        except BaseException as exc:
            if self._closing:
                return  # stop() closed the sockets under the loop
            self.accept_error = exc
            logger.exception("server %s: the accept loop died; deregistering so pools "
                             "stop routing to a server that no longer accepts",
                             self.address)
            registration = self.registration
            if registration is not None:
                try:
                    registration.stop()
                except Exception:
                    logger.exception("server %s: deregistering failed", self.address)

    def _accept_until_stopped(self) -> None:
        listener, wake = self._listener, self._wake_r
        assert listener is not None and wake is not None
        # A selector, not select.select(): that fails for descriptors above 1023, which
        # a busy server process reaches.  Looked up now, so gevent's patch applies.
        selector = selectors.DefaultSelector()
        try:
            selector.register(listener, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is wake:
                        return  # stop() is done draining
                self._accept_one(listener)
        finally:
            selector.close()

    def _accept_one(self, listener: socket.socket) -> None:
        try:
            sock, _peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            logger.warning("server %s: accept failed: %s", self.address, exc)
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of descriptors or memory: the listener stays readable, so pause
                # instead of spinning (stop() still wakes the loop at the next pass).
                self._stopped.wait(0.1)
            return
        sock.setblocking(True)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self.accepted += 1
            thread = threading.Thread(
                target=self._serve_connection, args=(sock,), daemon=True,
                name=f"thriftpool-server-{self.port}-conn-{self.accepted}")
            self._conns[sock] = thread
        thread.start()

    def _serve_connection(self, sock: socket.socket) -> None:
        try:
            if self._apache is not None:
                self._apache.serve(sock, self.address)
                return
            trans = self._transport.get_transport(TSocket(sock=sock))  # type: ignore[no-untyped-call]
            prot = self._protocol.get_protocol(trans)
            assert self._processor is not None
            while True:
                self._processor.process(prot, prot)
        except (TTransportException, OSError):
            pass  # the client hung up, or stop() closed the connection
        except Exception as exc:
            logger.warning("server %s: dropping a connection after %s: %s", self.address,
                           type(exc).__name__, exc)
        finally:
            with self._lock:
                self._conns.pop(sock, None)
            try:
                sock.close()
            except OSError:
                pass


def serve(service: Any, handler: Any = None, host: str = "127.0.0.1", port: int = 0,
          **options: Any) -> None:
    """Serve ``service`` and keep it registered in ZooKeeper until SIGINT or SIGTERM.

    ``service`` and ``handler`` are as for :class:`RegisteredServer`: a thriftpy2
    service, an Apache Thrift service module, or an Apache processor (``handler=None``).
    Then deregister, drain and stop (see :class:`RegisteredServer`, which takes the same
    options: ``hosts=`` and ``path=`` are required).  Signal handlers are installed only
    when called from the main thread, and restored on return.

    :raises ValueError: naming the option, when an option is invalid.
    """
    server = RegisteredServer(service, handler, host, port, **options)
    done = _compat.Event()
    previous: Dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: done.set())
    try:
        server.start()
        while not done.wait(0.5):
            pass
    finally:
        server.stop()
        for signum, handler_ in previous.items():
            signal.signal(signum, handler_)
