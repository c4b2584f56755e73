"""An ATM built only from pyiso8583, cryptography and psec against the real switch: TMK import,
key exchange, balance, withdrawal, duplicate, reversal, bad MAC, wrong PIN x3, and a
server-initiated key rotation."""

import secrets
import time

import pytest

from switchyard_e2e import Atm, kcv, next_stan, now_fields


def provision(sw, balance=500_000, limit=300_000):
    tid = "E" + secrets.token_hex(3).upper()
    acc = "ACC-" + secrets.token_hex(4)
    pan = "6011" + "".join(str(secrets.randbelow(10)) for _ in range(12))
    tmk = sw.register_terminal(tid)
    assert sw.http("POST", "/v1/accounts", {"id": acc, "currency": "360", "balance": balance, "dailyWithdrawalLimit": limit})[0] == 201
    status, _, card = sw.http("POST", "/v1/cards", {"pan": pan, "expiry": "2812", "accountId": acc, "pin": "1234"})
    assert status == 201, card
    assert pan not in str(card) and "1234" not in str(card), "the API never returns the PAN or PIN"
    atm = Atm(sw, tid, tmk)
    assert atm.network("001")["39"] == "00"
    atm.exchange("TPK")
    atm.exchange("TAK")
    return atm, acc, pan, card


def balance_of(sw, acc):
    return sw.http("GET", f"/v1/accounts/{acc}", token="viewer")[2]["balance"]


def test_tmk_import_refuses_a_wrong_kcv(switch):
    tmk = secrets.token_bytes(16)
    import psec.tr31
    block = psec.tr31.wrap(switch.kek, "D0000K0AB00E0000", tmk)
    status, _, body = switch.http("POST", "/v1/terminals", {"id": "BADKCV1", "tmk": {"keyBlock": block, "kcv": "000000"}})
    assert status == 422 and "KEY CHECK VALUE" in body["detail"].upper()
    assert switch.http("GET", "/v1/terminals/BADKCV1")[0] == 404
    block = psec.tr31.wrap(secrets.token_bytes(32), "D0000K0AB00E0000", tmk)
    status, _, _ = switch.http("POST", "/v1/terminals", {"id": "BADKEK1", "tmk": {"keyBlock": block, "kcv": kcv(tmk)}})
    assert status == 422


def test_key_exchange_states_and_no_key_bytes_in_api(switch):
    atm, _, _, _ = provision(switch)
    status, _, keys = switch.http("GET", f"/v1/terminals/{atm.tid}/keys", token="viewer")
    assert status == 200
    states = sorted((k["type"], k["state"]) for k in keys)
    assert states == [("TAK", "ACTIVE"), ("TMK", "ACTIVE"), ("TPK", "ACTIVE")]
    assert {k["kcv"] for k in keys if k["type"] == "TPK"} == {kcv(atm.tpk)}
    text = str(keys).upper()
    for key in (atm.tmk, atm.tpk, atm.tak):
        assert key.hex().upper() not in text


def test_balance_withdrawal_duplicate_and_reversal(switch):
    atm, acc, pan, _ = provision(switch)
    ans = atm.send_financial(atm.financial("310000", pan, "1234"))
    assert ans["t"] == "0210" and ans["39"] == "00"
    assert atm.verify_answer_mac(ans, atm.last_raw), "answers are MACed under the TAK"
    assert ans["54"][20:] == "0002360C000000500000"

    req = atm.financial("010000", pan, "1234", amount=150_000)
    ans = atm.send_financial(req)
    assert ans["39"] == "00" and len(ans["38"]) == 6 and len(ans["37"]) == 12
    assert balance_of(switch, acc) == 350_000

    # The same request again: the same answer, no second debit.
    atm.conn.send_raw(atm.last_request_raw)
    again = atm.answer(req["11"])
    assert again["39"] == "00" and again["38"] == ans["38"] and again["37"] == ans["37"]
    assert balance_of(switch, acc) == 350_000

    # Same identity (terminal, STAN, 7), different content: 94, nothing changes.
    changed = dict(req, **{"4": f"{1000:012d}"})
    assert atm.send_financial(changed)["39"] == "94"
    assert balance_of(switch, acc) == 350_000

    rev = {"t": "0400", "2": pan, "3": "010000", "4": req["4"], "11": next_stan(), "41": atm.f41, "49": "360",
           "90": "0200" + req["11"] + req["7"] + "0" * 22}
    rev.update(now_fields())
    assert atm.send_financial(rev)["39"] == "00"
    assert balance_of(switch, acc) == 500_000
    # The reversal again (a repeat advice): funds are restored once only.
    adv = dict(rev, t="0420", **{"11": next_stan()})
    adv["7"] = now_fields()["7"]
    assert atm.send_financial(adv)["39"] == "00"
    assert balance_of(switch, acc) == 500_000

    unknown = dict(rev, **{"11": next_stan(), "90": "0200" + "999999" + "0101000000" + "0" * 22})
    assert atm.send_financial(unknown)["39"] == "21"


