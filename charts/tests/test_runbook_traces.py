"""The slow-transaction runbook links a trace search (README "Traces and logs")."""

import re

from chartlib import CHART

RUNBOOKS = CHART / "docs" / "runbooks.md"


def test_high_latency_runbook_searches_traces():
    sections = re.split(r"(?m)^## ", RUNBOOKS.read_text())
    (body,) = [s for s in sections if s.startswith("SwitchyardHighLatency")]
    assert 'name = "iso8583.request"' in body and "duration > 2s" in body, "no TraceQL search"
    assert "exemplar" in body
