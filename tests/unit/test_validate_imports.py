"""What the validating child imports (agent/config/validate.py): only the config models of the drivers its file
names (modelkit.only_drivers), so that a Modbus-only gateway's start never imports BLE, serial or the other
drivers' models. Not a timing assertion: the modules present in the child's sys.modules once it has answered.

That the child's answers (configs and positioned problems) equal the whole union's, for every example and
test config, is tests/unit/test_plainmodel.py."""

from __future__ import annotations

import json
import marshal
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent import registry
from agent.config import modelkit

REPO = Path(__file__).resolve().parents[2]

# The child's own code path (validate.main, as `python -m agent.config.validate FILE` runs it), then its modules.
CHILD = textwrap.dedent(
    """
    import json, sys
    from agent.config import validate
    validate.main(sys.argv[1:])
    sys.stdout.flush()
    print(json.dumps(sorted(sys.modules)), file=sys.stderr)
    """
)

MODBUS_ONLY = """
gateway: {id: gw1}
upstream: {mqtt: {url: 'mqtt://127.0.0.1:1883'}}
buses: {lan: {type: modbus-tcp, host: 127.0.0.1, port: 5020}}
devices:
  meter: {bus: lan, unit_id: 1, poll: 1s, points: {p: {table: holding, address: 0}}}
"""

WITH_BLE = (
    MODBUS_ONLY
    + """
  th1: {driver: ble, address: 'A4:C1:38:00:00:01', decoder: bthome}
"""
)


def _python(code: str, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess[bytes]:
    """`code` in a new interpreter from this tree (`cache`: its snapshots' directory); it must exit 0."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if cache is not None:
        env["FIELDGATE_CACHE_DIR"] = str(cache)
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, cwd=REPO, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stderr.decode()
    return proc


def _child(tmp_path: Path, text: str) -> tuple[tuple[str, object, object], set[str]]:
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(text)
    proc = _python(CHILD, str(cfg))
    modules = set(json.loads(proc.stderr.decode().strip().splitlines()[-1]))
    return marshal.loads(proc.stdout), modules


def _config_modules(*names: str) -> set[str]:
    return {registry.DRIVERS[n].config.partition(":")[0] for n in names}


def test_a_modbus_only_file_is_validated_without_the_other_drivers(tmp_path: Path) -> None:
    (kind, _, _), modules = _child(tmp_path, MODBUS_ONLY)
    assert kind == "ok"
    assert "drivers.modbus.config" in modules
    others = _config_modules(*(n for n in registry.DRIVERS if n != "modbus"))
    assert not modules & others
    assert not {m for m in modules if m.split(".")[0] in ("bleak", "serial", "serial_asyncio")}
    assert not {m for m in modules if m.startswith(("drivers.ble", "drivers._serial"))}
    # nor anything of the running daemon's (drivers' I/O, the event loop's protocol libraries)
    assert not {m for m in modules if m.split(".")[0] in ("pymodbus", "aiomqtt", "paho")}


PLUGINS = textwrap.dedent(
    """
    import os, sys
    os.environ.pop("PYDANTIC_DISABLE_PLUGINS", None)
    from agent.config import validate
    validate.main(sys.argv[1:])
    sys.stdout.flush()
    from pydantic.plugin import _loader
    print(_loader._plugins is None, file=sys.stderr)
    """
)


def test_the_child_does_not_look_for_pydantic_plugins(tmp_path: Path) -> None:
    # pydantic scans every installed distribution's entry points for plugins when it builds its first validator
    # (~10 ms of the child's CPU); the child turns that off, so the scan never ran (its cache stays unset).
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(MODBUS_ONLY)
    proc = _python(PLUGINS, str(cfg))
    assert marshal.loads(proc.stdout)[0] == "ok"
    assert proc.stderr.decode().strip().splitlines()[-1] == "True"


def test_a_file_with_ble_devices_builds_the_ble_models_too(tmp_path: Path) -> None:
    (kind, _, _), modules = _child(tmp_path, WITH_BLE)
    assert kind == "ok"
    assert _config_modules("modbus", "ble") <= modules
    assert not modules & _config_modules("linky-tic", "sds011", "pms5003", "mhz19", "mbus")
    assert "bleak" not in modules  # the config model only, never the protocol library


def test_an_unknown_driver_is_refused_with_every_driver_listed(tmp_path: Path) -> None:
    (kind, problems, _), modules = _child(tmp_path, MODBUS_ONLY + "  x: {driver: modbsu}\n")
    assert kind == "problems"
    assert isinstance(problems, list) and len(problems) == 1
    assert "unknown 'modbsu'" in problems[0] and "did you mean 'modbus'" in problems[0]
    for name in registry.DRIVERS:
        assert f"'{name}'" in problems[0]
    assert _config_modules(*registry.DRIVERS) <= modules  # the whole union, as before


def test_the_device_union_cannot_shrink_once_built() -> None:
    # This process built its config models on the whole union (a test imports them): any set is within it.
    import agent.config.models  # noqa: F401

    modelkit.only_drivers(["modbus", "ble"])  # kept: the whole union holds them
    code = textwrap.dedent(
        """
        from agent.config import modelkit
        modelkit.select("pydantic")
        modelkit.only_drivers(["modbus"])
        import agent.config.models
        modelkit.only_drivers([])  # no device: the default driver's, held
        try:
            modelkit.only_drivers(["ble"])
        except modelkit.ModelKitChosenLate as exc:
            print("refused:", exc)
        """
    )
    out = _python(code).stdout.decode()
    assert out.startswith("refused: device union of ['modbus'] built before ['ble']")


@pytest.mark.parametrize(
    ("devices", "expected"),
    [
        ({}, set()),
        ({"a": {"unit_id": 1}, "b": {"driver": "ble"}}, {"modbus", "ble"}),
        ({"a": {"driver": "nope"}}, None),
        (None, None),
        ({"a": "not a mapping"}, {"modbus"}),  # dispatched as the union does: to the default driver
    ],
)
def test_drivers_named(devices: object, expected: set[str] | None) -> None:
    assert registry.drivers_named(devices) == expected


FORKED = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from agent.config import modelkit
    modelkit.select("plain")
    from agent.config import validate
    from agent.errors import ConfigError

    async def one(fork):
        pending = validate.spawn(Path(sys.argv[1]), fork=fork)
        kind = type(pending.proc).__name__
        try:
            cfg = await pending.result()
        except ConfigError as exc:
            return kind, {"problems": exc.problems}
        return kind, {"dump": cfg.model_dump(mode="json")}

    async def main():
        forked, started = await one(True), await one(False)
        # a forked child that is stopped during start-up (the daemon's stop): killed and reaped
        pending = validate.spawn(Path(sys.argv[1]), fork=True)
        pending.kill()
        await asyncio.to_thread(pending.proc.communicate)
        return {"forked": forked, "started": started, "killed": pending.proc.returncode}

    print(json.dumps(asyncio.run(main())))
    """
)


