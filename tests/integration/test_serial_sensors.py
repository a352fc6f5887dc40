"""SDS011, PMS5003, MH-Z19 and M-Bus drivers over pseudo-terminals: the test plays the device, noise included."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

import pytest

from agent.driver import DriverContext, SharedResources
from agent.errors import DeviceUnreachable
from drivers.mbus.config import MbusDeviceConfig
from drivers.mbus.driver import MbusDriver
from drivers.mhz19.config import Mhz19DeviceConfig
from drivers.mhz19.driver import Mhz19Driver
from drivers.pms5003.config import Pms5003DeviceConfig
from drivers.pms5003.driver import Pms5003Driver
from drivers.sds011 import codec as sds
from drivers.sds011.config import Sds011DeviceConfig
from drivers.sds011.driver import Sds011Driver
from tests.vectors import load_vectors

AIR = load_vectors("air_quality_serial.json")
MBUS = load_vectors("mbus_water_meters.json")


def _ctx() -> DriverContext:
    return DriverContext(SharedResources(), {}, Path("."))


async def _play(master: int, answer: dict[bytes, bytes], stop: asyncio.Event, size: int) -> None:
    """Answer each request read from the master side of the pty."""
    loop = asyncio.get_running_loop()
    buf = b""
    while not stop.is_set():
        try:
            buf += await loop.run_in_executor(None, _read_some, master)
        except OSError:
            return
        while len(buf) >= size or (buf and buf[:size] in answer):
            req, buf = buf[:size], buf[size:]
            if req in answer:
                os.write(master, answer[req])


def _read_some(fd: int) -> bytes:
    import select

    r, _, _ = select.select([fd], [], [], 0.1)
    return os.read(fd, 256) if r else b""


async def test_sds011_query_mode_with_noise() -> None:
    master, slave = os.openpty()
    good = bytes.fromhex(AIR["sds011_vectors"][0]["input_hex"])
    bad = bytes.fromhex(AIR["sds011_vectors"][-1]["input_hex"])
    reply = bytes.fromhex("AAC5060101000000" + "08AB")  # C5 reply; checksum of 06 01 01 00 00 00 = 08
    answers = {
        sds.sleep_command(False): reply,
        sds.sleep_command(True): reply,
        sds.set_query_mode_command(True): bytes.fromhex("AAC5020101000000" + "04AB"),
        sds.query_command(): b"\x00\x13" + bad + good,
    }
    stop = asyncio.Event()
    cfg = Sds011DeviceConfig.model_validate({"driver": "sds011", "port": os.ttyname(slave), "warmup": "0s"})
    driver = Sds011Driver("air-1", cfg, _ctx())
    player = asyncio.create_task(_play(master, answers, stop, sds.COMMAND_LEN))
    try:
        await driver.open()  # wakes the sensor and sets query mode: the player answers
        readings = await asyncio.wait_for(driver.read(), 10)
    finally:
        stop.set()
        await player
        await driver.close()
        os.close(master)
        os.close(slave)
    assert {r.point: r.value for r in readings} == {"pm2_5": 123.6, "pm10": 261.8}
    assert all(r.unit == "µg/m³" for r in readings)
    assert driver.counters["bad_checksum"] == 1
    assert driver.counters["garbage_bytes"] >= 2


@pytest.mark.parametrize("preheat", ["0s", "180s"])
async def test_mhz19_read_and_preheat(preheat: str) -> None:
    master, slave = os.openpty()
    from drivers.mhz19 import codec as mhz

    answers = {
        mhz.read_co2_command(): bytes.fromhex("FF8601F40000000086") + bytes.fromhex("FF8601F40000000085")
    }
    stop = asyncio.Event()
    cfg = Mhz19DeviceConfig.model_validate({"driver": "mhz19", "port": os.ttyname(slave), "preheat": preheat})
    driver = Mhz19Driver("co2-1", cfg, _ctx())
    await driver.open()
    player = asyncio.create_task(_play(master, answers, stop, mhz.FRAME_LEN))
    try:
        readings = await asyncio.wait_for(driver.read(), 10)
    finally:
        stop.set()
        await player
        await driver.close()
        os.close(master)
        os.close(slave)
    assert [(r.point, r.value, r.unit) for r in readings] == [("co2", 500, "ppm")]
    assert readings[0].quality == (None if preheat == "0s" else "uncertain")
    assert driver.counters["bad_checksum"] == 1


async def test_mbus_readout_and_silent_meter() -> None:
    from drivers.mbus import codec as mb

    master, slave = os.openpty()
    frame = bytes.fromhex(MBUS["vectors"][0]["frame_hex"])  # Itron BM+m at primary address 8
    answers = {mb.snd_nke(8): b"\xe5", mb.req_ud2(8): b"\x55" + frame}
    stop = asyncio.Event()
    shared = SharedResources()
    ctx = DriverContext(shared, {}, Path("."))
    base = {"driver": "mbus", "port": os.ttyname(slave), "reply_timeout": "300ms", "retries": 0}
    meter = MbusDriver("water-8", MbusDeviceConfig.model_validate({**base, "address": 8}), ctx)
    silent = MbusDriver("water-9", MbusDeviceConfig.model_validate({**base, "address": 9}), ctx)
    assert meter.bus is silent.bus  # one port for the meters of one line
    await meter.open()
    player = asyncio.create_task(_play(master, answers, stop, 5))
    try:
        readings = await asyncio.wait_for(meter.read(), 10)
        with pytest.raises(DeviceUnreachable, match="no answer from M-Bus address 9"):
            await asyncio.wait_for(silent.read(), 10)
    finally:
        stop.set()
        await player
        await shared.aclose()
        os.close(master)
        os.close(slave)
    values = {r.point: (r.value, r.unit) for r in readings}
    assert values["volume"] == (54.321, "m³")
    assert values["meter_id"] == ("11490378", None)
    assert "access_number" not in values
    assert meter.meter_id == "11490378"
    assert meter.counters["garbage_bytes"] >= 1


async def _play_sequence(master: int, request: bytes, answers: list[bytes], stop: asyncio.Event) -> int:
    """Answer the n-th `request` read from the master side with answers[n] (the last one repeats)."""
    loop = asyncio.get_running_loop()
    buf, served = b"", 0
    while not stop.is_set():
        try:
            buf += await loop.run_in_executor(None, _read_some, master)
        except OSError:
            break
        while (i := buf.find(request)) >= 0:
            buf = buf[i + len(request) :]
            os.write(master, answers[min(served, len(answers) - 1)])
            served += 1
    return served


async def test_pms5003_passive_mode_with_noise_and_a_warming_up_frame() -> None:
    from drivers.pms5003 import codec as pms

    vectors = {v["id"]: bytes.fromhex(v["input_hex"]) for v in AIR["pms5003_vectors"]}
    good, warming = vectors["pms5003-pypms-good"], vectors["pms5003-empty-warming-up"]
    bad = good[:-1] + bytes([good[-1] ^ 0x01])  # one bit flipped in the checksum
    command_ack = bytes.fromhex("424D0004E1000174")  # the answer to the passive-mode command: not data
    master, slave = os.openpty()
    stop = asyncio.Event()
    player = asyncio.create_task(
        _play_sequence(
            master,
            pms.read_command(),
            [b"\x42\x00\x13" + bad + command_ack + warming + b"\x4d\x42", b"\xff" + command_ack + good],
            stop,
        )
    )
    cfg = Pms5003DeviceConfig.model_validate({"driver": "pms5003", "port": os.ttyname(slave)})
    driver = Pms5003Driver("pm-1", cfg, _ctx())
    try:
        await driver.open()
        readings = await asyncio.wait_for(driver.read(), 10)
    finally:
        stop.set()
        served = await player
        await driver.close()
        os.close(master)
        os.close(slave)
    values = {r.point: (r.value, r.unit) for r in readings}
    assert values["pm2_5"] == (13, "µg/m³") and values["pm10"] == (22, "µg/m³")
    assert values["pm1_0"] == (5, "µg/m³") and values["n0_3"] == (765, "/0.1L")
    assert len(values) == 12
    assert served == 2  # the all-zero warm-up frame was not published: the driver asked again
    assert driver.counters["bad_checksum"] == 1 and driver.counters["malformed"] == 1
    assert driver.counters["garbage_bytes"] >= 3 and driver.counters["frames_ok"] == 2
    assert "malformed=1" in driver.point_errors["serial_line"]  # health says what was thrown away


async def test_pms5003_active_mode_takes_the_pushed_frame() -> None:
    vectors = {v["id"]: bytes.fromhex(v["input_hex"]) for v in AIR["pms5003_vectors"]}
    pushed = vectors["pms5003-capture-02c5"]
    master, slave = os.openpty()
    cfg = Pms5003DeviceConfig.model_validate(
        {"driver": "pms5003", "port": os.ttyname(slave), "reporting": "active"}
    )
    driver = Pms5003Driver("pm-2", cfg, _ctx())
    await driver.open()

    async def push() -> None:
        while True:  # the sensor pushes a frame about every second, noise included
            os.write(master, b"\x00" + pushed[:10] + b"\x42\x4d\x00" + pushed)
            await asyncio.sleep(0.1)

    pusher = asyncio.create_task(push())
    try:
        readings = await asyncio.wait_for(driver.read(), 10)
    finally:
        pusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await pusher
        await driver.close()
        os.close(master)
        os.close(slave)
    values = {r.point: r.value for r in readings}
    assert values["pm2_5"] == 8 and values["pm10"] == 8 and values["n0_3"] == 210
    assert driver.counters["garbage_bytes"] >= 1


async def test_pms5003_port_vanishes_and_returns(tmp_path: Path) -> None:
    good = {v["id"]: bytes.fromhex(v["input_hex"]) for v in AIR["pms5003_vectors"]}["pms5003-capture-0234"]
    link = tmp_path / "usb-Silicon_Labs_CP2102-if00-port0"
    first_m, first_s = os.openpty()
    link.symlink_to(os.ttyname(first_s))
    cfg = Pms5003DeviceConfig.model_validate({"driver": "pms5003", "port": str(link)})
    driver = Pms5003Driver("pm-3", cfg, _ctx())
    await driver.open()
    os.close(first_m)  # unplugged
    os.close(first_s)
    with pytest.raises(DeviceUnreachable, match=r"port lost|not open"):
        await asyncio.wait_for(driver.read(), 10)
    assert driver.counters["port_lost"] == 1
    link.unlink()
    second_m, second_s = os.openpty()
    link.symlink_to(os.ttyname(second_s))  # plugged back, another tty number
    stop = asyncio.Event()
    from drivers.pms5003 import codec as pms

    player = asyncio.create_task(_play_sequence(second_m, pms.read_command(), [good], stop))
    try:
        await driver.open()
        readings = await asyncio.wait_for(driver.read(), 10)
    finally:
        stop.set()
        await player
        await driver.close()
        os.close(second_m)
        os.close(second_s)
    assert {r.point: r.value for r in readings}["pm2_5"] == 5
