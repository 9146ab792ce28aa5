"""Option validation: every invalid option raises ValueError naming it, before any I/O."""

from __future__ import annotations

import gc
import math
import threading

import pytest

import thriftpool
from servers import echo_thrift, free_port

pytestmark = pytest.mark.usefixtures("no_thread_leak")

ADDR = "127.0.0.1:1"  # never contacted: validation fails first


def build(discovery=ADDR, **options):
    return thriftpool.ThriftPool(echo_thrift.Echo, discovery, **options)


def thriftpool_threads():
    return [t for t in threading.enumerate() if t.name.startswith("thriftpool-")]


BAD_OPTIONS = [
    # sizes
    ({"min_size": 5, "max_size": 2}, "min_size"),
    ({"min_size": -1}, "min_size"),
    ({"max_size": 0}, "max_size"),
    ({"max_size": -3}, "max_size"),
    ({"min_size": 2, "initial_size": 1, "max_size": 4}, "initial_size"),
    ({"min_size": 0, "initial_size": 5, "max_size": 4}, "initial_size"),
    ({"initial_size": -1, "min_size": 0}, "initial_size"),
    ({"initial_size": None}, "initial_size"),
    ({"max_size": 2.5}, "max_size"),
    ({"max_size": "8"}, "max_size"),
    # bools where numbers are expected
    ({"max_size": True}, "max_size"),
    ({"min_size": False}, "min_size"),
    ({"initial_size": True}, "initial_size"),
    ({"checkout_timeout": True}, "checkout_timeout"),
    ({"socket_timeout": False}, "socket_timeout"),
    ({"idle_timeout": True}, "idle_timeout"),
    ({"max_lifetime": True}, "max_lifetime"),
    ({"connect_timeout": True}, "connect_timeout"),
    ({"watchdog_interval": True}, "watchdog_interval"),
    ({"backoff_initial": True}, "backoff_initial"),
    ({"backoff_multiplier": True}, "backoff_multiplier"),
    ({"lifetime_jitter": True}, "lifetime_jitter"),
    ({"backoff_jitter": False}, "backoff_jitter"),
    # negative or zero timeouts
    ({"checkout_timeout": -1}, "checkout_timeout"),
    ({"checkout_timeout": None}, "checkout_timeout"),
    ({"checkout_timeout": math.inf}, "checkout_timeout"),
    ({"idle_timeout": 0}, "idle_timeout"),
    ({"idle_timeout": -5.0}, "idle_timeout"),
    ({"max_lifetime": 0}, "max_lifetime"),
    ({"max_lifetime": -1}, "max_lifetime"),
    ({"connect_timeout": 0}, "connect_timeout"),
    ({"connect_timeout": -0.5}, "connect_timeout"),
    ({"connect_timeout": None}, "connect_timeout"),
    ({"socket_timeout": 0}, "socket_timeout"),
    ({"socket_timeout": -1}, "socket_timeout"),
    ({"watchdog_interval": 0}, "watchdog_interval"),
    ({"backoff_initial": 0}, "backoff_initial"),
    ({"backoff_max": -1}, "backoff_max"),
    ({"backoff_initial": 5.0, "backoff_max": 1.0}, "backoff_max"),
    ({"backoff_multiplier": 0.5}, "backoff_multiplier"),
    ({"backoff_multiplier": "2"}, "backoff_multiplier"),
    ({"lifetime_jitter": 0.9}, "lifetime_jitter"),
    ({"lifetime_jitter": -0.1}, "lifetime_jitter"),
    ({"backoff_jitter": 1.5}, "backoff_jitter"),
    # NaN and strings are not seconds
    ({"socket_timeout": math.nan}, "socket_timeout"),
    ({"checkout_timeout": math.nan}, "checkout_timeout"),
    ({"idle_timeout": "60"}, "idle_timeout"),
    ({"connect_timeout": "1"}, "connect_timeout"),
    # transport, protocol and other choices
    ({"transport": "http"}, "transport"),
    ({"transport": object()}, "transport"),
    ({"protocol": "json"}, "protocol"),
    ({"protocol": 3}, "protocol"),
    ({"on_exhausted": "alert"}, "on_exhausted"),
    ({"name": 42}, "name"),
    ({"balancer": "fastest"}, "balancer"),
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("options,option", BAD_OPTIONS,
                         ids=[f"{o}-{i}" for i, (_, o) in enumerate(BAD_OPTIONS)])
def test_invalid_option_raises_value_error_naming_it(options, option):
    with pytest.raises(ValueError, match=option):
        build(**options)
    assert not thriftpool_threads()


BAD_ADDRESSES = [
    "localhost",                 # no port
    "127.0.0.1:",                # empty port
    ":9090",                     # empty host
    "127.0.0.1:http",            # port is not a number
    "127.0.0.1:0",               # port out of range
    "127.0.0.1:65536",
    "127.0.0.1:-1",
    "::1:9090",                  # unbracketed IPv6
    "[::1]",                     # bracketed without port
    "[::1]9090",
    ("127.0.0.1",),              # a 1-tuple
    ("127.0.0.1", 9090, 1),      # a 3-tuple
    ("", 9090),                  # empty host
    ("127.0.0.1", "x"),
    ("127.0.0.1", True),         # a bool is not a port
    (9090, "127.0.0.1"),         # swapped
    42,
    None,
]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("address", BAD_ADDRESSES, ids=[repr(a) for a in BAD_ADDRESSES])
def test_unparsable_address_raises_value_error_naming_discovery(address):
    with pytest.raises(ValueError, match="discovery"):
        build([address])
    assert not thriftpool_threads()


@pytest.mark.timeout(20)
def test_missing_discovery_and_bad_service_are_rejected():
    with pytest.raises(ValueError, match="discovery"):
        thriftpool.ThriftPool(echo_thrift.Echo)
    with pytest.raises(ValueError, match="service"):
        thriftpool.ThriftPool(object(), [ADDR])
    with pytest.raises(ValueError, match="service"):
        thriftpool.ThriftPool("echo", [ADDR])


@pytest.mark.timeout(20)
def test_a_failed_constructor_leaves_nothing_behind():
    """__del__ of a half-built pool must be safe (an error in it would be a warning, and
    warnings are errors here) and no thread may be left running."""
    for options in ({"max_size": 0}, {"transport": "nope"}):
        with pytest.raises(ValueError):
            build(**options)
    with pytest.raises(ValueError):
        build(["127.0.0.1:9090", "nonsense"])
    gc.collect()
    assert not thriftpool_threads()


@pytest.mark.parametrize("address,expected", [
    ("127.0.0.1:9090", ("127.0.0.1", 9090)),
    (" 127.0.0.1:9090 ", ("127.0.0.1", 9090)),
    (("127.0.0.1", 9090), ("127.0.0.1", 9090)),
    (["127.0.0.1", "9090"], ("127.0.0.1", 9090)),
    ("[::1]:9090", ("::1", 9090)),
    ("example.com:1", ("example.com", 1)),
    ("host:65535", ("host", 65535)),
])
def test_parse_address_accepts_the_documented_forms(address, expected):
    parsed = thriftpool.parse_address(address)
    assert tuple(parsed) == expected
    assert thriftpool.parse_address(parsed) is parsed


def test_parse_address_names_the_option_it_is_given():
    with pytest.raises(ValueError, match="^upstream: "):
        thriftpool.parse_address("nope", "upstream")
    assert str(thriftpool.parse_address("[::1]:80")) == "[::1]:80"
    assert str(thriftpool.parse_address(("10.0.0.1", 80))) == "10.0.0.1:80"


def test_config_defaults_and_unit_conversions():
    config = thriftpool.PoolConfig.build()
    assert (config.min_size, config.initial_size, config.max_size) == (1, 1, 8)
    assert config.checkout_timeout == 1.0
    assert config.socket_timeout == 5.0
    # initial_size defaults to min_size, not to max_size or 0
    assert thriftpool.PoolConfig.build(min_size=3, max_size=5).initial_size == 3
    # None and infinity both mean "never"; zero waits are allowed for checkouts only
    never = thriftpool.PoolConfig.build(idle_timeout=None, max_lifetime=math.inf,
                                        socket_timeout=None, checkout_timeout=0)
    assert never.idle_timeout is None and never.max_lifetime is None
    assert never.socket_timeout is None and never.checkout_timeout == 0.0
    # integers are accepted for seconds and stored as floats
    assert thriftpool.PoolConfig.build(socket_timeout=2).socket_timeout == 2.0
    import dataclasses

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.max_size = 3  # type: ignore[misc]


@pytest.mark.timeout(20)
def test_defaults_alone_make_a_working_pool(farm):
    server = farm.one()
    with thriftpool.ThriftPool(echo_thrift.Echo, [server.address]) as pool:
        with pool.checkout() as client:
            assert client.echo("hi") == "hi"
        assert pool.client().echo("there") == "there"
        assert pool.config.max_size == 8
        assert pool.name == "Echo"  # the service name by default
    # a single string is one address, a StaticDiscovery is taken as is
    with thriftpool.ThriftPool(echo_thrift.Echo, server.address, min_size=0) as pool:
        assert pool.client().echo("a") == "a"
    discovery = thriftpool.StaticDiscovery([server.address, server.address])
    assert discovery.addresses == [thriftpool.Address("127.0.0.1", server.port)]
    with thriftpool.ThriftPool(echo_thrift.Echo, discovery, min_size=0) as pool:
        assert list(pool.stats()["instances"]) == [server.address]


@pytest.mark.timeout(20)
@pytest.mark.parametrize("timeout", [-1, float("nan"), "1", True])
def test_a_bad_checkout_timeout_is_refused_even_with_an_idle_connection(farm, timeout):
    # An idle connection is ready, so the checkout would take the fast path: the
    # timeout is still checked, at the call.
    server = farm.one()
    with thriftpool.ThriftPool(echo_thrift.Echo, [server.address], min_size=1) as pool:
        pool.wait()
        with pytest.raises(ValueError, match="timeout"):
            pool.checkout(timeout=timeout)
        with pool.checkout(timeout=0) as client:  # zero: no waiting, still valid
            assert client.echo("ok") == "ok"
        assert pool.stats()["in_use"] == 0


@pytest.mark.timeout(20)
def test_factories_are_accepted_as_transport_and_protocol(farm):
    from thriftpy2.protocol import TBinaryProtocolFactory
    from thriftpy2.transport import TBufferedTransportFactory

    server = farm.one()
    with thriftpool.ThriftPool(echo_thrift.Echo, [server.address], min_size=0,
                               transport=TBufferedTransportFactory(),
                               protocol=TBinaryProtocolFactory()) as pool:
        assert pool.client().echo("x") == "x"


@pytest.mark.timeout(20)
def test_addresses_nobody_listens_on_are_valid_options():
    """An unreachable instance is a runtime failure, not a configuration error."""
    with thriftpool.ThriftPool(echo_thrift.Echo, [f"127.0.0.1:{free_port()}"],
                               min_size=0) as pool:
        assert len(pool.stats()["instances"]) == 1
