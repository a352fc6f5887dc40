"""Every value of the config is range-checked by `fieldgate check` (issue 17: a config that checks runs).

- structure: every duration and size field of every model (drivers' included) declares its bounds, every
  integer field its range (test_every_duration_and_size_is_bounded, test_every_integer_is_bounded);
- property, in process, many examples: configurations generated from the JSON Schema (`fieldgate schema`),
  near and beyond every bound, either load or raise ConfigError with positioned lines, never anything else;
  what loads holds only values the daemon runs with (test_generated_configs_*);
- the helpers: URL checks and redaction, topic prefixes, local.listen.
The daemon-level property (a config that checks starts, polls and stops) is
tests/integration/test_config_property_daemon.py.
"""

from __future__ import annotations

import math
import re
import tempfile
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from agent import registry
from agent.config.loader import load_config
from agent.config.models import FieldgateConfig, listen_problem, topic_prefix_problem
from agent.config.units import BOUND_MAX, BOUND_MIN, ZERO_OFF, format_duration, parse_duration
from agent.config.urls import redact_url, url_problem
from agent.errors import ConfigError
from tests.schema_strategies import SchemaStrategies, _mostly, config_schema

# Durations that may be 0 (it means "none" or "off"); every other duration of a config that loads is > 0.
ZERO_ALLOWED = {"min_interval", "preheat", "warmup", "scanner_watchdog", "heartbeat", "failback"}
POSITIONED = re.compile(r"^.+:\d+:\d+: \S")
ACCEPTED: list[int] = []  # devices of each generated config that loaded (the property must reach both sides)


def _models() -> Iterator[type[BaseModel]]:
    """Every model class a config can hold, the drivers' and buses' included."""
    todo: list[Any] = [FieldgateConfig]
    todo += [registry.config_class(n) for n in registry.DRIVERS]
    todo += [registry.load(p) for p in registry.BUSES.values()]
    seen: set[type[BaseModel]] = set()
    while todo:
        tp = todo.pop()
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in seen:
                continue
            seen.add(tp)
            yield tp
            todo += [f.annotation for f in tp.model_fields.values()]
        else:
            todo += list(typing.get_args(tp))


def _is_duration_or_size(field: Any) -> bool:
    text = repr(field.annotation) + repr(field.metadata)
    return "parse_duration" in text or "parse_size" in text


def test_every_duration_and_size_is_bounded() -> None:
    missing = [
        f"{model.__name__}.{name}"
        for model in _models()
        for name, field in model.model_fields.items()
        if _is_duration_or_size(field)
        and not (isinstance(field.json_schema_extra, dict) and BOUND_MIN in field.json_schema_extra)
    ]
    assert missing == []


def test_every_integer_is_bounded() -> None:
    loose = []
    for model in _models():
        for name, field in model.model_fields.items():
            annotation = field.annotation
            if (annotation is not int and annotation != (int | None)) or _is_duration_or_size(field):
                continue
            kinds = {type(m).__name__ for m in field.metadata}
            if not ({"Ge", "Gt"} & kinds and {"Le", "Lt"} & kinds) and name != "version":
                loose.append(f"{model.__name__}.{name}")
    assert (
        loose == []
    )  # `version` is checked against the versions this fieldgate reads (agent/config/migrate.py)


# --- the property, in process ---------------------------------------------------------------------------


