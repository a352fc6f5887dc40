"""Platform side: roll a configuration out to a fleet of gateways in stages, and show the fleet's state.

`fieldgate fleet push` signs each gateway's new config (Ed25519, the remote-config signature of
agent/control/remoteconfig.py), publishes it on `{prefix}/{gateway}/config/set` stage by stage (`1,10%,100%`: one
canary, then up to 10 % of the gateways, then all), and waits for each gateway's retained `config/state` to
confirm it (same request id, `ok: true`: the gateway reached its upstream with it) before the next stage. A
gateway that refuses the config, rolls it back, or says nothing within the timeout halts the rollout: every
gateway already changed gets its previous config back (pushed and confirmed the same way).

`fieldgate fleet status` reads what the gateways left on the broker: the retained `status` and `config/state`,
and the `health` messages that arrive while it listens (buffer pending).

The message sent to one gateway is built by `envelope()` alone: bound to the gateway and to a rising serial,
signed as the gateway checks it (agent/control/remoteconfig.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from agent.config.models import mqtt_endpoint
from agent.control.remoteconfig import signed_message
from agent.errors import FieldgateError

DEFAULT_PREFIX = "fieldgate"
SUBSCRIBE_ATTEMPTS = 5  # a subscription the broker refuses is asked again after 1, 2, 4 and 8 s


class FleetSetupError(FieldgateError):
    """A usage or setup problem (bad stages, missing files, unreadable key); nothing was pushed."""


# -- what is sent ---------------------------------------------------------------------------------------


def load_signing_key(path: Path) -> Any:
    """The Ed25519 private key (PEM, unencrypted) that signs pushed configs."""
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
    except ImportError:
        raise FleetSetupError("signing needs the cryptography package: install fieldgate[remote]") from None
    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise FleetSetupError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, TypeError) as exc:
        raise FleetSetupError(f"{path}: not an unencrypted PEM private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise FleetSetupError(f"{path}: not an Ed25519 key")
    return key


def envelope(
    gateway: str, config: bytes, request_id: str, key: Any | None, serial: int | None = None
) -> dict[str, Any]:
    """The `{prefix}/{gateway}/config/set` message for one gateway (docs/CONFIG_LIFECYCLE.md): bound to that
    gateway and to a serial higher than any earlier push (default: now in milliseconds, so a rollback pushed
    after a rollout is newer than it); the signature covers the config's digest, the gateway and the serial
    (`agent.control.remoteconfig.signed_message`, the gateway's own check)."""
    if serial is None:
        serial = time.time_ns() // 1_000_000
    doc: dict[str, Any] = {"id": request_id, "config": config.decode(), "gateway": gateway, "serial": serial}
    if key is not None:
        doc["signature"] = base64.b64encode(key.sign(signed_message(config, gateway, serial))).decode()
    return doc


# -- stages ---------------------------------------------------------------------------------------------


def parse_stages(spec: str, total: int) -> list[int]:
    """`1,10%,100%` -> cumulative gateway counts per stage, e.g. [1, 3, 25] for 25 gateways.

    A count is an integer or a percentage of the fleet (rounded up, at least 1); counts above the fleet are
    capped; a stage that adds nobody is dropped. The last stage may stop short of the whole fleet.
    """
    if total < 1:
        raise FleetSetupError("no gateway to push to")
    counts: list[int] = []
    for token in (t.strip() for t in spec.split(",")):
        try:
            if token.endswith("%"):
                pct = float(token[:-1])
                if not 0 < pct <= 100:
                    raise ValueError
                n = max(1, math.ceil(total * pct / 100 - 1e-9))
            else:
                n = int(token)
                if n < 1:
                    raise ValueError
        except ValueError:
            raise FleetSetupError(
                f"--stages {spec!r}: {token!r} is not a count (>= 1) or a percentage (0-100%]"
            ) from None
        n = min(n, total)
        if counts and n < counts[-1]:
            raise FleetSetupError(
                f"--stages {spec!r}: stages must grow ({token} after {counts[-1]} gateways)"
            )
        if not counts or n > counts[-1]:
            counts.append(n)
    if not counts:
        raise FleetSetupError(f"--stages {spec!r}: no stage")
    return counts


# -- the broker side ------------------------------------------------------------------------------------


@dataclass
class GatewayView:
    """What the broker tells about one gateway."""

    status: dict[str, Any] | None = None
    state: dict[str, Any] | None = None
    health: dict[str, Any] | None = None
    last_seen_ms: int | None = None


@dataclass
class Outcome:
    gateway: str
    result: str  # confirmed | refused | rolled back | silent | not pushed
    detail: str = ""
    seconds: float = 0.0


class FleetLink:
    """One platform connection: publishes pushes, keeps the latest state of every gateway it hears."""

    def __init__(self, client: aiomqtt.Client, prefix: str = DEFAULT_PREFIX) -> None:
        self.client = client
        self.prefix = prefix
        self.views: dict[str, GatewayView] = {}
        self.pushed: set[str] = (
            set()
        )  # gateways sent a config (it may have arrived even if the publish failed)
        self._changed = asyncio.Event()

    async def subscribe(self) -> None:
        """Subscribe to what the gateways leave on the broker. A broker may refuse a subscription in its SUBACK
        (a NATS node that cannot create the JetStream consumer in time, as at N = 200 in bench_fleet): it is
        asked again, waits doubling from 1 s; still refused after SUBSCRIBE_ATTEMPTS, aiomqtt.MqttError
        (the verbs report the broker and exit 1; nothing was pushed yet)."""
        from agent.upstream.mqtt import suback_refusals

        for leaf in ("status", "config/state", "health"):
            topic = f"{self.prefix}/+/{leaf}"
            wait = 1.0
            for attempt in range(1, SUBSCRIBE_ATTEMPTS + 1):
                refused = suback_refusals(await self.client.subscribe(topic, qos=1))
                if not refused:
                    break
                if attempt == SUBSCRIBE_ATTEMPTS:
                    raise aiomqtt.MqttError(
                        f"the broker refused the subscription to {topic} {attempt} times ({refused[0]})"
                    )
                await asyncio.sleep(wait)
                wait *= 2

    async def listen(self) -> None:
        async for msg in self.client.messages:
            topic = str(msg.topic)
            if not topic.startswith(self.prefix + "/"):
                continue
            gateway, _, leaf = topic[len(self.prefix) + 1 :].partition("/")
            try:
                doc = json.loads(msg.payload if isinstance(msg.payload, bytes | str) else b"")
            except ValueError:
                continue
            if not isinstance(doc, dict):
                continue
            view = self.views.setdefault(gateway, GatewayView())
            if leaf == "status":
                view.status = doc
            elif leaf == "config/state":
                view.state = doc
            elif leaf == "health":
                view.health = doc
            else:
                continue
            ts = doc.get("ts") or doc.get("applied_ts")
            if isinstance(ts, int) and (view.last_seen_ms is None or ts > view.last_seen_ms):
                view.last_seen_ms = ts
            self._changed.set()

    async def push(self, gateway: str, doc: dict[str, Any]) -> None:
        self.pushed.add(gateway)
        await self.client.publish(f"{self.prefix}/{gateway}/config/set", json.dumps(doc).encode(), qos=1)

    async def outcome(self, gateway: str, request_id: str, wait: float) -> Outcome:
        """Wait for the gateway's config/state about `request_id`: confirmed, refused, rolled back; or silent."""
        started = time.monotonic()
        deadline = started + wait
        while True:
            state = self.views.get(gateway, GatewayView()).state
            if state is not None and state.get("id") == request_id:
                took = time.monotonic() - started
                if state.get("ok") is True:
                    return Outcome(gateway, "confirmed", f"version {state.get('version')}", took)
                error = str(state.get("error", ""))
                problems = state.get("problems") or []
                if problems:
                    error += ": " + "; ".join(str(p) for p in problems[:3])
                result = "rolled back" if state.get("rolled_back") else "refused"
                return Outcome(gateway, result, error, took)
            left = deadline - time.monotonic()
            if left <= 0:
                return Outcome(gateway, "silent", f"no config/state within {wait:g} s", wait)
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, 1.0)):
                    await self._changed.wait()


