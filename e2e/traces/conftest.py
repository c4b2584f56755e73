"""Traces suite (SPEC §8 "Traces and logs"): a small OTLP/HTTP receiver that decodes what the
real switch binaries export with the `opentelemetry-proto` package, independent of the Rust SDK
that encoded it. Skips without its prerequisites (the built binary, opentelemetry-proto) unless
CI=true, where a missing prerequisite fails the suite."""

from __future__ import annotations

import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "interop"))

from switchyard_e2e import switch_binary  # noqa: E402


def _missing() -> str | None:
    if not Path(switch_binary()).exists():
        return f"switch binary {switch_binary()} not built (cargo build -p switchyard-switch --bins)"
    try:
        import opentelemetry.proto.collector.trace.v1.trace_service_pb2  # noqa: F401
    except ImportError as e:
        return f"opentelemetry-proto not installed ({e}); pip install -r e2e/requirements.txt"
    return None


@pytest.fixture(scope="session", autouse=True)
def prerequisites():
    why = _missing()
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"traces suite cannot run and CI=true forbids skipping: {why}")
        pytest.skip(why)


def _value(v):
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: POST /v1/traces with an
    ExportTraceServiceRequest (application/x-protobuf). Keeps every decoded span and the raw
    request bodies (to search them for card secrets)."""

    def __init__(self, delay: float = 0.0):
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

        self.spans: list[dict] = []
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if delay:
                    time.sleep(delay)
                if self.path != "/v1/traces":
                    self.send_response(404)
                    self.end_headers()
                    return
                request = trace_service_pb2.ExportTraceServiceRequest()
                request.ParseFromString(body)
                receiver.take(request, body)
                out = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self, request, body: bytes):
        spans = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append({
                        "service": resource.get("service.name"),
                        "trace_id": s.trace_id.hex(),
                        "span_id": s.span_id.hex(),
                        "parent_span_id": s.parent_span_id.hex(),
                        "name": s.name,
                        "kind": s.kind,
                        "start": s.start_time_unix_nano,
                        "end": s.end_time_unix_nano,
                        "attributes": {a.key: _value(a.value) for a in s.attributes},
                        "events": [e.name for e in s.events],
                    })
        with self.lock:
            self.spans.extend(spans)
            self.bodies.append(body)

    def snapshot(self) -> list[dict]:
        with self.lock:
            return list(self.spans)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def slow_receiver():
    # slower than any bound below: a withdrawal that waited for it would show
    r = Receiver(delay=3.0)
    yield r
    r.close()
