"""What every discovery does between reading its source and calling the pool's listener.

- :func:`check_filter`, :func:`check_fraction`: option checks.
- :class:`DropGuard`: the pure rule that holds back a read removing too many instances
  at once until a later read confirms it (``max_drop_fraction``, ``drop_confirm_delay``).
- :class:`SnapshotFile`: the last delivered list on disk (``snapshot_path``), written
  atomically and read back at a cold start when the source cannot be read.
- :class:`Publisher`: ties them together for one discovery: filter, guard, deliver,
  write the snapshot, count, and serve the snapshot when the first read is late.

A publisher is used from the discovery's own worker thread only (its counters are read
by ``stats()`` from any thread, which needs no lock: each is one attribute).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from .. import _compat
from ..address import Address, Endpoint
from .base import DiscoveryListener

__all__ = [
    "DropDecision",
    "DropGuard",
    "EndpointFilter",
    "Publisher",
    "SnapshotFile",
    "check_filter",
    "check_fraction",
]

logger = logging.getLogger("thriftpool.discovery")

#: ``filter=``: a callable of an :class:`Endpoint` returning whether the pool uses it.
EndpointFilter = Callable[[Endpoint], bool]

#: The ``"format"`` field of a snapshot file; anything else is a foreign file.
SNAPSHOT_FORMAT = "thriftpool-discovery-snapshot"
SNAPSHOT_VERSION = 1
#: A snapshot larger than this is not read (it cannot be one of ours for a sane fleet).
SNAPSHOT_MAX_BYTES = 64 * 1024 * 1024


def check_fraction(value: Any, option: str = "max_drop_fraction") -> Optional[float]:
    """``None`` (no protection) or a number in 0..1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or math.isnan(value) or not 0 <= value <= 1:
        raise ValueError(f"{option} must be a fraction in 0..1 or None, got {value!r}")
    return float(value)


def check_filter(value: Any) -> Optional[EndpointFilter]:
    """``None`` or a callable of an :class:`Endpoint`."""
    if value is not None and not callable(value):
        raise ValueError(f"filter must be a callable of an Endpoint returning a bool, "
                         f"got {value!r}")
    return value  # type: ignore[no-any-return]


def check_snapshot_path(value: Any) -> Optional[str]:
    """``None`` or a file path (``str`` or ``os.PathLike``)."""
    if value is None:
        return None
    try:
        path = os.fspath(value)
    except TypeError:
        raise ValueError(f"snapshot_path must be a file path, got {value!r}") from None
    if not isinstance(path, str) or not path or path.endswith(os.sep):
        raise ValueError(f"snapshot_path must be a file path, got {value!r}")
    return path


# -- drop protection ------------------------------------------------------------------

@dataclass(frozen=True)
class DropDecision:
    """What to deliver after one successful read.

    :ivar endpoints: the list to deliver (the read, plus the instances held back).
    :ivar recheck_in: seconds until a read that can confirm the held removal, or
        ``None`` when nothing is held.
    :ivar event: ``"held"`` (a large removal was held back now), ``"confirmed"`` (a held
        removal was applied), ``"released"`` (the instances came back before the
        confirmation), or ``None``.
    :ivar removed: how many instances the read removes (held or not).
    """

    endpoints: List[Endpoint]
    recheck_in: Optional[float]
    event: Optional[str]
    removed: int


