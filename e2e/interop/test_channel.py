"""The ATM channel against pyiso8583: framing, sign-on/echo/sign-off, sessions, bad input."""

import os
import secrets
import socket
import threading
import time

from switchyard_e2e import Atm, IsoConnection, next_stan, now_fields


def new_tid(prefix="T"):
    return prefix + secrets.token_hex(3).upper()


def test_sign_on_echo_sign_off(switch):
    tid = new_tid()
    atm = Atm(switch, tid, switch.register_terminal(tid))
    ans = atm.network("001")
    assert ans["t"] == "0810" and ans["39"] == "00" and ans["70"] == "001" and ans["41"].strip() == tid
    assert atm.network("301")["39"] == "00"
    status, _, body = switch.http("GET", f"/v1/terminals/{tid}", token="viewer")
    assert status == 200 and body["signedOn"] is True and body["remoteAddress"].startswith("127.0.0.1:")
    assert atm.network("002")["39"] == "00"
    status, _, body = switch.http("GET", f"/v1/terminals/{tid}")
    assert body["signedOn"] is False
    # after sign-off the terminal must sign on again
    assert atm.network("301")["39"] == "58"
    atm.conn.close()


def test_unknown_terminal_is_refused_and_not_signed_on(switch):
    atm = Atm(switch, "NOBODY", b"\0" * 16)
    assert atm.network("001")["39"] == "58"
    assert atm.network("301")["39"] == "58"
    atm.conn.close()


def test_financial_before_sign_on_gets_58(switch):
    tid = new_tid()
    switch.register_terminal(tid)
    conn = IsoConnection(switch)
    doc = {"t": "0200", "2": "6011000000000004", "3": "310000", "4": "000000000000", "11": next_stan(),
           "14": "2812", "41": f"{tid:<8}", "49": "360", "64": "0" * 16}
    doc.update(now_fields())
    conn.send(doc)
    ans, _ = conn.recv()
    assert ans["t"] == "0210" and ans["39"] == "58"
    conn.close()


def test_new_sign_on_replaces_the_old_connection(switch):
    tid = new_tid()
    tmk = switch.register_terminal(tid)
    first = Atm(switch, tid, tmk)
    assert first.network("001")["39"] == "00"
    second = Atm(switch, tid, tmk)
    assert second.network("001")["39"] == "00"
    assert first.conn.is_closed_by_peer(), "the replaced connection must be closed"
    assert second.network("301")["39"] == "00"
    second.conn.close()


def test_oversized_frame_is_refused_without_waiting_for_the_body(switch):
    before = switch.metric('switchyard_frame_errors_total{reason="too_large"}')
    conn = IsoConnection(switch)
    conn.sock.sendall((60000).to_bytes(2, "big") + b"0800")
    assert conn.is_closed_by_peer(wait=5)
    time.sleep(0.2)
    assert switch.metric('switchyard_frame_errors_total{reason="too_large"}') == before + 1


def test_truncated_frame_closes_only_that_connection(switch):
    conn = IsoConnection(switch)
    conn.sock.sendall((100).to_bytes(2, "big") + b"0800822")
    conn.sock.shutdown(socket.SHUT_WR)
    assert conn.is_closed_by_peer()
    tid = new_tid()
    atm = Atm(switch, tid, switch.register_terminal(tid))
    assert atm.network("001")["39"] == "00"
    atm.conn.close()


def test_random_bytes_never_crash_the_switch(switch):
    for _ in range(50):
        conn = IsoConnection(switch)
        payload = os.urandom(secrets.randbelow(300) + 1)
        conn.send_raw(payload)
        conn.sock.settimeout(5)
        try:
            data = conn.sock.recv(4096)
            # Either closed, or a length-prefixed answer (a 30 when the MTI was readable).
            assert data == b"" or len(data) >= 2
        except (ConnectionResetError, socket.timeout):
            pass
        conn.close()
    assert switch.proc.poll() is None
    tid = new_tid()
    atm = Atm(switch, tid, switch.register_terminal(tid))
    assert atm.network("001")["39"] == "00"
    atm.conn.close()


