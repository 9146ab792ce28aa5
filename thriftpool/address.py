"""Server addresses: parsing ``"host:port"`` strings and ``(host, port)`` pairs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Tuple, Union

__all__ = ["Address", "AddressLike", "Endpoint", "parse_address"]


class Address(NamedTuple):
    """A server instance's address; the key of its per-instance pool."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:  # IPv6 literal
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


AddressLike = Union[str, Tuple[str, int], Address]


@dataclass(frozen=True)
class Endpoint:
    """One live instance as discovery reports it: where it is and how much traffic it takes.

    :param address: where the instance listens.
    :param weight: relative share of traffic for weighted balancers (>= 1).
    :param tls: the instance speaks only TLS: a pool without ``ssl_context`` refuses to
        connect to it rather than send plaintext.
    """

    address: Address
    weight: int = 1
    tls: bool = False

    def __str__(self) -> str:
        return str(self.address)


def _check_port(port: Any, option: str, value: Any) -> int:
    if isinstance(port, bool):
        raise ValueError(f"{option}: invalid port in {value!r}")
    try:
        number = int(port)
    except (TypeError, ValueError):
        raise ValueError(f"{option}: invalid port in {value!r}") from None
    if not 0 < number < 65536:
        raise ValueError(f"{option}: port out of range 1-65535 in {value!r}")
    return number


def parse_address(value: Any, option: str = "address") -> Address:
    """Parse ``"host:port"``, ``"[v6]:port"``, ``(host, port)`` or an :class:`Address`.

    :param option: the option name to put in the error message.
    :raises ValueError: naming ``option`` when ``value`` is not a valid address.
    """
    if isinstance(value, Address):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep or not rest.startswith(":"):
                raise ValueError(f"{option}: cannot parse address {value!r}")
            port: Any = rest[1:]
        else:
            host, sep, port = text.rpartition(":")
            if not sep or ":" in host:
                raise ValueError(
                    f"{option}: cannot parse address {value!r} (expected 'host:port')")
        if not host:
            raise ValueError(f"{option}: empty host in {value!r}")
        return Address(host, _check_port(port, option, value))
    if isinstance(value, (tuple, list)) and len(value) == 2:
        host, port = value
        if not isinstance(host, str) or not host:
            raise ValueError(f"{option}: invalid host in {value!r}")
        return Address(host, _check_port(port, option, value))
    raise ValueError(f"{option}: cannot parse address {value!r}")