class DropGuard:
    """Hold back a read that removes more than ``max_fraction`` of the known instances.

    Pure: the caller passes the clock.  A read that removes a large share starts a hold:
    the removed instances stay in the delivered list (the read's additions and changes
    apply at once) until a read at least ``confirm_delay`` seconds after the hold began
    still lacks them; then the removal applies.  While a hold is on, every missing
    instance waits for that confirmation; a read that lists them all again ends the hold
    ("released").  Removing a single instance (one deregistration) never starts a hold,
    however small the fleet.

    :param max_fraction: the largest share removed at once without a hold; ``None`` or
        ``1.0`` turns the guard off.
    :param confirm_delay: seconds between the holding read and the confirming one.
    """

    def __init__(self, max_fraction: Optional[float], confirm_delay: float) -> None:
        self.max_fraction = max_fraction
        self.confirm_delay = confirm_delay
        self.held_since: Optional[float] = None
        self.held: Set[Address] = set()

    def reset(self) -> None:
        self.held_since = None
        self.held = set()

    def decide(self, previous: Optional[Sequence[Endpoint]], read: List[Endpoint],
               now: float) -> DropDecision:
        if previous is None or self.max_fraction is None:
            self.reset()
            return DropDecision(read, None, None, 0)
        present = {e.address for e in read}
        kept = [e for e in previous if e.address not in present]
        removed = len(kept)
        if self.held_since is None:
            if removed <= 1 or removed <= self.max_fraction * len(previous):
                return DropDecision(read, None, None, removed)
            self.held_since = now
            self.held = {e.address for e in kept}
            return DropDecision(read + kept, self.confirm_delay, "held", removed)
        # A hold is on: whatever is missing waits for the same confirmation, even when
        # some instances came back and the rest alone would be a small removal.
        if not kept:
            self.reset()
            return DropDecision(read, None, "released", 0)
        waited = now - self.held_since
        if waited >= self.confirm_delay:
            self.reset()
            return DropDecision(read, None, "confirmed", removed)
        self.held = {e.address for e in kept}
        return DropDecision(read + kept, self.confirm_delay - waited, None, removed)


# -- the snapshot file ----------------------------------------------------------------

def _endpoint_json(endpoint: Endpoint) -> Dict[str, Any]:
    record: Dict[str, Any] = {"host": endpoint.address.host, "port": endpoint.address.port,
                              "weight": endpoint.weight, "tls": endpoint.tls}
    metadata = getattr(endpoint.metadata, "to_json", None)
    if metadata is not None:
        record["metadata"] = metadata()
    elif endpoint.metadata:
        record["metadata"] = dict(endpoint.metadata)
    return record


class SnapshotFile:
    """The last list a discovery delivered, on disk.

    The file is JSON: ``{"format": "thriftpool-discovery-snapshot", "version": 1,
    "source": "<what discovery read>", "written_at": <unix time>, "instances": [{"host",
    "port", "weight", "tls", "metadata"}]}``.  It is written to a temporary file in the
    same directory (mode 0600), flushed to disk and renamed over the old one, so a
    reader sees the old list or the new one, never a part.

    :param path: the file.
    :param source: what the discovery reads (e.g. ``"zookeeper:/services/echo"``); a
        file written for another source is foreign and ignored.
    """

    def __init__(self, path: str, source: str) -> None:
        self.path = path
        self.source = source

    def write(self, endpoints: Sequence[Endpoint]) -> None:
        """Replace the file with ``endpoints``.

        :raises OSError: the directory is not writable, the disk is full...
        """
        doc = {"format": SNAPSHOT_FORMAT, "version": SNAPSHOT_VERSION, "source": self.source,
               "written_at": time.time(), "instances": [_endpoint_json(e) for e in endpoints]}
        data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode("utf-8")
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(self.path) + ".",
                                   suffix=".tmp", dir=directory)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def read(self) -> Tuple[Optional[List[Endpoint]], float, str]:
        """Load the file.

        :returns: ``(endpoints, age in seconds, "")``, or ``(None, 0, why)`` when the file
            is missing, unreadable, corrupt or foreign.
        """
        try:
            with open(self.path, "rb") as f:
                data = f.read(SNAPSHOT_MAX_BYTES + 1)
        except FileNotFoundError:
            return None, 0.0, "it does not exist"
        except OSError as exc:
            return None, 0.0, f"it cannot be read ({exc})"
        if len(data) > SNAPSHOT_MAX_BYTES:
            return None, 0.0, f"it is larger than {SNAPSHOT_MAX_BYTES} bytes"
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return None, 0.0, "it is not JSON (corrupt)"
        if not isinstance(doc, dict) or doc.get("format") != SNAPSHOT_FORMAT:
            return None, 0.0, "it is not a thriftpool discovery snapshot"
        if doc.get("version") != SNAPSHOT_VERSION:
            return None, 0.0, f"its version is {doc.get('version')!r}, not {SNAPSHOT_VERSION}"
        if doc.get("source") != self.source:
            return None, 0.0, (f"it was written for {str(doc.get('source'))[:200]!r}, "
                               f"not {self.source!r}")
        written_at = doc.get("written_at")
        records = doc.get("instances")
        if isinstance(written_at, bool) or not isinstance(written_at, (int, float)) \
                or not isinstance(records, list):
            return None, 0.0, "it is corrupt (no 'written_at' or 'instances')"
        endpoints: List[Endpoint] = []
        try:
            for record in records:
                endpoints.append(Endpoint(Address(record["host"], record["port"]),
                                          record.get("weight", 1), record.get("tls", False),
                                          record.get("metadata") or {}))
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            return None, 0.0, f"it is corrupt (an instance is invalid: {str(exc)[:200]})"
        return endpoints, max(0.0, time.time() - float(written_at)), ""


