"""A fixed list of addresses: the discovery for tests, examples and small fleets."""

from __future__ import annotations

from typing import Iterable, List, Optional, Union

from ..address import Address, AddressLike, Endpoint, parse_address
from ._delivery import EndpointFilter, check_filter
from .base import Discovery, DiscoveryListener

__all__ = ["StaticDiscovery"]


class StaticDiscovery(Discovery):
    """Serve a fixed list of instances.

    A static list is always readable, so it has no snapshot file and no drop
    protection (those options exist for sources that can fail or change).

    :param addresses: ``"host:port"`` strings, ``(host, port)`` pairs, :class:`Address`
        or :class:`Endpoint` objects.  Duplicates are merged.
    :param filter: a callable of each :class:`Endpoint`, returning whether the pool uses
        it (applied once, at :meth:`start`).
    :raises ValueError: naming ``discovery`` when an address cannot be parsed (a bad
        host, a port outside 1-65535), or ``filter`` when it is not callable.  A bad
        weight is refused by :class:`Endpoint` itself.
    """

    def __init__(self, addresses: Iterable[Union[AddressLike, Endpoint]], *,
                 filter: Optional[EndpointFilter] = None,  # noqa: A002 - documented name
                 ) -> None:
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
        self._filter = check_filter(filter)

    @property
    def addresses(self) -> List[Address]:
        """The configured addresses, in order."""
        return [e.address for e in self._endpoints]

    def start(self, listener: DiscoveryListener, pool_name: str) -> None:
        keep = self._filter
        listener([e for e in self._endpoints if keep is None or keep(e)])

    def stop(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"StaticDiscovery({[str(e) for e in self._endpoints]!r})"
