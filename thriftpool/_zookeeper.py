"""ZooKeeper plumbing shared by discovery and registration.

Option checks (each raises ``ValueError`` naming the option), the kazoo client factory
(gevent handler when gevent patched this process, reconnects that never give up), the
worker loop that watches over a kazoo client (:class:`ClientSupervisor`), and the
instance record format: what a registration writes and what discovery reads.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from kazoo.client import KazooClient
from kazoo.exceptions import (
    ConnectionClosedError,
    ConnectionLoss,
    OperationTimeoutError,
    SessionExpiredError,
)
from kazoo.handlers.threading import KazooTimeoutError, SequentialThreadingHandler
from kazoo.protocol.states import KeeperState
from kazoo.retry import KazooRetry
from kazoo.security import ACL

from . import _compat
from .address import Address, Endpoint, host_problem, parse_address, weight_problem

__all__ = [
    "RETRY_INITIAL",
    "AuthData",
    "ClientSupervisor",
    "HostsLike",
    "check_acl",
    "check_auth_data",
    "check_hosts",
    "check_kazoo_options",
    "check_node_name",
    "check_path",
    "check_seconds",
    "client_gave_up",
    "close_client",
    "FORMATS",
    "encode_record",
    "is_transient",
    "make_client",
    "parse_record",
]

logger = logging.getLogger(__name__)

#: ``hosts`` accepts ``"h1:2181,h2:2181/chroot"`` or a list of ``"host:port"`` strings.
HostsLike = Union[str, Sequence[str]]
#: ``[("digest", "user:password"), ...]``, as kazoo's ``auth_data``.
AuthData = Sequence[Tuple[str, str]]

DEFAULT_PORT = 2181

#: First and longest wait before a worker retries a failed pass (it is also woken at
#: once when kazoo reconnects).
RETRY_INITIAL = 0.2
RETRY_MAX = 5.0

# Options that thriftpool itself passes to KazooClient.
_MANAGED_KAZOO_OPTIONS = frozenset({"hosts", "timeout", "handler", "auth_data"})


# -- option checks -------------------------------------------------------------------

def check_seconds(name: str, value: Any) -> float:
    """A positive, finite number of seconds (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or math.isnan(value) or math.isinf(value) or value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def check_path(value: Any, option: str = "path") -> str:
    """An absolute ZooKeeper path such as ``"/services/echo"``."""
    if not isinstance(value, str) or not value.startswith("/"):
        raise ValueError(f"{option} must be an absolute ZooKeeper path such as "
                         f"'/services/echo', got {value!r}")
    if value == "/":
        return value
    if value.endswith("/") or "\x00" in value:
        raise ValueError(f"{option}: invalid ZooKeeper path {value!r}")
    for segment in value[1:].split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"{option}: invalid ZooKeeper path {value!r}")
    return value


def check_node_name(value: Any, option: str = "node_name") -> str:
    """One path segment: no ``/``, not ``.`` or ``..``."""
    if not isinstance(value, str) or not value or "/" in value or "\x00" in value \
            or value in (".", ".."):
        raise ValueError(f"{option} must be a ZooKeeper node name without '/', got {value!r}")
    return value


def check_hosts(value: Any, option: str = "hosts") -> str:
    """Normalize ``hosts`` to kazoo's connection string ``"h1:p1,h2:p2[/chroot]"``.

    A server without a port gets ZooKeeper's default, 2181.
    """
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, (list, tuple)) and value \
            and all(isinstance(h, str) for h in value):
        text = ",".join(h.strip() for h in value)
    else:
        raise ValueError(f"{option} must be a connection string such as "
                         f"'127.0.0.1:2181' or a list of 'host:port', got {value!r}")
    servers, slash, chroot = text.partition("/")
    if not servers.strip():
        raise ValueError(f"{option}: no ZooKeeper server in {value!r}")
    normalized: List[str] = []
    for item in servers.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"{option}: empty server in {value!r}")
        if item.endswith("]") or ":" not in item:
            item = f"{item}:{DEFAULT_PORT}"
        try:
            normalized.append(str(parse_address(item, option)))
        except ValueError:
            raise ValueError(f"{option}: cannot parse server {item!r} in {value!r}") from None
    result = ",".join(normalized)
    if slash and chroot:
        result += check_path("/" + chroot, f"{option} (chroot)")
    return result