@pytest.mark.parametrize(
    "text", [MODBUS_ONLY, WITH_BLE + "  bad: {bus: nowhere, unit_id: 300, points: {}}\n"]
)
def test_the_forked_child_answers_as_the_started_one(tmp_path: Path, text: str) -> None:
    """`fieldgate run` forks its validating child (ForkedChild); reloads start one: the same answers."""
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(text)
    out = json.loads(_python(FORKED, str(cfg)).stdout)
    assert out["forked"][0] == "ForkedChild" and out["started"][0] == "Popen"
    assert out["forked"][1] == out["started"][1]
    assert ("problems" in out["forked"][1]) == (text != MODBUS_ONLY)
    assert out["killed"] == -9


DAEMON = textwrap.dedent(
    """
    import json, sys
    from agent.config import modelkit
    modelkit.select("plain")
    import agent.verbs.run, agent.runtime, agent.upstream.mqtt, drivers.modbus.driver
    print(json.dumps(sorted(sys.modules)))
    """
)


def test_the_modules_loaded_before_the_fork_are_both_processes(tmp_path: Path) -> None:
    """validate.SHARED_MODULES are loaded by the daemon before it forks its child, as both import them: a
    module either would not import must not be there (it would cost the daemon, or the child, for nothing)."""
    from agent.config.validate import SHARED_MODULES

    _, child = _child(tmp_path, MODBUS_ONLY)
    daemon = set(json.loads(_python(DAEMON).stdout))
    assert set(SHARED_MODULES) - child == set()
    assert set(SHARED_MODULES) - daemon == set()


def test_a_failed_fork_starts_the_child_instead(tmp_path: Path) -> None:
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(MODBUS_ONLY)
    code = textwrap.dedent(
        """
        import asyncio, errno, os, sys
        from pathlib import Path
        from agent.config import modelkit
        modelkit.select("plain")
        from agent.config import validate

        def no_fork():
            raise OSError(errno.EAGAIN, "Resource temporarily unavailable")

        os.fork = no_fork
        before = len(os.listdir("/proc/self/fd"))
        pending = validate.spawn(Path(sys.argv[1]), fork=True)
        cfg = asyncio.run(pending.result())
        print(type(pending.proc).__name__, cfg.gateway.id, len(os.listdir("/proc/self/fd")) - before)
        """
    )
    assert _python(code, str(cfg)).stdout.decode().split() == ["Popen", "gw1", "0"]


