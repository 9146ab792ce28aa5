"""A fixed list of addresses: the discovery for tests, examples and small fleets."""

from __future__ import annotations

from typing import Iterable, List, Union

from ..address import Address, AddressLike, Endpoint, parse_address
from .base import Discovery, DiscoveryListener

__all__ = ["StaticDiscovery"]


class StaticDiscovery(Discovery):
    """Serve a fixed list of instances.

    :param addresses: ``"host:port"`` strings, ``(host, port)`` pairs, :class:`Address`
        or :class:`Endpoint` objects.  Duplicates are merged.
    :raises ValueError: naming ``discovery`` when an address cannot be parsed.
    """

    def __init__(self, addresses: Iterable[Union[AddressLike, Endpoint]]) -> None:
        if isinstance(addresses, (str, bytes)):
            addresses = [addresses]  # type: ignore[list-item]
        endpoints: List[Endpoint] = []
        seen = set()
        for item in addresses:
            endpoint = item if isinstance(item, Endpoint) else Endpoint(
                parse_address(item, "discovery"))
            if endpoint.address not in seen:
                seen.add(endpoint.address)
                endpoints.append(endpoint)
        self._endpoints = endpoints

    @property
    def addresses(self) -> List[Address]:
        """The configured addresses, in order."""
        return [e.address for e in self._endpoints]

    def start(self, listener: DiscoveryListener, pool_name: str) -> None:
        listener(list(self._endpoints))

    def stop(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"StaticDiscovery({[str(e) for e in self._endpoints]!r})"
