"""Pool options: one frozen :class:`PoolConfig`, validated once at the boundary."""

from __future__ import annotations

import dataclasses
import math
import ssl
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, FrozenSet, Iterable, Mapping, Optional, Union

from thriftpy2.protocol import TBinaryProtocolFactory, TCompactProtocolFactory
from thriftpy2.transport import TBufferedTransportFactory, TFramedTransportFactory

from .events import ExhaustedCallback
from .service import ServiceSpec, describe_service

__all__ = ["PoolConfig", "UNSET"]


class _Unset:
    """Marks an option that was not given, as opposed to ``None`` ("never")."""

    _instance: Optional["_Unset"] = None

    def __new__(cls) -> "_Unset":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"

    def __bool__(self) -> bool:
        return False


UNSET: Any = _Unset()

#: The default ``max_message_size``: 64 MiB.
DEFAULT_MAX_MESSAGE_SIZE = 64 * 1024 * 1024

TRANSPORTS = {"buffered": TBufferedTransportFactory, "framed": TFramedTransportFactory}
PROTOCOLS = {"binary": TBinaryProtocolFactory, "compact": TCompactProtocolFactory}


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def _check_seconds(name: str, value: Any, allow_none: bool, allow_zero: bool = False
                   ) -> Optional[float]:
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a number of seconds, got None")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if math.isnan(value) or (value == 0 and not allow_zero) or value < 0:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound} seconds, got {value!r}")
    if math.isinf(value):
        if allow_none:
            return None
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_fraction(name: str, value: Any, upper: float = 1.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not 0 <= value <= upper:
        raise ValueError(f"{name} must be between 0 and {upper}, got {value!r}")
    return float(value)


def _factory(name: str, value: Any, table: dict[str, Any], method: str) -> Any:
    if isinstance(value, str):
        try:
            return table[value]()
        except KeyError:
            choices = ", ".join(repr(k) for k in table)
            raise ValueError(f"{name} must be one of {choices} or a factory, got {value!r}"
                             ) from None
    if callable(getattr(value, method, None)):
        return value
    raise ValueError(f"{name} must be one of {', '.join(table)} or a thriftpy2 factory, "
                     f"got {value!r}")


@dataclass(frozen=True)
class PoolConfig:
    """Every :class:`~thriftpool.ThriftPool` option, validated.  Times are in seconds.

    Build it with :meth:`build`, which checks each value and raises :class:`ValueError`
    naming the option; the pool passes this one object down instead of re-listing options.
    """

    service: Any
    name: str
    min_size: int
    initial_size: int
    max_size: int
    checkout_timeout: float
    idle_timeout: Optional[float]
    max_lifetime: Optional[float]
    lifetime_jitter: float
    connect_timeout: float
    socket_timeout: Optional[float]
    transport_factory: Any
    protocol_factory: Any
    on_exhausted: Optional[ExhaustedCallback]
    watchdog_interval: float
    backoff_initial: float
    backoff_multiplier: float
    backoff_max: float
    backoff_jitter: float
    failure_threshold: int
    heartbeat: Optional[str]
    heartbeat_interval: float
    retries: int
    idempotent: FrozenSet[str]
    retry_budget: float
    ssl_context: Optional[ssl.SSLContext]
    server_hostname: Optional[str]
    #: The service as the pool sees it (its stack, methods, client class); None when
    #: the options are checked without a service.
    spec: Optional[ServiceSpec] = None
    subset_size: Optional[int] = None
    subset_key: Union[str, bytes, None] = None
    max_waiting: int = 0
    leak_timeout: Optional[float] = None
    max_ejection_percent: int = 50
    failure_classifier: Optional[Callable[[BaseException], bool]] = None
    #: ``{method: seconds or None}``, read-only; methods not in it use ``socket_timeout``.
    method_timeouts: Mapping[str, Optional[float]] = field(
        default_factory=lambda: MappingProxyType({}), hash=False)
    max_message_size: Optional[int] = DEFAULT_MAX_MESSAGE_SIZE

    @classmethod
    def build(
        cls,
        *,
        service: Any = None,
        name: str = "",
        min_size: int = 1,
        initial_size: Union[int, Any] = UNSET,
        max_size: int = 8,
        checkout_timeout: float = 1.0,
        idle_timeout: Optional[float] = 60.0,
        max_lifetime: Optional[float] = 600.0,
        lifetime_jitter: float = 0.1,
        connect_timeout: float = 1.0,
        socket_timeout: Optional[float] = 5.0,
        transport: Any = "buffered",
        protocol: Any = "binary",
        on_exhausted: Optional[ExhaustedCallback] = None,
        watchdog_interval: float = 1.0,
        backoff_initial: float = 1.0,
        backoff_multiplier: float = 1.6,
        backoff_max: float = 120.0,
        backoff_jitter: float = 0.2,
        failure_threshold: int = 3,
        heartbeat: Optional[str] = None,
        heartbeat_interval: float = 30.0,
        retries: int = 2,
        idempotent: Union[Iterable[str], bool] = (),
        retry_budget: float = 0.2,
        ssl_context: Optional[ssl.SSLContext] = None,
        server_hostname: Optional[str] = None,
        subset_size: Optional[int] = None,
        subset_key: Union[str, bytes, None] = None,
        max_waiting: int = 0,
        leak_timeout: Optional[float] = None,
        max_ejection_percent: int = 50,
        failure_classifier: Optional[Callable[[BaseException], bool]] = None,
        method_timeouts: Optional[Mapping[str, Optional[float]]] = None,
        max_message_size: Optional[int] = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> "PoolConfig":
        """Validate the options and freeze them.

        :raises ValueError: naming the first invalid option and its bound.
        """
        if not isinstance(name, str):
            raise ValueError(f"name must be a string, got {name!r}")
        min_size = _check_int("min_size", min_size, 0)
        max_size = _check_int("max_size", max_size, 1)
        if min_size > max_size:
            raise ValueError(f"min_size ({min_size}) must be <= max_size ({max_size})")
        if initial_size is UNSET:
            initial_size = min_size
        initial_size = _check_int("initial_size", initial_size, 0)
        if not min_size <= initial_size <= max_size:
            raise ValueError(f"initial_size ({initial_size}) must be between min_size "
                             f"({min_size}) and max_size ({max_size})")
        checkout = _check_seconds("checkout_timeout", checkout_timeout, allow_none=False,
                                  allow_zero=True)
        if on_exhausted is not None and not callable(on_exhausted):
            raise ValueError(f"on_exhausted must be callable or None, got {on_exhausted!r}")
        backoff_initial_s = _check_seconds("backoff_initial", backoff_initial, False)
        backoff_max_s = _check_seconds("backoff_max", backoff_max, False)
        assert backoff_initial_s is not None and backoff_max_s is not None
        if backoff_max_s < backoff_initial_s:
            raise ValueError(f"backoff_max ({backoff_max}) must be >= backoff_initial "
                             f"({backoff_initial})")
        if (isinstance(backoff_multiplier, bool)
                or not isinstance(backoff_multiplier, (int, float))
                or not 1 <= backoff_multiplier <= 10):
            raise ValueError(f"backoff_multiplier must be between 1 and 10, "
                             f"got {backoff_multiplier!r}")
        connect = _check_seconds("connect_timeout", connect_timeout, allow_none=False)
        interval = _check_seconds("watchdog_interval", watchdog_interval, allow_none=False)
        assert checkout is not None and connect is not None and interval is not None
        spec = describe_service(service)
        methods = list(spec.methods) if spec is not None else []
        if heartbeat is not None:
            if heartbeat not in methods:
                raise ValueError(f"heartbeat must name a method of the service, got {heartbeat!r}")
            assert spec is not None
            if heartbeat in spec.oneway:
                raise ValueError(f"heartbeat method {heartbeat!r} must not be oneway "
                                 "(a oneway call has no answer to wait for)")
            if spec.args_spec(heartbeat):
                raise ValueError(f"heartbeat method {heartbeat!r} must take no arguments")
        beat_interval = _check_seconds("heartbeat_interval", heartbeat_interval,
                                       allow_none=False)
        assert beat_interval is not None
        if idempotent is True:
            idempotent_set = frozenset(methods)
        elif idempotent is False or idempotent is None:
            idempotent_set = frozenset()
        elif isinstance(idempotent, str):
            raise ValueError(f"idempotent must be a list of method names, got {idempotent!r}")
        else:
            try:
                idempotent_set = frozenset(idempotent)
            except TypeError:
                raise ValueError(f"idempotent must be a list of method names or True, "
                                 f"got {idempotent!r}") from None
            unknown = sorted(m for m in idempotent_set if m not in methods)
            if unknown:
                raise ValueError(f"idempotent names methods the service lacks: {unknown}")
        if protocol == "header" and transport == "framed":
            raise ValueError("protocol 'header' frames each message itself; use "
                             "transport='buffered' with it, not 'framed'")
        if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
            raise ValueError(f"ssl_context must be an ssl.SSLContext, got {ssl_context!r}")
        if server_hostname is not None:
            if not isinstance(server_hostname, str) or not server_hostname:
                raise ValueError(f"server_hostname must be a non-empty string, "
                                 f"got {server_hostname!r}")
            if ssl_context is None:
                raise ValueError("server_hostname needs ssl_context")
        if subset_size is not None:
            subset_size = _check_int("subset_size", subset_size, 1)
        if subset_key is not None:
            if not isinstance(subset_key, (str, bytes)) or not subset_key:
                raise ValueError(f"subset_key must be a non-empty str or bytes, "
                                 f"got {subset_key!r}")
            if subset_size is None:
                raise ValueError("subset_key needs subset_size")
        max_ejection_percent = _check_int("max_ejection_percent", max_ejection_percent, 0)
        if max_ejection_percent > 100:
            raise ValueError(f"max_ejection_percent must be <= 100, got {max_ejection_percent!r}")
        if failure_classifier is not None and not callable(failure_classifier):
            raise ValueError(f"failure_classifier must be callable or None, "
                             f"got {failure_classifier!r}")
        return cls(
            service=service,
            name=name,
            min_size=min_size,
            initial_size=initial_size,
            max_size=max_size,
            checkout_timeout=checkout,
            idle_timeout=_check_seconds("idle_timeout", idle_timeout, allow_none=True),
            max_lifetime=_check_seconds("max_lifetime", max_lifetime, allow_none=True),
            lifetime_jitter=_check_fraction("lifetime_jitter", lifetime_jitter, 0.5),
            connect_timeout=connect,
            socket_timeout=_check_seconds("socket_timeout", socket_timeout, allow_none=True),
            transport_factory=_factory("transport", transport, TRANSPORTS, "get_transport")
            if spec is None else spec.transport_factory(transport),
            protocol_factory=_factory("protocol", protocol, PROTOCOLS, "get_protocol")
            if spec is None else spec.protocol_factory(protocol, name),
            on_exhausted=on_exhausted,
            watchdog_interval=interval,
            backoff_initial=backoff_initial_s,
            backoff_multiplier=float(backoff_multiplier),
            backoff_max=backoff_max_s,
            backoff_jitter=_check_fraction("backoff_jitter", backoff_jitter, 1.0),
            failure_threshold=_check_int("failure_threshold", failure_threshold, 1),
            heartbeat=heartbeat,
            heartbeat_interval=beat_interval,
            retries=_check_int("retries", retries, 0),
            idempotent=idempotent_set,
            retry_budget=_check_fraction("retry_budget", retry_budget, 1.0),
            ssl_context=ssl_context,
            server_hostname=server_hostname,
            spec=spec,
            subset_size=subset_size,
            subset_key=subset_key,
            max_waiting=_check_int("max_waiting", max_waiting, 0),
            leak_timeout=_check_seconds("leak_timeout", leak_timeout, allow_none=True),
            max_ejection_percent=max_ejection_percent,
            failure_classifier=failure_classifier,
            method_timeouts=_check_method_timeouts(method_timeouts, methods),
            max_message_size=None if max_message_size is None else _check_int(
                "max_message_size", max_message_size, 1),
        )

    def resized(self, min_size: Any = UNSET, max_size: Any = UNSET) -> "PoolConfig":
        """This config with new sizes, checked as :meth:`build` checks them
        (``initial_size`` is kept within the new bounds).

        :raises ValueError: naming the invalid option and its bound.
        """
        new_min = self.min_size if min_size is UNSET else _check_int("min_size", min_size, 0)
        new_max = self.max_size if max_size is UNSET else _check_int("max_size", max_size, 1)
        if new_min > new_max:
            raise ValueError(f"min_size ({new_min}) must be <= max_size ({new_max})")
        initial = min(max(self.initial_size, new_min), new_max)
        return dataclasses.replace(self, min_size=new_min, max_size=new_max,
                                   initial_size=initial)


def _check_method_timeouts(value: Any, methods: Iterable[str]
                           ) -> Mapping[str, Optional[float]]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, Mapping):
        raise ValueError(f"method_timeouts must be a mapping of method name to seconds, "
                         f"got {value!r}")
    known = set(methods)
    unknown = sorted(str(m) for m in value if m not in known)
    if unknown:
        raise ValueError(f"method_timeouts names methods the service lacks: {unknown}")
    return MappingProxyType({
        name: _check_seconds(f"method_timeouts[{name!r}]", seconds, allow_none=True)
        for name, seconds in value.items()})