def _strategies() -> SchemaStrategies:
    """The schema's strategies; names the schema cannot describe (a pattern in a validator) are mostly valid."""
    url = _mostly(
        st.sampled_from(["mqtt://127.0.0.1:1883", "mqtts://broker.example.org", "mqtt://[::1]:8883/"]),
        st.one_of(
            st.from_regex(r"^mqtts?://[^/\s]+(:\d+)?/?$", fullmatch=True),
            st.sampled_from(["mqtt://u:p@h", "mqtt://h:0", "mqtt://h:65536", "mqtt://h:1883?x=1"]),
        ),
    )
    ngsi_url = _mostly(
        st.just("http://127.0.0.1:1026"), st.sampled_from(["http://u:p@h", "https://h/?token=x"])
    )
    name = _mostly(st.from_regex(r"[a-z0-9_-]{1,10}", fullmatch=True), st.text(max_size=10))
    listen = _mostly(
        st.sampled_from(["", "127.0.0.1:8470", "[::1]:0"]),
        st.one_of(st.text(max_size=12), st.sampled_from(["localhost", "h:99999", ":80", "[x]:1"])),
    )
    serial = _mostly(st.just("/dev/ttyUSB0"), st.sampled_from(["", "\0", "/dev/tty\0"]))
    overrides: dict[str, st.SearchStrategy[Any]] = {
        "StorageConfig.path": st.just("/nonexistent/fieldgate/buffer.db"),
        "GatewayConfig.id": name,
        "MqttConfig.url": url,
        "NgsiLdConfig.url": ngsi_url,
        "LocalConfig.listen": listen,
        "ModbusTcpBusConfig.host": _mostly(st.just("127.0.0.1"), st.sampled_from(["", "a b", "u@h"])),
        "ModbusRtuTcpBusConfig.host": st.just("127.0.0.1"),
        "ModbusRtuBusConfig.port": serial,
    }
    for cls in ("ModbusDeviceConfig", "BleDeviceConfig", "TicDeviceConfig", "MbusDeviceConfig"):
        overrides[f"{cls}.bus"] = st.sampled_from(["lan", "lan", "other"])
    for cls in ("TicDeviceConfig", "MbusDeviceConfig", "Sds011DeviceConfig", "Pms5003DeviceConfig"):
        overrides[f"{cls}.port"] = serial
    overrides["Mhz19DeviceConfig.port"] = serial
    for tag in registry.DRIVERS:  # the key that selects the model, else every device would be read as Modbus
        overrides[f"{registry.config_class(tag).__name__}.driver"] = st.just(tag)
    return SchemaStrategies(config_schema(), overrides=overrides)


def _configs() -> st.SearchStrategy[dict[str, Any]]:
    s = _strategies()
    device = st.one_of(
        [
            s.ref(name)
            for name in ("ModbusDeviceConfig", "TicDeviceConfig", "BleDeviceConfig", "MbusDeviceConfig")
        ]
        + [s.ref(n) for n in ("Sds011DeviceConfig", "Pms5003DeviceConfig", "Mhz19DeviceConfig")]
    )
    bus = st.one_of([s.ref(n) for n in ("ModbusTcpBusConfig", "ModbusRtuBusConfig", "ModbusRtuTcpBusConfig")])
    return st.fixed_dictionaries(
        {"gateway": s.ref("GatewayConfig"), "upstream": s.ref("UpstreamConfig")},
        optional={
            "storage": s.ref("StorageConfig"),
            "local": s.ref("LocalConfig"),
            "buses": st.fixed_dictionaries({"lan": bus}),
            "devices": st.fixed_dictionaries({"d": device}),
            "commands": s.ref("CommandsConfig"),
            "remote_config": s.ref("RemoteConfigConfig"),
            "schedules": st.dictionaries(st.just("night"), s.ref("ScheduleConfig"), max_size=1),
        },
    )


