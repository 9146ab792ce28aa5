"""Discovery from DNS: every address of a name is an instance (``pip install thriftpool[dns]``).

Made for Kubernetes headless Services (``echo.default.svc.cluster.local`` has one A or
AAAA record per ready pod) and for SRV records (``_thrift._tcp.echo...``, with ports and
weights).  Resolution uses dnspython, so a test or an application can point it at its
own name servers.

Threads: one named daemon worker, ``thriftpool-<pool>-dns``, resolves, waits on an
event until the next resolution (so :meth:`DnsDiscovery.stop` wakes it at once) and calls
the pool's listener with no lock held.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from .. import _compat
from .._zookeeper import check_seconds
from ..address import Address, Endpoint, check_host, check_weight, parse_address
from ._delivery import (
    EndpointFilter,
    Publisher,
    check_filter,
    check_fraction,
    check_snapshot_path,
)
from .base import Discovery, DiscoveryListener

if TYPE_CHECKING:
    import dns.resolver

__all__ = ["DnsDiscovery"]

logger = logging.getLogger(__name__)

#: The shortest wait between resolutions that a short TTL can ask for (a TTL of 0 must
#: not make the worker spin).
MIN_TTL_WAIT = 1.0
#: First and longest wait before retrying a failed resolution (capped by ``refresh``).
RETRY_INITIAL = 0.2
RETRY_MAX = 5.0


def _import_dns() -> Any:
    try:
        import dns.exception
        import dns.nameserver
        import dns.rdatatype
        import dns.resolver
    except ImportError as exc:
        raise ImportError("DnsDiscovery needs dnspython: pip install 'thriftpool[dns]'"
                          ) from exc
    return dns


def _check_nameservers(value: Any) -> Optional[List[Tuple[str, int]]]:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"nameservers must be a list of 'ip' or 'ip:port' strings, "
                         f"got {value!r}")
    servers: List[Tuple[str, int]] = []
    for item in value:
        if not isinstance(item, str):
            raise ValueError(f"nameservers: {item!r} is not an 'ip' or 'ip:port' string")
        text = item.strip()
        try:
            ipaddress.ip_address(text)
            host, port = text, 53
        except ValueError:
            host, port = parse_address(text, "nameservers")
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"nameservers: {item!r} is not an IP address (a name "
                                 "server is given by address)") from None
        servers.append((host, port))
    return servers


class DnsDiscovery(Discovery):
    """Follow the addresses of a DNS name.

    ::

        pool = thriftpool.ThriftPool(echo.Echo, discovery=thriftpool.DnsDiscovery(
            "echo.default.svc.cluster.local", port=9090))
        srv = thriftpool.DnsDiscovery("_thrift._tcp.echo.default.svc.cluster.local",
                                      srv=True)

    Every A and AAAA record of ``name`` is one instance on ``port``.  With ``srv=True``
    the SRV records of ``name`` are read instead: each target's addresses (from the
    answer's additional section, or resolved) on the record's port, with the record's
    weight (an SRV weight of 0 counts as 1); every priority is used, and
    ``metadata["priority"]`` lets ``filter`` keep only some.  Each endpoint's metadata
    says ``{"format": "dns", "record": "A" | "AAAA" | "SRV", "name": ...}`` (SRV adds
    ``target``, ``priority`` and ``weight``).

    Behaviour:

    - :meth:`start` returns at once; the worker resolves at once, then every
      ``refresh`` seconds, or when the shortest TTL of the answer runs out if that is
      sooner (but no more often than once a second).
    - The pool gets the full, sorted list each time it changes, and applies it as a
      diff.  A name that does not exist (NXDOMAIN) or has no records of the type lists
      no instances.
    - When resolution fails (a timeout, SERVFAIL, REFUSED, no name server answering),
      nothing is delivered and the pool keeps its last list (fail static); the worker
      retries after 0.2 s, doubling up to 5 s (at most ``refresh``).  The first failure
      of a kind is logged as a warning, the recovery as info.
    - ``max_drop_fraction``, ``drop_confirm_delay``, ``snapshot_path``,
      ``connect_timeout`` and ``filter`` work as for
      :class:`~thriftpool.ZooKeeperDiscovery`.

    :param name: the name to resolve.
    :param port: the instances' port (required for A/AAAA, not allowed with ``srv``).
    :param refresh: the longest time, in seconds, between two resolutions.
    :param srv: read SRV records (with their ports and weights) instead of A/AAAA.
    :param nameservers: name servers to ask, as ``"ip"`` (port 53) or ``"ip:port"``
        (``"[v6]:port"``); default ``None``: the system's resolver configuration
        (``/etc/resolv.conf``).
    :param timeout: seconds one resolution (each query, all servers and retries) may
        take.
    :param weight: the weight of every A/AAAA instance (1..1,000,000).
    :param tls: the instances speak only TLS.
    :param filter: a callable of each :class:`~thriftpool.Endpoint`, returning whether
        the pool uses it.
    :param snapshot_path: a file keeping the last delivered list, served at a cold
        start when the first resolution has not succeeded within ``connect_timeout``.
    :param connect_timeout: seconds to wait for the first resolution before serving the
        snapshot.
    :param max_drop_fraction: the largest share of the known instances one resolution
        may remove at once without a confirmation (0..1, ``None`` turns it off).
    :param drop_confirm_delay: seconds before a resolution can confirm a held removal.
    :raises ValueError: naming the option, when an option is invalid.
    :raises ImportError: dnspython is not installed (the ``dns`` extra).
    """

    def __init__(
        self,
        name: str,
        port: Optional[int] = None,
        *,
        refresh: float = 5.0,
        srv: bool = False,
        nameservers: Optional[Sequence[str]] = None,
        timeout: float = 2.0,
        weight: int = 1,
        tls: bool = False,
        filter: Optional[EndpointFilter] = None,  # noqa: A002 - the documented name
        snapshot_path: Optional[str] = None,
        connect_timeout: float = 1.0,
        max_drop_fraction: Optional[float] = 0.5,
        drop_confirm_delay: float = 5.0,
    ) -> None:
        self._dns = _import_dns()
        self.name = check_host(name, "name")
        if not isinstance(srv, bool):
            raise ValueError(f"srv must be True or False, got {srv!r}")
        self.srv = srv
        if srv:
            if port is not None:
                raise ValueError("port: SRV records carry the ports; leave port out")
        elif isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise ValueError(f"port must be an integer in 1-65535, got {port!r}")
        self.port = port
        self.refresh = check_seconds("refresh", refresh)
        self.timeout = check_seconds("timeout", timeout)
        self.nameservers = _check_nameservers(nameservers)
        self.weight = check_weight(weight)
        if not isinstance(tls, bool):
            raise ValueError(f"tls must be True or False, got {tls!r}")
        self.tls = tls
        source = f"dns-srv:{self.name}" if srv else f"dns:{self.name}:{port}"
        self._publisher = Publisher(
            "dns", source, snapshot_path=check_snapshot_path(snapshot_path),
            connect_timeout=check_seconds("connect_timeout", connect_timeout),
            max_drop_fraction=check_fraction(max_drop_fraction),
            drop_confirm_delay=check_seconds("drop_confirm_delay", drop_confirm_delay),
            endpoint_filter=check_filter(filter))
        self._init_state()

    def _init_state(self) -> None:
        # Built here and again after fork(): the parent's thread does not exist there.
        self._state_lock = _compat.Lock()
        self._stop_event = _compat.Event()
        self._worker: Optional[threading.Thread] = None
        self._running = False
        self._stopping = False
        self._pool_name = ""
        self._resolutions = 0
        self._failures = 0
        self._last_error: Optional[str] = None
        self._ttl: Optional[int] = None
        self._publisher.reset("", None)

    # -- Discovery interface -----------------------------------------------------------

    def start(self, listener: DiscoveryListener, pool_name: str) -> None:
        """Start the worker, which resolves at once; returns without waiting for it.

        :raises RuntimeError: discovery was already started (one discovery per pool).
        """
        with self._state_lock:
            if self._running:
                raise RuntimeError(f"{self!r} is already started; use one discovery per pool")
            self._publisher.reset(pool_name, listener)
            self._pool_name = pool_name
            self._stop_event.clear()
            self._running = True
            self._stopping = False
            self._worker = _compat.spawn(self._run, f"thriftpool-{pool_name}-dns")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop resolving; idempotent.  Waits at most ``timeout`` seconds for the worker
        (a resolution in progress ends within the ``timeout`` option; nothing is
        delivered after ``stop`` began).

        :param timeout: seconds to wait for the worker thread.
        """
        with self._state_lock:
            if not self._running or self._stopping:
                return
            self._stopping = True
            self._publisher.stopping = True
            worker = self._worker
        self._stop_event.set()
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout)
            if worker.is_alive():
                logger.warning("%s did not stop within %.1fs", worker.name, timeout)
        with self._state_lock:
            self._running = False
            self._worker = None

    def after_fork(self) -> None:
        """Forget the parent's worker in a forked child; :meth:`start` makes a new one."""
        self._init_state()

    # -- inspection --------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Its background thread runs (read by the pool's ``stats()``)."""
        worker = self._worker
        return worker is not None and worker.is_alive()

    def stats(self) -> Dict[str, Any]:
        """What discovery knows now.

        ``{"name", "port", "srv", "resolutions", "failures", "last_error", "ttl",
        "source", "instances", "snapshots", "snapshot_path", "snapshot_age",
        "snapshot_writes", "snapshot_write_errors", "drops_held", "drops_confirmed",
        "holding"}``: ``resolutions`` and ``failures`` count successful and failed
        resolutions, ``last_error`` describes the last failure (``None`` once one
        succeeds), ``ttl`` is the shortest TTL of the last answer; ``source`` is
        ``None``, ``"snapshot"`` or ``"dns"``; the rest is as for
        :meth:`ZooKeeperDiscovery.stats() <thriftpool.ZooKeeperDiscovery.stats>`.
        """
        stats: Dict[str, Any] = {
            "name": self.name,
            "port": self.port,
            "srv": self.srv,
            "resolutions": self._resolutions,
            "failures": self._failures,
            "last_error": self._last_error,
            "ttl": self._ttl,
        }
        stats.update(self._publisher.stats())
        return stats

    def __repr__(self) -> str:
        if self.srv:
            return f"DnsDiscovery({self.name!r}, srv=True)"
        return f"DnsDiscovery({self.name!r}, port={self.port})"

    # -- the worker --------------------------------------------------------------------

    def _make_resolver(self) -> "dns.resolver.Resolver":
        mod = self._dns
        resolver: dns.resolver.Resolver
        if self.nameservers is None:
            resolver = mod.resolver.Resolver()  # reads /etc/resolv.conf
            return resolver
        resolver = mod.resolver.Resolver(configure=False)
        resolver.nameservers = [mod.nameserver.Do53Nameserver(host, port)
                                for host, port in self.nameservers]
        return resolver

    def _run(self) -> None:
        publisher = self._publisher
        resolver: Optional[dns.resolver.Resolver] = None
        retry = RETRY_INITIAL
        while not self._stop_event.is_set():
            lifetime = self.timeout
            due = publisher.snapshot_due()
            if due is not None:
                # The first resolution must not outlast the snapshot fallback.
                lifetime = max(0.05, min(lifetime, due))
            try:
                if resolver is None:
                    resolver = self._make_resolver()
                endpoints, ttl = self._resolve(resolver, lifetime)
            except Exception as exc:
                self._failed(exc, retry)
                wait = min(retry, self.refresh)
                due = publisher.snapshot_due()
                if due is not None:
                    wait = min(wait, due)
                retry = min(retry * 2, RETRY_MAX)
            else:
                if self._last_error is not None:
                    logger.info("pool %r: resolving %s works again", self._pool_name,
                                self.name)
                self._last_error = None
                self._resolutions += 1
                self._ttl = ttl
                retry = RETRY_INITIAL
                if self._stop_event.is_set():
                    return
                wait = self.refresh if ttl is None \
                    else min(self.refresh, max(float(ttl), MIN_TTL_WAIT))
                confirm = publisher.read_succeeded(endpoints)
                if confirm is not None:
                    wait = min(wait, confirm)
            self._stop_event.wait(wait)

    def _failed(self, exc: Exception, retry: float) -> None:
        self._failures += 1
        problem = f"{type(exc).__name__}: {exc}"
        # One warning per kind of failure: the message itself varies (elapsed times).
        if self._last_error is None or not self._last_error.startswith(
                type(exc).__name__ + ":"):
            logger.warning("pool %r: resolving %s failed (%s); serving the last known "
                           "instances, retrying", self._pool_name, self.name, problem)
        else:
            logger.debug("pool %r: resolving %s failed again (%s); retrying in %.1fs",
                         self._pool_name, self.name, problem, retry)
        self._last_error = problem

    def _query(self, resolver: "dns.resolver.Resolver", name: str, rdtype: str,
               lifetime: float) -> Tuple[List[Any], Optional[int], Any]:
        """The records of one type: ``(rdata list, ttl or None, response or None)``.

        NXDOMAIN and an empty answer are empty lists; every other failure raises.
        """
        try:
            answer = resolver.resolve(name, rdtype, lifetime=lifetime,
                                      raise_on_no_answer=False, search=False)
        except self._dns.resolver.NXDOMAIN:
            return [], None, None
        if answer.rrset is None:
            return [], None, answer.response
        return list(answer.rrset), int(answer.rrset.ttl), answer.response

    def _addresses(self, resolver: "dns.resolver.Resolver", name: str, lifetime: float
                   ) -> Tuple[List[Tuple[str, str]], Optional[int]]:
        found: List[Tuple[str, str]] = []
        ttls: List[int] = []
        for rdtype in ("A", "AAAA"):
            records, ttl, _response = self._query(resolver, name, rdtype, lifetime)
            found.extend((rdtype, r.address) for r in records)
            if ttl is not None:
                ttls.append(ttl)
        return found, (min(ttls) if ttls else None)

    def _resolve(self, resolver: "dns.resolver.Resolver", lifetime: float
                 ) -> Tuple[List[Endpoint], Optional[int]]:
        endpoints: Dict[Address, Endpoint] = {}
        if not self.srv:
            assert self.port is not None
            found, ttl = self._addresses(resolver, self.name, lifetime)
            for rdtype, ip in found:
                address = Address(ip, self.port)
                endpoints.setdefault(address, Endpoint(
                    address, self.weight, self.tls,
                    {"format": "dns", "record": rdtype, "name": self.name}))
        else:
            records, ttl, response = self._query(resolver, self.name, "SRV", lifetime)
            ttls = [] if ttl is None else [ttl]
            glue = self._glue(response)
            for record in sorted(records, key=lambda r: (r.priority, -r.weight,
                                                         str(r.target), r.port)):
                target = record.target.to_text(omit_final_dot=True)
                if target in ("", "."):
                    continue  # "." means: the service is not available here
                glued = glue.get(target.lower())
                if glued is not None:
                    found = glued
                else:
                    found, target_ttl = self._addresses(resolver, target, lifetime)
                    if target_ttl is not None:
                        ttls.append(target_ttl)
                for _rdtype, ip in found:
                    address = Address(ip, record.port)
                    endpoints.setdefault(address, Endpoint(
                        address, min(max(1, record.weight), 65535), self.tls,
                        {"format": "dns", "record": "SRV", "name": self.name,
                         "target": target, "priority": record.priority,
                         "weight": record.weight}))
            ttl = min(ttls) if ttls else None
        return sorted(endpoints.values(), key=_order), ttl

    def _glue(self, response: Any) -> Dict[str, List[Tuple[str, str]]]:
        """The A/AAAA records of the SRV answer's additional section, by owner name."""
        glue: Dict[str, List[Tuple[str, str]]] = {}
        if response is None:
            return glue
        for rrset in response.additional:
            rdtype = self._dns.rdatatype.to_text(rrset.rdtype)
            if rdtype not in ("A", "AAAA"):
                continue
            owner = rrset.name.to_text(omit_final_dot=True).lower()
            glue.setdefault(owner, []).extend((rdtype, r.address) for r in rrset)
        return glue


def _order(endpoint: Endpoint) -> Tuple[int, Any, int]:
    ip = ipaddress.ip_address(endpoint.address.host.split("%")[0])
    return ip.version, ip.packed, endpoint.address.port