def test_limits_and_funds(switch):
    atm, acc, pan, _ = provision(switch, balance=100_000, limit=60_000)
    assert atm.send_financial(atm.financial("010000", pan, "1234", amount=70_000))["39"] == "61"
    assert atm.send_financial(atm.financial("010000", pan, "1234", amount=50_000))["39"] == "00"
    assert atm.send_financial(atm.financial("010000", pan, "1234", amount=20_000))["39"] == "61"
    assert atm.send_financial(atm.financial("010000", pan, "1234", amount=0))["39"] == "13"
    assert balance_of(switch, acc) == 50_000
    atm2, acc2, pan2, _ = provision(switch, balance=10_000, limit=60_000)
    assert atm2.send_financial(atm2.financial("010000", pan2, "1234", amount=20_000))["39"] == "51"
    assert balance_of(switch, acc2) == 10_000


def test_card_checks(switch):
    atm, _, pan, _ = provision(switch)
    assert atm.send_financial(atm.financial("310000", "6011999999999999", "1234"))["39"] == "14"
    assert atm.send_financial(atm.financial("310000", "4111111111111111", "1234"))["39"] == "14"
    assert atm.send_financial(atm.financial("310000", pan, "1234", expiry="2001"))["39"] == "54"
    assert atm.send_financial(atm.financial("400000", pan, "1234"))["39"] == "12"


def test_bad_mac_is_63_audited_and_changes_nothing(switch):
    atm, acc, pan, _ = provision(switch)
    before = switch.metric("switchyard_mac_failures_total")
    ans = atm.send_financial(atm.financial("010000", pan, "1234", amount=1_000), key=secrets.token_bytes(16))
    assert ans["39"] == "63"
    assert balance_of(switch, acc) == 500_000
    assert switch.metric("switchyard_mac_failures_total") == before + 1


def test_wrong_pin_three_times_blocks_until_reset(switch):
    atm, acc, pan, card = provision(switch)
    codes = [atm.send_financial(atm.financial("010000", pan, "9999", amount=1_000))["39"] for _ in range(3)]
    assert codes == ["55", "55", "75"]
    assert atm.send_financial(atm.financial("010000", pan, "1234", amount=1_000))["39"] == "75", "blocked even with the right PIN"
    assert balance_of(switch, acc) == 500_000
    status, _, body = switch.http("POST", f"/v1/cards/{card['id']}/pin-reset", {"pin": "4321", "pan": pan})
    assert status == 200 and body["pinBlocked"] is False
    assert atm.send_financial(atm.financial("010000", pan, "4321", amount=1_000))["39"] == "00"


def test_server_initiated_rotation_and_grace(switch):
    atm, _, pan, _ = provision(switch)
    old_tak = atm.tak
    status, _, body = switch.http("POST", f"/v1/terminals/{atm.tid}/keys/TAK/rotate")
    assert status == 200 and body["pushed"] is True and body["key"]["state"] == "PENDING"
    # The push arrives on the live session; the helper answers it with the KCV it computed.
    ans = atm.send_financial(atm.financial("310000", pan, "1234"))
    assert "TAK" in atm.pushes and atm.tak != old_tak
    deadline = time.time() + 5
    while time.time() < deadline:
        keys = switch.http("GET", f"/v1/terminals/{atm.tid}/keys")[2]
        if any(k["type"] == "TAK" and k["state"] == "ACTIVE" and k["kcv"] == kcv(atm.tak) for k in keys):
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the pushed TAK never became ACTIVE: {keys}")
    assert any(k["type"] == "TAK" and k["state"] == "EXPIRED" and k.get("graceUntil") for k in keys)
    # New key works; the previous one still verifies inside the grace window.
    assert atm.send_financial(atm.financial("310000", pan, "1234"))["39"] == "00"
    assert atm.send_financial(atm.financial("310000", pan, "1234"), key=old_tak)["39"] == "00"
    assert ans["39"] in ("00", "63")


def test_fleet_rotation_pushes_to_live_sessions(switch):
    atm, _, _, _ = provision(switch)
    status, _, body = switch.http("POST", "/v1/key-rotations", {"keyType": "TPK", "terminals": {"ids": [atm.tid]}, "activation": "onConfirm"},
                                  headers={"Idempotency-Key": secrets.token_hex(8)})
    assert status == 201 and body["terminals"] == 1
    rid = body["id"]
    atm.conn.sock.settimeout(5)
    while "TPK" not in atm.pushes:
        doc, raw = atm.conn.recv()
        if doc["t"] == "0800" and doc.get("70") == "161":
            atm.take_push(doc, raw)
    deadline = time.time() + 5
    while time.time() < deadline:
        totals = switch.http("GET", f"/v1/key-rotations/{rid}", token="viewer")[2]["totals"]
        if totals["ACTIVE"] == 1:
            break
        time.sleep(0.1)
    assert totals == {"PENDING": 0, "ACTIVE": 1, "EXPIRED": 0, "REVOKED": 0}
    status, _, body = switch.http("POST", f"/v1/key-rotations/{rid}/expire-previous")
    assert status == 200 and body["expired"] == 1