# -- the publisher --------------------------------------------------------------------

class Publisher:
    """Filters, guards, delivers and saves the lists of one discovery.

    :param kind: the source's name in ``stats()["source"]`` (``"zookeeper"``, ``"dns"``).
    :param source: what is read, for the snapshot file and log lines.
    :param snapshot_path: where to keep the last delivered list, or ``None``.
    :param connect_timeout: how long after :meth:`start` the first read may take before
        the snapshot is served.
    :param max_drop_fraction: see :class:`DropGuard`.
    :param drop_confirm_delay: see :class:`DropGuard`.
    :param endpoint_filter: the ``filter=`` option.
    """

    def __init__(self, kind: str, source: str, *, snapshot_path: Optional[str],
                 connect_timeout: float, max_drop_fraction: Optional[float],
                 drop_confirm_delay: float, endpoint_filter: Optional[EndpointFilter]
                 ) -> None:
        self.kind = kind
        self.source = source
        self.snapshot = None if snapshot_path is None else SnapshotFile(snapshot_path, source)
        self.connect_timeout = connect_timeout
        self.guard = DropGuard(max_drop_fraction, drop_confirm_delay)
        self.endpoint_filter = endpoint_filter
        self.reset("", None)

    def reset(self, pool_name: str, listener: Optional[DiscoveryListener]) -> None:
        """Forget everything (at start, and after fork)."""
        self.pool_name = pool_name
        self.listener = listener
        self.stopping = False
        self.started_at = _compat.monotonic()
        self.delivered: Optional[List[Endpoint]] = None
        self.current_source: Optional[str] = None
        self.snapshot_tried = False
        self.snapshot_age: Optional[float] = None
        self.snapshots = 0
        self.drops_held = 0
        self.drops_confirmed = 0
        self.snapshot_writes = 0
        self.snapshot_write_errors = 0
        self._write_problem = ""
        self.guard.reset()

    # -- the source ---------------------------------------------------------------------

    def read_succeeded(self, endpoints: List[Endpoint]) -> Optional[float]:
        """Deliver a successful read of the source.

        :returns: seconds until the source must be read again to confirm a held
            removal, or ``None``.
        """
        first = self.current_source != self.kind
        if first and self.current_source == "snapshot":
            logger.info("pool %r: %s read; it replaces the snapshot", self.pool_name,
                        self.source)
        self.current_source = self.kind
        self.snapshot_age = None
        chosen = self._filtered(endpoints)
        decision = self.guard.decide(self.delivered, chosen, _compat.monotonic())
        previous = 0 if self.delivered is None else len(self.delivered)
        if decision.event == "held":
            self.drops_held += 1
            logger.warning("pool %r: %s lists %d of the %d known instances: holding the "
                           "removal of %d back until a read at least %.1fs from now "
                           "confirms it", self.pool_name, self.source, len(chosen),
                           previous, decision.removed, self.guard.confirm_delay)
        elif decision.event == "confirmed":
            self.drops_confirmed += 1
            logger.warning("pool %r: %s confirmed: removing %d of the %d known instances",
                           self.pool_name, self.source, decision.removed, previous)
        elif decision.event == "released":
            logger.info("pool %r: %s lists the held instances again; nothing removed",
                        self.pool_name, self.source)
        self._deliver(decision.endpoints, save=True, force_save=first)
        return decision.recheck_in

    def snapshot_due(self) -> Optional[float]:
        """Serve the snapshot if the first read is late; call while it has not come.

        :returns: seconds until the snapshot is due, or ``None`` when there is nothing
            left to wait for (served, missing, or the source was read).
        """
        if self.snapshot is None or self.snapshot_tried or self.current_source is not None \
                or self.stopping:
            return None
        left = self.started_at + self.connect_timeout - _compat.monotonic()
        if left > 0:
            return left
        self.snapshot_tried = True
        endpoints, age, problem = self.snapshot.read()
        if endpoints is None:
            logger.warning("pool %r: %s was not read within %.1fs, and the snapshot %s "
                           "is not used: %s", self.pool_name, self.source,
                           self.connect_timeout, self.snapshot.path, problem)
            return None
        logger.warning("pool %r: %s was not read within %.1fs; serving the snapshot %s "
                       "(%d instances, written %.0fs ago) until it is", self.pool_name,
                       self.source, self.connect_timeout, self.snapshot.path,
                       len(endpoints), age)
        self.current_source = "snapshot"
        self.snapshot_age = age
        self._deliver(self._filtered(endpoints), save=False)
        return None

    # -- inspection ---------------------------------------------------------------------

    def stats(self) -> Dict[str, Any]:
        """The keys every discovery's ``stats()`` has."""
        delivered = self.delivered
        return {
            "source": self.current_source,
            "instances": None if delivered is None else len(delivered),
            "snapshots": self.snapshots,
            "snapshot_path": None if self.snapshot is None else self.snapshot.path,
            "snapshot_age": self.snapshot_age,
            "snapshot_writes": self.snapshot_writes,
            "snapshot_write_errors": self.snapshot_write_errors,
            "drops_held": self.drops_held,
            "drops_confirmed": self.drops_confirmed,
            "holding": sorted(str(a) for a in self.guard.held),
        }

    # -- internals ----------------------------------------------------------------------

    def _filtered(self, endpoints: List[Endpoint]) -> List[Endpoint]:
        keep = self.endpoint_filter
        if keep is None:
            return endpoints
        chosen = []
        for endpoint in endpoints:
            try:
                if keep(endpoint):
                    chosen.append(endpoint)
            except Exception:
                logger.exception("pool %r: the discovery filter failed on %s; left out",
                                 self.pool_name, endpoint)
        return chosen

    def _deliver(self, endpoints: List[Endpoint], save: bool, force_save: bool = False
                 ) -> None:
        if self.stopping:
            return
        changed = endpoints != self.delivered
        if changed:
            self.delivered = endpoints
            self.snapshots += 1
            listener = self.listener
            logger.debug("pool %r: %s lists %d instances", self.pool_name, self.source,
                         len(endpoints))
            if listener is not None:
                try:
                    listener(list(endpoints))
                except Exception:
                    logger.exception("pool %r: the discovery listener failed",
                                     self.pool_name)
        if save and self.snapshot is not None and (changed or force_save):
            self._save(endpoints)

    def _save(self, endpoints: List[Endpoint]) -> None:
        assert self.snapshot is not None
        try:
            self.snapshot.write(endpoints)
        except (OSError, TypeError, ValueError) as exc:
            self.snapshot_write_errors += 1
            problem = f"{type(exc).__name__}: {exc}"
            # Once per kind of failure (the message names a random temporary file).
            kind = f"{type(exc).__name__}:{getattr(exc, 'errno', None)}"
            if kind != self._write_problem:
                self._write_problem = kind
                logger.warning("pool %r: cannot write the snapshot %s: %s", self.pool_name,
                               self.snapshot.path, problem)
        else:
            self.snapshot_writes += 1
            self._write_problem = ""
