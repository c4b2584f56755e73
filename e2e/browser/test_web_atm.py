"""The web ATM in a real browser against a real switch (SPEC §7a): a person's flows, screen by
screen, with a screenshot of each under target/e2e-screens/. Tests key on the screen ids and
element ids the page exposes, never on pixel layout."""

from __future__ import annotations

import re
import time

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select, WebDriverWait

from conftest import SCREENS

EVERYDAY, LOW_BALANCE, LOW_LIMIT, OFFLINE = 0, 1, 2, 3


@pytest.fixture(scope="module")
def atm(browser, web_atm):
    browser.get(web_atm.url)
    Page(browser).wait_screen("welcome")
    return Page(browser)


class Page:
    def __init__(self, driver):
        self.d = driver

    def el(self, id_):
        return self.d.find_element(By.ID, id_)

    def screen(self) -> str:
        return self.el("screen").get_attribute("data-screen")

    def wait(self, what, timeout=15, message=""):
        # the page re-renders panels live (server-sent events): an element found a moment ago may
        # be replaced before it is read; such a poll is simply tried again
        return WebDriverWait(
            self.d, timeout, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,)
        ).until(lambda _: what(), message)

    def wait_screen(self, name, timeout=15):
        self.wait(lambda: self.screen() == name, timeout,
                  f"screen {name!r} not reached (at {self.screen()!r}: {self.text()})")

    def text(self) -> str:
        return self.el("screen").text

    def shot(self, name: str, readme: bool = False):
        self.d.save_screenshot(str(SCREENS / f"{name}.png"))
        if readme:
            # A smaller copy of the ATM and panel for README (docs/web-atm/ holds the committed ones).
            import base64
            shot = self.d.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "clip": {"x": 0, "y": 0, "width": 1330, "height": 650, "scale": 0.6}})
            (SCREENS / "readme").mkdir(exist_ok=True)
            (SCREENS / "readme" / f"{name}.png").write_bytes(base64.b64decode(shot["data"]))

    def click(self, id_):
        self.wait(lambda: self.el(id_).is_displayed() and self.el(id_).is_enabled(), 10, f"{id_} not clickable")
        self.el(id_).click()

    def key(self, k):
        ids = {"enter": "key-enter", "cancel": "key-cancel", "clear": "key-clear"}
        self.click(ids.get(k) or (f"side-{k}" if re.fullmatch(r"[LR][1-4]", k) else f"key-{k}"))

    def type_pin(self, pin):
        for d in pin:
            self.key(d)
        self.wait(lambda: self.el("entry").text == "*" * len(pin), 5, "PIN entry not echoed as asterisks")

    def insert(self, index):
        self.wait_screen("welcome")
        Select(self.el("card-select")).select_by_value(str(index))
        self.click("insert-card")
        self.wait_screen("pin")

    def sign_in(self, index, pin="1234"):
        self.insert(index)
        self.type_pin(pin)
        self.key("enter")
        self.wait_screen("menu")

    def take_card(self):
        self.wait_screen("take-card")
        self.click("take-card")
        self.wait_screen("welcome")

    def take_receipt(self) -> str:
        self.wait(lambda: self.el("take-receipt").is_displayed(), 5, "no receipt")
        text = self.el("take-receipt").text
        self.click("take-receipt")
        self.wait(lambda: not self.el("take-receipt").is_displayed(), 5, "receipt not taken")
        return text

    def exchanges(self) -> list[str]:
        return [e.text for e in self.d.find_elements(By.CSS_SELECTOR, "#exchanges summary")]

    def available(self) -> str:
        m = re.search(r"Available balance: ([\d,.]+)", self.text())
        assert m, self.text()
        return m.group(1)

    def balance(self) -> str:
        self.key("R1")
        self.wait_screen("balance")
        return self.available()


