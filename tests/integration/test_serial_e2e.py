"""Serial devices end to end: the real daemon on pty slaves, the test playing the meters, Mosquitto as the judge.

The test writes real TIC frames (historic and standard) with noise, partial
frames and bad checksums between them into the pty masters, answers an MH-Z19's
requests with noise and bad frames around the good answer, and checks that the
broker receives exactly the values of the valid groups/frames, that the bad
frames are counted in /api/status, and that a TIC adapter unplugged and plugged
back (a by-id symlink re-pointed to a new pty) is recovered by the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tty
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.broker import Broker, free_port
from tests.daemon import Checker, Daemon, fieldgate_cli, write_config
from tests.integration.test_status_daemon import wait_status
from tests.vectors import load_vectors

pytestmark = pytest.mark.timeout(120)

TIC = {f["id"]: f for f in load_vectors("linky_tic.json")["frame_vectors"]}
HIST = TIC["frame-hist-hallard-HC"]
STD = TIC["frame-std-hekmon-capture"]
GW = "gw-serial-e2e"


# --- frames, built by the test (its own checksum code, checked against the real captures) ---


def _ck(payload: bytes) -> bytes:
    return bytes([(sum(payload) & 0x3F) + 0x20])


def _groups(frame: bytes, mode: str) -> list[tuple[bytes, list[bytes]]]:
    """Label and fields (horodate, data) of each group of a frame; the checksum character is dropped.

    Historic groups are parsed from both ends: the checksum may itself be a space.
    """
    out = []
    for g in frame[1:-1].split(b"\r"):
        g = g[1:]  # the LF
        if not g:
            continue
        if mode == "historic":
            label = g.split(b" ", 1)[0]
            out.append((label, [g[len(label) + 1 : -2]]))
        else:
            fields = g.split(b"\t")
            out.append((fields[0], fields[1:-1]))
    return out


def _rebuild(frame: bytes, mode: str, changes: dict[str, str]) -> bytes:
    """The same frame with some groups' data replaced and their checksum recomputed."""
    sep = b" " if mode == "historic" else b"\t"
    out = b"\x02"
    for label, fields in _groups(frame, mode):
        if label.decode() in changes:
            fields = [*fields[:-1], changes[label.decode()].encode()]
        if mode == "historic":  # historic: checksum over label SP data
            payload = label + sep + sep.join(fields)
            out += b"\n" + payload + sep + _ck(payload) + b"\r"
        else:  # standard: checksum over label HT [horodate HT] data HT
            payload = label + sep + sep.join(fields) + sep
            out += b"\n" + payload + _ck(payload) + b"\r"
    return out + b"\x03"


HIST_A = bytes.fromhex(HIST["frame_hex"])  # real Linky capture, historic mode
HIST_B = _rebuild(HIST_A, "historic", {"PAPP": "00250", "IINST": "002", "HCHP": "001742240"})
HIST_AFTER_REPLUG = _rebuild(HIST_A, "historic", {"PAPP": "00333"})
# Corrupted on the line: values changed, checksums left as they were (they no longer fit).
HIST_BAD = HIST_A.replace(b"PAPP 00180 *", b"PAPP 00980 *").replace(b"HCHC 000723392  ", b"HCHC 000723999  ")
STD_C = bytes.fromhex(STD["frame_hex"])  # real Linky capture, standard mode
STD_D = _rebuild(STD_C, "standard", {"SINSTS": "00411", "EAST": "003519750", "EASF01": "003519750"})
STD_BAD = STD_C.replace(b"SINSTS\t00263\tQ", b"SINSTS\t09263\tQ").replace(b"URMS1\t242\tB", b"URMS1\t042\tB")

HIST_CYCLE = (
    b"\x7f\x55garbage"
    + HIST_A
    + HIST_B[:40]  # a frame cut short (adapter re-plugged mid-frame, line noise): resynchronised
    + HIST_BAD
    + b"\x01\x02\x02\xff"
    + HIST_B
)
STD_CYCLE = b"\x00\x15\x02ADSC\t01" + STD_C + STD_BAD + b"\x13\x11noise" + STD_D[:100] + STD_D

CO2_GOOD = (500, 612, 733)
CO2_BAD = 9999  # only ever sent with a wrong checksum


