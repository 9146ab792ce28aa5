"""Discovery from ZooKeeper: follow the children of a service path.

Every live instance of a service is a child node of one path (normally an ephemeral
node written by :class:`~thriftpool.ServiceRegistration`).  A :class:`ZooKeeperDiscovery`
watches that path with its own kazoo client and hands the pool a full snapshot each time
the set of usable children changes; the pool applies it as a diff.

Threads: kazoo runs its connection and callback threads; the watch and state callbacks
only record what changed and wake one named daemon worker,
``thriftpool-<pool>-zookeeper``, which does every read and calls the pool's listener.
So a slow read never stalls kazoo's callback queue, and snapshots reach the pool in
order, one at a time, with no lock held.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError, NoNodeError
from kazoo.protocol.states import EventType, KazooState, WatchedEvent

from .. import _compat
from .._zookeeper import (
    AuthData,
    ClientSupervisor,
    HostsLike,
    check_acl,
    check_auth_data,
    check_hosts,
    check_kazoo_options,
    check_path,
    check_seconds,
    client_gave_up,
    close_client,
    make_client,
    parse_record,
)
from ..address import Endpoint
from ._delivery import (
    EndpointFilter,
    Publisher,
    check_filter,
    check_fraction,
    check_snapshot_path,
)
from .base import Discovery, DiscoveryListener

__all__ = ["ZooKeeperDiscovery"]

logger = logging.getLogger(__name__)

#: How often an idle worker checks that kazoo is still trying to connect.
_SUPERVISE_INTERVAL = 5.0

#: Stands for the data of a child that may not be read, in the warned-about map.
_UNREADABLE = b"\x00unreadable"


def _digest(data: Optional[bytes]) -> bytes:
    # The warned-about map keeps a digest, not the data: a node may hold a megabyte.
    return hashlib.sha1(data or b"").digest()


class ZooKeeperDiscovery(Discovery):
    """Follow the instances registered under ``path`` in ZooKeeper.

    ::

        pool = thriftpool.ThriftPool(echo.Echo, discovery=thriftpool.ZooKeeperDiscovery(
            hosts="zk1:2181,zk2:2181,zk3:2181", path="/services/echo"))

    Each child of ``path`` is one instance.  Its format is detected per node:
    thriftpool's JSON ``{"host": str, "port": int, "weight": int, "tls": bool}`` (weight
    optional), a Finagle/Aurora ServerSet member (``serviceEndpoint``,
    ``additionalEndpoints``, ``shard``, ``status``: only ``ALIVE`` members serve), an
    Apache Curator ``ServiceInstance`` (``address`` and ``port``, or ``sslPort`` meaning
    TLS; point ``path`` at Curator's ``<base>/<service>``), or a ``host:port`` node name.
    What the record says besides the address is the endpoint's ``metadata`` (with
    ``"format"``), which ``filter`` can select on.  A child that is unusable (no valid
    host, a port outside 1-65535, a weight that is not an integer in 1..1,000,000, data
    that is not JSON...) is skipped, with one warning per child naming its node (not one
    per change); the other children still serve.  Each child is read once and then
    cached until ZooKeeper reports that it changed, so a path with thousands of children
    costs one read per changed child.

    Behaviour:

    - :meth:`start` never blocks on the network: the kazoo client connects in the
      background, and the pool has no instances until the first read succeeds.
    - A missing ``path`` is not created (unless ``create_path=True``): it is watched,
      reads as an empty list until someone creates it, and then its children are
      followed.  So a typo in ``path`` cannot leave a world-writable node behind.
    - While ZooKeeper is unreachable, or the session is suspended or lost, nothing is
      delivered and the pool keeps serving its last list (fail static).  Kazoo
      reconnects by itself (to any server of ``hosts``), with a new session if the old
      one expired; then the children and their data are read again in full and every
      watch is set again, and the pool gets the new list if it differs.
    - Only a successful read that finds no usable child empties the pool; then checkouts
      raise :class:`~thriftpool.NoAvailableInstance`.  A read that would remove more than
      ``max_drop_fraction`` of the known instances at once (a registry bug, a deleted
      parent) is held back until a read ``drop_confirm_delay`` seconds later confirms it
      (its additions apply at once); removing one instance (a deregistration) is never
      held.  Holds and confirmations are logged as warnings and counted in
      :meth:`stats`.
    - With ``snapshot_path``, each list delivered to the pool is saved there atomically
      (a temporary file renamed over the old one, mode 0600).  When the first read has
      not succeeded ``connect_timeout`` seconds after :meth:`start` (ZooKeeper down at a
      cold start), the saved list is served (``stats()["source"] == "snapshot"``, its age
      logged) until the first successful read replaces it.  A missing, corrupt or
      foreign snapshot (written for another path) is ignored with a warning.

    :param hosts: the ZooKeeper ensemble, ``"host:port,host:port[/chroot]"`` or a list of
        ``"host:port"``; a server without a port uses 2181.
    :param path: the service path whose children are the instances.
    :param auth_data: credentials sent on every connection, e.g.
        ``[("digest", "user:password")]``; needed when the path is not world-readable.
    :param acl: kazoo ACL objects for ``path`` and its parents when discovery creates
        them (``create_path=True``; default: kazoo's ``OPEN_ACL_UNSAFE``).
    :param create_path: create ``path`` (and its parents) when it is missing; default
        ``False``: wait for a registration to create it.
    :param endpoint: for ServerSet members, the name of the ``additionalEndpoints`` entry
        to connect to instead of ``serviceEndpoint`` (a member without it is skipped
        with a warning); other formats ignore it.
    :param filter: a callable of each :class:`~thriftpool.Endpoint`, returning whether
        the pool uses it, e.g. ``lambda e: e.metadata.get("shard") == 3``.  One that
        raises leaves that instance out (logged).
    :param snapshot_path: a file that keeps the last delivered list (see above);
        default ``None``: no snapshot.
    :param connect_timeout: seconds after :meth:`start` to wait for the first successful
        read before serving the snapshot.
    :param max_drop_fraction: the largest share of the known instances one read may
        remove at once without a confirmation, in 0..1; ``None`` or ``1`` turns the
        protection off.
    :param drop_confirm_delay: seconds between the read that was held back and the
        read that confirms it.
    :param session_timeout: the ZooKeeper session timeout, in seconds (the server clamps
        it to between 2 and 20 ticks).
    :param reconnect_max_delay: the longest wait, in seconds, between attempts to reach
        ZooKeeper; attempts start at 50 ms and double up to this.
    :param kazoo_options: more ``KazooClient`` arguments (``use_ssl``, ``ca``,
        ``certfile``, ``keyfile``, ``read_only``, ``randomize_hosts``,
        ``connection_retry``, ``sasl_options``, ...); ``hosts``, ``timeout``, ``handler``
        and ``auth_data`` are set by thriftpool.
    :raises ValueError: naming the option, when an option is invalid.
    """

    def __init__(
        self,
        hosts: HostsLike,
        path: str,
        *,
        auth_data: Optional[AuthData] = None,
        acl: Optional[Sequence[Any]] = None,
        create_path: bool = False,
        session_timeout: float = 10.0,
        reconnect_max_delay: float = 2.0,
        kazoo_options: Optional[Mapping[str, Any]] = None,
        endpoint: Optional[str] = None,
        filter: Optional[EndpointFilter] = None,  # noqa: A002 - the documented name
        snapshot_path: Optional[str] = None,
        connect_timeout: float = 1.0,
        max_drop_fraction: Optional[float] = 0.5,
        drop_confirm_delay: float = 5.0,
    ) -> None:
        self.hosts = check_hosts(hosts)
        self.path = check_path(path)
        self._auth_data = check_auth_data(auth_data)
        self._acl = check_acl(acl)
        if not isinstance(create_path, bool):
            raise ValueError(f"create_path must be True or False, got {create_path!r}")
        self._create_path = create_path
        self.session_timeout = check_seconds("session_timeout", session_timeout)
        self._reconnect_max_delay = check_seconds("reconnect_max_delay", reconnect_max_delay)
        self._kazoo_options = check_kazoo_options(kazoo_options)
        if endpoint is not None and (not isinstance(endpoint, str) or not endpoint):
            raise ValueError(f"endpoint must be the name of a ServerSet additional "
                             f"endpoint, got {endpoint!r}")
        self.endpoint = endpoint
        self._prefix = self.path.rstrip("/") + "/"
        chroot = self.hosts.partition("/")[2]
        self._publisher = Publisher(
            "zookeeper", f"zookeeper:{'/' + chroot if chroot else ''}{self.path}",
            snapshot_path=check_snapshot_path(snapshot_path),
            connect_timeout=check_seconds("connect_timeout", connect_timeout),
            max_drop_fraction=check_fraction(max_drop_fraction),
            drop_confirm_delay=check_seconds("drop_confirm_delay", drop_confirm_delay),
            endpoint_filter=check_filter(filter))
        self._init_state()

    def _init_state(self) -> None:
        # Built here and again after fork(): a lock held by a thread that does not exist
        # in the child would never be released.
        self._state_lock = _compat.Lock()  # start/stop transitions
        self._lock = _compat.Lock()        # the flags below, shared with kazoo callbacks
        self._wake = _compat.Event()
        self._client: Optional[KazooClient] = None
        self._worker: Optional[threading.Thread] = None
        self._listener: Optional[DiscoveryListener] = None
        self._pool_name = ""
        self._running = False
        self._stopping = False
        # Set by callbacks, consumed by the worker under self._lock.
        self._connected = False
        self._resync = True               # read everything again (watches are gone)
        self._stale: Set[str] = set()     # children whose data changed
        self._path_ready = False          # path known to exist in this session
        # Runs the worker; its client_closed flag (kazoo gave up: restart it) is
        # guarded by self._lock too.
        self._supervisor = ClientSupervisor(
            logger, self._wake, self._lock, self._state_lock, lambda: self._stopping,
            self._refresh, self._refresh_failed)
        # Worker-only state.
        self._cache: Dict[str, Optional[Endpoint]] = {}
        self._warned: Dict[str, bytes] = {}  # child -> digest of the data warned about
        self._children = 0
        self._reads = 0
        self._session_id: Optional[int] = None
        self._publisher.reset("", None)

    # -- Discovery interface -----------------------------------------------------------

    def start(self, listener: DiscoveryListener, pool_name: str) -> None:
        """Connect in the background and deliver snapshots to ``listener`` from then on.

        Returns at once, even when ZooKeeper is down.  Called by the pool.

        :raises RuntimeError: discovery was already started (one discovery per pool).
        """
        with self._state_lock:
            if self._running:
                raise RuntimeError(f"{self!r} is already started; use one discovery per pool")
            client = make_client(self.hosts, self.session_timeout, self._auth_data,
                                 self._reconnect_max_delay, self._kazoo_options)
            client.add_listener(self._on_state)
            with self._lock:
                self._connected = False
                self._resync = True
                self._path_ready = False
                self._supervisor.client_closed = False
                self._stale.clear()
            self._cache.clear()
            self._publisher.reset(pool_name, listener)
            self._listener = listener
            self._pool_name = pool_name
            self._client = client
            self._running = True
            self._stopping = False
            # Set, so the first pass runs now and times the snapshot fallback.
            self._wake.set()
            self._worker = _compat.spawn(self._supervisor.run,
                                         f"thriftpool-{pool_name}-zookeeper", client,
                                         f"pool {pool_name!r}", _SUPERVISE_INTERVAL)
        try:
            # Non-blocking: kazoo's start(timeout) would stop and close the client when
            # ZooKeeper is down, and a pool must come up anyway.
            client.start_async()
        except BaseException:
            self.stop()
            raise
        logger.debug("pool %r: watching %s%s", pool_name, self.hosts, self.path)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching and close the ZooKeeper session; idempotent.

        Closes the kazoo client first, which fails any read the worker is waiting on,
        then joins the worker.  Waits at most ``timeout`` in all: when kazoo is stuck in
        a connection attempt (up to ``session_timeout / len(hosts)`` against a server
        that does not answer), the close finishes on a daemon thread.

        :param timeout: seconds to wait for the client and the worker thread.
        """
        with self._state_lock:
            if not self._running or self._stopping:
                return
            self._stopping = True
            self._publisher.stopping = True
            client, worker = self._client, self._worker
        self._wake.set()
        deadline = _compat.monotonic() + timeout
        if client is not None:
            client.remove_listener(self._on_state)
            close_client(client, f"thriftpool-{self._pool_name}-zookeeper-close", timeout)
        if worker is not None and worker is not threading.current_thread():
            worker.join(max(0.0, deadline - _compat.monotonic()))
            if worker.is_alive():
                logger.warning("%s did not stop within %.1fs", worker.name, timeout)
        with self._state_lock:
            self._running = False
            self._client = None
            self._worker = None
        logger.debug("pool %r: stopped watching %s", self._pool_name, self.path)

    def after_fork(self) -> None:
        """Forget the parent's kazoo client in a forked child; :meth:`start` makes a new one.

        The inherited client must not be stopped or used: its session, sockets and
        threads belong to the parent.
        """
        self._init_state()

    # -- inspection --------------------------------------------------------------------

    @property
    def client(self) -> Optional[KazooClient]:
        """The kazoo client while started (for inspection; do not stop it), else ``None``."""
        return self._client

    @property
    def connected(self) -> bool:
        """Connected to ZooKeeper now."""
        client = self._client
        return client is not None and client.connected

    @property
    def alive(self) -> bool:
        """Its background thread runs (read by the pool's ``stats()``)."""
        worker = self._worker
        return worker is not None and worker.is_alive()

    def stats(self) -> Dict[str, Any]:
        """What discovery knows now.

        ``{"path", "connected", "session_id", "children", "reads", "source",
        "instances", "snapshots", "snapshot_path", "snapshot_age", "snapshot_writes",
        "snapshot_write_errors", "drops_held", "drops_confirmed", "holding"}``:
        ``children`` is the number of child nodes at the last read, ``reads`` counts
        child data reads, ``source`` is ``None`` before the first list, ``"snapshot"``
        while the snapshot file is served and ``"zookeeper"`` once ZooKeeper was read;
        ``instances`` is the length of the last delivered list and ``snapshots`` counts
        the lists delivered to the pool; ``snapshot_age`` is the served snapshot's age in
        seconds (else ``None``); ``drops_held`` and ``drops_confirmed`` count the large
        removals held back and confirmed, and ``holding`` lists the addresses held back
        now.
        """
        stats: Dict[str, Any] = {
            "path": self.path,
            "connected": self.connected,
            "session_id": self._session_id,
            "children": self._children,
            "reads": self._reads,
        }
        stats.update(self._publisher.stats())
        return stats

    def __repr__(self) -> str:
        return f"ZooKeeperDiscovery(hosts={self.hosts!r}, path={self.path!r})"

    # -- kazoo callbacks: record and wake, never block ----------------------------------

    def _on_state(self, state: str) -> None:
        if state == KazooState.CONNECTED:
            with self._lock:
                self._connected = True
                # kazoo drops every watch when the connection drops: read all again.
                self._resync = True
            self._wake.set()
            if self._publisher.delivered is not None:
                logger.info("pool %r: ZooKeeper connection back; reading %s again",
                            self._pool_name, self.path)
        elif state == KazooState.SUSPENDED:
            with self._lock:
                self._connected = False
            logger.warning("pool %r: lost the ZooKeeper connection; serving the last known "
                           "instances until it is back", self._pool_name)
        else:  # LOST: the session expired or was closed
            closed = client_gave_up(self._client)
            with self._lock:
                self._connected = False
                self._path_ready = False
                self._supervisor.client_closed = closed
            if not self._stopping:
                logger.warning("pool %r: ZooKeeper session lost; serving the last known "
                               "instances until a new session is established",
                               self._pool_name)
            if closed:
                self._wake.set()  # the worker restarts the client

    def _on_children(self, event: WatchedEvent) -> None:
        if event.type != EventType.NONE:
            self._wake.set()

    def _on_child_data(self, event: WatchedEvent) -> None:
        if event.type in (EventType.CHANGED, EventType.DELETED) and event.path:
            with self._lock:
                self._stale.add(event.path.rsplit("/", 1)[-1])
            self._wake.set()

    def _on_path(self, event: WatchedEvent) -> None:
        if event.type != EventType.NONE:
            with self._lock:
                self._path_ready = False
            self._wake.set()

    # -- the worker ---------------------------------------------------------------------

    def _refresh(self, client: KazooClient) -> Optional[float]:
        """One pass: make sure the path exists, list it, read new or changed children,
        and deliver the list if it changed.  Runs on the worker only.

        :returns: seconds until the next pass is due without a callback (the snapshot
            fallback, or the read that confirms a held removal), else ``None``.
        """
        if not client.connected:
            return self._publisher.snapshot_due()  # the CONNECTED callback wakes us
        with self._lock:
            if not self._connected:
                return self._publisher.snapshot_due()
            resync, self._resync = self._resync, False
            stale, self._stale = self._stale, set()
            path_ready = self._path_ready
        client_id = client.client_id
        if client_id is not None:
            self._session_id = client_id[0]
        timeout = self.session_timeout
        if resync:
            self._cache.clear()
        for name in stale:
            self._cache.pop(name, None)
        if not path_ready:
            if not self._ensure_path(client, timeout):
                self._children = 0  # no such path: the service has no instances
                return self._publisher.read_succeeded([])
        try:
            children = client.get_children_async(self.path, watch=self._on_children) \
                .get(timeout=timeout)
        except NoNodeError:
            # Deleted since we checked: find out again (and watch for its return).
            with self._lock:
                self._path_ready = False
            self._wake.set()
            return None
        children = sorted(children)
        cache = self._cache
        present = set(children)
        for name in [n for n in cache if n not in present]:
            del cache[name]
        for name in [n for n in self._warned if n not in present]:
            del self._warned[name]
        missing = [n for n in children if n not in cache]
        if missing:
            self._read_children(client, missing, timeout)
        endpoints: List[Endpoint] = []
        seen = set()
        for name in children:
            endpoint = cache.get(name)
            if endpoint is not None and endpoint.address not in seen:
                seen.add(endpoint.address)
                endpoints.append(endpoint)
        self._children = len(children)
        return self._publisher.read_succeeded(endpoints)

    def _refresh_failed(self, exc: Exception, problem: str, quiet: bool,
                        retry: float) -> None:
        with self._lock:
            self._resync = True
        self._publisher.snapshot_due()
        if quiet:
            logger.debug("pool %r: reading %s failed (%s); retrying in %.1fs",
                         self._pool_name, self.path, problem, retry)
        elif isinstance(exc, NoAuthError):
            logger.error("pool %r: not allowed to read %s (check auth_data); retrying",
                         self._pool_name, self.path)
        else:
            logger.exception("pool %r: reading %s failed; retrying", self._pool_name,
                             self.path)

    def _ensure_path(self, client: KazooClient, timeout: float) -> bool:
        """Create the path if allowed; else watch for it.  True when it exists."""
        exists = False
        if self._create_path:
            try:
                client.ensure_path_async(self.path, acl=self._acl).get(timeout=timeout)
                exists = True
            except NoAuthError:
                logger.warning("pool %r: %s does not exist and this client may not create "
                               "it; waiting for it", self._pool_name, self.path)
        if not exists:
            # exists() needs no permission, and its watch fires when the path appears.
            exists = client.exists_async(self.path, watch=self._on_path) \
                .get(timeout=timeout) is not None
        if exists:
            with self._lock:
                self._path_ready = True
        return exists

    def _read_children(self, client: KazooClient, names: List[str], timeout: float) -> None:
        """Read the data of ``names`` in one pipelined batch, each with a data watch."""
        pending: List[Tuple[str, Any]] = [
            (name, client.get_async(self._prefix + name, watch=self._on_child_data))
            for name in names]
        self._reads += len(pending)
        cache = self._cache
        for name, result in pending:
            endpoint: Optional[Endpoint]
            problem: Optional[str]
            try:
                data, _stat = result.get(timeout=timeout)
            except NoNodeError:
                continue  # deleted meanwhile; the children watch fires
            except NoAuthError:
                # One unreadable child must not keep the others from serving.
                data = _UNREADABLE
                endpoint, problem = None, "its data is not readable with these credentials"
            else:
                endpoint, problem = parse_record(name, data, self.endpoint)
            cache[name] = endpoint
            if problem is not None:
                digest = _digest(data)
                if self._warned.get(name) != digest:
                    self._warned[name] = digest
                    logger.warning("pool %r: ZooKeeper node %s%s: %s", self._pool_name,
                                   self._prefix, name, problem)
            else:
                self._warned.pop(name, None)