def test_malformed_field_gets_format_error_30(switch):
    conn = IsoConnection(switch)
    stan = next_stan()
    # A well-framed 0800 whose field 70 is not numeric: parsed far enough to answer 30.
    doc = {"t": "0800", "7": now_fields()["7"], "11": stan, "41": "ATM00001", "70": "001"}
    raw = bytearray(conn.encode(doc))
    raw[-3:] = b"0X1"
    conn.send_raw(bytes(raw))
    ans, _ = conn.recv()
    assert ans["t"] == "0810" and ans["39"] == "30" and ans["11"] == stan
    conn.close()


def test_two_hundred_concurrent_connections_sign_on_and_echo(switch):
    n = 200
    tids = [new_tid("C") for _ in range(n)]
    tmks = {tid: switch.register_terminal(tid) for tid in tids}
    atms, errors = [], []
    ready = threading.Barrier(n + 1)
    done = threading.Event()

    def run(tid):
        try:
            atm = Atm(switch, tid, tmks[tid])
            assert atm.network("001")["39"] == "00"
            assert atm.network("301")["39"] == "00"
            atms.append(atm)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e))
        finally:
            ready.wait(timeout=60)
            done.wait(timeout=60)

    threads = [threading.Thread(target=run, args=(t,)) for t in tids]
    for t in threads:
        t.start()
    ready.wait(timeout=60)
    assert not errors, errors[:5]
    assert switch.metric("switchyard_terminals_signed_on") >= n
    done.set()
    for t in threads:
        t.join()
    for atm in atms:
        atm.conn.close()
    deadline = time.time() + 10
    while time.time() < deadline and switch.metric("switchyard_terminals_signed_on") > 0:
        time.sleep(0.1)
    assert switch.metric("switchyard_terminals_signed_on") == 0, "disconnects must deregister sessions"


def test_admin_api_auth_and_problem_json(switch):
    status, headers, body = switch.http("GET", "/v1/terminals", token=None)
    assert status == 401 and headers["content-type"] == "application/problem+json" and body["status"] == 401
    status, _, _ = switch.http("GET", "/v1/terminals", token="not-a-valid-token-at-all")
    assert status == 401
    status, _, body = switch.http("POST", "/v1/accounts", {"id": "V1", "currency": "360", "balance": 1, "dailyWithdrawalLimit": 1}, token="viewer")
    assert status == 403, body
    status, _, body = switch.http("POST", "/v1/accounts", {"id": "U1", "currency": "360", "balance": 1, "dailyWithdrawalLimit": 1, "colour": "red"})
    assert status == 400 and "colour" in body["detail"]
    status, _, body = switch.http("POST", "/v1/accounts", b"x" * (2 * 1024 * 1024))
    assert status == 413
    status, _, body = switch.http("GET", "/v1/accounts/U1")
    assert status == 404, "a refused write changes nothing"
    status, _, doc = switch.http("GET", "/v1/openapi.json", token=None)
    assert status == 200 and "/v1/terminals" in doc["paths"] and "/v1/key-rotations" in doc["paths"]


def test_idempotency_key_replays_and_refuses_reuse(switch):
    body = {"id": "IDEM-1", "currency": "360", "balance": 100, "dailyWithdrawalLimit": 100}
    s1, _, b1 = switch.http("POST", "/v1/accounts", body, headers={"Idempotency-Key": "k-1"})
    s2, h2, b2 = switch.http("POST", "/v1/accounts", body, headers={"Idempotency-Key": "k-1"})
    assert s1 == s2 == 201 and b1 == b2 and h2.get("idempotent-replayed") == "true"
    s3, _, _ = switch.http("POST", "/v1/accounts", dict(body, balance=5), headers={"Idempotency-Key": "k-1"})
    assert s3 == 422
    s4, _, _ = switch.http("POST", "/v1/accounts", body)
    assert s4 == 409


def test_every_write_is_audited(switch):
    tid = new_tid("A")
    switch.register_terminal(tid)
    switch.http("POST", f"/v1/terminals/{tid}/sign-off")
    switch.http("POST", "/v1/accounts", {"id": "AUD-1"}, token="viewer")
    status, _, records = switch.http("GET", "/v1/audit?limit=1000", token="viewer")
    assert status == 200
    actions = [(r["action"], r["target"], r["actor"]) for r in records]
    assert any(a[1] == tid and a[2].startswith("admin#") for a in actions), actions[-10:]
    assert any(a[0] == "terminal.sign-off" and a[1] == tid for a in actions)
    assert any(r["result"].startswith("refused: 403") and r["actor"].startswith("viewer#") for r in records)