def _mhz19_answer(ppm: int, good: bool = True) -> bytes:
    body = bytes([0xFF, 0x86]) + ppm.to_bytes(2, "big") + b"\x00\x00\x00\x00"
    cs = (0xFF - (sum(body[1:8]) & 0xFF) + 1) & 0xFF
    return body + bytes([cs if good else (cs + 1) & 0xFF])


def test_the_crafted_frames_follow_the_real_ones() -> None:
    # Our frame builder reproduces the real captures byte for byte, so the crafted frames are real-shaped.
    assert _rebuild(HIST_A, "historic", {}) == HIST_A
    assert _rebuild(STD_C, "standard", {}) == STD_C
    assert HIST_BAD != HIST_A and STD_BAD != STD_C
    assert b"PAPP 00250 " in HIST_B and b"SINSTS\t00411\t" in STD_D


# --- the field side: ptys and the devices the test plays ---


class Pty:
    """A serial adapter: the daemon opens the slave (through `link`), the test owns the master."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)  # no echo before the daemon's pyserial sets the line up
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)

    def write(self, data: bytes) -> None:
        # Nobody reading (daemon not started, port being reopened): the bytes are lost, as on a real line.
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self.master, data)

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


class Meter:
    """A Linky sending its frame cycle every 200 ms (faster than the real 1-2 s: the test is short)."""

    def __init__(self, pty: Pty, cycle: bytes) -> None:
        self.pty = pty
        self.cycle = cycle
        self.sending = True
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            if self.sending:
                self.pty.write(self.cycle)
            await asyncio.sleep(0.2)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class Co2Sensor:
    """An MH-Z19 on the pty master: each read request gets noise, a bad frame, then the next good value."""

    def __init__(self, pty: Pty) -> None:
        self.pty = pty
        self.requests = 0
        self._buf = b""
        asyncio.get_running_loop().add_reader(pty.master, self._on_request)

    def _on_request(self) -> None:
        try:
            self._buf += os.read(self.pty.master, 256)
        except OSError:
            return
        while (i := self._buf.find(b"\xff\x01\x86")) >= 0 and len(self._buf) >= i + 9:
            self._buf = self._buf[i + 9 :]
            ppm = CO2_GOOD[self.requests % len(CO2_GOOD)]
            self.requests += 1
            self.pty.write(b"\x00\x13\xff" + _mhz19_answer(CO2_BAD, good=False) + _mhz19_answer(ppm))

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.pty.master)


# --- checks ---


def _norm(value: Any) -> str:
    text = str(value).strip()
    return (text.lstrip("0") or "0") if text.isdigit() else text


def _allowed(frames: list[bytes], mode: str) -> dict[str, set[str]]:
    """Per label, the (normalised) data of the valid groups of the valid frames the test sent."""
    out: dict[str, set[str]] = {}
    for frame in frames:
        for label, fields in _groups(frame, mode):
            out.setdefault(label.decode(), set()).add(_norm(fields[-1].decode()))
    return out


def _values(checker: Checker, device: str, point: str) -> list[Any]:
    return [r["value"] for r in checker.data.readings if r["device"] == device and r["point"] == point]


def _only_valid(checker: Checker, device: str, allowed: dict[str, set[str]]) -> None:
    got = [r for r in checker.data.readings if r["device"] == device and not r["point"].startswith("_")]
    assert got, f"nothing from {device}"
    wrong = [r for r in got if r["point"] not in allowed or _norm(r["value"]) not in allowed[r["point"]]]
    assert not wrong, f"{device}: values that no valid frame carried: {wrong[:5]}"


async def test_daemon_forwards_exactly_the_valid_serial_readings(tmp_path: Path, broker: Broker) -> None:
    hist, std, co2 = Pty(), Pty(), Pty()
    link = tmp_path / "usb-Enedis_TIC_Linky-if00-port0"  # what /dev/serial/by-id/ gives a daemon
    link.symlink_to(hist.path)
    api = free_port()
    cfg = write_config(
        tmp_path / "fieldgate.yaml",
        gateway=GW,
        broker_port=broker.port,
        db=tmp_path / "buffer.db",
        local=f"127.0.0.1:{api}",
        buses="  {}",
        devices=f"""  linky-h:
    driver: linky-tic
    port: {link}
    mode: historic
    min_interval: 0s
    poll: 1s          # the reopen backoff after the port is lost starts at 1 s
  linky-s:
    driver: linky-tic
    port: {std.path}
    mode: standard
    min_interval: 0s
  co2:
    driver: mhz19
    port: {co2.path}
    poll: 300ms
    preheat: 0s
