"""TLS: verification by the caller's SSLContext, mutual TLS, and no plaintext, ever."""

from __future__ import annotations

import ssl

import pytest
from thriftpy2.transport import TTransportException

import thriftpool
from servers import wait_for
from tlscerts import make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    ca, server, client, rogue, rogue_server = make_pki(str(tmp_path_factory.mktemp("pki")))
    return {"ca": ca, "server": server, "client": client, "rogue_server": rogue_server}


def client_context(pki, with_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=pki["ca"].files.cert)
    if with_client_cert:
        ctx.load_cert_chain(pki["client"].cert, pki["client"].key)
    return ctx


@pytest.mark.timeout(60)
def test_calls_over_verified_tls(farm, service, pki):
    server = farm.one(tls=(pki["server"].cert, pki["server"].key))
    with thriftpool.ThriftPool(service, [server.address], ssl_context=client_context(pki),
                               min_size=1, max_size=2) as pool:
        proxy = pool.client()
        assert [proxy.echo(f"m{i}") for i in range(50)] == [f"m{i}" for i in range(50)]
        with pool.checkout() as client:
            assert isinstance(client._conn.socket.sock, ssl.SSLSocket)
            assert client._conn.socket.sock.version() in ("TLSv1.2", "TLSv1.3")
        # Idle TLS connections are reused, not discarded by the liveness check (a TLS 1.3
        # server sends session tickets after the handshake, which make the socket readable).
        accepted = server.stats()["accepted"]
        for i in range(20):
            assert proxy.echo(str(i)) == str(i)
        assert server.stats()["accepted"] == accepted
        assert server.stats()["tls_failures"] == 0


@pytest.mark.timeout(60)
def test_untrusted_certificate_is_refused_at_checkout_and_ejects(farm, service, pki):
    rogue = farm.one(tls=(pki["rogue_server"].cert, pki["rogue_server"].key))
    # Building the pool does not raise, even though its first connections fail.
    pool = thriftpool.ThriftPool(service, [rogue.address], ssl_context=client_context(pki),
                                 min_size=0, backoff_initial=5.0)
    try:
        with pytest.raises(thriftpool.NoAvailableInstance) as info:
            with pool.checkout():
                pass
        cause = info.value.__cause__
        assert isinstance(cause, TTransportException)
        assert "certificate verify failed" in str(cause)
        assert isinstance(cause.__cause__, ssl.SSLCertVerificationError)
        assert pool.stats()["instances"][rogue.address]["healthy"] is False
        assert rogue.stats()["calls"] == 0
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_server_hostname_overrides_the_name_checked(farm, service, pki):
    server = farm.one(tls=(pki["server"].cert, pki["server"].key))
    good = thriftpool.ThriftPool(service, [server.address], ssl_context=client_context(pki),
                                 server_hostname="echo.internal", min_size=0)
    bad = thriftpool.ThriftPool(service, [server.address], ssl_context=client_context(pki),
                                server_hostname="not-in-the-cert.example", min_size=0)
    try:
        assert good.client().echo("ok") == "ok"
        with pytest.raises(thriftpool.NoAvailableInstance) as info:
            bad.client().echo("no")
        assert "Hostname mismatch" in str(info.value.__cause__) or \
            "doesn't match" in str(info.value.__cause__)
    finally:
        good.close()
        bad.close()


@pytest.mark.timeout(60)
def test_mutual_tls(farm, service, pki):
    server = farm.one(tls=(pki["server"].cert, pki["server"].key),
                      client_ca=pki["ca"].files.cert)
    with thriftpool.ThriftPool(service, [server.address], min_size=0,
                               ssl_context=client_context(pki, with_client_cert=True)) as pool:
        assert pool.client().echo("mtls") == "mtls"
    # Without a client certificate the server refuses the handshake; the call never lands.
    with thriftpool.ThriftPool(service, [server.address], min_size=0, max_size=1,
                               ssl_context=client_context(pki)) as pool:
        with pytest.raises((thriftpool.NoAvailableInstance, TTransportException, OSError)):
            pool.client().echo("anonymous")
    wait_for(lambda: server.stats()["tls_failures"] >= 1, message="the refused handshake")
    assert server.stats()["calls"] == 1


@pytest.mark.timeout(60)
def test_tls_pool_never_sends_plaintext_to_a_plain_server(farm, service, pki):
    plain = farm.one()
    pool = thriftpool.ThriftPool(service, [plain.address], ssl_context=client_context(pki),
                                 min_size=0, connect_timeout=1.0)
    try:
        with pytest.raises(thriftpool.NoAvailableInstance):
            pool.client().echo("secret")
        assert plain.stats()["calls"] == 0
    finally:
        pool.close()


@pytest.mark.timeout(60)
def test_endpoint_advertising_tls_is_refused_without_ssl_context(farm, service):
    server = farm.one()
    endpoint = thriftpool.Endpoint(thriftpool.parse_address(server.address), tls=True)
    pool = thriftpool.ThriftPool(service, thriftpool.StaticDiscovery([endpoint]), min_size=0)
    try:
        with pytest.raises(thriftpool.NoAvailableInstance) as info:
            pool.client().echo("plaintext")
        assert "requires TLS" in str(info.value.__cause__)
        assert server.stats()["accepted"] == 0  # not even a TCP connection
    finally:
        pool.close()


def test_tls_options_are_validated(service):
    with pytest.raises(ValueError, match="ssl_context"):
        thriftpool.ThriftPool(service, ["127.0.0.1:1"], ssl_context="yes")
    with pytest.raises(ValueError, match="server_hostname"):
        thriftpool.ThriftPool(service, ["127.0.0.1:1"], server_hostname="x")