def check_auth_data(value: Any) -> Optional[List[Tuple[str, str]]]:
    """``None`` or a list of ``(scheme, credential)`` string pairs."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise ValueError("auth_data must be a list of (scheme, credential) pairs such as "
                         f"[('digest', 'user:password')], got {value!r}")
    pairs: List[Tuple[str, str]] = []
    for item in value:
        if not isinstance(item, (list, tuple)) or len(item) != 2 \
                or not all(isinstance(x, str) for x in item) or not item[0]:
            raise ValueError(f"auth_data: {item!r} is not a (scheme, credential) pair of "
                             "strings")
        pairs.append((item[0], item[1]))
    return pairs


def check_acl(value: Any) -> Optional[List[ACL]]:
    """``None`` or a non-empty list of kazoo ``ACL`` objects."""
    if value is None:
        return None
    if isinstance(value, ACL):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value \
            or not all(isinstance(a, ACL) for a in value):
        raise ValueError("acl must be a non-empty list of kazoo.security.ACL objects "
                         f"(e.g. make_digest_acl(...)), got {value!r}")
    return list(value)


def check_kazoo_options(value: Any) -> Dict[str, Any]:
    """Extra ``KazooClient`` keyword arguments (TLS, ``read_only``, retries, ...)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise ValueError(f"kazoo_options must be a dict of KazooClient arguments, got "
                         f"{value!r}")
    managed = sorted(_MANAGED_KAZOO_OPTIONS.intersection(value))
    if managed:
        raise ValueError(f"kazoo_options: {', '.join(managed)} cannot be set here; use the "
                         "hosts/session_timeout/auth_data options")
    return dict(value)


# -- the kazoo client ----------------------------------------------------------------

def make_client(hosts: str, session_timeout: float, auth_data: Optional[AuthData],
                reconnect_max_delay: float, kazoo_options: Mapping[str, Any]) -> KazooClient:
    """A new, unstarted ``KazooClient`` that reconnects forever.

    Uses kazoo's gevent handler when gevent patched ``socket`` in this process (kazoo's
    threading handler would block the hub), its threading handler otherwise.  Between
    connection attempts it waits at most ``reconnect_max_delay`` seconds (kazoo's own
    default grows to an hour, which would leave a pool on a stale list long after
    ZooKeeper came back).
    """
    handler: Any
    if _compat.gevent_patched():
        from kazoo.handlers.gevent import SequentialGeventHandler

        handler = SequentialGeventHandler()
    else:
        handler = SequentialThreadingHandler()
    options = dict(kazoo_options)
    for key in ("connection_retry", "command_retry"):
        retry = options.get(key)
        if isinstance(retry, dict):
            # kazoo refuses a retry whose sleep differs from the handler's.
            options[key] = KazooRetry(**{"sleep_func": handler.sleep_func, **retry})
    options.setdefault("connection_retry", KazooRetry(
        max_tries=-1, delay=0.05, backoff=2, max_jitter=0.3,
        max_delay=reconnect_max_delay, sleep_func=handler.sleep_func))
    options.setdefault("command_retry", KazooRetry(
        max_tries=3, delay=0.05, max_delay=reconnect_max_delay,
        sleep_func=handler.sleep_func))
    return KazooClient(hosts=hosts, timeout=session_timeout, handler=handler,
                       auth_data=list(auth_data) if auth_data else None, **options)


def close_client(client: KazooClient, thread_name: str, timeout: float) -> bool:
    """Stop and close ``client``, waiting at most ``timeout`` seconds.

    Kazoo's ``stop()`` waits for a connection attempt in progress, up to its connect
    timeout (``session_timeout / len(hosts)``) when a server does not answer; a pool's
    ``close()`` must not hang on that, so the close runs on a daemon thread that is
    left to finish in the background after ``timeout``.

    :returns: whether the client was closed in time.
    """
    def run() -> None:
        try:
            client.stop()
            client.close()
        except Exception as exc:  # e.g. kazoo's WriterNotClosedException
            logger.warning("%s: closing the ZooKeeper client failed: %s", thread_name, exc)

    thread = _compat.spawn(run, thread_name)
    thread.join(timeout)
    if thread.is_alive():
        logger.warning("%s: the ZooKeeper client is still closing after %.1fs (a connection "
                       "attempt is in progress); it finishes in the background",
                       thread_name, timeout)
        return False
    return True