""",
    )
    meters = [Meter(hist, HIST_CYCLE), Meter(std, STD_CYCLE)]
    sensor = Co2Sensor(co2)
    replugged: Pty | None = None
    daemon = Daemon(cfg, tmp_path / "daemon.log").start()
    try:
        async with Checker(broker.port, GW) as checker:

            def seen(device: str, point: str, value: Any) -> Callable[[], bool]:
                return lambda: value in _values(checker, device, point)

            # Both frames of each cycle get through; the corrupted groups never do.
            await checker.wait_for(seen("linky-h", "PAPP", 180), what="historic PAPP of frame A")
            await checker.wait_for(seen("linky-h", "PAPP", 250), what="historic PAPP of frame B")
            await checker.wait_for(seen("linky-s", "SINSTS", 263), what="standard SINSTS of frame C")
            await checker.wait_for(seen("linky-s", "SINSTS", 411), what="standard SINSTS of frame D")
            await checker.wait_for(
                lambda: set(CO2_GOOD) <= set(_values(checker, "co2", "co2")), what="every CO2 value"
            )
            status = await wait_status(
                api,
                lambda d: all(
                    d["devices"][n]["counters"].get("bad_checksum", 0) >= 2
                    for n in ("linky-h", "linky-s", "co2")
                ),
                "bad checksums counted for each device",
            )

            _only_valid(checker, "linky-h", _allowed([HIST_A, HIST_B], "historic"))
            _only_valid(checker, "linky-s", _allowed([STD_C, STD_D], "standard"))
            assert set(_values(checker, "co2", "co2")) == set(CO2_GOOD)
            for bad in (980, 723999):
                assert bad not in [r["value"] for r in checker.data.readings if r["device"] == "linky-h"]
            for bad in (9263, 42):
                assert bad not in [r["value"] for r in checker.data.readings if r["device"] == "linky-s"]
            by_point = {r["point"]: r for r in checker.data.readings if r["device"] == "linky-h"}
            assert by_point["ADCO"]["value"] == "021528603314" and "unit" not in by_point["ADCO"]
            assert by_point["HCHC"]["value"] == 723392 and by_point["HCHC"]["unit"] == "Wh"
            assert by_point["PAPP"]["unit"] == "VA" and by_point["IINST"]["unit"] == "A"
            by_point = {r["point"]: r for r in checker.data.readings if r["device"] == "linky-s"}
            assert by_point["ADSC"]["value"] == "012345678910"
            assert by_point["EAST"]["unit"] == "Wh" and by_point["URMS1"]["value"] == 242
            assert by_point["URMS1"]["unit"] == "V" and by_point["IRMS1"]["unit"] == "A"
            assert {r["unit"] for r in checker.data.readings if r["device"] == "co2"} == {"ppm"}
            assert not [r for r in checker.data.readings if r["point"] == "_state"]  # nothing failed so far

            h = status["devices"]["linky-h"]["counters"]
            assert h["frames_ok"] > 0 and h["garbage_bytes"] > 0 and h["partial_frames"] >= 1
            assert status["devices"]["linky-s"]["counters"]["partial_frames"] >= 1
            c = status["devices"]["co2"]["counters"]
            assert c["frames_ok"] >= 3 and c["garbage_bytes"] >= 3
            assert "bad_checksum" in status["devices"]["linky-h"]["point_errors"]["serial_line"]

            # The historic adapter is unplugged: the link goes, the pty hangs up.
            meters[0].sending = False
            hist.close()
            link.unlink()
            await checker.wait_for(
                lambda: "failing" in _values(checker, "linky-h", "_state"), what="linky-h failing"
            )
            assert any("port lost" in str(v) for v in _values(checker, "linky-h", "_error"))
            await wait_status(
                api,
                lambda d: "cannot open" in (d["devices"]["linky-h"]["last_error"] or ""),
                "the reopen failing while the adapter is away",
            )
            # The other devices are not disturbed by one adapter going away.
            co2_before = len(_values(checker, "co2", "co2"))
            await checker.wait_for(
                lambda: len(_values(checker, "co2", "co2")) > co2_before, what="CO2 goes on"
            )

            # Plugged back: a new tty behind the same by-id name.
            replugged = Pty()
            link.symlink_to(replugged.path)
            meters[0].pty, meters[0].cycle, meters[0].sending = replugged, HIST_AFTER_REPLUG, True
            await checker.wait_for(seen("linky-h", "PAPP", 333), what="readings after the re-plug")
            await checker.wait_for(lambda: _values(checker, "linky-h", "_state")[-1:] == ["ok"], what="ok")
            status = await wait_status(
                api, lambda d: d["devices"]["linky-h"]["state"] == "ok", "linky-h ok again"
            )
            assert status["devices"]["linky-h"]["counters"]["port_lost"] >= 1
            assert _values(checker, "linky-h", "_state") == ["failing", "ok"]
            _only_valid(checker, "linky-h", _allowed([HIST_A, HIST_B, HIST_AFTER_REPLUG], "historic"))
            assert not [
                r for r in checker.data.readings if r["device"] != "linky-h" and r["point"] == "_state"
            ]
    finally:
        code = daemon.stop()
        for m in meters:
            await m.stop()
        sensor.close()
        for p in (hist, std, co2, replugged):
            if p is not None:
                p.close()
    assert code == 0, daemon.log_text()[-3000:]
    assert "Traceback" not in daemon.log_text()


# --- `fieldgate decode` for the serial codecs: both TIC modes, --mode, and the invalid vectors ---


async def _decode(*args: str) -> tuple[int, Any, str]:
    res = await fieldgate_cli("decode", *args, "--json")
    return res.code, json.loads(res.out) if res.out.strip() else None, res.err


@pytest.mark.parametrize("frame_id", sorted(TIC))
async def test_decode_tic_frames_with_and_without_mode(frame_id: str) -> None:
    vec = TIC[frame_id]
    for extra in (["--mode", vec["mode"]], []):  # explicit mode, then detected from the separators
        code, doc, err = await _decode("tic", vec["frame_hex"], *extra)
        assert code == 0, err
        address = "ADCO" if vec["mode"] == "historic" else "ADSC"
        assert doc[address] == vec["expected"][address]
        for label, data in vec["expected"].items():
            if label in doc and label != "DATE":
                assert _norm(doc[label]) == _norm(data), (label, doc[label], data)
    other = "standard" if vec["mode"] == "historic" else "historic"
    code, doc, _err = await _decode("tic", vec["frame_hex"], "--mode", other)
    assert code == 1 and other in doc["error"]  # the wrong mode is refused in words, not misread


async def test_decode_refuses_the_invalid_serial_vectors() -> None:
    aq = load_vectors("air_quality_serial.json")
    corrupted_tic = HIST_BAD.hex()
    code, doc, _ = await _decode("tic", corrupted_tic, "--mode", "historic")
    assert code == 1 and "checksum" in doc["error"]
    pms_warm = next(v for v in aq["pms5003_vectors"] if v["id"] == "pms5003-empty-warming-up")
    pms_bad = next(v for v in aq["pms5003_vectors"] if v["id"] == "pms5003-inconsistent")
    for vec, word in ((pms_warm, "warming up"), (pms_bad, "inconsistent")):
        code, doc, _ = await _decode("pms5003", vec["input_hex"])
        assert code == 1 and word in doc["error"]
    bad_mhz = next(v for v in aq["mhz19_vectors"] if v["id"] == "mhz19-bad-checksum")
    code, doc, _ = await _decode("mhz19", bad_mhz["input_hex"])
    assert code == 1 and "checksum" in doc["error"]
    sds_bad = aq["sds011_vectors"][-1]
    code, doc, _ = await _decode("sds011", sds_bad["input_hex"])
    assert code == 1 and "checksum" in doc["error"]
    mbus = load_vectors("mbus_water_meters.json")["vectors"][0]
    frame = bytearray.fromhex(mbus["frame_hex"])
    frame[-2] ^= 0xFF  # the long frame's checksum byte
    code, doc, _ = await _decode("mbus", frame.hex())
    assert code == 1 and "checksum" in doc["error"]
