"""Server addresses: parsing ``"host:port"`` strings and ``(host, port)`` pairs, and the
:class:`Endpoint` that discovery reports for each live instance."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, NamedTuple, Optional, Tuple, Union

__all__ = [
    "MAX_WEIGHT",
    "Address",
    "AddressLike",
    "Endpoint",
    "Metadata",
    "check_host",
    "check_weight",
    "parse_address",
]

#: The largest weight an instance may have; weights are integers in 1..MAX_WEIGHT, so
#: a balancer's sums and tables stay small and exact.
MAX_WEIGHT = 1_000_000

#: One DNS label: letters, digits, ``-`` and ``_`` (used by some internal names), at most
#: 63 characters.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\Z")


class Address(NamedTuple):
    """A server instance's address; the key of its per-instance pool."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:  # IPv6 literal
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


AddressLike = Union[str, Tuple[str, int], Address]


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...(%d chars)" % len(text)


def host_problem(host: Any) -> Optional[str]:
    """Why ``host`` is not a usable host name or IP literal, or ``None`` when it is.

    Accepted: an IPv4 or IPv6 literal (without brackets; an IPv6 scope such as
    ``fe80::1%eth0`` too), or a DNS name of at most 253 characters made of labels of 1-63
    letters, digits, ``-`` and ``_`` (a trailing dot is allowed).
    """
    if not isinstance(host, str):
        return f"the host is not a string ({_short(host)})"
    if not host:
        return "the host is empty"
    if len(host) > 253:
        return f"the host is longer than 253 characters ({_short(host)})"
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"the host is not a valid IPv6 address ({_short(host)})"
        return None
    name = host[:-1] if host.endswith(".") else host
    if name and all(_LABEL.match(label) for label in name.split(".")):
        return None
    return f"the host has characters or labels a host name cannot have ({_short(host)})"


def check_host(host: Any, option: str = "host") -> str:
    """``host`` when it is a valid host name or IP literal (see :func:`host_problem`).

    :raises ValueError: naming ``option``.
    """
    problem = host_problem(host)
    if problem is not None:
        raise ValueError(f"{option}: {problem}")
    return str(host)


def weight_problem(weight: Any) -> Optional[str]:
    """Why ``weight`` is not an integer in 1..:data:`MAX_WEIGHT`, or ``None``."""
    if isinstance(weight, bool) or not isinstance(weight, int) \
            or not 1 <= weight <= MAX_WEIGHT:
        return f"the weight is not an integer in 1..{MAX_WEIGHT} ({_short(weight)})"
    return None


def check_weight(weight: Any, option: str = "weight") -> int:
    """``weight`` when it is an integer in 1..:data:`MAX_WEIGHT`.

    :raises ValueError: naming ``option``.
    """
    problem = weight_problem(weight)
    if problem is not None:
        raise ValueError(f"{option}: {problem}")
    return int(weight)


def _freeze(value: Any) -> Any:
    if isinstance(value, Metadata):
        return value
    if isinstance(value, Mapping):
        return Metadata(value)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, (set, frozenset)):
        return frozenset(_freeze(v) for v in value)
    if value is None or isinstance(value, (str, bytes, int, float, bool)):
        return value
    raise TypeError(f"metadata values must be JSON-like (str, number, bool, None, lists, "
                    f"mappings), got {type(value).__name__}")


class Metadata(Mapping[str, Any]):
    """An immutable, hashable mapping: what a discovery record said about an instance.

    Nested mappings become :class:`Metadata` and lists become tuples, so an
    :class:`Endpoint` carrying it stays hashable and comparable.
    """

    __slots__ = ("_items", "_hash")

    def __init__(self, items: Optional[Mapping[str, Any]] = None) -> None:
        frozen = {}
        for key, value in (items or {}).items():
            if not isinstance(key, str):
                raise TypeError(f"metadata keys must be strings, got {key!r}")
            frozen[key] = _freeze(value)
        self._items = frozen
        self._hash: Optional[int] = None

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._items.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Metadata):
            return self._items == other._items
        if isinstance(other, Mapping):
            return self._items == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Metadata({self._items!r})"

    def to_json(self) -> Any:
        """A plain ``dict`` (lists for tuples) for ``json.dumps``."""
        return _thaw(self)


