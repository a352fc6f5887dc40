"""TIC driver over a pseudo-terminal: real frames with noise in between; the port vanishing and returning."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator
from contextlib import aclosing
from pathlib import Path

import pytest

from agent.driver import DriverContext, SharedResources
from agent.errors import DeviceUnreachable
from drivers.tic.config import TicDeviceConfig
from drivers.tic.driver import TicDriver
from tests.vectors import load_vectors

FRAMES = {f["id"]: bytes.fromhex(f["frame_hex"]) for f in load_vectors("linky_tic.json")["frame_vectors"]}
HALLARD = FRAMES["frame-hist-hallard-HC"]


class Pty:
    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):  # already closed by the test (unplugged)
                os.close(fd)


@pytest.fixture
def pty() -> Iterator[Pty]:
    p = Pty()
    yield p
    p.close()


def _driver(path: str, **kw: object) -> TicDriver:
    cfg = TicDeviceConfig.model_validate({"driver": "linky-tic", "port": path, **kw})
    return TicDriver("linky", cfg, DriverContext(SharedResources(), {}, Path(".")))


async def _collect(driver: TicDriver, n: int) -> list[list]:
    out = []
    async with aclosing(driver.stream()) as stream:  # type: ignore[type-var]
        async for batch in stream:
            out.append(batch)
            if len(out) == n:
                break
    return out


async def test_stream_yields_only_valid_values_through_noise(pty: Pty) -> None:
    driver = _driver(pty.path, mode="historic", min_interval="0s", labels="all")
    await driver.open()
    try:
        bad = HALLARD.replace(b"PAPP 00180 *", b"PAPP 00980 *")  # corrupted value, checksum no longer fits
        noise = b"\x7f\x55garbage" + HALLARD[:40] + b"\x04" + bad + b"\x01\x02\x02" + HALLARD
        os.write(pty.master, noise)
        batches = await asyncio.wait_for(_collect(driver, 2), 5)
    finally:
        await driver.close()
    values = {r.point: r.value for r in batches[1]}
    assert values["PAPP"] == 180 and values["HCHC"] == 723392 and values["ADCO"] == "021528603314"
    first = {r.point: r.value for r in batches[0]}
    assert "PAPP" not in first  # the corrupted PAPP is never published
    assert all(r.unit == "Wh" for r in batches[1] if r.point in ("HCHC", "HCHP"))
    assert driver.counters["bad_checksum"] == 1
    assert driver.counters["garbage_bytes"] > 0 and driver.counters["partial_frames"] >= 1
    assert driver.meter_address == "021528603314"
    assert "serial_line" in driver.point_errors


async def test_min_interval_emits_latest_value_once(pty: Pty) -> None:
    driver = _driver(pty.path, mode="standard", min_interval="1h")
    await driver.open()
    try:
        os.write(pty.master, FRAMES["frame-std-hekmon-capture"] * 3)
        batches = await asyncio.wait_for(_collect(driver, 1), 5)
        await asyncio.sleep(0.2)
    finally:
        await driver.close()
    points = {r.point for r in batches[0]}
    assert {"ADSC", "EAST", "SINSTS", "IRMS1", "URMS1"} <= points
    assert "MSG1" not in points and "DATE" not in points  # not in the default label filter
    assert driver.counters["frames_ok"] >= 1


async def test_auto_mode_detects_standard(pty: Pty) -> None:
    driver = _driver(pty.path, mode="auto", detect_timeout="2s")
    task = asyncio.create_task(driver.open())
    await asyncio.sleep(0.1)
    os.write(pty.master, FRAMES["frame-std-hekmon-test"] * 2)
    await asyncio.wait_for(task, 5)
    await driver.close()
    assert driver.mode == "standard"


async def test_port_vanishes_and_returns(tmp_path: Path) -> None:
    first, second = Pty(), Pty()
    link = tmp_path / "usb-Linky_TIC-if00"
    link.symlink_to(first.path)
    driver = _driver(str(link), mode="historic", min_interval="0s")
    try:
        await driver.open()
        os.write(first.master, HALLARD)
        assert (await asyncio.wait_for(_collect(driver, 1), 5))[0]
        first.close()  # USB adapter unplugged
        with pytest.raises(DeviceUnreachable, match="port lost"):
            await asyncio.wait_for(_collect(driver, 1), 5)
        link.unlink()
        with pytest.raises(DeviceUnreachable, match="cannot open"):
            await driver.open()
        link.symlink_to(second.path)  # plugged back, renumbered
        await driver.open()
        os.write(second.master, HALLARD)
        batch = (await asyncio.wait_for(_collect(driver, 1), 5))[0]
        assert {r.point: r.value for r in batch}["PAPP"] == 180
        assert driver.counters["port_lost"] == 1
    finally:
        await driver.close()
        second.close()
