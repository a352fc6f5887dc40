"""Drivers describe themselves: each registered driver ships drivers/<protocol>/sample.yaml (package data),
a minimal configuration of one device of that driver, which `fieldgate check` accepts once wrapped in a
minimal gateway config (docs/ARCHITECTURE.md, Registry)."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest
import yaml

from agent import registry
from tests.daemon import REPO, fieldgate_cli

GATEWAY = """\
version: 1
gateway:
  id: gw-sample
storage:
  path: {db}
upstream:
  mqtt:
    url: mqtt://127.0.0.1:1
"""


def driver_package(name: str) -> str:
    """`drivers.tic` for linky-tic: the package of the driver's config model."""
    module = registry.DRIVERS[name].config.partition(":")[0]
    return module.rsplit(".", 1)[0]


def sample_text(name: str) -> str:
    return importlib.resources.files(driver_package(name)).joinpath("sample.yaml").read_text("utf-8")


def test_every_driver_package_is_a_registered_driver() -> None:
    """drivers/<x>/ is a driver (in the registry, with a sample); shared helpers live in drivers/_<x>/."""
    packages = {driver_package(n).split(".")[1] for n in registry.DRIVERS}
    on_disk = {
        p.name
        for p in (REPO / "drivers").iterdir()
        if p.is_dir() and (p / "__init__.py").exists() and not p.name.startswith("_")
    }
    assert on_disk == packages
    for package in packages:
        assert (REPO / "drivers" / package / "sample.yaml").is_file(), package


@pytest.mark.parametrize("name", sorted(registry.DRIVERS))
def test_the_sample_is_a_device_block_of_its_driver(name: str) -> None:
    data = yaml.safe_load(sample_text(name))
    assert set(data) <= {"buses", "devices"}, sorted(data)
    devices = data["devices"]
    assert len(devices) >= 1
    for device in devices.values():
        assert device["driver"] == name


@pytest.mark.parametrize("name", sorted(registry.DRIVERS))
async def test_the_sample_passes_fieldgate_check(name: str, tmp_path: Path) -> None:
    config = tmp_path / "fieldgate.yaml"
    config.write_text(GATEWAY.format(db=tmp_path / "buffer.db") + sample_text(name))
    res = await fieldgate_cli("check", "-c", str(config))
    assert res.code == 0, res.out + res.err


async def test_a_broken_sample_fails_fieldgate_check(tmp_path: Path) -> None:
    """The check above can fail: a sample with an unknown key is refused, with its line."""
    config = tmp_path / "fieldgate.yaml"
    text = GATEWAY.format(db=tmp_path / "buffer.db") + sample_text("sds011") + "    colour: blue\n"
    config.write_text(text)
    res = await fieldgate_cli("check", "-c", str(config))
    assert res.code != 0
    assert "colour" in res.out + res.err