def client_gave_up(client: Optional[KazooClient]) -> bool:
    """Kazoo stopped connecting for good (authentication failed, or a custom
    ``connection_retry`` ran out), though nobody called ``stop()``."""
    return client is not None and client.client_state in (KeeperState.CLOSED,
                                                          KeeperState.AUTH_FAILED)


_TRANSIENT = (ConnectionLoss, ConnectionClosedError, SessionExpiredError,
              OperationTimeoutError, KazooTimeoutError)


def is_transient(exc: BaseException) -> bool:
    """The error says the connection or session went away, not that the request is wrong."""
    if isinstance(exc, _TRANSIENT):
        return True
    # The gevent handler raises gevent.Timeout subclasses from AsyncResult.get(timeout).
    return type(exc).__name__ in ("KazooTimeoutError", "Timeout")


# -- the worker loop -----------------------------------------------------------------

class _Restarted(Exception):
    """Internal: the kazoo client was restarted; back off before the next attempt."""


class ClientSupervisor:
    """The loop of the worker thread that owns one kazoo client (discovery's, a
    registration's).

    The owner's kazoo callbacks only record what changed and set ``wake``; the worker
    runs :meth:`run`, which waits for ``wake`` (at most ``interval`` seconds while idle),
    restarts the client when kazoo gave up connecting, and otherwise calls ``work``.  When
    a pass raises, ``failed`` logs it and the next pass follows after a delay that doubles
    from :data:`RETRY_INITIAL` up to :data:`RETRY_MAX`; a pass that succeeds resets it.
    Neither callback is called with a lock held.

    :param logger: the owner's logger, for the restart error.
    :param wake: the owner's event, set by its callbacks and by its ``stop()``.
    :param lock: the owner's lock for the flags it shares with kazoo callbacks; it guards
        :attr:`client_closed` too.
    :param state_lock: the owner's start/stop lock.  The owner's ``stop()`` must set its
        stopping flag under it before closing the client: a client is restarted under
        it too, and only while ``stopping()`` is false, so a closed client stays closed.
    :param stopping: tells whether the owner's ``stop()`` has begun.
    :param work: one pass of the owner's work; returns the seconds until the next pass,
        or ``None`` to wait for ``wake``.
    :param failed: handles a failed pass (logs it): called with the exception, its
        one-line description, whether to log it quietly (the connection went away, the
        same failure again, or a restart) and the seconds until the next attempt.
    :param back_off_after_restart: wait and retry after restarting the client, as after a
        failed pass, instead of waiting for ``wake``.
    """

    def __init__(
        self,
        logger: logging.Logger,
        wake: threading.Event,
        lock: threading.Lock,
        state_lock: threading.Lock,
        stopping: Callable[[], bool],
        work: Callable[[KazooClient], Optional[float]],
        failed: Callable[[Exception, str, bool, float], None],
        *,
        back_off_after_restart: bool = False,
    ) -> None:
        self._logger = logger
        self._wake = wake
        self._lock = lock
        self._state_lock = state_lock
        self._stopping = stopping
        self._work = work
        self._failed = failed
        self._back_off_after_restart = back_off_after_restart
        #: Set under ``lock`` by the owner when kazoo reported that it gave up (then it
        #: sets ``wake``), and when it starts a client; the worker restarts the client.
        self.client_closed = False

    def run(self, client: KazooClient, label: str, interval: float) -> None:
        """The worker thread's body; returns once the owner is stopping.

        :param label: names the owner in log lines, e.g. ``"pool 'echo'"``.
        :param interval: how often an idle worker checks that kazoo is still trying to
            connect.
        """
        delay: Optional[float] = None  # None: wait for a callback
        retry = RETRY_INITIAL
        last_problem = ""
        gave_up_at: Optional[float] = None
        while True:
            self._wake.wait(interval if delay is None else delay)
            # Cleared before the flags are read, so a callback that lands during the
            # pass wakes the next one instead of being lost.
            self._wake.clear()
            if self._stopping():
                return
            try:
                with self._lock:
                    restart, self.client_closed = self.client_closed, False
                # A client that never connected says nothing when it gives up: notice
                # it when it stays stopped for a whole interval (a single look could
                # fall in the instant between start_async() and its first attempt).
                now = _compat.monotonic()
                if not client_gave_up(client):
                    gave_up_at = None
                elif gave_up_at is None:
                    gave_up_at = now
                elif now - gave_up_at >= interval:
                    restart = True
                if restart:
                    gave_up_at = None
                    # Only an authentication failure or a custom connection_retry that
                    # gave up stops kazoo for good; a pool must not go deaf for that,
                    # nor a registration's node vanish.
                    self._logger.error("%s: the ZooKeeper client stopped (%s); restarting it",
                                       label, client.client_state)
                    with self._state_lock:  # never restart a client stop() closed
                        if self._stopping():
                            return
                        client.start_async()
                    if self._back_off_after_restart:
                        raise _Restarted()
                    delay = None
                else:
                    delay = self._work(client)
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
                self._failed(exc, problem, is_transient(exc) or problem == last_problem
                             or isinstance(exc, _Restarted), retry)
                last_problem = problem
                delay = retry
                retry = min(retry * 2, RETRY_MAX)
            else:
                last_problem = ""
                retry = RETRY_INITIAL


