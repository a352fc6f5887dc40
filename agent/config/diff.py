"""What a new config changes, in words a technician reads: devices, points, buses, upstream, the rest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from agent.config.models import FieldgateConfig

Tree = dict[str, Any]


def _show(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values (they are compared whole)."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(_flatten(value, path))
        else:
            out[path] = value
    return out


def _field_changes(old: Any, new: Any) -> list[str]:
    """'poll 10s -> 5s' for every leaf that differs (added or removed leaves read '(none)')."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in [*a, *(k for k in b if k not in a)]:
        if a.get(key) != b.get(key):
            lines.append(f"{key} {_show(a.get(key))} -> {_show(b.get(key))}")
    return lines


def _device_summary(dev: Tree) -> str:
    """'modbus on bus rs485-1, unit 7, 6 points'."""
    parts = [str(dev.get("driver", "?"))]
    if dev.get("bus"):
        parts[0] += f" on bus {dev['bus']}"
    for key, word in (("unit_id", "unit"), ("address", "address"), ("port", "port")):
        if dev.get(key) is not None:
            parts.append(f"{word} {_show(dev[key])}")
    points = dev.get("points")
    if isinstance(points, dict):
        parts.append(f"{len(points)} point{'s' if len(points) != 1 else ''}")
    if dev.get("enabled") is False:
        parts.append("disabled")
    return ", ".join(parts)


def _named_section(kind: str, old: Tree, new: Tree, summary: Any) -> list[str]:
    lines = []
    for name in new:
        if name not in old:
            lines.append(f"{kind} {name} added ({summary(new[name])})")
    for name in old:
        if name not in new:
            lines.append(f"{kind} {name} removed")
    for name in old:
        if name in new and old[name] != new[name]:
            lines.extend(_changed_entry(kind, name, old[name], new[name]))
    return lines


def _changed_entry(kind: str, name: str, old: Tree, new: Tree) -> list[str]:
    if kind != "device":
        return [f"{kind} {name}: {line}" for line in _field_changes(old, new)]
    lines = []
    if old.get("enabled", True) != new.get("enabled", True):
        lines.append(f"device {name} {'enabled' if new.get('enabled', True) else 'disabled'}")
    rest_old = {k: v for k, v in old.items() if k not in ("points", "enabled")}
    rest_new = {k: v for k, v in new.items() if k not in ("points", "enabled")}
    lines.extend(f"device {name}: {line}" for line in _field_changes(rest_old, rest_new))
    p_old, p_new = old.get("points"), new.get("points")
    if isinstance(p_old, dict) and isinstance(p_new, dict):
        for point in p_new:
            if point not in p_old:
                lines.append(f"device {name}: point {point} added")
        for point in p_old:
            if point not in p_new:
                lines.append(f"device {name}: point {point} removed")
        for point in p_old:
            if point in p_new and p_old[point] != p_new[point]:
                lines.extend(
                    f"device {name}: point {point}: {line}"
                    for line in _field_changes(p_old[point], p_new[point])
                )
    elif p_old != p_new:
        lines.append(f"device {name}: points {_show(p_old)} -> {_show(p_new)}")
    return lines


def _bus_summary(bus: Tree) -> str:
    where = bus.get("port") if bus.get("type") != "modbus-tcp" else f"{bus.get('host')}:{bus.get('port')}"
    return f"{bus.get('type', '?')}{' on ' + str(where) if where else ''}"


def describe(old: FieldgateConfig, new: FieldgateConfig) -> list[str]:
    """Every change from `old` to `new`, one line each; [] when they mean the same."""
    a: Tree = old.model_dump(mode="json")
    b: Tree = new.model_dump(mode="json")
    lines: list[str] = []
    if a.get("version") != b.get("version"):
        lines.append(f"config format version {a.get('version')} -> {b.get('version')}")
    lines.extend(f"gateway: {line}" for line in _field_changes(a["gateway"], b["gateway"]))
    lines.extend(f"upstream: {line}" for line in _field_changes(a["upstream"]["mqtt"], b["upstream"]["mqtt"]))
    lines.extend(_named_section("bus", a.get("buses", {}), b.get("buses", {}), _bus_summary))
    lines.extend(_named_section("device", a.get("devices", {}), b.get("devices", {}), _device_summary))
    lines.extend(
        _named_section(
            "schedule", a.get("schedules", {}), b.get("schedules", {}), lambda s: f"{len(s)} settings"
        )
    )
    for section in ("storage", "local", "commands", "remote_config"):
        lines.extend(f"{section}: {line}" for line in _field_changes(a.get(section), b.get(section)))
    return lines


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a validated new config changes in the running daemon: what `Runtime.apply` stops and starts."""

    config: FieldgateConfig  # what runs next (its storage is the old one's: storage changes at a restart)
    storage_changed: bool
    changed_buses: frozenset[str]
    restart: frozenset[str]  # devices stopped: changed, removed, or on a changed bus (started again if kept)
    added: tuple[str, ...]
    upstream_changed: bool  # the uplinks are replaced (reconnect)
    local_changed: bool
    schedules_changed: bool

    def changes(self) -> list[str]:
        """In words, for the log and `fieldgate reload`."""
        out = ["storage (at next restart)"] if self.storage_changed else []
        out += [f"device {name} added" for name in self.added]
        devices = dict(self.config.device_items())
        out += [f"device {n} {'changed' if n in devices else 'removed'}" for n in sorted(self.restart)]
        out += ["upstream reconnected"] if self.upstream_changed else []
        out += ["local API restarted"] if self.local_changed else []
        out += ["schedules restarted"] if self.schedules_changed else []
        return out


def plan(old: FieldgateConfig, new: FieldgateConfig, secrets_changed: bool = False) -> ReloadPlan:
    """What applying `new` over the running `old` restarts; `secrets_changed`: the upstream's secret files'
    contents changed (a rotated certificate reconnects even when the text is the same)."""
    upstream_changed = (
        new.upstream != old.upstream
        or new.gateway.id != old.gateway.id
        or new.remote_config != old.remote_config  # the config/set subscription is the uplink's
        or secrets_changed
    )
    storage_changed = new.storage != old.storage
    if storage_changed:
        new = new.model_copy(update={"storage": old.storage})
    changed_buses = frozenset(
        n for n in set(old.buses) | set(new.buses) if old.buses.get(n) != new.buses.get(n)
    )
    old_devices = dict(old.device_items())
    new_devices = dict(new.device_items())
    restart = frozenset(
        name
        for name, cfg in old_devices.items()
        if name not in new_devices or new_devices[name] != cfg or getattr(cfg, "bus", None) in changed_buses
    )
    return ReloadPlan(
        config=new,
        storage_changed=storage_changed,
        changed_buses=changed_buses,
        restart=restart,
        added=tuple(sorted(set(new_devices) - set(old_devices))),
        upstream_changed=upstream_changed,
        local_changed=new.local != old.local,
        schedules_changed=(
            new.schedules != old.schedules or new.commands != old.commands or new.gateway != old.gateway
        ),
    )
