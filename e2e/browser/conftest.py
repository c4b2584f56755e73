"""Fixtures of the browser suite: a real switch (`switchyard-switch serve` on a temporary SQLite),
the web ATM (`switchyard-atm web`) provisioning its own terminal and test cards through the
switch's admin API, and headless Chromium driven by Selenium.

Without Chromium and chromedriver the suite is skipped, unless CI=true, where that is a failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "interop"))

from switchyard_e2e import REPO, free_port, start_switch, switch_binary  # noqa: E402

SCREENS = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target")) / "e2e-screens"
# A BIN the switch routes to an issuer nobody listens for: its cards get 91.
OFFLINE_BIN = "4999"


def chromium_paths() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if browser and driver:
        return browser, driver
    return None


def atm_binary() -> str:
    return str(Path(switch_binary()).with_name("switchyard-atm"))


@pytest.fixture(scope="session")
def chromium():
    paths = chromium_paths()
    if paths is None:
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium and chromedriver are required with CI=true (apt-get install chromium chromium-driver)")
        pytest.skip("Chromium/chromedriver not installed: browser suite skipped")
    return paths


@pytest.fixture(scope="module")
def switch(tmp_path_factory, chromium):
    # The offline issuer: a route and an upstream whose endpoint refuses connections; stand-in off.
    config_dir = tmp_path_factory.mktemp("switch-config")
    (config_dir / "issuer-tmk.hex").write_text(os.urandom(16).hex())
    config = config_dir / "switch.toml"
    config.write_text(
        "[[routing.routes]]\n"
        f'prefix = "{OFFLINE_BIN}"\nupstream = "offline-issuer"\n'
        "[[upstreams]]\n"
        'name = "offline-issuer"\nendpoints = ["127.0.0.1:9"]\nstation_id = "WEBACQ1"\ntimeout = "1s"\n'
        f'tmk_file = "{config_dir / "issuer-tmk.hex"}"\n'
    )
    sw = start_switch(tmp_path_factory.mktemp("switch"), extra_env={"SWITCHYARD_CONFIG": str(config)})
    yield sw
    sw.stop()


class WebAtm:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path):
        self.proc, self.url, self.log = proc, url, log

    def state(self) -> dict:
        with urllib.request.urlopen(self.url + "/api/state", timeout=5) as r:
            return json.loads(r.read())

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def web_atm(switch, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("web-atm") / "web-atm.log"
    proc = subprocess.Popen(
        [atm_binary(), "--iso", f"127.0.0.1:{switch.iso_port}", "--admin", f"http://127.0.0.1:{switch.admin_port}",
         "--token-file", str(switch.dir / "tokens"), "--kek-file", str(switch.dir / "kek.hex"),
         "web", "--listen", f"127.0.0.1:{port}", "--offline-issuer-bin", OFFLINE_BIN],
        stdout=open(log, "wb"), stderr=subprocess.STDOUT,
    )
    atm = WebAtm(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.time() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"web ATM exited with {proc.returncode}:\n{log.read_text()}")
        try:
            st = atm.state()
            if st["terminal"]["signedOn"] and all(k["kcv"] for k in st["terminal"]["keys"]):
                break
        except OSError:
            pass
        if time.time() > deadline:
            atm.stop()
            raise RuntimeError(f"web ATM not signed on in time:\n{log.read_text()}")
        time.sleep(0.2)
    yield atm
    atm.stop()


@pytest.fixture(scope="module")
def browser(chromium, tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(30)
    SCREENS.mkdir(parents=True, exist_ok=True)
    yield driver
    driver.quit()
