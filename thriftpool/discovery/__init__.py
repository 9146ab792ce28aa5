"""Where a pool learns which server instances exist."""

from __future__ import annotations

from .base import Discovery, DiscoveryListener
from .static import StaticDiscovery

__all__ = ["Discovery", "DiscoveryListener", "StaticDiscovery"]
