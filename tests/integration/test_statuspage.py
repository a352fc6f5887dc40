"""The status page in Debian's headless chromium, driven by Playwright, against the real LocalServer."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.control.localapi import LocalServer

REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "field-token-123"
T0 = 1_700_000_100_000

# Never `playwright install`: we drive the distribution's chromium, offline.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not Path(CHROMIUM).exists():
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.async_api", reason="playwright (pip) is not installed")


class ChangingSource:
    """A StatusSource whose values the test changes, with one healthy and one failing device."""

    def __init__(self) -> None:
        self.voltage = 230.1
        self.polls: list[str] = []
        self.writes: list[tuple[str, str, Any]] = []

    async def refresh(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {
            "ts": T0,
            "uptime_s": 5 * 3600 + 120,
            "version": "0.1.0",
            "gateway": {"id": "gw-lyon-0042", "name": "Armoire EP rue Garibaldi"},
            "buffer": {"pending": 1520, "oldest_ts": T0 - 340_000, "evicted": 0, "bytes": 2_400_000,
                       "recovered": 0, "disk_errors": 0, "last_error": None},
            "upstream": {"connected": False, "sent": 48211, "url": "mqtts://broker.example.org:8883",
                         "last_error": "connection refused by broker.example.org:8883",
                         "since_ts": T0 - 340_000},
            "devices": {
                "meter-1": {"state": "ok", "errors": 0, "last_ok_ts": T0 - 3000, "last_error": None,
                            "driver": "modbus", "point_errors": {}, "next_attempt_ts": None, "counters": {},
                            "readings": {
                                "voltage": {"value": self.voltage, "unit": "V", "ts": T0 - 3000},
                                "current": {"value": 1.27, "unit": "A", "ts": T0 - 3000},
                                "energy_wh": {"value": 1234560, "unit": "Wh", "ts": T0 - 3000},
                            }},
                "lamp-1": {"state": "failing", "errors": 14, "last_ok_ts": T0 - 600_000,
                           "last_error": "no answer from unit 3 on lan within 1 s", "driver": "modbus",
                           "point_errors": {}, "next_attempt_ts": T0 + 8000, "counters": {},
                           "readings": {"dim": {"value": 80, "unit": "%", "ts": T0 - 600_000}}},
                "thermo-park": {"state": "ok", "errors": 0, "last_ok_ts": T0 - 12_000, "last_error": None,
                                "driver": "ble", "point_errors": {}, "next_attempt_ts": None, "counters": {},
                                "readings": {
                                    "temperature": {"value": 21.4, "unit": "°C", "ts": T0 - 12_000},
                                    "humidity": {"value": 48.0, "unit": "%", "ts": T0 - 12_000,
                                                 "quality": "uncertain"},
                                }},
            },
        }  # fmt: skip

    async def poll_now(self, device: str) -> None:
        self.polls.append(device)

    async def write(self, device: str, point: str, value: Any) -> dict[str, Any]:
        self.writes.append((device, point, value))
        return {"ok": True, "value": value, "ts": T0}


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[LocalServer, ChangingSource]]:
    token_file = tmp_path / "local.token"
    token_file.write_text(TOKEN)
    source = ChangingSource()
    server = LocalServer(source, "127.0.0.1:0", token_file)
    await server.start()
    try:
        yield server, source
    finally:
        await server.aclose()


@pytest.fixture
async def page(served: tuple[LocalServer, ChangingSource]) -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=2)
            yield await context.new_page()
        finally:
            await browser.close()


def device_card(page: Any, name: str) -> Any:
    return page.locator(f'.dev[data-device="{name}"]')


async def test_page_renders_updates_and_shows_errors(
    served: tuple[LocalServer, ChangingSource], page: Any
) -> None:
    server, source = served
    await page.goto(f"http://127.0.0.1:{server.port}/")
    voltage = device_card(page, "meter-1").locator('tr[data-point="voltage"] td.v')
    await playwright_api.expect(voltage).to_have_text("230.1 V")
    await playwright_api.expect(page.locator("#gw")).to_have_text("Armoire EP rue Garibaldi")
    await playwright_api.expect(page.locator("#live")).to_have_text("live")
    # the failing device says why, in words
    lamp = device_card(page, "lamp-1")
    await playwright_api.expect(lamp.locator(".badge")).to_have_text("failing")
    await playwright_api.expect(lamp.locator(".err")).to_have_text("no answer from unit 3 on lan within 1 s")
    await playwright_api.expect(lamp).to_contain_text("next try in 8 s")
    # upstream and backlog
    await playwright_api.expect(page.locator("#up")).to_contain_text("DISCONNECTED")
    await playwright_api.expect(page.locator("#up")).to_contain_text(
        "connection refused by broker.example.org"
    )
    await playwright_api.expect(page.locator("#buf")).to_contain_text("1520 pending")
    await playwright_api.expect(page.locator("#buf")).to_contain_text("oldest 6 min old")
    await playwright_api.expect(page.locator("#buf")).to_contain_text("0 evicted")
    await playwright_api.expect(device_card(page, "thermo-park")).to_contain_text("48 % (uncertain)")
    # read-only until the token is pasted
    assert not await device_card(page, "meter-1").locator("button").is_visible()

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "statuspage.png"), full_page=True)

    source.voltage = 231.7
    await playwright_api.expect(voltage).to_have_text("231.7 V", timeout=10_000)


async def test_token_unlocks_actions(served: tuple[LocalServer, ChangingSource], page: Any) -> None:
    server, source = served
    await page.goto(f"http://127.0.0.1:{server.port}/")
    await playwright_api.expect(device_card(page, "meter-1")).to_be_visible()

    await page.fill("#token", "not-the-token")
    await page.click("#arm")
    await device_card(page, "meter-1").get_by_role("button", name="Poll now").click()
    await playwright_api.expect(page.locator("#msg")).to_contain_text("wrong token")
    assert source.polls == []
    # a refused token locks the page again
    await playwright_api.expect(page.locator("#token")).to_be_visible()

    await page.fill("#token", TOKEN)
    await page.click("#arm")
    await device_card(page, "lamp-1").get_by_role("button", name="Poll now").click()
    await playwright_api.expect(page.locator("#msg")).to_have_text("lamp-1: polled")
    assert source.polls == ["lamp-1"]

    await page.select_option("#wdev", "lamp-1")
    await page.fill("#wpoint", "dim")
    await page.fill("#wval", "40")
    await page.click("#wbtn")
    await playwright_api.expect(page.locator("#msg")).to_have_text("lamp-1: wrote 40")
    assert source.writes == [("lamp-1", "dim", 40)]
    # the token lives in sessionStorage only, never in the page's URL or the DOM
    assert TOKEN not in page.url and TOKEN not in await page.content()
