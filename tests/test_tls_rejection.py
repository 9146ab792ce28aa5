"""Mutual TLS with a client certificate the server rejects: a failed connect, not a
delivered request, so the proxy fails over (TLS 1.3 reports the refusal only at the
first read or write after the handshake)."""

from __future__ import annotations

import ssl
import time

import pytest
from thriftpy2.transport import TTransportException

import thriftpool
from servers import echo_thrift, wait_for
from thriftpool.address import parse_address
from thriftpool.connection import Connection, client_class, is_connect_error, should_discard
from tlscerts import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca, server, client, rogue, _ = make_pki(str(tmp_path_factory.mktemp("pki")))
    rogue_client = rogue.issue("rogue_client", client=True)
    return {"ca": ca, "server": server, "client": client, "rogue_client": rogue_client}


def context(pki, cert=None, version=ssl.TLSVersion.TLSv1_3) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["ca"].files.cert)
    ctx.minimum_version = ctx.maximum_version = version
    if cert is not None:
        ctx.load_cert_chain(cert.cert, cert.key)
    return ctx


@pytest.mark.timeout(60)
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
@pytest.mark.parametrize("cert", [None, "rogue_client"])
def test_a_rejected_client_certificate_is_a_connect_failure(farm, pki, version, cert):
    strict = farm.one(tls=(pki["server"].cert, pki["server"].key),
                      client_ca=pki["ca"].files.cert)
    config = thriftpool.PoolConfig.build(
        service=echo_thrift.Echo,
        ssl_context=context(pki, pki[cert] if cert else None, version))
    conn = None
    try:
        try:
            # TLS 1.2: the server's refusal ends the handshake, inside open().
            conn = Connection.open(parse_address(strict.address), config)
        except TTransportException as exc:
            assert version == ssl.TLSVersion.TLSv1_2
            error: BaseException = exc
        else:
            # TLS 1.3: the client's handshake is done before the server has checked the
            # certificate; the refusal arrives with the first read (or write).
            assert version == ssl.TLSVersion.TLSv1_3
            client = client_class(echo_thrift.Echo)(conn)
            with pytest.raises(TTransportException) as info:
                client.echo("anonymous")
            error = info.value
            assert "rejected by the server" in str(error)
            assert conn.sent is False  # not delivered: the proxy may retry elsewhere
        assert is_connect_error(error)
        assert should_discard(error)
        assert isinstance(error.__cause__, ssl.SSLError)
    finally:
        if conn is not None:
            conn.close()
    wait_for(lambda: strict.stats()["tls_failures"] >= 1, message="the refused handshake")
    assert strict.stats()["calls"] == 0


@pytest.mark.timeout(60)
def test_the_proxy_fails_over_from_an_instance_rejecting_the_client_certificate(farm, pki):
    strict = farm.one(tls=(pki["server"].cert, pki["server"].key),
                      client_ca=pki["ca"].files.cert)
    lenient = farm.one(tls=(pki["server"].cert, pki["server"].key))
    with thriftpool.ThriftPool(echo_thrift.Echo, [strict.address, lenient.address],
                               min_size=0, balancer="round_robin", retries=2,
                               ssl_context=context(pki, pki["rogue_client"])) as pool:
        proxy = pool.client()
        assert [proxy.echo(f"m{i}") for i in range(20)] == [f"m{i}" for i in range(20)]
        with pool.checkout() as client:  # a session that answered is no longer "fresh"
            client.ping()
            assert client._conn.socket._fresh is False
    assert strict.stats()["calls"] == 0
    assert lenient.stats()["calls"] == 21
    assert strict.stats()["tls_failures"] >= 1


@pytest.mark.timeout(60)
def test_an_instance_rejecting_the_client_certificate_does_not_flap(farm, pki):
    strict = farm.one(tls=(pki["server"].cert, pki["server"].key),
                      client_ca=pki["ca"].files.cert)
    lenient = farm.one(tls=(pki["server"].cert, pki["server"].key))

    class Record(thriftpool.PoolListener):
        def __init__(self) -> None:
            self.restored = 0

        def instance_restored(self, pool: str, address: str) -> None:
            if address == strict.address:
                self.restored += 1

    record = Record()
    with thriftpool.ThriftPool(echo_thrift.Echo, [strict.address, lenient.address],
                               min_size=1, balancer="round_robin", failure_threshold=1,
                               backoff_initial=0.05, backoff_max=0.2, watchdog_interval=0.05,
                               listeners=[record],
                               ssl_context=context(pki, pki["rogue_client"])) as pool:
        proxy = pool.client()
        ends = time.monotonic() + 1.5
        for i in range(5_000):  # bounded in count and in time
            assert proxy.echo(str(i)) == str(i)
            if time.monotonic() > ends:
                break
    assert record.restored <= 1, f"restored {record.restored} times in 1.5 s"


@pytest.mark.timeout(60)
def test_a_client_certificate_loaded_into_the_context_is_used_at_the_next_connect(farm, pki):
    strict = farm.one(tls=(pki["server"].cert, pki["server"].key),
                      client_ca=pki["ca"].files.cert)
    ctx = context(pki, pki["rogue_client"])
    with thriftpool.ThriftPool(echo_thrift.Echo, [strict.address], min_size=0, retries=0,
                               failure_threshold=100, ssl_context=ctx) as pool:
        with pytest.raises(TTransportException) as info:
            pool.client().echo("old certificate")
        assert is_connect_error(info.value)
        ctx.load_cert_chain(pki["client"].cert, pki["client"].key)  # rotate in place
        # The refusal ejected the instance as a failed connect does: it is back once the
        # watchdog's probe (a connect and a trial call, with the new certificate) succeeds.
        wait_for(lambda: pool.stats()["instances"][strict.address]["healthy"], 10,
                 message="the instance restored after the rotation")
        assert pool.client().echo("new certificate") == "new certificate"
    # The probe's trial call (a method no service has, answered UNKNOWN_METHOD) and ours;
    # the refused one never reached the server.
    assert strict.stats()["calls"] == 2

