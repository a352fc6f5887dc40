"""The explicit driver registry: every line imports, its config's tag matches, and drivers load lazily."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest

from agent import registry
from agent.driver import Driver

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(registry.DRIVERS))
def test_every_registry_line_imports_and_its_tag_matches(name: str) -> None:
    config = registry.config_class(name)
    tag = config.model_fields["driver"].annotation
    assert typing.get_args(tag) == (name,), f"{config.__name__}.driver must be Literal['{name}']"
    driver = registry.driver_class(name)
    assert issubclass(driver, Driver)
    assert driver.name == name


@pytest.mark.parametrize("bus_type", sorted(registry.BUSES))
def test_every_bus_type_is_tagged_with_its_name(bus_type: str) -> None:
    model = registry.load(registry.BUSES[bus_type])
    assert typing.get_args(model.model_fields["type"].annotation) == (bus_type,)


def test_a_modbus_only_gateway_never_imports_bleak_or_other_drivers() -> None:
    """Loading a Modbus-only config and building its drivers must not import bleak or other drivers' I/O."""
    code = f"""
import sys
from pathlib import Path
from agent.config.loader import load_config
from agent.pipeline.devices import make_context, make_driver
path = Path({str(REPO / "config" / "fieldgate.example.yaml")!r})
config = load_config(path)
context = make_context(config, path)
for name, cfg in config.device_items():
    make_driver(name, cfg, context)
# Config models of every driver are loaded (they are pure pydantic); no other driver's I/O module is.
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("bleak", "bumble", "dbus_fast")
               or (m.startswith("drivers.") and not m.startswith("drivers.modbus")
                   and not m.endswith((".config", "__init__")) and m.count(".") > 1))
print(",".join(heavy))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "", f"imported needlessly: {out.stdout.strip()}"
