import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from switchyard_e2e import start_switch  # noqa: E402


@pytest.fixture(scope="module", params=["ascii", "binary-bitmap"])
def switch(request, tmp_path_factory):
    sw = start_switch(tmp_path_factory.mktemp(f"switch-{request.param}"), packager=request.param)
    yield sw
    code = sw.stop()
    assert code == 0, f"switch exited with {code} after SIGTERM:\n{sw.log.read_text()[-4000:]}"


@pytest.fixture(scope="module")
def ascii_switch(tmp_path_factory):
    sw = start_switch(tmp_path_factory.mktemp("switch-ascii"), packager="ascii")
    yield sw
    assert sw.stop() == 0
