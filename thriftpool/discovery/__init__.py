"""Where a pool learns which server instances exist."""

from __future__ import annotations

from .base import Discovery, DiscoveryListener
from .dns import DnsDiscovery
from .static import StaticDiscovery
from .zookeeper import ZooKeeperDiscovery

__all__ = ["Discovery", "DiscoveryListener", "DnsDiscovery", "StaticDiscovery",
           "ZooKeeperDiscovery"]
