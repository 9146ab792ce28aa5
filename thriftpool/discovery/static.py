"""A fixed list of addresses: the discovery for tests, examples and small fleets."""

from __future__ import annotations

import logging

from typing import Iterable, List, Optional, Union

from ..address import Address, AddressLike, Endpoint, parse_address
from ._delivery import EndpointFilter, SnapshotFile, check_filter
from .base import Discovery, DiscoveryListener

__all__ = ["StaticDiscovery"]

logger = logging.getLogger(__name__)


class StaticDiscovery(Discovery):
    """Serve a fixed list of instances.

    A static list is always readable and never changes, so it has no drop protection
    and never reads a snapshot; with ``snapshot_path`` it writes one, in the same format
    as the other discoveries, so tools (and a later switch to another discovery) see the
    list it served.

    :param addresses: ``"host:port"`` strings, ``(host, port)`` pairs, :class:`Address`
        or :class:`Endpoint` objects.  Duplicates are merged.
    :param filter: a callable of each :class:`Endpoint`, returning whether the pool uses
        it (applied once, at :meth:`start`).
    :param snapshot_path: write the list served to this file at :meth:`start` (atomically,
        mode 0600); a failure to write is logged as a warning, never fatal.
    :raises ValueError: naming ``discovery`` when an address cannot be parsed (a bad
        host, a port outside 1-65535), or ``filter`` when it is not callable.  A bad
        weight is refused by :class:`Endpoint` itself.
    """

    def __init__(self, addresses: Iterable[Union[AddressLike, Endpoint]], *,
                 filter: Optional[EndpointFilter] = None,  # noqa: A002 - documented name
                 snapshot_path: Optional[str] = None) -> None:
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
        if snapshot_path is not None and (not isinstance(snapshot_path, str)
                                          or not snapshot_path):
            raise ValueError(f"snapshot_path must be a file path, got {snapshot_path!r}")
        self._snapshot = None if snapshot_path is None else SnapshotFile(
            snapshot_path, "static:" + ",".join(str(e) for e in endpoints))

    @property
    def addresses(self) -> List[Address]:
        """The configured addresses, in order."""
        return [e.address for e in self._endpoints]

    def start(self, listener: DiscoveryListener, pool_name: str) -> None:
        keep = self._filter
        endpoints = [e for e in self._endpoints if keep is None or keep(e)]
        listener(endpoints)
        if self._snapshot is not None:
            try:
                self._snapshot.write(endpoints)
            except OSError as exc:
                logger.warning("pool %r: cannot write the discovery snapshot %s: %s",
                               pool_name, self._snapshot.path, exc)

    def stop(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"StaticDiscovery({[str(e) for e in self._endpoints]!r})"
