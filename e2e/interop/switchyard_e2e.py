"""Test-side helpers: start the real switchyard-switch binary, and act as an ATM using only
independent libraries (pyiso8583 for messages, cryptography for AES-CMAC, psec for TR-31 and
ISO 9564-1 format 4 PIN blocks)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import iso8583
import iso8583.specs
import psec.pinblock
import psec.tr31
from cryptography.hazmat.primitives.ciphers import algorithms
from cryptography.hazmat.primitives.cmac import CMAC
from cryptography.hazmat.primitives.kdf.kbkdf import CounterLocation, KBKDFCMAC, Mode

REPO = Path(__file__).resolve().parents[2]
SPECS = {"ascii": iso8583.specs.default_ascii, "binary-bitmap": iso8583.specs.default}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def switch_binary() -> str:
    explicit = os.environ.get("SWITCHYARD_BIN")
    if explicit:
        return explicit
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    return str(target / "debug" / "switchyard-switch")


def cmac(key: bytes, data: bytes) -> bytes:
    c = CMAC(algorithms.AES(key))
    c.update(data)
    return c.finalize()


def nm_key(tmk: bytes, f41: str) -> bytes:
    """Profile v2 network-management key K_NM: NIST SP 800-108 counter mode, PRF AES-CMAC under
    the TMK, 32-bit counter before the fixed data, label SWITCHYARD-NM, context = field 41."""
    kdf = KBKDFCMAC(algorithms.AES, Mode.CounterMode, 16, 4, 4, CounterLocation.BeforeFixed,
                    b"SWITCHYARD-NM", f41.encode("ascii"), None)
    return kdf.derive(tmk)


def kcv(key: bytes) -> str:
    """AES KCV: leftmost 3 bytes of CMAC over 16 zero bytes (X9.24-1:2017)."""
    return cmac(key, bytes(16))[:3].hex().upper()


@dataclass
class Switch:
    proc: subprocess.Popen
    dir: Path
    iso_port: int
    admin_port: int
    metrics_port: int
    admin_token: str
    viewer_token: str
    kek: bytes
    packager: str
    log: Path
    # TLS (SPEC §2): client contexts for an HTTPS admin API and a TLS ISO 8583 port
    admin_ssl: ssl.SSLContext | None = None
    iso_ssl: ssl.SSLContext | None = None

    @property
    def spec(self):
        return SPECS[self.packager]

    # ---- admin API -----------------------------------------------------------------------
    def http(self, method: str, path: str, body=None, token: str | None = "admin", headers=None):
        scheme = "https" if self.admin_ssl else "http"
        host = "localhost" if self.admin_ssl else "127.0.0.1"
        url = f"{scheme}://{host}:{self.admin_port}{path}"
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token == "admin":
            req.add_header("Authorization", f"Bearer {self.admin_token}")
        elif token == "viewer":
            req.add_header("Authorization", f"Bearer {self.viewer_token}")
        elif token:
            req.add_header("Authorization", f"Bearer {token}")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=30, context=self.admin_ssl) as resp:
                raw = resp.read()
                return resp.status, dict(resp.headers), (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            return e.code, dict(e.headers), (json.loads(raw) if raw else None)

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()

    def metric(self, name_with_labels: str) -> float:
        for line in self.metrics().splitlines():
            if line.startswith(name_with_labels + " "):
                return float(line.split()[-1])
        return 0.0

    def register_terminal(self, tid: str, group: str = "e2e") -> bytes:
        """Registers a terminal with a fresh TMK wrapped by psec under the KEK; returns the TMK."""
        tmk = secrets.token_bytes(16)
        block = psec.tr31.wrap(self.kek, "D0000K0AB00E0000", tmk)
        status, _, body = self.http("POST", "/v1/terminals", {"id": tid, "group": group, "tmk": {"keyBlock": block, "kcv": kcv(tmk)}})
        assert status == 201, body
        return tmk

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_switch(tmp: Path, packager: str = "ascii", extra_env: dict | None = None) -> Switch:
    tmp.mkdir(parents=True, exist_ok=True)
    lmk, kek = secrets.token_bytes(32), secrets.token_bytes(32)
    admin_token, viewer_token = secrets.token_hex(16), secrets.token_hex(16)
    (tmp / "lmk.hex").write_text(lmk.hex())
    (tmp / "kek.hex").write_text(kek.hex())
    (tmp / "tokens").write_text(f"admin:{admin_token}\nviewer:{viewer_token}\n")
    iso_port, admin_port, metrics_port = free_port(), free_port(), free_port()
    env = dict(os.environ)
    env.update({
        "SWITCHYARD_ISO8583__LISTEN": f"127.0.0.1:{iso_port}",
        "SWITCHYARD_ISO8583__PACKAGER": packager,
        "SWITCHYARD_ADMIN__LISTEN": f"127.0.0.1:{admin_port}",
        "SWITCHYARD_METRICS__LISTEN": f"127.0.0.1:{metrics_port}",
        "SWITCHYARD_ADMIN__TOKENS_FILE": str(tmp / "tokens"),
        "SWITCHYARD_KEYS__LMK_FILE": str(tmp / "lmk.hex"),
        "SWITCHYARD_KEYS__KEK_FILE": str(tmp / "kek.hex"),
        "SWITCHYARD_DATABASE__URL": f"sqlite://{tmp / 'switch.db'}",
        "SWITCHYARD_ROUTING__ON_US": '["6011"]',
        "RUST_LOG": "info",
    })
    env.update(extra_env or {})
    log = tmp / "switch.log"
    proc = subprocess.Popen(
        [switch_binary(), "serve", "--migrate", "--log-format", "json"],
        env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    sw = Switch(proc, tmp, iso_port, admin_port, metrics_port, admin_token, viewer_token, kek, packager, log)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"switch exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=1) as r:
                if r.status == 200:
                    return sw
        except OSError:
            pass
        time.sleep(0.1)
    sw.stop()
    raise RuntimeError(f"switch not ready in time:\n{log.read_text()}")


class IsoConnection:
    """A raw ISO 8583 connection: 2-byte big-endian length, then a pyiso8583-encoded message."""

    def __init__(self, sw: Switch, timeout: float = 10.0):
        self.sw = sw
        self.spec = sw.spec
        self.sock = socket.create_connection(("127.0.0.1", sw.iso_port), timeout=timeout)
        if sw.iso_ssl is not None:
            self.sock = sw.iso_ssl.wrap_socket(self.sock, server_hostname="localhost")

    def close(self):
        self.sock.close()

    def send_raw(self, payload: bytes):
        self.sock.sendall(len(payload).to_bytes(2, "big") + payload)

    def encode(self, doc: dict) -> bytes:
        raw, _ = iso8583.encode(dict(doc), self.spec)
        return bytes(raw)

    def send(self, doc: dict) -> bytes:
        raw = self.encode(doc)
        self.send_raw(raw)
        return raw

    def recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed by the switch")
            buf += chunk
        return buf

    def recv(self) -> tuple[dict, bytes]:
        n = int.from_bytes(self.recv_exact(2), "big")
        raw = self.recv_exact(n)
        doc, _ = iso8583.decode(raw, self.spec)
        return doc, raw

    def is_closed_by_peer(self, wait: float = 5.0) -> bool:
        self.sock.settimeout(wait)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False


_stan = [int.from_bytes(secrets.token_bytes(2), "big")]


def next_stan() -> str:
    _stan[0] = (_stan[0] + 1) % 1_000_000
    return f"{_stan[0]:06d}"


def now_fields() -> dict:
    now = datetime.now(timezone.utc)
    return {"7": now.strftime("%m%d%H%M%S"), "12": now.strftime("%H%M%S"), "13": now.strftime("%m%d")}


@dataclass
class Atm:
    """A terminal built only from independent libraries."""

    sw: Switch
    tid: str
    tmk: bytes
    conn: IsoConnection = None
    tpk: bytes | None = None
    tak: bytes | None = None
    pushes: list = field(default_factory=list)

    def __post_init__(self):
        self.conn = IsoConnection(self.sw)

    @property
    def f41(self) -> str:
        return f"{self.tid:<8}"

    @property
    def nm(self) -> bytes:
        return nm_key(self.tmk, self.f41)

    def network(self, code: str, extra: dict | None = None, key: bytes | None = None,
                mac: bool = True) -> dict:
        """An 0800 MACed under K_NM (or `key`, or unMACed with mac=False). A MACed answer must
        verify under K_NM; refusals the switch could not authenticate (63/58/30) carry none."""
        doc = {"t": "0800", "7": now_fields()["7"], "11": next_stan(), "41": self.f41, "70": code}
        doc.update(extra or {})
        self.last_network_request = doc
        if mac:
            self.conn.send_raw(self.macd(doc, key or self.nm))
        else:
            self.conn.send(doc)
        ans = self.answer(doc["11"])
        if "64" in ans or "128" in ans:
            assert self.verify_answer_mac(ans, self.last_raw, self.nm), "0810 MAC does not verify under K_NM"
        else:
            assert ans["39"] in ("63", "58", "30"), f"an unMACed 0810 that is not a refusal: {ans}"
        return ans

    def answer(self, stan: str) -> dict:
        while True:
            doc, raw = self.conn.recv()
            if doc["t"] == "0800" and doc.get("70") == "161":
                self.take_push(doc, raw)
                continue
            assert doc.get("11") == stan, f"answer for STAN {doc.get('11')} while waiting for {stan}"
            self.last_raw = raw
            return doc

    def unwrap(self, block: str, expected_kcv: str) -> bytes:
        _, key = psec.tr31.unwrap(self.tmk, block)
        assert kcv(key) == expected_kcv.upper(), "KCV of the delivered key does not match field 122"
        return key

    def take_push(self, push: dict, raw: bytes):
        assert self.verify_answer_mac(push, raw, self.nm), "key push MAC does not verify under K_NM"
        kt = push["48"]
        key = self.unwrap(push["120"], push["122"])
        setattr(self, kt.lower(), key)
        self.pushes.append(kt)
        answer = {k: push[k] for k in ("7", "11", "41", "48", "70") if k in push}
        answer.update({"t": "0810", "39": "00", "122": kcv(key)})
        self.conn.send_raw(self.macd(answer, self.nm))

    def exchange(self, kt: str):
        ans = self.network("161", {"48": kt})
        assert ans["39"] == "00", ans
        key = self.unwrap(ans["120"], ans["122"])
        conf = self.network("162", {"48": kt, "122": kcv(key)})
        assert conf["39"] == "00", conf
        setattr(self, kt.lower(), key)

    def mac_field(self, doc: dict) -> str:
        return "128" if any(int(k) > 64 for k in doc if k.isdigit()) else "64"

    def macd(self, doc: dict, key: bytes | None = None) -> bytes:
        """Encodes `doc` with its MAC: AES-CMAC over the packed message up to the MAC field."""
        f = self.mac_field(doc)
        doc = dict(doc)
        doc[f] = "0" * 16
        raw = self.conn.encode(doc)
        cut = 16 if self.sw.packager == "ascii" else 8
        mac = cmac(key or self.tak, raw[:-cut])[:8]
        doc[f] = mac.hex().upper()
        return self.conn.encode(doc)

    def verify_answer_mac(self, doc: dict, raw: bytes, key: bytes | None = None) -> bool:
        f = "128" if "128" in doc else "64"
        if f not in doc:
            return False
        cut = 16 if self.sw.packager == "ascii" else 8
        mac = doc[f] if isinstance(doc[f], str) else doc[f].hex()
        return cmac(key or self.tak, raw[:-cut])[:8].hex().upper() == mac.upper()

    def financial(self, pcode: str, pan: str, pin: str, amount: int = 0, expiry: str = "2812", extra=None) -> dict:
        doc = {"t": "0200", "2": pan, "3": pcode, "4": f"{amount:012d}", "11": next_stan(), "14": expiry,
               "22": "051", "41": self.f41, "42": "E2E-ATM        ", "49": "360",
               "123": psec.pinblock.encipher_pinblock_iso_4(self.tpk, pin, pan).hex().upper()}
        doc.update(now_fields())
        doc.update(extra or {})
        return doc

    def send_financial(self, doc: dict, key: bytes | None = None) -> dict:
        raw = self.macd(doc, key)
        self.conn.send_raw(raw)
        self.last_request_raw = raw
        return self.answer(doc["11"])