# -- instance records ----------------------------------------------------------------

def encode_record(host: str, port: int, weight: int,
                  metadata: Optional[Mapping[str, Any]] = None) -> bytes:
    """The JSON a registration stores: ``{"host", "port", "weight", **metadata}``."""
    record: Dict[str, Any] = dict(metadata or {})
    record.update(host=host, port=port, weight=weight)
    return json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")


def _port(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.isdigit() and len(value) <= 5:
        value = int(value)
    if isinstance(value, int) and 0 < value < 65536:
        return value
    return None


def _short(value: Any, limit: int = 60) -> str:
    """A bounded repr for log lines: a node's data can be a megabyte."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


def _address(host: Any, port: Any, what: str) -> Tuple[Optional[Address], str]:
    problem = host_problem(host)
    if problem is not None:
        return None, f"{what}: {problem}"
    number = _port(port)
    if number is None:
        return None, f"{what} has no valid port ({_short(port)})"
    return Address(host, number), ""


def _endpoint(address: Address, weight: Any, tls: Any, metadata: Mapping[str, Any],
              what: str) -> Tuple[Optional[Endpoint], str]:
    problem = weight_problem(weight)
    if problem is not None:
        return None, f"{what}: {problem}"
    if not isinstance(tls, bool):
        return None, f"{what}: 'tls' is not true or false ({_short(tls)})"
    try:
        return Endpoint(address, weight, tls, metadata), ""
    except ValueError as exc:  # metadata of a kind JSON cannot even produce
        return None, f"{what}: {exc}"


#: Record formats, as ``parse_record`` reports them in ``Endpoint.metadata["format"]``.
FORMATS = ("thriftpool", "serverset", "curator", "name")

# The keys of a thriftpool record that are the endpoint itself, not metadata.
_THRIFTPOOL_KEYS = frozenset({"host", "port", "weight", "tls"})
# The keys of a Curator ServiceInstance that are the endpoint itself.
_CURATOR_KEYS = frozenset({"address", "port", "sslPort"})


def _serverset(doc: Mapping[str, Any], endpoint_name: Optional[str]
               ) -> Tuple[Optional[Endpoint], Optional[str]]:
    # Finagle/Aurora: {"serviceEndpoint": {"host", "port"}, "additionalEndpoints":
    # {"name": {"host", "port"}}, "status": "ALIVE", "shard": 0}
    status = doc.get("status")
    if not isinstance(status, str):
        return None, "its ServerSet member has no 'status'"
    if endpoint_name is None:
        where, what = doc.get("serviceEndpoint"), "its ServerSet 'serviceEndpoint'"
    else:
        extra = doc.get("additionalEndpoints")
        if not isinstance(extra, dict) or endpoint_name not in extra:
            return None, f"its ServerSet member has no additional endpoint {endpoint_name!r}"
        where = extra[endpoint_name]
        what = f"its ServerSet additional endpoint {endpoint_name!r}"
    if not isinstance(where, dict):
        return None, f"{what} is not an object"
    address, problem = _address(where.get("host"), where.get("port"), what)
    if address is None:
        return None, problem
    shard = doc.get("shard")
    if shard is not None and (isinstance(shard, bool) or not isinstance(shard, int)):
        return None, f"its ServerSet 'shard' is not an integer ({_short(shard)})"
    if status != "ALIVE":
        # A member that is STARTING, STOPPING, DEAD... is known, not broken.
        return None, None
    metadata: Dict[str, Any] = {"format": "serverset", "status": status}
    if shard is not None:
        metadata["shard"] = shard
    if endpoint_name is not None:
        metadata["endpoint"] = endpoint_name
    endpoint, problem = _endpoint(address, 1, False, metadata, "its ServerSet member")
    return endpoint, (problem or None)


def _curator(doc: Mapping[str, Any]) -> Tuple[Optional[Endpoint], Optional[str]]:
    # Apache Curator's ServiceInstance (curator-x-discovery, Spring Cloud Zookeeper):
    # {"name", "id", "address", "port", "sslPort", "payload", "registrationTimeUTC",
    #  "serviceType", "uriSpec"} (Curator 5 adds "enabled").
    if doc.get("enabled", True) is False:
        return None, None  # disabled by its owner: known, not broken
    port, tls = doc.get("port"), False
    if port is None:
        port, tls = doc.get("sslPort"), True
        if port is None:
            return None, "its Curator ServiceInstance has neither 'port' nor 'sslPort'"
    address, problem = _address(doc.get("address"), port, "its Curator ServiceInstance")
    if address is None:
        return None, problem
    metadata = {k: v for k, v in doc.items() if k not in _CURATOR_KEYS}
    if not tls and doc.get("sslPort") is not None:
        metadata["sslPort"] = doc["sslPort"]
    metadata["format"] = "curator"
    endpoint, problem = _endpoint(address, 1, tls, metadata, "its Curator ServiceInstance")
    return endpoint, (problem or None)


def _thriftpool(doc: Mapping[str, Any]) -> Tuple[Optional[Endpoint], Optional[str]]:
    address, problem = _address(doc.get("host"), doc.get("port"), "its data")
    if address is None:
        return None, problem
    weight = doc.get("weight", 1)
    metadata = {k: v for k, v in doc.items() if k not in _THRIFTPOOL_KEYS}
    metadata["format"] = "thriftpool"
    endpoint, problem = _endpoint(address, 1 if weight is None else weight,
                                  doc.get("tls", False), metadata, "its data")
    return endpoint, (problem or None)


def parse_record(name: str, data: Optional[bytes], endpoint: Optional[str] = None
                 ) -> Tuple[Optional[Endpoint], Optional[str]]:
    """Read one child of a service path; the format is detected per node.

    Accepted:

    - thriftpool's JSON ``{"host": str, "port": int, "weight": int, "tls": bool, ...}``
      (weight optional, an integer in 1..1,000,000); the other keys become metadata;
    - a Finagle/Aurora ServerSet member (``serviceEndpoint``, ``additionalEndpoints``,
      ``status``, ``shard``): only ``ALIVE`` members serve; with ``endpoint="name"`` the
      additional endpoint of that name is used instead of ``serviceEndpoint``; ``shard``
      and ``status`` become metadata;
    - an Apache Curator ``ServiceInstance`` (``address`` with ``port``, or with only
      ``sslPort``, which means TLS); ``id``, ``name``, ``payload`` and the rest become
      metadata; a Curator 5 instance with ``"enabled": false`` does not serve;
    - when the data is empty or unusable, a node *name* of the form ``host:port``.

    Every endpoint's metadata has ``"format"``: one of :data:`FORMATS`.

    :returns: ``(endpoint, None)`` for a usable child, ``(None, None)`` for a member that
        says it does not serve (not an error), and ``(endpoint or None, problem)`` when
        the data is unusable: an endpoint taken from the name, or ``None`` when the
        child must be skipped.
    """
    problem: Optional[str]
    if not data:
        problem = "the node has no data"
    else:
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            problem = "its data is not JSON"
        else:
            if not isinstance(doc, dict):
                problem = "its data is not a JSON object"
            else:
                if "serviceEndpoint" in doc or "additionalEndpoints" in doc:
                    result, problem = _serverset(doc, endpoint)
                elif "address" in doc and ("port" in doc or "sslPort" in doc):
                    result, problem = _curator(doc)
                else:
                    result, problem = _thriftpool(doc)
                if problem is None:
                    return result, None
    try:
        address = parse_address(name, "node name")
    except ValueError:
        return None, f"{problem}, and its name is not 'host:port'; skipped"
    result = Endpoint(address, metadata={"format": "name"})
    # A bare "host:port" name with no data is a format of its own: nothing to report.
    return result, (f"{problem}; using its name" if data else None)
