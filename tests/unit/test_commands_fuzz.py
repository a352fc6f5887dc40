"""Fuzzing the command parser (hypothesis): whatever arrives on `{p}/commands`, a refusal or nothing.

Fixed example budget, derandomized, no example database (nothing committed, the same
examples every run). A failure found here becomes a named test in test_commands.py
(the deep-nesting ones did: test_deeply_nested_json_is_refused_without_an_exception).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.control.commands import CommandProcessor, CommandsConfig
from agent.driver import Driver
from agent.pipeline.health import DeviceHealth
from tests.unit.test_commands import FakeLamp

FUZZ = settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=timedelta(seconds=2),  # bounded: a parse never hangs (generous for a loaded machine)
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)  # what orjson can encode
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30,
)
FIELDS = ("id", "device", "point", "value", "expires_ts", "override")
plausible = {
    "id": st.text(max_size=250) | st.integers(min_value=-(2**63), max_value=2**63 - 1) | json_values,
    "device": st.sampled_from(["lamp-1", "lamp-2", ""]) | json_values,
    "point": st.sampled_from(["dim", "on", "setpoint", "label", "power_w", "nope"]) | json_values,
    "value": json_values,
    "expires_ts": st.integers(min_value=-(2**63), max_value=2**63 - 1) | json_values,
    "override": st.sampled_from(["30m", "2h", "1d", "0s", "99999999999d", "1" + "0" * 400 + "d"])
    | json_values,
}
commands = st.fixed_dictionaries({}, optional={**plausible, "extra": json_values})


class Rig:
    """A processor in a private event loop (hypothesis calls the test body many times)."""

    def __init__(self, lamp: FakeLamp | None) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="fg-fuzz-")
        drivers: dict[str, Driver[Any]] = {} if lamp is None else {"lamp-1": lamp}
        health = {"lamp-1": DeviceHealth(driver="fake", state="ok")}
        self.proc = CommandProcessor(
            Path(self.dir.name) / "commands.db", drivers.get, health.get, CommandsConfig()
        )
        self.proc.open()
        self.runner = asyncio.Runner()
        self.count = 0

    def handle(self, payload: bytes) -> dict[str, Any] | None:
        return self.runner.run(self.proc.handle(payload))

    def close(self) -> None:
        self.runner.close()
        self.proc.close()
        self.dir.cleanup()


@pytest.fixture
def no_devices() -> Iterator[Rig]:
    rig = Rig(None)
    yield rig
    rig.close()


@pytest.fixture
def one_lamp() -> Iterator[tuple[Rig, FakeLamp]]:
    lamp = FakeLamp()
    rig = Rig(lamp)
    yield rig, lamp
    rig.close()


def assert_refusal(result: dict[str, Any] | None) -> None:
    if result is None:  # nothing to answer to (no usable id)
        return
    assert set(result) == {"id", "ok", "error"}, result
    assert result["ok"] is False and isinstance(result["error"], str) and result["error"], result
    assert "internal error" not in result["error"], result
    orjson.dumps(result)  # publishable as it is


@FUZZ
@given(payload=st.binary(max_size=2000))
def test_random_bytes_get_a_refusal_or_nothing(no_devices: Rig, payload: bytes) -> None:
    assert_refusal(no_devices.handle(payload))


@FUZZ
@given(doc=json_values)
def test_random_json_gets_a_refusal_or_nothing(no_devices: Rig, doc: Any) -> None:
    assert_refusal(no_devices.handle(orjson.dumps(doc)))


@FUZZ
@given(doc=commands)
def test_command_shaped_json_without_devices_is_refused(no_devices: Rig, doc: dict[str, Any]) -> None:
    result = no_devices.handle(orjson.dumps(doc))
    assert_refusal(result)
    if result is not None:
        assert result["id"] == doc["id"]


@FUZZ
@given(doc=commands)
def test_command_shaped_json_on_a_lamp_is_refused_or_written_once(
    one_lamp: tuple[Rig, FakeLamp], doc: dict[str, Any]
) -> None:
    rig, lamp = one_lamp
    rig.count += 1
    doc = {**doc, "id": f"fuzz-{rig.count}"}  # a new id each time: never a repeat
    before = len(lamp.writes)
    result = rig.handle(orjson.dumps(doc))
    assert result is not None and result["id"] == doc["id"]
    if result["ok"]:
        assert len(lamp.writes) == before + 1 and set(result) == {"id", "ok", "value", "ts"}
    else:
        assert_refusal(result)
        assert len(lamp.writes) == before