def test_balance_with_receipt(atm, web_atm):
    atm.shot("01-welcome")
    atm.insert(EVERYDAY)
    atm.type_pin("1234")
    atm.shot("02-pin")
    atm.key("enter")
    atm.wait_screen("menu")
    atm.shot("03-menu")
    assert atm.balance() == "5,000.00"
    atm.shot("04-balance")
    # the panel shows the exchange: MTI, code, timing, masked PAN; no PIN block, no full PAN
    atm.wait(lambda: any("0200 balance inquiry" in s and "0210 00 approved" in s for s in atm.exchanges()), 5,
             "balance exchange not in the panel")
    source = atm.d.page_source
    pan = next(c for c in web_atm.state()["atm"]["cards"])["pan"]
    assert re.fullmatch(r"\d{6}\*+\d{4}", pan)
    assert "(withheld: PIN block)" in web_atm_state_text(web_atm)
    assert not re.search(r"\b\d{16}\b", source), "a full PAN reached the page"
    atm.key("R2")  # receipt
    atm.wait_screen("take-card")
    receipt = atm.take_receipt()
    assert "BALANCE INQUIRY" in receipt and "AVAILABLE 5,000.00" in receipt
    atm.take_card()


def web_atm_state_text(web_atm) -> str:
    import json
    return json.dumps(web_atm.state())


def test_withdrawal_with_receipt(atm):
    atm.sign_in(EVERYDAY)
    atm.key("L1")
    atm.wait_screen("fast-cash")
    atm.shot("05-fast-cash")
    atm.key("L2")  # 200.00
    atm.wait_screen("take-cash")
    atm.shot("06-take-cash", readme=True)
    assert "200.00" in atm.el("take-cash").text
    atm.click("take-cash")
    atm.wait_screen("receipt-question")
    atm.key("R3")
    atm.wait_screen("take-card")
    atm.shot("07-receipt")
    receipt = atm.take_receipt()
    assert "WITHDRAWAL 200.00" in receipt and "AVAILABLE 4,800.00" in receipt
    assert re.search(r"AUTH CODE \w+", receipt)
    atm.take_card()
    atm.sign_in(EVERYDAY)
    assert atm.balance() == "4,800.00"
    atm.key("R4")
    atm.take_card()


def test_other_amount_and_cancel_reverses(atm):
    atm.sign_in(EVERYDAY)
    atm.key("L2")
    atm.wait_screen("other-amount")
    for d in "150":
        atm.key(d)
    atm.wait(lambda: atm.el("entry").text == "150", 5)
    atm.shot("08-other-amount")
    atm.key("enter")
    atm.wait_screen("take-cash")
    # the customer walks away: Cancel retracts the cash and reverses the withdrawal
    atm.key("cancel")
    atm.wait_screen("take-card")
    assert "reversed" in atm.text()
    atm.shot("09-cancel-reversed")
    atm.wait(lambda: any("0400 reversal" in s and "0410 00" in s for s in atm.exchanges()), 5,
             "reversal not in the panel")
    atm.take_card()
    atm.sign_in(EVERYDAY)
    assert atm.balance() == "4,800.00", "the reversal restored the 150.00"
    atm.key("R4")
    atm.take_card()


def test_insufficient_funds_and_daily_limit(atm):
    atm.sign_in(LOW_BALANCE)
    atm.key("L1")
    atm.key("L1")  # 100.00 from 50.00
    atm.wait_screen("insufficient-funds")
    atm.shot("10-insufficient-funds")
    atm.key("R4")
    atm.take_card()
    atm.sign_in(LOW_LIMIT)
    atm.key("L1")
    atm.key("L2")  # 200.00 over a 150.00 daily limit
    atm.wait_screen("limit-exceeded")
    atm.shot("11-limit-exceeded")
    atm.key("cancel")
    atm.take_card()


def test_issuer_unavailable(atm):
    atm.sign_in(OFFLINE)
    atm.key("R1")
    atm.wait_screen("unavailable", timeout=30)
    atm.shot("12-issuer-unavailable")
    atm.wait(lambda: any("91 issuer unavailable" in s for s in atm.exchanges()), 5)
    atm.key("R4")
    atm.take_card()