@dataclass
class Target:
    gateway: str
    new: bytes
    previous: bytes


@dataclass
class Rollout:
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    rollbacks: dict[str, Outcome] = field(default_factory=dict)
    halted_at: int | None = None  # stage number (1-based) that failed

    @property
    def ok(self) -> bool:
        return self.halted_at is None


async def rollout(
    link: FleetLink,
    targets: list[Target],
    stages: list[int],
    request_id: str,
    key: Any | None,
    wait: float,
    say: Callable[[str], None] = print,
) -> Rollout:
    """Push stage by stage; on the first failure, halt and give every changed gateway its previous config."""
    result = Rollout()
    done = 0
    for number, upto in enumerate(stages, start=1):
        batch = targets[done:upto]
        started = time.monotonic()
        for t in batch:
            await link.push(t.gateway, envelope(t.gateway, t.new, request_id, key))
        outcomes = await asyncio.gather(*(link.outcome(t.gateway, request_id, wait) for t in batch))
        for o in outcomes:
            result.outcomes[o.gateway] = o
        failed = [o for o in outcomes if o.result != "confirmed"]
        took = time.monotonic() - started
        say(
            f"stage {number}/{len(stages)}: {len(batch)} gateways ({upto} of {len(targets)}): "
            f"{len(batch) - len(failed)} confirmed, {len(failed)} failed, {took:.1f} s"
        )
        if failed:
            for o in failed:
                say(f"  {o.gateway}: {o.result}: {o.detail}")
            result.halted_at = number
            changed = [
                t
                for t in targets[:upto]
                if result.outcomes.get(t.gateway, Outcome(t.gateway, "")).result == "confirmed"
            ]
            # A silent gateway may yet apply the config: it gets the previous one back too.
            changed += [t for t in batch if result.outcomes[t.gateway].result == "silent"]
            say(f"halted at stage {number}: rolling back {len(changed)} gateways")
            for o in await roll_back(link, changed, request_id, key, wait):
                result.rollbacks[o.gateway] = o
            for t in targets[upto:]:
                result.outcomes[t.gateway] = Outcome(t.gateway, "not pushed")
            return result
        done = upto
    for t in targets[done:]:
        result.outcomes[t.gateway] = Outcome(t.gateway, "not pushed", "beyond the last stage")
    return result


