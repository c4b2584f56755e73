"""One routed withdrawal through two real switch processes (ATM → acquirer → issuer, the link
with `propagate_trace = true`) exports one trace holding both processes' spans, with the
documented names and attributes and no card secrets; JSON logs and latency exemplars carry
that trace id; a collector that is down or slow changes no answer."""

from __future__ import annotations

import json
import secrets
import time

import psec.tr31

from switchyard_e2e import Atm, kcv, start_switch

ISSUER_BIN = "4111"
# names SPEC §8 and README "Traces and logs" document
ACQUIRER_SPANS = {"iso8583.request", "decode", "authenticate", "pin", "store", "upstream", "answer"}
ISSUER_SPANS = {"iso8583.request", "decode", "authenticate", "pin", "store", "answer"}


def mask(pan: str) -> str:
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


def wait_for(what: str, check, timeout: float = 30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def start_pair(tmp_path, acquirer_endpoint: str, issuer_endpoint: str | None, propagate: bool = True):
    """An issuer owning BIN 4111 with one card and station ACQ001, and an acquirer routing 4111
    to it over a link with `propagate_trace`. The acquirer's export is configured by
    `[telemetry] otlp_endpoint`, the issuer's by the standard OTEL_EXPORTER_OTLP_ENDPOINT."""
    issuer_env = {"SWITCHYARD_ROUTING__ON_US": f'["{ISSUER_BIN}"]', "OTEL_SERVICE_NAME": "issuer"}
    if issuer_endpoint:
        issuer_env["OTEL_EXPORTER_OTLP_ENDPOINT"] = issuer_endpoint
    issuer = start_switch(tmp_path / "issuer", extra_env=issuer_env)
    try:
        acc = "ISS-" + secrets.token_hex(4)
        pan = ISSUER_BIN + "".join(str(secrets.randbelow(10)) for _ in range(12))
        assert issuer.http("POST", "/v1/accounts", {"id": acc, "currency": "360", "balance": 500_000,
                                                    "dailyWithdrawalLimit": 300_000})[0] == 201
        status, _, body = issuer.http("POST", "/v1/cards", {"pan": pan, "expiry": "2812", "accountId": acc, "pin": "1234"})
        assert status == 201, body
        station_tmk = secrets.token_bytes(16)
        block = psec.tr31.wrap(issuer.kek, "D0000K0AB00E0000", station_tmk)
        status, _, body = issuer.http("POST", "/v1/terminals", {
            "id": "ACQ001", "group": "stations", "kind": "station",
            "tmk": {"keyBlock": block, "kcv": kcv(station_tmk)}})
        assert status == 201, body
        acq_dir = tmp_path / "acquirer"
        acq_dir.mkdir()
        (acq_dir / "station.tmk").write_text(station_tmk.hex())
        config = acq_dir / "switchyard.toml"
        config.write_text(
            "[telemetry]\n"
            f'otlp_endpoint = "{acquirer_endpoint}"\n'
            "sample_ratio = 1.0\n"
            "[[routing.routes]]\n"
            f'prefix = "{ISSUER_BIN}"\nupstream = "issuer-b"\n'
            "[[upstreams]]\n"
            f'name = "issuer-b"\nendpoints = ["127.0.0.1:{issuer.iso_port}"]\nstation_id = "ACQ001"\n'
            f'tmk_file = "{acq_dir / "station.tmk"}"\nheartbeat_interval = "1s"\ntimeout = "3s"\n'
            f"propagate_trace = {'true' if propagate else 'false'}\n"
        )
        acquirer = start_switch(acq_dir, extra_env={"SWITCHYARD_CONFIG": str(config), "OTEL_SERVICE_NAME": "acquirer"})
    except BaseException:
        issuer.stop()
        raise
    try:
        wait_for("the acquirer's link to the issuer", lambda: acquirer.metric('switchyard_upstream_up{upstream="issuer-b"}') == 1.0)
    except BaseException:
        acquirer.stop()
        issuer.stop()
        raise
    return issuer, acquirer, pan


def atm_at(sw) -> Atm:
    tid = "T" + secrets.token_hex(3).upper()
    atm = Atm(sw, tid, sw.register_terminal(tid))
    assert atm.network("001")["39"] == "00"
    atm.exchange("TPK")
    atm.exchange("TAK")
    return atm


def json_lines(path):
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def test_routed_withdrawal_is_one_trace_across_both_switches(tmp_path, receiver):
    issuer, acquirer, pan = start_pair(tmp_path, receiver.endpoint, receiver.endpoint)
    try:
        atm = atm_at(acquirer)
        doc = atm.financial("010000", pan, "1234", amount=20_000)
        answer = atm.send_financial(doc)
        assert answer["39"] == "00", answer

        def joined():
            spans = receiver.snapshot()
            roots = [s for s in spans if s["service"] == "acquirer" and s["name"] == "iso8583.request"
                     and s["attributes"].get("mti") == "0200"]
            for root in roots:
                trace = [s for s in spans if s["trace_id"] == root["trace_id"]]
                names = {(s["service"], s["name"]) for s in trace}
                if ({("acquirer", n) for n in ACQUIRER_SPANS} | {("issuer", n) for n in ISSUER_SPANS}) <= names:
                    return root, trace
            return None

        root, trace = wait_for("one trace with both switches' spans", joined)
        by_id = {s["span_id"]: s for s in trace}
        assert root["parent_span_id"] == "", "the acquirer's request span starts the trace"
        # the issuer's request span is a child of the acquirer's upstream span
        upstream = [s for s in trace if s["service"] == "acquirer" and s["name"] == "upstream"]
        assert len(upstream) == 1, upstream
        issuer_roots = [s for s in trace if s["service"] == "issuer" and s["name"] == "iso8583.request"]
        assert len(issuer_roots) == 1, issuer_roots
        assert issuer_roots[0]["parent_span_id"] == upstream[0]["span_id"]
        assert upstream[0]["attributes"]["upstream"] == "issuer-b"
        assert upstream[0]["attributes"]["response_code"] == "00"
        # every other span hangs off its own process's request span (directly or deeper)
        for s in trace:
            if s is root:
                continue
            assert s["parent_span_id"] in by_id, f"{s['service']}/{s['name']} has a parent outside the trace"

        for r, tid in ((root, atm.tid), (issuer_roots[0], "ACQ001")):
            a = r["attributes"]
            assert a["mti"] == "0200"
            assert a["processing_code"] == "010000"
            assert a["response_code"] == "00"
            assert a["terminal_id"] == tid
            assert a["pan"] == mask(pan)

        # no card secret or key anywhere in what was exported, nor in either process's log
        secrets_seen = [pan, doc["123"], doc["123"].lower(), atm.tpk.hex(), atm.tak.hex(),
                        atm.tpk.hex().upper(), atm.tak.hex().upper(), atm.tmk.hex(), atm.tmk.hex().upper()]
        exported = b"".join(receiver.bodies)
        for s in secrets_seen:
            assert s.encode() not in exported, "a card secret or key reached an exported span"
        logs = acquirer.log.read_text(errors="replace") + issuer.log.read_text(errors="replace")
        for s in secrets_seen:
            assert s not in logs, "a card secret or key reached a log line"
        dumped = json.dumps(trace)
        for s in secrets_seen:
            assert s not in dumped

        # JSON log lines inside the request carry its trace id (the issuer's too: same trace)
        trace_id = root["trace_id"]
        issuer_lines = [l for l in json_lines(issuer.log) if l.get("trace_id") == trace_id]
        assert issuer_lines, "no issuer log line carries the trace id"
        assert all(len(l.get("span_id", "")) == 16 for l in issuer_lines)

        # the acquirer's latency histogram names this trace as an exemplar
        wait_for("a withdrawal latency exemplar", lambda: any(
            line.startswith("switchyard_transaction_duration_seconds_bucket{")
            and 'type="withdrawal"' in line and f'trace_id="{trace_id}"' in line
            for line in acquirer.metrics().splitlines()), timeout=5)
    finally:
        assert acquirer.stop() == 0
        assert issuer.stop() == 0


def test_without_propagate_trace_the_issuer_starts_its_own_trace(tmp_path, receiver):
    issuer, acquirer, pan = start_pair(tmp_path, receiver.endpoint, receiver.endpoint, propagate=False)
    try:
        atm = atm_at(acquirer)
        assert atm.send_financial(atm.financial("010000", pan, "1234", amount=10_000))["39"] == "00"

        def both():
            spans = receiver.snapshot()
            acq = [s for s in spans if s["service"] == "acquirer" and s["name"] == "iso8583.request"
                   and s["attributes"].get("mti") == "0200"]
            iss = [s for s in spans if s["service"] == "issuer" and s["name"] == "iso8583.request"
                   and s["attributes"].get("mti") == "0200"]
            return (acq[0], iss[0]) if acq and iss else None

        acq, iss = wait_for("both request spans", both)
        assert acq["trace_id"] != iss["trace_id"]
        assert iss["parent_span_id"] == ""
    finally:
        assert acquirer.stop() == 0
        assert issuer.stop() == 0


def on_us_withdrawals(sw, n: int) -> list[float]:
    acc = "ACC-" + secrets.token_hex(4)
    pan = "6011" + "".join(str(secrets.randbelow(10)) for _ in range(12))
    assert sw.http("POST", "/v1/accounts", {"id": acc, "currency": "360", "balance": 5_000_000,
                                            "dailyWithdrawalLimit": 5_000_000})[0] == 201
    assert sw.http("POST", "/v1/cards", {"pan": pan, "expiry": "2812", "accountId": acc, "pin": "1234"})[0] == 201
    atm = atm_at(sw)
    took = []
    for _ in range(n):
        started = time.monotonic()
        answer = atm.send_financial(atm.financial("010000", pan, "1234", amount=1_000))
        took.append(time.monotonic() - started)
        assert answer["39"] == "00", answer
    return took


def withdrawals_do_not_wait_for(tmp_path, telemetry_env, n, dropped_reason, timeout):
    """n withdrawals against a switch exporting to a collector that cannot keep up: every one
    is approved without waiting for it, and the spans it lost are counted under dropped_reason."""
    sw = start_switch(tmp_path / "sw", extra_env=telemetry_env)
    try:
        took = on_us_withdrawals(sw, n)
        assert max(took) < 2.0, f"a withdrawal waited for the collector: {took}"
        wait_for(f"spans dropped ({dropped_reason}) counted", lambda: sw.metric(
            f'switchyard_trace_spans_dropped_total{{reason="{dropped_reason}"}}') > 0,
            timeout=timeout)
    finally:
        assert sw.stop() == 0


def test_collector_down_changes_no_answer(tmp_path):
    # a port nobody listens on: every export fails
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    withdrawals_do_not_wait_for(
        tmp_path, {"SWITCHYARD_TELEMETRY__OTLP_ENDPOINT": f"http://127.0.0.1:{dead}"},
        20, "export_failed", timeout=30)


def test_slow_collector_changes_no_answer(tmp_path, slow_receiver):
    withdrawals_do_not_wait_for(tmp_path, {
        "SWITCHYARD_TELEMETRY__OTLP_ENDPOINT": slow_receiver.endpoint,
        # a small queue, so the slow collector fills it
        "SWITCHYARD_TELEMETRY__MAX_QUEUE_SIZE": "16",
    }, 30, "queue_full", timeout=10)
