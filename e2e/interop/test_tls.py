"""Transport security seen by an independent client: Python's `ssl` module (OpenSSL underneath,
a different TLS stack from the switch's rustls) talks to the admin API over HTTPS and to the
ISO 8583 port over TLS, both with mutual TLS, using a throwaway CA made by
`switchyard-switch dev-certs`."""

import http.client
import ssl
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from switchyard_e2e import Atm, IsoConnection, start_switch, switch_binary


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs")
    subprocess.run([switch_binary(), "dev-certs", "--out", str(out)], check=True, capture_output=True)
    return out


def client_context(certs, with_cert=True):
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs / "ca.crt"))
    if with_cert:
        ctx.load_cert_chain(str(certs / "client.crt"), str(certs / "client.key"))
    return ctx


@pytest.fixture(scope="module")
def tls_switch(tmp_path_factory, certs):
    env = {}
    for section in ("ADMIN", "ISO8583"):
        env[f"SWITCHYARD_{section}__TLS__CERT_FILE"] = str(certs / "server.crt")
        env[f"SWITCHYARD_{section}__TLS__KEY_FILE"] = str(certs / "server.key")
        env[f"SWITCHYARD_{section}__TLS__CLIENT_CA_FILE"] = str(certs / "ca.crt")
    sw = start_switch(tmp_path_factory.mktemp("switch-tls"), extra_env=env)
    sw.admin_ssl = client_context(certs)
    sw.iso_ssl = client_context(certs)
    yield sw
    assert sw.stop() == 0


def test_admin_api_over_https_with_a_client_certificate(tls_switch):
    status, headers, body = tls_switch.http("GET", "/v1/saf/stats", token="viewer")
    assert status == 200, body
    lower = {k.lower(): v for k, v in headers.items()}
    assert lower["cache-control"] == "no-store"
    assert lower["x-content-type-options"] == "nosniff"
    assert lower["strict-transport-security"].startswith("max-age=")


def test_admin_api_refuses_a_client_without_certificate(tls_switch, certs):
    req = urllib.request.Request(f"https://localhost:{tls_switch.admin_port}/v1/saf/stats")
    req.add_header("Authorization", f"Bearer {tls_switch.viewer_token}")
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        with urllib.request.urlopen(req, timeout=10, context=client_context(certs, with_cert=False)) as r:
            r.read()


def test_admin_api_is_not_served_over_plain_http(tls_switch):
    # rustls answers the plain request with a TLS alert, which is no HTTP status line
    with pytest.raises((urllib.error.URLError, http.client.HTTPException, OSError)):
        with urllib.request.urlopen(f"http://127.0.0.1:{tls_switch.admin_port}/v1/saf/stats", timeout=10) as r:
            r.read()


def test_atm_signs_on_and_exchanges_keys_over_tls(tls_switch):
    atm = Atm(tls_switch, "TLSATM01", tls_switch.register_terminal("TLSATM01"))
    assert isinstance(atm.conn.sock, ssl.SSLSocket)
    assert atm.conn.sock.version() in ("TLSv1.2", "TLSv1.3")
    assert atm.network("001")["39"] == "00"
    atm.exchange("TAK")
    assert atm.network("301")["39"] == "00"
    atm.conn.close()


def test_handshake_failures_are_counted(tls_switch, certs):
    before = tls_switch.metric('switchyard_tls_handshake_failures_total{channel="iso8583",reason="certificate"}')
    iso_ssl = tls_switch.iso_ssl
    tls_switch.iso_ssl = client_context(certs, with_cert=False)
    try:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            conn = IsoConnection(tls_switch)
            # TLS 1.3: the refusal of a missing client certificate arrives with the first read
            conn.send_raw(b"0800")
            conn.recv_exact(2)
    finally:
        tls_switch.iso_ssl = iso_ssl
    deadline = time.time() + 5
    while time.time() < deadline:
        after = tls_switch.metric('switchyard_tls_handshake_failures_total{channel="iso8583",reason="certificate"}')
        if after >= before + 1:
            return
        time.sleep(0.1)
    pytest.fail("the refused handshake was not counted")