async def roll_back(
    link: FleetLink, targets: list[Target], request_id: str, key: Any | None, wait: float
) -> list[Outcome]:
    """Give each target its previous config (request `<id>-rollback`) and wait for each one's outcome."""
    back_id = f"{request_id}-rollback"
    for t in targets:
        await link.push(t.gateway, envelope(t.gateway, t.previous, back_id, key))
    return list(await asyncio.gather(*(link.outcome(t.gateway, back_id, wait) for t in targets)))


def rollout_table(targets: list[Target], result: Rollout) -> str:
    rows: list[tuple[str, ...]] = [("GATEWAY", "OUTCOME", "ROLLBACK", "DETAIL")]
    for t in targets:
        o = result.outcomes.get(t.gateway, Outcome(t.gateway, "not pushed"))
        back = result.rollbacks.get(t.gateway)
        rows.append((t.gateway, o.result, back.result if back else "-", back.detail if back else o.detail))
    return table(rows)


def status_table(views: dict[str, GatewayView], now_ms: int, gateways: list[str] | None = None) -> str:
    """Per gateway: online/offline, the running config (version, hash), whether it is confirmed, the last
    push's outcome, when it was last heard of, and its buffer's pending readings (from `health`)."""
    rows: list[tuple[str, ...]] = [
        ("GATEWAY", "STATUS", "CONFIG", "CONFIRMED", "LAST PUSH", "LAST SEEN", "PENDING")
    ]
    for gw in gateways or sorted(views):
        v = views.get(gw, GatewayView())
        status = str(v.status.get("state", "?")) if v.status else "?"
        config, confirmed, last = "?", "?", "-"
        if v.state:
            config = f"v{v.state.get('version', '?')} {str(v.state.get('hash', ''))[:12]}"
            error = str(v.state.get("error", ""))
            # A refused or rolled-back push leaves the gateway on its previous, confirmed config; only a
            # failed rollback leaves it on one that never reached its upstream.
            confirmed = "no" if "rollback failed" in error else "yes"
            if v.state.get("id") is not None:
                outcome = (
                    "confirmed"
                    if v.state.get("ok")
                    else "rolled back"
                    if v.state.get("rolled_back")
                    else "refused"
                )
                last = f"{v.state['id']} {outcome}"
        seen = f"{max(0, now_ms - v.last_seen_ms) / 1000:.0f} s ago" if v.last_seen_ms else "never"
        pending = "?"
        if v.health and isinstance(v.health.get("buffer"), dict):
            pending = str(v.health["buffer"].get("pending", "?"))
        rows.append((gw, status, config, confirmed, last, seen, pending))
    return table(rows)


def table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def client_for(url: str, username: str | None, password: str | None, client_id: str) -> aiomqtt.Client:
    """The platform's MQTT client (mqtt:// or mqtts:// with the system's CA store)."""
    import ssl

    host, port = mqtt_endpoint(url)
    tls = ssl.create_default_context() if url.startswith("mqtts://") else None
    return aiomqtt.Client(
        host,
        port,
        identifier=client_id,
        username=username,
        password=password,
        tls_context=tls,
        clean_session=True,
    )