def _dump(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


def _check_runnable(model: BaseModel, path: str = "") -> None:
    """What the daemon needs of every value: finite numbers, durations > 0 (or 0 where it means off),
    within the documented bounds, names that fit in topics, URLs without credentials."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        where = f"{path}{name}"
        if isinstance(value, BaseModel):
            _check_runnable(value, f"{where}.")
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    _check_runnable(item, f"{where}.{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    _check_runnable(item, f"{where}.{i}.")
        if isinstance(value, float):
            assert math.isfinite(value), where
        if _is_duration_or_size(field) and isinstance(value, float):
            assert value > 0 or name in ZERO_ALLOWED, f"{where}: {value}"
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            low = parse_duration(str(extra.get(BOUND_MIN, "0s")))
            high = parse_duration(str(extra.get(BOUND_MAX, "30d")))
            assert low <= value <= high or (value == 0 and extra.get(ZERO_OFF)), f"{where}: {value}"
        if name == "keepalive":
            assert 1 <= value <= 65535, where
        if name == "port" and isinstance(value, int):
            assert 1 <= value <= 65535, where
        if name == "topic_prefix":
            assert value and not set(value) & {"+", "#", "\0"} and "" not in value.split("/"), where
        if name == "url":
            assert "@" not in value.split("://", 1)[-1].split("/", 1)[0], where
        if name == "listen" and value:
            host, _, port = value.rpartition(":")
            assert host and port.isdigit() and int(port) <= 65535, where
        if name == "unit_id":
            assert 0 <= value <= 255, where
        if name == "address" and isinstance(value, int) and hasattr(model, "register_count"):
            assert value + model.register_count() - 1 <= 65535, where


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


@settings(
    max_examples=250,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(doc=_configs())
# The generator reaches a loadable config with a device only by luck (its run depends on the session's other
# tests): this example makes sure that side of the property is always exercised.
@example(
    doc={
        "gateway": {"id": "gw-1"},
        "upstream": {"mqtt": {"url": "mqtt://127.0.0.1:1883"}},
        "buses": {"lan": {"type": "modbus-tcp", "host": "127.0.0.1", "port": 502}},
        "devices": {"d": {"bus": "lan", "unit_id": 1, "poll": "10ms", "points": {"v": {"address": 65535}}}},
    }
)
def test_generated_configs_load_or_give_positioned_errors_and_hold_only_runnable_values(
    doc: dict[str, Any], workdir: Path
) -> None:
    path = workdir / "fieldgate.yaml"
    path.write_text(_dump(doc), encoding="utf-8")
    try:
        config = load_config(path)
    except ConfigError as exc:
        assert exc.problems
        for line in exc.problems:
            assert POSITIONED.match(line) and line.startswith(str(path)), line
        return
    ACCEPTED.append(len(config.devices))
    _check_runnable(config)
    for _, device in config.device_items():
        assert 0 < device.cycle_timeout() < math.inf


def test_generated_configs_reached_both_sides() -> None:
    """Runs after the property (file order): some generated configs loaded, with and without a device."""
    assert len(ACCEPTED) >= 10 and 0 in ACCEPTED and 1 in ACCEPTED, ACCEPTED


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(value=st.one_of(st.text(max_size=30), st.integers(), st.floats(), st.none(), st.booleans()))
def test_any_duration_value_is_a_value_or_a_value_error(value: Any) -> None:
    try:
        seconds = parse_duration(value)
    except ValueError:
        return
    assert math.isfinite(seconds) and seconds >= 0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("poll", "0s", "must be at least 10ms (got 0s)"),
        ("poll", "2d", "must be at most 1d (got 48h)"),
        ("timeout", "0s", "must be at least 10ms"),
        ("heartbeat", "500ms", "must be at least 1s or 0 (off) (got 500ms)"),
        ("poll", "9" * 400 + "s", "is not a finite duration"),
    ],
)
def test_device_duration_bounds(field: str, value: str, message: str, tmp_path: Path) -> None:
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(
        "gateway: {id: gw-1}\nupstream: {mqtt: {url: 'mqtt://127.0.0.1:1883'}}\n"
        "buses: {lan: {type: modbus-tcp, host: 127.0.0.1}}\n"
        f"devices:\n  d: {{bus: lan, {field}: '{value}', points: {{v: {{address: 0}}}}}}\n"
    )
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    assert len(err.value.problems) == 1
    assert re.match(
        rf"^{re.escape(str(cfg))}:5:\d+: devices\.d\.{field}: .*{re.escape(message)}", err.value.problems[0]
    )


def test_heartbeat_zero_still_turns_confirmations_off(tmp_path: Path) -> None:
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(
        "gateway: {id: gw-1}\nupstream: {mqtt: {url: 'mqtt://127.0.0.1:1883'}}\n"
        "buses: {lan: {type: modbus-tcp, host: 127.0.0.1}}\n"
        "devices:\n  d: {bus: lan, report: on_change, heartbeat: 0s, points: {v: {address: 0}}}\n"
    )
    assert load_config(cfg).devices["d"].heartbeat == 0


# --- the helpers ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mqtt://gw:s3cret@broker:1883", "mqtt://***@broker:1883"),
        (
            "https://a:b@orion.example.org/base?token=abc&x",
            "https://***@orion.example.org/base?token=***&***",
        ),
        (
            "https://orion.example.org/?access_token=abc#frag",
            "https://orion.example.org/?access_token=***#***",
        ),
        ("mqtts://broker.example.org:8883", "mqtts://broker.example.org:8883"),
        ("http://[::1", "http://***"),
        ("user:pw@host", "***@host"),
        ("mqtt://a@b@host/x@y", "mqtt://***@host/x@y"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cret" not in redact_url(url) and "abc" not in redact_url(url)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(
    user=st.text(st.characters(codec="ascii", exclude_characters="@/?#[]"), min_size=1, max_size=8),
    secret=st.text(st.characters(codec="ascii", exclude_characters="@/?#[]"), min_size=4, max_size=12),
    scheme=st.sampled_from(["mqtt", "mqtts", "http", "https"]),
)
def test_redact_url_never_shows_the_password(user: str, secret: str, scheme: str) -> None:
    shown = redact_url(f"{scheme}://{user}:{secret}@broker.example.org:1883/p?token={secret}")
    assert f":{secret}@" not in shown and f"={secret}" not in shown


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mqtt://user:secret@host", "use upstream.mqtt.username and password_file"),
        ("mqtt://host:0", "from 1 to 65535"),
        ("mqtt://host:65536", "from 1 to 65535"),
        ("mqtt://host:99999999999999999999", "from 1 to 65535"),
        ("mqtt://:1883", "no host"),
        ("mqtt://hôte", "printable ASCII"),
        ("mqtt://host\x00", "printable ASCII"),
        ("http://host", "scheme must be mqtt:// or mqtts://"),
    ],
)
def test_url_problem(url: str, problem: str) -> None:
    found = url_problem(url, ("mqtt", "mqtts"), "upstream.mqtt.username and password_file")
    assert found is not None and problem in found
    assert "secret" not in found


@pytest.mark.parametrize("url", ["mqtt://127.0.0.1:1883", "mqtts://broker.example.org", "mqtt://[::1]:1883/"])
def test_url_problem_accepts_plain_urls(url: str) -> None:
    assert url_problem(url, ("mqtt", "mqtts"), "") is None


@pytest.mark.parametrize(
    ("prefix", "ok"),
    [
        ("fieldgate", True),
        ("city/lyon", True),
        ("city/+", False),
        ("#", False),
        ("a\x00b", False),
        ("", False),
        ("/a", False),
        ("a/", False),
        ("a//b", False),
        ("$SYS", False),
        ("x" * 201, False),
    ],
)
def test_topic_prefix(prefix: str, ok: bool) -> None:
    assert (topic_prefix_problem(prefix) is None) == ok


@pytest.mark.parametrize(
    ("listen", "ok"),
    [
        ("", True),
        ("127.0.0.1:8470", True),
        ("[::1]:8470", True),
        ("localhost:0", True),
        ("localhost", False),
        (":8470", False),
        ("127.0.0.1:65536", False),
        ("127.0.0.1:８４７０", False),  # full-width digits pass str.isdigit()
        ("[nonsense]:80", False),
        ("bad host:80", False),
    ],
)
def test_listen(listen: str, ok: bool) -> None:
    assert (listen_problem(listen) is None) == ok


def test_format_duration_of_bounds() -> None:
    assert format_duration(0.01) == "10ms"
