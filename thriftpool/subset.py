"""Subsetting: which few instances of a large fleet one client connects to.

Pure functions and one small class, no I/O and no threads.  Each client ranks every
address by rendezvous (highest-random-weight) hashing of ``(salt, address)`` and uses
the first ``size`` that are not excluded (ejected):

- **Spread**: with a different salt per client, each instance is in about
  ``clients * size / instances`` subsets (a binomial spread: 1,000 clients x 100
  instances with subsets of 10 put 100 +- 10 clients on each instance).
- **Churn**: one instance joining or leaving changes at most one member of any
  client's subset (the ranks of the others do not move), so a deploy does not reshuffle
  every client's connections.
- **Ejection**: an excluded member is replaced by the next address in rank while it is
  out, and comes back in its place when it is no longer excluded.
- **Stable**: the hash is BLAKE2b, not Python's per-process randomized ``hash()``, so a
  given ``key`` picks the same subset in every process and on every machine.

::

    subsetter = Subsetter(10)                       # a per-process random salt
    members = subsetter.select(endpoints, excluded={ejected_address})
    sticky = Subsetter(10, key="host-17")           # the same choice after a restart
"""

from __future__ import annotations

import hashlib
import os
from typing import Collection, Dict, Iterable, List, Sequence, Tuple, Union

from .address import Address, Endpoint

__all__ = ["Subsetter", "rank", "score", "spread"]

#: ``excluded`` may name instances by address or by endpoint.
Excluded = Collection[Union[Address, Endpoint]]


def _salt(key: Union[str, bytes, None]) -> bytes:
    if key is None:
        return os.urandom(16)
    if isinstance(key, str):
        key = key.encode("utf-8")
    if not isinstance(key, bytes):
        raise ValueError(f"subset_key must be a str, bytes or None, got {key!r}")
    # BLAKE2b takes keys of up to 64 bytes; a longer one is hashed down to that.
    return key if len(key) <= 64 else hashlib.blake2b(key).digest()


def score(salt: bytes, address: Address) -> int:
    """The rendezvous score of ``address`` for a client salted with ``salt``: a 64-bit
    integer, the same in every process."""
    digest = hashlib.blake2b(str(address).encode("utf-8"), digest_size=8, key=salt,
                             salt=b"", person=b"thriftpool").digest()
    return int.from_bytes(digest, "big")


def rank(salt: bytes, addresses: Iterable[Address]) -> List[Address]:
    """``addresses`` (duplicates merged), best first for a client salted with ``salt``.

    Ties (a 64-bit collision) are broken by the address, so the order is total.
    """
    unique = set(addresses)
    return sorted(unique, key=lambda a: (-score(salt, a), a.host, a.port))


class Subsetter:
    """Chooses a client's subset of at most ``size`` instances.

    Thread-safe: :meth:`select` keeps a cache of scores that it replaces whole, never
    edits in place.

    :param size: how many instances to use, at least 1.
    :param key: the salt: a string or bytes for a stable choice (e.g. the host name, so a
        restarted client reconnects to the same instances), or ``None`` for a random
        salt drawn once per :class:`Subsetter` (per process).
    :raises ValueError: naming ``subset_size`` or ``subset_key``.
    """

    def __init__(self, size: int, key: Union[str, bytes, None] = None) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"subset_size must be an integer >= 1, got {size!r}")
        self.size = size
        self.salt = _salt(key)
        self.stable = key is not None
        self._scores: Dict[Address, int] = {}

    def ranked(self, endpoints: Iterable[Endpoint]) -> List[Endpoint]:
        """Every endpoint (the first of each address), best first."""
        scores = self._scores
        fresh: Dict[Address, int] = {}
        chosen: Dict[Address, Endpoint] = {}
        for endpoint in endpoints:
            address = endpoint.address
            if address in chosen:
                continue
            chosen[address] = endpoint
            value = scores.get(address)
            fresh[address] = score(self.salt, address) if value is None else value
        self._scores = fresh  # only the current addresses: a churning fleet stays small
        order = sorted(chosen, key=lambda a: (-fresh[a], a.host, a.port))
        return [chosen[a] for a in order]

    def select(self, endpoints: Iterable[Endpoint], excluded: Excluded = frozenset()
               ) -> List[Endpoint]:
        """The subset: the first ``size`` endpoints in rank that are not ``excluded``.

        :param endpoints: every instance discovery knows.
        :param excluded: addresses (or endpoints) to pass over while they are out, e.g.
            the ejected ones; each is replaced by the next in rank.
        :returns: at most ``size`` endpoints, best first (fewer when too few are left;
            empty when every one is excluded: the caller decides what to fall back on).
        """
        out = {e.address if isinstance(e, Endpoint) else e for e in excluded}
        members: List[Endpoint] = []
        for endpoint in self.ranked(endpoints):
            if endpoint.address in out:
                continue
            members.append(endpoint)
            if len(members) == self.size:
                break
        return members

    def __repr__(self) -> str:
        return f"Subsetter(size={self.size}, {'keyed' if self.stable else 'random salt'})"


def spread(clients: Sequence[Subsetter], endpoints: Sequence[Endpoint]
           ) -> Tuple[Dict[Address, int], List[List[Endpoint]]]:
    """For simulations: how many clients each address gets, and each client's subset."""
    counts: Dict[Address, int] = {e.address: 0 for e in endpoints}
    subsets = []
    for client in clients:
        members = client.select(endpoints)
        subsets.append(members)
        for endpoint in members:
            counts[endpoint.address] += 1
    return counts, subsets

