"""Several brokers for one upstream: the URL list in the config, the order they are tried, the jittered backoff."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest

from agent.config import mqtt_endpoint
from agent.errors import ConfigError
from agent.loader import load_config
from agent.uplink import FAILOVER_SPREAD, RECONNECT_MAX, RECONNECT_MIN, backoff_delay, connect_order


def _load(tmp_path: Path, url: str, extra: str = "") -> object:
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text(f"gateway: {{id: gw-1}}\nupstream:\n  mqtt:\n    url: {url}\n{extra}")
    return load_config(cfg)


def test_single_url_stays_valid(tmp_path: Path) -> None:
    cfg = _load(tmp_path, '"mqtt://broker.example:1884"')
    mqtt = cfg.upstream.mqtt  # type: ignore[attr-defined]
    assert mqtt.url == "mqtt://broker.example:1884"
    assert mqtt.urls == ["mqtt://broker.example:1884"]
    assert (mqtt.host, mqtt.port, mqtt.use_tls) == ("broker.example", 1884, False)
    assert mqtt.failback == 300.0


def test_url_list_in_order_of_preference(tmp_path: Path) -> None:
    cfg = _load(
        tmp_path,
        "[mqtts://a.example, 'mqtts://b.example:8884', mqtts://c.example/]",
        "    failback: 5m\n",
    )
    mqtt = cfg.upstream.mqtt  # type: ignore[attr-defined]
    assert mqtt.urls == ["mqtts://a.example", "mqtts://b.example:8884", "mqtts://c.example/"]
    assert [mqtt_endpoint(u) for u in mqtt.urls] == [
        ("a.example", 8883),
        ("b.example", 8884),
        ("c.example", 8883),
    ]
    assert (mqtt.host, mqtt.port, mqtt.use_tls) == ("a.example", 8883, True)
    assert mqtt.failback == 300.0


def test_extra_upstream_takes_a_list_too(tmp_path: Path) -> None:
    cfg = _load(
        tmp_path,
        "mqtt://a:1883",
        "  extra:\n    backup:\n      mqtt: {url: [mqtt://b:1883, mqtt://c:1883], failback: 0s}\n",
    )
    extra = cfg.upstream.extra["backup"].mqtt  # type: ignore[attr-defined]
    assert extra.urls == ["mqtt://b:1883", "mqtt://c:1883"] and extra.failback == 0


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("[]", "give at least one broker URL"),
        (
            "[mqtt://a:1883, 'http://b:80']",
            "http://b:80: the scheme must be mqtt:// or mqtts://",
        ),
        ("[mqtt://a:1883, mqtts://b:8883]", "all mqtt:// or all mqtts://"),
        ("[mqtt://a:1883, mqtt://a:1883]", "a broker is listed twice"),
        ('"mqtt://a:1883/path"', "expected mqtt://HOST[:PORT]"),
    ],
)
def test_bad_url_lists_name_the_key(tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, url)
    problems = "\n".join(err.value.problems)
    assert "fieldgate.yaml:4:" in problems and "upstream.mqtt.url" in problems, problems
    assert message in problems, problems


def test_connect_order_puts_the_lost_broker_last() -> None:
    assert connect_order(1, None) == [0]
    assert connect_order(1, 0) == [0]  # a single broker is retried
    assert connect_order(3, None) == [0, 1, 2]
    assert connect_order(3, 0) == [1, 2, 0]
    assert connect_order(3, 1) == [0, 2, 1]


def test_backoff_is_full_jitter_within_the_cap() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        cap = min(RECONNECT_MAX, RECONNECT_MIN * 2**attempt)
        samples = [backoff_delay(attempt, rng) for _ in range(4000)]
        assert min(samples) >= 0.0 and max(samples) <= cap
        # Full jitter: spread over the whole [0, cap], not clustered around it (the old ±20 %).
        assert min(samples) < 0.05 * cap and max(samples) > 0.95 * cap, (attempt, min(samples), max(samples))
        assert abs(statistics.mean(samples) - cap / 2) < 0.05 * cap
        deciles = statistics.quantiles(samples, n=10)
        for i, q in enumerate(deciles, start=1):
            assert abs(q - cap * i / 10) < 0.05 * cap, (attempt, i, q)
    # "Data flows again within 2 s of the broker coming back" (docs/RELIABILITY.md): no wait exceeds the cap.
    assert backoff_delay(10_000, rng) <= RECONNECT_MAX < 2.0
    assert FAILOVER_SPREAD < 2.0
