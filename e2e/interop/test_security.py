"""Profile v2 against an attacker with nothing but network access to the ISO 8583 port, and
against the real ATM's own frames replayed: every 0800/0810 is MACed under K_NM (derived here
with `cryptography`'s KBKDFCMAC, independently of the switch), and what does not verify changes
nothing. Also the connection-hygiene limits, seen from the wire."""

import secrets
import time

from switchyard_e2e import Atm, IsoConnection, kcv, next_stan, now_fields, start_switch


def new_tid(prefix="S"):
    return prefix + secrets.token_hex(3).upper()


def keys_of(sw, tid):
    status, _, keys = sw.http("GET", f"/v1/terminals/{tid}/keys", token="viewer")
    assert status == 200, keys
    return sorted((k["type"], k["state"], k["kcv"]) for k in keys)


def audit_results(sw, tid):
    status, _, records = sw.http("GET", "/v1/audit?limit=1000", token="viewer")
    assert status == 200
    return [r["result"] for r in records if r["target"] == tid and r["action"] == "message.network"]


def signed_on_with_keys(sw):
    tid = new_tid()
    atm = Atm(sw, tid, sw.register_terminal(tid))
    assert atm.network("001")["39"] == "00"
    atm.exchange("TPK")
    atm.exchange("TAK")
    return atm


def test_the_attack_from_the_security_review_changes_nothing(switch):
    """Unauthenticated 0800/001, then 161 TAK, then 162 with the KCV the switch returned: each is
    answered 63 without a MAC, the real ATM keeps its session and its keys."""
    real = signed_on_with_keys(switch)
    before = keys_of(switch, real.tid)
    macs_before = switch.metric("switchyard_mac_failures_total")

    attacker = Atm(switch, real.tid, secrets.token_bytes(16))  # same terminal id, no TMK
    for mac in (False, True):  # no MAC at all; a MAC under a key derived from the wrong TMK
        sign_on = attacker.network("001", mac=mac)
        assert sign_on["39"] == "63" and "64" not in sign_on and "128" not in sign_on, sign_on
        change = attacker.network("161", {"48": "TAK"}, mac=mac)
        assert change["39"] == "63" and "120" not in change and "122" not in change, change
        confirm = attacker.network("162", {"48": "TAK", "122": kcv(secrets.token_bytes(16))}, mac=mac)
        assert confirm["39"] == "63", confirm

    assert keys_of(switch, real.tid) == before, "no key was made or activated"
    assert switch.metric("switchyard_mac_failures_total") >= macs_before + 6
    assert sum("63" in r for r in audit_results(switch, real.tid)) >= 6, "every refusal is audited"
    # the real terminal's session was never replaced: it is still signed on and transacting
    assert not real.conn.is_closed_by_peer(wait=0.5)
    assert real.network("301")["39"] == "00"
    status, _, body = switch.http("GET", f"/v1/terminals/{real.tid}", token="viewer")
    assert body["signedOn"] is True
    attacker.conn.close()
    real.conn.close()


def test_a_mac_under_the_tak_does_not_authenticate_network_management(switch):
    """K_NM is not the TAK: an 0800 MACed under the terminal's own TAK is still refused."""
    atm = signed_on_with_keys(switch)
    assert atm.network("301", key=atm.tak)["39"] == "63"
    assert atm.network("301")["39"] == "00"
    atm.conn.close()


def test_a_replayed_sign_on_gets_94_and_keeps_the_live_session(switch):
    tid = new_tid()
    atm = Atm(switch, tid, switch.register_terminal(tid))
    assert atm.network("001")["39"] == "00"
    captured = atm.macd(atm.last_network_request, atm.nm)  # the exact frame the ATM sent
    eavesdropper = IsoConnection(switch)
    eavesdropper.send_raw(captured)
    ans, _ = eavesdropper.recv()
    assert ans["39"] == "94", ans
    assert any("replay" in r for r in audit_results(switch, tid))
    assert not atm.conn.is_closed_by_peer(wait=0.5), "the live session is kept"
    assert atm.network("301")["39"] == "00"
    # the terminal itself signing on again (new STAN) is accepted and replaces nothing but itself
    assert atm.network("001")["39"] == "00"
    eavesdropper.close()
    atm.conn.close()


