"""The daemon's plain config models (agent/config/plainmodel.py, agent/config/validate.py) against pydantic's.

The daemon validates its file in a child process and runs on plain models; every other process (this one
included) runs on pydantic. A process cannot hold both, so the plain side runs in a subprocess here, loading
each file through the real child validator, and its results are compared with this process's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from agent.config import modelkit
from agent.config.loader import load_config
from agent.config.validate import snapshot
from agent.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]

# What the running code asks of a config besides its fields, computed the same way on both sides.
FACTS = textwrap.dedent(
    """
    def facts(cfg):
        out = {
            "devices": {n: d.cycle_timeout() for n, d in cfg.device_items()},
            "mqtt": [cfg.upstream.mqtt.host, cfg.upstream.mqtt.port, cfg.upstream.mqtt.use_tls],
            "copy_equal": cfg.model_copy() == cfg,
            "copy_update": cfg.model_copy(update={"version": 99}).version,
            "storage_equal": cfg.storage == type(cfg.storage)(**cfg.storage.model_dump()),
            "problems": [list(map(str, loc)) + [m] for loc, m in cfg.problems()],
            "python_keys": sorted(cfg.model_dump()),
            "schedules": {
                n: [[t.device, t.point] for t in s.all_targets()] + [s.uses_sun()]
                for n, s in cfg.schedules.items()
            },
            "points": {
                n: {p: [pt.effective_type(), pt.register_count()] for p, pt in d.points.items()}
                for n, d in cfg.devices.items()
                if d.driver == "modbus"
            },
        }
        hash(cfg.gateway)
        return out
    """
)

PROBE = (
    textwrap.dedent(
        """
    import asyncio, json, sys
    from pathlib import Path
    from agent.config import modelkit
    modelkit.select("plain")
    from agent.config import validate
    from agent.errors import ConfigError

    async def main():
        out = {}
        for name in sys.argv[1:]:
            try:
                cfg = await validate.load(Path(name))
            except ConfigError as exc:
                out[name] = {"problems": exc.problems}
                continue
            out[name] = {"dump": cfg.model_dump(mode="json"), "facts": facts(cfg), "cls": type(cfg).__mro__[-2].__module__}
        return out

    """
    )
    + FACTS
    + textwrap.dedent(
        """
    out = asyncio.run(main())
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("pydantic", "pydantic_core", "yaml"))
    print(json.dumps({"results": out, "leaked": leaked}))
    """
    )
)


def _facts(cfg: Any) -> dict[str, Any]:
    scope: dict[str, Any] = {}
    exec(FACTS, scope)
    result: dict[str, Any] = scope["facts"](cfg)
    return result


def _plain_process(probe: str, files: list[Path]) -> dict[str, Any]:
    """What `probe` prints (JSON), run on `files` in a process on plain models."""
    proc = subprocess.run(
        [sys.executable, "-c", probe, *map(str, files)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def _plain_side(files: list[Path]) -> dict[str, Any]:
    return _plain_process(PROBE, files)


def _config_files() -> list[Path]:
    files = [
        REPO / "config" / "fieldgate.example.yaml",
        *sorted((REPO / "config" / "examples").glob("*.yaml")),
    ]
    files += sorted((REPO / "tests" / "cases" / "config").glob("*/fieldgate.yaml"))
    return files


@pytest.fixture(scope="module")
def plain() -> dict[str, Any]:
    return _plain_side(_config_files())


def test_the_plain_side_never_imports_pydantic_or_yaml(plain: dict[str, Any]) -> None:
    assert plain["leaked"] == []
    assert {r.get("cls") for r in plain["results"].values() if "dump" in r} == {"agent.config.plainmodel"}


@pytest.mark.parametrize("path", _config_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_plain_models_match_pydantic(plain: dict[str, Any], path: Path) -> None:
    got = plain["results"][str(path)]
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        # An invalid file: the child's messages are the loader's, positions included.
        assert got == {"problems": exc.problems}
        return
    assert "problems" not in got, got
    assert got["dump"] == json.loads(json.dumps(cfg.model_dump(mode="json")))
    assert json.dumps(got["dump"]) == json.dumps(cfg.model_dump(mode="json"))  # the fields' order too
    assert got["facts"] == json.loads(json.dumps(_facts(cfg)))


SLOTS_PROBE = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from agent.config import modelkit
    modelkit.select("plain")
    from agent.config import plainmodel, validate

    def models(value):
        if isinstance(value, plainmodel.BaseModel):
            yield value
            for name in type(value).__plain_names__:
                yield from models(getattr(value, name))
        elif isinstance(value, dict):
            for v in value.values():
                yield from models(v)
        elif isinstance(value, list | tuple):
            for v in value:
                yield from models(v)

    def refused(call):
        try:
            call()
        except (AttributeError, TypeError) as exc:
            return type(exc).__name__
        return None

    cfg = asyncio.run(validate.load(Path(sys.argv[1])))
    out = {"models": 0, "with_dict": [], "unknown_set": set(), "frozen": set(), "copy_unknown": set(),
           "rebuild_unknown": set()}
    for m in models(cfg):
        cls = type(m)
        name = f"{cls.__module__}:{cls.__qualname__}"
        out["models"] += 1
        if hasattr(m, "__dict__"):
            out["with_dict"].append(name)
        out["unknown_set"].add(refused(lambda: object.__setattr__(m, "not_a_field", 1)))
        out["frozen"].add(refused(lambda: setattr(m, cls.__plain_names__[0], None)))
        out["copy_unknown"].add(refused(lambda: m.model_copy(update={"not_a_field": 1})))
        out["rebuild_unknown"].add(refused(lambda: plainmodel.rebuild((plainmodel.MODEL, name, {"not_a_field": 1}))))
    print(json.dumps({k: sorted(map(str, v)) if isinstance(v, set) else v for k, v in out.items()}))
    """
)


