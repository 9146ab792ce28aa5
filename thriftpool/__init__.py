"""thriftpool: thread-safe connection pools for thriftpy2 clients, with service discovery.

::

    import thriftpy2, thriftpool
    echo = thriftpy2.load("idl/echo.thrift", module_name="echo_thrift")
    with thriftpool.ThriftPool(echo.Echo, ["127.0.0.1:9090", "127.0.0.1:9091"]) as pool:
        with pool.checkout() as client:
            client.echo("hi")
        pool.client().echo("hi")
"""

from __future__ import annotations

from .address import Address, Endpoint, Metadata, parse_address
from .balancer import Balancer, LeastLoaded, RandomBalancer, RoundRobin
from .config import PoolConfig
from .deadlines import Deadline, deadline
from .discovery import (
    Discovery,
    DiscoveryListener,
    DnsDiscovery,
    StaticDiscovery,
    ZooKeeperDiscovery,
)
from .errors import (
    ClientReleased,
    DeadlineExceeded,
    NoAvailableInstance,
    PoolClosed,
    PoolExhausted,
    ReplyMismatch,
    ThriftPoolError,
    TooManyWaiters,
)
from .events import ExhaustedCallback, ExhaustedEvent, Holder, PoolListener
from .pool import Checkout, ThriftPool
from .proxy import ClientProxy
from .registration import RegisteredServer, RegistrationConflict, ServiceRegistration, serve

__version__ = "0.1.0"

__all__ = [
    "Address",
    "Balancer",
    "Checkout",
    "ClientProxy",
    "ClientReleased",
    "Deadline",
    "DeadlineExceeded",
    "Discovery",
    "DiscoveryListener",
    "DnsDiscovery",
    "Endpoint",
    "LeastLoaded",
    "Metadata",
    "ExhaustedCallback",
    "ExhaustedEvent",
    "Holder",
    "NoAvailableInstance",
    "PoolClosed",
    "PoolConfig",
    "PoolExhausted",
    "PoolListener",
    "RandomBalancer",
    "RegisteredServer",
    "RegistrationConflict",
    "ReplyMismatch",
    "RoundRobin",
    "ServiceRegistration",
    "StaticDiscovery",
    "ThriftPool",
    "ThriftPoolError",
    "TooManyWaiters",
    "ZooKeeperDiscovery",
    "deadline",
    "parse_address",
    "serve",
]