def test_a_process_that_built_config_models_starts_its_child_instead_of_forking(tmp_path: Path) -> None:
    """A start that rolls a remote config back first (agent/control/remoteconfig.py) builds the daemon's plain
    models before the validator is spawned: a forked copy could not choose pydantic (ModelKitChosenLate, the
    validation failed and the daemon did not start), so a child is started, and it validates."""
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(MODBUS_ONLY)
    code = textwrap.dedent(
        """
        import asyncio, sys
        from pathlib import Path
        from agent.config import modelkit
        modelkit.select("plain")
        from agent.config import validate
        from agent.config.models import FieldgateConfig
        assert FieldgateConfig  # the plain models are built in this process
        pending = validate.spawn(Path(sys.argv[1]), fork=True)
        cfg = asyncio.run(pending.result())
        print(modelkit.models_built(), type(pending.proc).__name__, cfg.gateway.id)
        """
    )
    assert _python(code, str(cfg)).stdout.decode().split() == ["True", "Popen", "gw1"]


HELD = textwrap.dedent(
    """
    import asyncio, gc, sys
    from pathlib import Path
    from agent.config import modelkit
    modelkit.select("plain")
    from agent.config import validate

    def held_bytes(root):
        seen, todo, total = set(), [root], 0
        while todo:
            obj = todo.pop()
            if id(obj) in seen or isinstance(obj, type):
                continue
            seen.add(id(obj))
            if isinstance(obj, bytes):
                total += len(obj)
            else:
                todo.extend(gc.get_referents(obj))
        return total

    async def main():
        pending = validate.spawn(Path(sys.argv[1]), fork=sys.argv[2] == "fork")
        await pending.result()
        print(type(pending.proc).__name__, held_bytes(pending))

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("fork", ["fork", "start"])
def test_the_childs_answer_is_not_kept_once_read(tmp_path: Path, fork: str) -> None:
    """The Pending of the daemon's start lives as long as the daemon: what the child wrote (the config's
    snapshot, 1.7 MiB at 10,000 points) must not stay referenced from it (a Popen keeps communicate()'s chunks)."""
    points = ", ".join(f"r{i}: {{table: holding, address: {i}}}" for i in range(100))
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(
        MODBUS_ONLY
        + "".join(f"  d{d}: {{bus: lan, unit_id: {d}, points: {{{points}}}}}\n" for d in range(2, 12))
    )
    kind, held = _python(HELD, str(cfg), fork).stdout.decode().split()
    assert kind == ("ForkedChild" if fork == "fork" else "Popen")
    assert int(held) < 4096  # the answer is ~100 kB here


SNAPSHOT_DROPPED = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from agent.config import modelkit
    modelkit.select("plain")
    from agent.config import validate
    from agent.errors import ConfigError

    async def main():
        path = Path(sys.argv[1])
        await validate.spawn(path).result()  # keeps the snapshot
        pending = validate.spawn(path, use_snapshot=True)
        await pending.result()
        held = pending.from_cache and pending.cached is not None
        path.write_text(path.read_text() + "  bad: {bus: nowhere, unit_id: 300, points: {}}\\n")
        try:
            await pending.verify()
        except ConfigError:
            print(held, pending.cached is None)

    asyncio.run(main())
    """
)


def test_the_starts_snapshot_is_dropped_when_the_file_no_longer_validates(tmp_path: Path) -> None:
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(MODBUS_ONLY)
    proc = _python(SNAPSHOT_DROPPED, str(cfg), cache=tmp_path / "cache")
    assert proc.stdout.decode().split() == ["True", "True"]


VERIFY_REBUILDS = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from agent.config import modelkit
    modelkit.select("plain")
    from agent.config import validate

    rebuilt = []
    config_of = validate._config_of

    def counting(path, payload):
        rebuilt.append(path)
        return config_of(path, payload)

    async def main():
        path = Path(sys.argv[1])
        await validate.spawn(path).result()  # keeps the snapshot
        for change in ("", "  d2: {bus: lan, unit_id: 2, points: {r: {table: holding, address: 1}}}\\n"):
            pending = validate.spawn(path, use_snapshot=True)
            await pending.result()
            held = (type(pending.cached).__name__, pending._snapshot is None)  # the file's bytes, not the objects
            path.write_text(path.read_text() + change)
            validate._config_of = counting
            fresh = await pending.verify()
            validate._config_of = config_of
            print(pending.from_cache, *held, len(rebuilt), None if fresh is None else sorted(fresh.devices))
            rebuilt.clear()

    asyncio.run(main())
    """
)


def test_verify_rebuilds_the_models_only_for_a_changed_file(tmp_path: Path) -> None:
    """After a start from the snapshot, the daemon holds the snapshot file's bytes, not its decoded objects, and
    `verify()` compares the child's snapshot with it: an unchanged file builds no second copy of the config's
    models; a changed one does (together, 5.4 MiB of heap left at 10,000 points: docs/PERFORMANCE.md)."""
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(MODBUS_ONLY)
    proc = _python(VERIFY_REBUILDS, str(cfg), cache=tmp_path / "cache")
    assert proc.stdout.decode().splitlines() == [
        "True bytes True 0 None",
        "True bytes True 1 ['d2', 'meter']",
    ]