def test_plain_models_have_slots_that_refuse_other_attributes() -> None:
    """No `__dict__` per model (docs/PERFORMANCE.md, issue 24): an attribute that is not a field cannot be set,
    not by a copy's update nor by a snapshot naming it; fields stay frozen."""
    got = _plain_process(SLOTS_PROBE, [REPO / "config" / "fieldgate.example.yaml"])
    assert got["models"] > 10
    assert got["with_dict"] == []
    assert got["unknown_set"] == got["copy_unknown"] == got["rebuild_unknown"] == ["AttributeError"]
    assert got["frozen"] == ["TypeError"]


def test_a_rich_config_survives_the_trip(tmp_path: Path) -> None:
    """Every kind of value the models hold: paths, durations, sizes, nested unions, extra upstreams, BLE."""
    (tmp_path / "key.pem").write_text("x")
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(
        textwrap.dedent(
            """
            gateway: {id: gw-1, location: {latitude: 45.7, longitude: 4.8, timezone: Europe/Paris}}
            storage: {path: /tmp/x.db, max_size: 64MB, commit_interval: 500ms}
            upstream:
              mqtt:
                url: mqtts://broker.example:8883
                format: sparkplug
                tls: {ca_file: /etc/ssl/ca.pem, insecure: false}
                compression: gzip
              extra:
                city: {ngsi_ld: {url: "http://127.0.0.1:1026", devices: {m1: {type: Device, static: {a: [1, 2]}}}}}
            local: {listen: ""}
            buses:
              rs485: {type: modbus-rtu, port: /dev/ttyUSB0, baudrate: 19200, parity: E}
            devices:
              m1:
                bus: rs485
                poll: 5s
                report: deadband
                deadband: 2%
                aggregate: {window: 1m, functions: [min, max]}
                processing: {v: {report: always, heartbeat: 1h}}
                points:
                  v: {table: input, address: 0, type: float32, order: CDAB, scale: 0.1, poll: 1m}
                  on: {table: coil, address: 3, writable: true}
              t1: {driver: ble, address: "A4:C1:38:12:34:56", decoder: bthome, bindkey_file: key.pem}
            schedules:
              night:
                device: m1
                point: "on"
                steps: [{at: sunset+15m, value: true}, {at: "06:30", value: false, weekdays: [mon, tue]}]
            commands: {}
            """
        )
    )
    expected = load_config(cfg)
    got = _plain_side([cfg])["results"][str(cfg)]
    assert got["dump"] == json.loads(json.dumps(expected.model_dump(mode="json")))
    assert got["dump"]["storage"]["commit_interval"] == "500ms"  # the serializer of a Duration applied
    assert got["facts"] == json.loads(json.dumps(_facts(expected)))


def test_a_snapshot_refuses_a_value_it_cannot_carry() -> None:
    with pytest.raises(TypeError, match="bytearray"):
        snapshot({"a": bytearray(b"x")})


def test_plain_mode_is_refused_once_pydantic_models_are_loaded() -> None:
    # This process built its models on pydantic: asking for plain ones now must say no, not mix the two.
    with pytest.raises(modelkit.ModelKitChosenLate, match="after config models were built on 'pydantic'"):
        modelkit.select("plain")
    assert modelkit.selected() == "pydantic"
    modelkit.select("pydantic")  # the same kit again is no change