def test_a_stale_sign_on_gets_94(switch):
    tid = new_tid()
    atm = Atm(switch, tid, switch.register_terminal(tid))
    doc = {"t": "0800", "7": "0101000000" if time.gmtime().tm_mon >= 6 else "0701000000",
           "11": next_stan(), "41": atm.f41, "70": "001"}
    atm.conn.send_raw(atm.macd(doc, atm.nm))
    ans, _ = atm.conn.recv()
    assert ans["39"] == "94", ans
    atm.conn.close()


def test_key_push_is_macd_under_k_nm_and_its_answer_must_be_too(switch):
    atm = signed_on_with_keys(switch)
    status, _, body = switch.http("POST", f"/v1/terminals/{atm.tid}/keys/TAK/rotate", {})
    assert status in (200, 201), body
    new_kcv = body["key"]["kcv"]
    atm.conn.sock.settimeout(5)
    push, raw = atm.conn.recv()
    assert push["t"] == "0800" and push["70"] == "161"
    assert atm.verify_answer_mac(push, raw, atm.nm), "the switch's own 0800 is MACed under K_NM"
    # An answer with the right KCV but no MAC (or a MAC under the wrong key) activates nothing.
    forged = {k: push[k] for k in ("7", "11", "41", "48", "70")}
    forged.update({"t": "0810", "39": "00", "122": new_kcv})
    atm.conn.send(forged)
    atm.conn.send_raw(atm.macd(forged, secrets.token_bytes(16)))
    time.sleep(0.5)
    assert ("TAK", "PENDING", new_kcv) in keys_of(switch, atm.tid)
    # The real answer, MACed under K_NM, activates it.
    atm.take_push(push, raw)
    deadline = time.time() + 5
    while time.time() < deadline and ("TAK", "ACTIVE", new_kcv) not in keys_of(switch, atm.tid):
        time.sleep(0.1)
    assert ("TAK", "ACTIVE", new_kcv) in keys_of(switch, atm.tid)
    atm.conn.close()


def test_frames_before_sign_on_close_the_connection_after_the_limit(switch):
    tid = new_tid()
    switch.register_terminal(tid)
    conn = IsoConnection(switch)
    answers = []
    for _ in range(8):  # the default iso8583.max_unauthenticated_frames
        doc = {"t": "0200", "2": "6011000000000004", "3": "310000", "4": "000000000000",
               "11": next_stan(), "14": "2812", "41": f"{tid:<8}", "49": "360", "64": "0" * 16}
        doc.update(now_fields())
        conn.send(doc)
        answers.append(conn.recv()[0]["39"])
    assert answers == ["58"] * 8
    assert conn.is_closed_by_peer(), "the 8th unauthenticated frame closes the connection"
    assert switch.metric('switchyard_connections_rejected_total{reason="unauthenticated_frames"}') >= 1


def test_hygiene_limits_from_the_wire(tmp_path):
    sw = start_switch(tmp_path / "sw", extra_env={
        "SWITCHYARD_ISO8583__SIGNON_TIMEOUT": "1s",
        "SWITCHYARD_ISO8583__MAX_CONNECTIONS_PER_IP": "4",
    })
    try:
        idle = [IsoConnection(sw) for _ in range(4)]
        refused = IsoConnection(sw)
        assert refused.is_closed_by_peer(wait=2), "a 5th connection from one address is closed at accept"
        assert all(c.is_closed_by_peer(wait=3) for c in idle), "no sign-on within signon_timeout: closed"
        assert sw.metric('switchyard_connections_rejected_total{reason="per_ip_limit"}') >= 1
        assert sw.metric('switchyard_connections_rejected_total{reason="signon_timeout"}') >= 4
        # the slots are free again: a terminal signs on and transacts
        tid = new_tid()
        atm = Atm(sw, tid, sw.register_terminal(tid))
        assert atm.network("001")["39"] == "00"
        assert atm.network("301")["39"] == "00"
        atm.conn.close()
    finally:
        assert sw.stop() == 0