def test_wrong_pin_three_times_retains_the_card(atm):
    atm.sign_in(LOW_LIMIT, pin="9999")
    atm.key("R1")
    atm.wait_screen("wrong-pin")
    atm.shot("13-wrong-pin")
    wrong = 1
    while True:
        atm.key("R3")
        atm.wait_screen("pin")
        atm.type_pin("9999")
        atm.key("enter")
        atm.wait(lambda: atm.screen() in ("wrong-pin", "card-retained"), 15)
        wrong += 1
        if atm.screen() == "card-retained":
            break
        assert wrong < 4, "the card was not retained after three wrong PINs"
    assert wrong == 3, f"retained after {wrong} wrong PINs"
    atm.shot("14-card-retained")
    assert not atm.el("take-card").is_displayed(), "a retained card is not given back"
    assert atm.el("retained").text == "1"
    atm.key("R4")
    atm.wait_screen("welcome")


def test_server_pushed_tak_rotation_is_shown_live(atm, switch, web_atm):
    tid = atm.el("terminal-id").text
    before = atm.el("kcv-TAK").text
    status, _, body = switch.http("POST", f"/v1/terminals/{tid}/keys/TAK/rotate", {})
    assert status in (200, 201), body
    new_kcv = body["key"]["kcv"]
    assert new_kcv != before
    # no reload: the page learns it over server-sent events
    atm.wait(lambda: atm.el("kcv-TAK").text == new_kcv, 15, "the pushed TAK's KCV was not shown")
    atm.wait(lambda: "switch pushed a new TAK" in atm.el("events").text, 5)
    atm.wait(lambda: any("switch → ATM" in s and "0800 TAK key change" in s and "0810 00" in s for s in atm.exchanges()), 5)
    atm.shot("15-tak-pushed", readme=True)
    # the switch activated it: a MACed balance inquiry works under the new TAK
    deadline = time.time() + 10
    while True:
        status, _, keys = switch.http("GET", f"/v1/terminals/{tid}/keys")
        if any(k["type"] == "TAK" and k["kcv"] == new_kcv and k["state"] == "ACTIVE" for k in keys):
            break
        assert time.time() < deadline, keys
        time.sleep(0.2)
    atm.sign_in(EVERYDAY)
    assert atm.balance() == "4,800.00"
    atm.key("R4")
    atm.take_card()


def test_operator_buttons(atm, switch):
    tid = atm.el("terminal-id").text
    atm.click("op-sign-off")
    atm.wait(lambda: atm.el("signed-on").text == "signed off", 10)
    atm.click("op-sign-on")
    atm.wait(lambda: atm.el("signed-on").text == "signed on", 10)
    tpk = atm.el("kcv-TPK").text
    atm.click("op-key-exchange")
    atm.wait(lambda: atm.el("kcv-TPK").text != tpk, 10, "key exchange did not change the TPK")
    status, _, keys = switch.http("GET", f"/v1/terminals/{tid}/keys")
    assert any(k["type"] == "TPK" and k["state"] == "ACTIVE" and k["kcv"] == atm.el("kcv-TPK").text for k in keys)
    # a withdrawal, then the operator reverses it from the panel
    atm.sign_in(EVERYDAY)
    atm.key("L1")
    atm.key("L1")
    atm.wait_screen("take-cash")
    atm.click("take-cash")
    atm.wait_screen("receipt-question")
    atm.key("R4")
    atm.take_card()
    atm.click("op-reverse-last")
    atm.wait(lambda: "0400 reversal → 00" in atm.el("notice").text, 10, atm.el("notice").text)
    atm.shot("16-panel")
    atm.sign_in(EVERYDAY)
    assert atm.balance() == "4,800.00"
    atm.key("R4")
    atm.take_card()