def _thaw(value: Any) -> Any:
    if isinstance(value, Metadata):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, (tuple, frozenset)):
        return [_thaw(v) for v in value]
    return value


_EMPTY = Metadata()


@dataclass(frozen=True)
class Endpoint:
    """One live instance as discovery reports it: where it is and how much traffic it takes.

    Validated on construction, so a bad record cannot reach a balancer or a connect.

    :param address: where the instance listens (an :class:`Address`; a ``"host:port"``
        string or a pair is parsed).
    :param weight: relative share of traffic for weighted balancers, an integer in
        1..1,000,000.
    :param tls: the instance speaks only TLS: a pool without ``ssl_context`` refuses to
        connect to it rather than send plaintext.
    :param metadata: what the discovery record said besides the address (a ServerSet
        ``shard``, a Curator ``id`` and ``payload``, a registration's ``metadata``); stored
        as an immutable :class:`Metadata`, and part of equality.
    :raises ValueError: the host, port, weight, ``tls`` or metadata is invalid.
    """

    address: Address
    weight: int = 1
    tls: bool = False
    metadata: Mapping[str, Any] = field(default=_EMPTY)

    def __post_init__(self) -> None:
        address = self.address
        if not isinstance(address, Address):
            address = parse_address(address, "endpoint")
            object.__setattr__(self, "address", address)
        else:
            check_host(address.host, "endpoint")
            _check_port(address.port, "endpoint", address)
        check_weight(self.weight, "endpoint weight")
        if not isinstance(self.tls, bool):
            raise ValueError(f"endpoint tls must be True or False, got {self.tls!r}")
        if not isinstance(self.metadata, Metadata):
            if not isinstance(self.metadata, Mapping):
                raise ValueError(f"endpoint metadata must be a mapping, got "
                                 f"{_short(self.metadata)}")
            try:
                object.__setattr__(self, "metadata", Metadata(self.metadata))
            except TypeError as exc:
                raise ValueError(f"endpoint metadata: {exc}") from None

    def __str__(self) -> str:
        return str(self.address)


def _check_port(port: Any, option: str, value: Any) -> int:
    if isinstance(port, bool):
        raise ValueError(f"{option}: invalid port in {_short(value)}")
    if isinstance(port, str) and not port.strip().isdigit():
        raise ValueError(f"{option}: invalid port in {_short(value)}")
    try:
        number = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"{option}: invalid port in {_short(value)}") from None
    if not 0 < number < 65536:
        raise ValueError(f"{option}: port out of range 1-65535 in {_short(value)}")
    return number


def parse_address(value: Any, option: str = "address") -> Address:
    """Parse ``"host:port"``, ``"[v6]:port"``, ``(host, port)`` or an :class:`Address`.

    The host must be a host name or an IP literal (see :func:`host_problem`).

    :param option: the option name to put in the error message.
    :raises ValueError: naming ``option`` when ``value`` is not a valid address.
    """
    if isinstance(value, Address):
        check_host(value.host, option)
        _check_port(value.port, option, value)
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or not rest.startswith(":") or ":" not in host:
                raise ValueError(f"{option}: cannot parse address {_short(value)}")
            port: Any = rest[1:]
        else:
            host, sep, port = text.rpartition(":")
            if not sep or ":" in host:
                raise ValueError(
                    f"{option}: cannot parse address {_short(value)} (expected 'host:port')")
        if not host:
            raise ValueError(f"{option}: empty host in {_short(value)}")
        check_host(host, option)
        return Address(host, _check_port(port, option, value))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        host, port = value
        if not isinstance(host, str) or not host:
            raise ValueError(f"{option}: invalid host in {_short(value)}")
        check_host(host, option)
        return Address(host, _check_port(port, option, value))
    raise ValueError(f"{option}: cannot parse address {_short(value)}")
