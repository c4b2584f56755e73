"""Times a 10,000-terminal fleet rotation through the admin API (BENCHMARKS.md).

    SWITCHYARD_BIN=target/release/switchyard-switch e2e/.venv/bin/python e2e/bench/fleet_rotation.py [N] [postgres-url]

Registers N terminals (TMKs wrapped by psec under the KEK, 16 parallel clients), then times
POST /v1/key-rotations for all of them (key generation in the HSM, one store transaction) and
reads the totals back.
"""

import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interop"))
from switchyard_e2e import start_switch  # noqa: E402

n = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
extra = {"SWITCHYARD_DATABASE__URL": sys.argv[2]} if len(sys.argv) > 2 else {}
# The registrations all come from one address with one token: lift the admin rate limits, which
# are sized for people and the operator, not for provisioning a fleet in one burst.
extra.update({"SWITCHYARD_ADMIN__RATE_LIMIT_PER_SECOND": "100000", "SWITCHYARD_ADMIN__RATE_LIMIT_BURST": "100000"})
with tempfile.TemporaryDirectory() as tmp:
    sw = start_switch(Path(tmp), extra_env=extra)
    try:
        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: sw.register_terminal(f"F{i:07d}", "fleet"), range(n)))
        print(f"registered {n} terminals in {time.monotonic() - started:.1f}s")
        started = time.monotonic()
        status, _, body = sw.http("POST", "/v1/key-rotations",
                                  {"keyType": "TPK", "terminals": {"groups": ["fleet"]}, "activation": "onConfirm"})
        elapsed = time.monotonic() - started
        assert status == 201 and body["terminals"] == n, body
        print(f"fleet rotation of {n} terminals: POST /v1/key-rotations answered in {elapsed:.2f}s")
        totals = sw.http("GET", f"/v1/key-rotations/{body['id']}")[2]["totals"]
        print(f"totals {totals}")
    finally:
        sw.stop()
