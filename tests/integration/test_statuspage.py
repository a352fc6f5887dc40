"""The status page in Debian's headless chromium, driven by Playwright, against the real LocalServer."""

from __future__ import annotations

import math
import random
import re
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
SLOTS = 60
# A known last hour of the meter's voltage, fed through the API: a gap of 10 minutes at the start, a lone
# minute, a gap, then 40 minutes of values.
VOLT_SERIES: list[float | None] = (
    [None] * 10
    + [229.0]
    + [None] * 4
    + [229.5 + (i % 6) * 0.4 for i in range(40)]
    + [None] * 3
    + [230.1, 230.1]
)
# The upstream link and the backlog over that hour: up, an outage of 8 minutes, a flapping minute, up again.
CONNECTED: list[float | None] = [None] * 5 + [1.0] * 30 + [0.0] * 8 + [0.5] + [1.0] * 16
PENDING: list[int | None] = (
    [None] * 5
    + [0] * 30
    + [120 * (i + 1) for i in range(8)]
    + [600]
    + [max(0, 400 - 100 * i) for i in range(16)]
)
# lamp-1's minutes: ok, then failing, with one mixed minute.
LAMP_OK = [0] * 20 + [30] * 29 + [12] + [0] * 10
LAMP_ERRORS = [0] * 49 + [3] + [5] * 10

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
        self.power = 980.911
        self.current = 1.27
        self.power_factor = 0.95
        self.polls: list[str] = []
        self.writes: list[tuple[str, str, Any]] = []

    async def refresh(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        """GET /api/status: the document without its last hour."""
        doc = self.full()
        doc.pop("history")
        for dv in doc["devices"].values():
            dv.pop("activity", None)
            for r in dv["readings"].values():
                r.pop("history", None)
        return doc

    def history(self) -> dict[str, Any]:
        """GET /api/history, in the shape of agent.pipeline.health.history_doc()."""
        doc = self.full()
        return {
            **doc["history"],
            "ts": doc["ts"],
            "devices": {
                name: {
                    "activity": dv.get("activity", {"ok": [0] * SLOTS, "errors": [0] * SLOTS}),
                    "points": {p: r["history"] for p, r in dv["readings"].items() if "history" in r},
                }
                for name, dv in doc["devices"].items()
            },
        }

    def full(self) -> dict[str, Any]:
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
            "history": {"step_s": 60, "end_ts": T0 - T0 % 60_000 + 60_000, "pending": PENDING,
                        "connected": CONNECTED},
            "devices": {
                "meter-1": {"state": "ok", "errors": 0, "last_ok_ts": T0 - 3000, "last_error": None,
                            "driver": "modbus", "point_errors": {}, "next_attempt_ts": None, "counters": {},
                            "activity": {"ok": [0] * 45 + [20] * 15, "errors": [0] * SLOTS},
                            "readings": {
                                "voltage": {"value": self.voltage, "unit": "V", "ts": T0 - 3000,
                                            "history": VOLT_SERIES},
                                "current": {"value": self.current, "unit": "A", "ts": T0 - 3000},
                                "power": {"value": self.power, "unit": "W", "ts": T0 - 3000},
                                "power_factor": {"value": self.power_factor, "unit": None, "ts": T0 - 3000},
                                "energy_wh": {"value": 1234560, "unit": "Wh", "ts": T0 - 3000},
                            }},
                "lamp-1": {"state": "failing", "errors": 14, "last_ok_ts": T0 - 600_000,
                           "last_error": "no answer from unit 3 on lan within 1 s", "driver": "modbus",
                           "point_errors": {}, "next_attempt_ts": T0 + 8000, "counters": {},
                           "activity": {"ok": LAMP_OK, "errors": LAMP_ERRORS},
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
async def browser() -> AsyncIterator[Any]:
    async with playwright_api.async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


async def new_page(browser: Any, width: int) -> Any:
    context = await browser.new_context(viewport={"width": width, "height": 844}, device_scale_factor=2)
    return await context.new_page()


@pytest.fixture
async def page(browser: Any) -> Any:
    return await new_page(browser, 390)


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


# -- trends and numbers ---------------------------------------------------------------------------------


def expected_runs(series: list[float | None]) -> list[list[tuple[float, float]]]:
    """The page's drawing rule (docs/STATUS_API.md): x = 2 per minute, y from 2 (the hour's max) to 22 (its
    min), a minute without a value breaks the line."""
    nums = [v for v in series if v is not None]
    lo, hi = min(nums), max(nums)
    runs: list[list[tuple[float, float]]] = [[]]
    for i, v in enumerate(series):
        if v is None:
            runs.append([])
            continue
        y = 12.0 if hi == lo else 2 + 20 * (hi - v) / (hi - lo)
        runs[-1].append((2.0 * i, math.floor(y * 10 + 0.5) / 10))
    return [r for r in runs if r]


def parse_points(text: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in (p.split(",") for p in text.split())]


async def strip_classes(locator: Any) -> list[str]:
    classes = await locator.locator("rect").evaluate_all("rs => rs.map(r => r.getAttribute('class'))")
    return [c.removeprefix("m-") for c in classes]


def strip_rule(ok: list[int], errors: list[int]) -> list[str]:
    return [
        "mix" if e and o else "err" if e else "ok" if o else "none" for o, e in zip(ok, errors, strict=True)
    ]


@pytest.mark.parametrize("width", [375, 1280])
async def test_trends_draw_the_series_fed_through_the_api(
    served: tuple[LocalServer, ChangingSource], browser: Any, width: int
) -> None:
    server, _ = served
    page = await new_page(browser, width)
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    await page.goto(f"http://127.0.0.1:{server.port}/")
    voltage = device_card(page, "meter-1").locator('tr[data-point="voltage"]')
    await playwright_api.expect(voltage.locator("td.v")).to_have_text("230.1 V")

    # the sparkline: one polyline per run of minutes with values, a dot for a lone minute
    spark = voltage.locator("svg.spark")
    await playwright_api.expect(spark.locator("circle")).to_have_count(1)  # /api/history arrived
    assert await spark.get_attribute("viewBox") == f"0 0 {2 * (SLOTS - 1)} 24"
    drawn = [parse_points(p) for p in await spark.locator("polyline").evaluate_all(
        "ls => ls.map(l => l.getAttribute('points'))")]  # fmt: skip
    runs = expected_runs(VOLT_SERIES)
    assert [r for r in runs if len(r) > 1] == drawn
    dots = await spark.locator("circle").evaluate_all(
        "cs => cs.map(c => [+c.getAttribute('cx'), +c.getAttribute('cy')])"
    )
    assert [tuple(d) for d in dots] == [r[0] for r in runs if len(r) == 1] == [(20.0, 22.0)]
    assert float(await spark.get_attribute("data-min")) == 229.0
    assert float(await spark.get_attribute("data-max")) == pytest.approx(231.5)
    assert "229.0 … 231.5 V" in await spark.locator("title").text_content()
    # points without a history (no numbers yet) have no sparkline
    assert await device_card(page, "meter-1").locator('tr[data-point="current"] svg').count() == 0

    # the upstream link and the backlog over the hour
    link = page.locator('#up svg.strip[data-what="upstream"]')
    assert await strip_classes(link) == [
        "none" if c is None else "up" if c == 1 else "down" if c == 0 else "part" for c in CONNECTED
    ]
    bars = page.locator("#buf svg.bars")
    assert await bars.get_attribute("data-max") == "960"
    heights = await bars.locator("rect").evaluate_all(
        "rs => rs.map(r => [+r.getAttribute('x'), +r.getAttribute('height')])"
    )
    assert heights == [[2 * i, math.floor(30 * v / 960 * 10 + 0.5) / 10] for i, v in enumerate(PENDING) if v]
    await playwright_api.expect(page.locator("#buf")).to_contain_text("last hour, up to 960 pending")
    # the failing lamp's error strip
    errors = device_card(page, "lamp-1").locator('svg.strip[data-what="errors"]')
    assert await strip_classes(errors) == strip_rule(LAMP_OK, LAMP_ERRORS)
    assert (await strip_classes(errors))[49] == "mix"

    # fits the screen: nothing wider than the viewport, the sparkline has room
    scroll_width = await page.evaluate("document.documentElement.scrollWidth")
    assert scroll_width <= width
    box = await spark.bounding_box()
    assert box is not None and box["width"] >= 60 and box["height"] == 24
    # everything came from the gateway itself: no network beyond it
    assert requests and all(u.startswith(f"http://127.0.0.1:{server.port}/") for u in requests), requests
    # the status every 2 s, the history once (then once a minute)
    assert sum(u.endswith("/api/history") for u in requests) == 1, requests

    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / f"statuspage-{width}.png"), full_page=True)


async def test_numbers_keep_their_decimals_across_refreshes(
    served: tuple[LocalServer, ChangingSource], page: Any
) -> None:
    server, source = served
    await page.goto(f"http://127.0.0.1:{server.port}/")
    meter = device_card(page, "meter-1")

    def value(point: str) -> Any:
        return meter.locator(f'tr[data-point="{point}"] td.v')

    await playwright_api.expect(value("power")).to_have_text("981 W")  # W: no decimals
    await playwright_api.expect(value("current")).to_have_text("1.27 A")  # A: 2
    await playwright_api.expect(value("voltage")).to_have_text("230.1 V")  # V: 1
    await playwright_api.expect(value("energy_wh")).to_have_text("1234560 Wh")  # Wh: 0
    await playwright_api.expect(value("power_factor")).to_have_text("0.95")  # no unit: as many as seen
    await playwright_api.expect(device_card(page, "thermo-park")).to_contain_text("21.4 °C")
    await playwright_api.expect(device_card(page, "thermo-park")).to_contain_text("48 % (uncertain)")

    source.power, source.current, source.voltage, source.power_factor = 1214.26, 1.3, 231.0, 0.9
    await playwright_api.expect(value("power")).to_have_text("1214 W", timeout=10_000)
    await playwright_api.expect(value("current")).to_have_text("1.30 A")
    await playwright_api.expect(value("voltage")).to_have_text("231.0 V")
    await playwright_api.expect(value("power_factor")).to_have_text("0.90")  # keeps its 2 decimals
    # every value on the page: the unit's fixed decimals
    rule = {"W": 0, "A": 2, "V": 1, "Wh": 0, "°C": 1, "%": 0}
    for text in await page.locator("td.v").all_text_contents():
        m = re.fullmatch(r"(-?\d+)(?:\.(\d+))? (\S+)( \(uncertain\))?", text)
        if m and m.group(3) in rule:
            assert len(m.group(2) or "") == rule[m.group(3)], text


class DemoLikeSource(ChangingSource):
    """`fieldgate demo`'s cabinet (its devices, points, units and values) with an hour behind it: the lamps
    dimmed to 80 % 20 minutes ago, the uplink down for 8 minutes, lamp-1 unanswering for 3. Its screenshot
    is the README's (docs/img/statuspage.png)."""

    def full(self) -> dict[str, Any]:
        def wave(base: float, amp: float, period: float, phase: float = 0.0) -> list[float | None]:
            """A slow swing plus a seeded random walk: what a minute's mean of a mains figure looks like."""
            rng, walk, out = random.Random(f"{base}/{period}"), 0.0, []
            for i in range(SLOTS):
                walk = 0.8 * walk + rng.uniform(-1, 1)
                out.append(round(base + amp * (0.5 * math.sin((i + phase) / period) + 0.25 * walk), 3))
            return out

        dim = [100.0] * 40 + [80.0] * 20
        lamp_ok = [30] * 45 + [0] * 3 + [30] * 12
        lamp_err = [0] * 45 + [4] * 3 + [0] * 12
        for i in range(45, 48):
            dim[i] = None  # type: ignore[call-overload]
        power = [None if d is None else round(d * 1.0 + 0.1 * math.sin(i), 1) for i, d in enumerate(dim)]
        p_total = [round(3990 + 300 * math.sin(i / 9) + 40 * math.sin(i * 1.7), 1) for i in range(SLOTS)]
        energy = [round(1233.2 + i * 0.066, 3) for i in range(SLOTS)]
        meter = {
            "voltage_l1": ("V", 230.9691162109375, wave(230.8, 0.9, 9)),
            "voltage_l2": ("V", 231.95803833007812, wave(231.6, 0.8, 7, 2)),
            "voltage_l3": ("V", 230.69305419921875, wave(230.5, 1.0, 5, 4)),
            "current_l1": ("A", 3.5544044971466064, wave(3.5, 0.4, 8)),
            "current_l2": ("A", 6.965587139129639, wave(6.9, 0.6, 9, 3)),
            "current_l3": ("A", 7.641943454742432, wave(7.6, 0.5, 7, 1)),
            "total_active_power": ("W", 3989.6435546875, p_total),
            "total_power_factor": (None, 0.949999988079071, wave(0.95, 0.01, 11)),
            "frequency": ("Hz", 50.025062561035156, wave(50.0, 0.03, 5)),
            "import_active_energy": ("kWh", 1237.11, energy),
        }
        lamp = {
            "dim": ("%", 80, dim),
            "power": ("W", 80.10000000000001, power),
            "voltage": ("V", 230.20000000000002, wave(230.3, 0.6, 6, 5)),
            "energy": ("Wh", 52000, [52000 - 80 * (SLOTS - i) // 60 * 60 for i in range(SLOTS)]),
            "burning_hours": ("h", 8760.0, [8759.0 + i / 60 for i in range(SLOTS)]),
        }

        def readings(points: dict[str, tuple[str | None, float, list[Any]]], ts: int) -> dict[str, Any]:
            return {p: {"value": v, "unit": u, "ts": ts, "history": h} for p, (u, v, h) in points.items()}

        lamp_readings = readings(lamp, T0 - 1200)
        for p, v in (("on", True), ("driver_failure", False), ("lamp_failure", False)):
            lamp_readings[p] = {"value": v, "unit": None, "ts": T0 - 1200}
        connected = [1.0] * 27 + [0.4] + [0.0] * 7 + [0.6] + [1.0] * 24
        pending = [0] * 27 + [300 * (i + 1) for i in range(9)] + [900, 120] + [0] * 22
        return {
            "ts": T0,
            "uptime_s": 3 * 3600 + 1260,
            "version": "0.1.0",
            "gateway": {"id": "demo-gateway", "name": "Demo cabinet (simulated devices)"},
            "buffer": {"pending": 0, "oldest_ts": None, "evicted": 0, "bytes": 1_046_296,
                       "recovered": 0, "disk_errors": 0, "last_error": None},
            "upstream": {"connected": True, "sent": 181_337, "url": "mqtt://127.0.0.1:1883",
                         "last_error": None, "since_ts": T0 - 24 * 60_000 - 17_000},
            "history": {"step_s": 60, "end_ts": T0 - T0 % 60_000 + 60_000, "pending": pending,
                        "connected": connected},
            "devices": {
                "meter-1": {"state": "ok", "errors": 0, "last_ok_ts": T0 - 2100, "last_error": None,
                            "driver": "modbus", "point_errors": {}, "next_attempt_ts": None, "counters": {},
                            "activity": {"ok": [12] * SLOTS, "errors": [0] * SLOTS},
                            "readings": readings(meter, T0 - 2100)},
                "lamp-1": {"state": "ok", "errors": 12, "last_ok_ts": T0 - 1200, "last_error": None,
                           "driver": "modbus", "point_errors": {}, "next_attempt_ts": None, "counters": {},
                           "activity": {"ok": lamp_ok, "errors": lamp_err}, "readings": lamp_readings},
            },
        }  # fmt: skip


async def test_readme_screenshot_of_a_demo_like_gateway(browser: Any, tmp_path: Path) -> None:
    server = LocalServer(DemoLikeSource(), "127.0.0.1:0", None)
    await server.start()
    try:
        page = await new_page(browser, 390)
        await page.goto(f"http://127.0.0.1:{server.port}/")
        meter = device_card(page, "meter-1")
        await playwright_api.expect(page.locator("svg.spark")).to_have_count(15)  # /api/history arrived
        await playwright_api.expect(meter.locator('tr[data-point="total_active_power"] td.v')).to_have_text(
            "3990 W"
        )
        await playwright_api.expect(meter.locator('tr[data-point="frequency"] td.v')).to_have_text("50.03 Hz")
        await playwright_api.expect(meter.locator('tr[data-point="total_power_factor"] td.v')).to_have_text(
            "0.950"  # no unit: the decimals of the values seen (3 at most)
        )
        # every numeric point has its line; booleans have none
        assert await page.locator("svg.spark").count() == 15
        assert await page.locator("svg.spark polyline").count() == 17  # dim and power: broken by the failure
        lamp = device_card(page, "lamp-1")
        assert await lamp.locator('tr[data-point="on"] svg').count() == 0
        assert await lamp.locator('tr[data-point="dim"] svg polyline').count() == 2  # the 3 failed minutes
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "statuspage-demo.png"), full_page=True)
    finally:
        await server.aclose()


async def test_every_unit_rule_is_the_documented_one(
    served: tuple[LocalServer, ChangingSource], page: Any
) -> None:
    """docs/STATUS_API.md's table of decimals per unit is the page's (`DECIMALS`), and `fmt` applies it."""
    server, _ = served
    await page.goto(f"http://127.0.0.1:{server.port}/")
    await playwright_api.expect(page.locator("#live")).to_have_text("live")
    text = (REPO_ROOT / "docs" / "STATUS_API.md").read_text()
    table = text[text.index("| decimals | units |") :].split("\n\n", 1)[0]
    documented: dict[str, int] = {}
    for decimals, units in re.findall(r"^\| (\d) \| (.+) \|$", table, re.M):
        for unit in units.split(", "):
            documented[unit] = int(decimals)
    assert documented == await page.evaluate("DECIMALS")
    shown = await page.evaluate("units => units.map(u => fmt(-1234.56789, u, null))", list(documented))
    for unit, text_ in zip(documented, shown, strict=True):
        d = documented[unit]
        assert text_ == f"{-1234.56789:.{d}f}", unit
    # no "-0.0" for a value that rounds to zero; a unit without a rule keeps the most decimals it has shown
    assert await page.evaluate("fmt(-0.04, 'V', null)") == "0.0"
    assert await page.evaluate("[fmt(0.5, null, 'k'), fmt(0.25, null, 'k'), fmt(1, null, 'k')]") == [
        "0.5",
        "0.25",
        "1.00",
    ]
