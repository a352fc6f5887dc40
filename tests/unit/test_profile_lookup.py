"""The lookup order of `profile: NAME` that docs/PROFILES.md documents, and where the bundled profiles are:
package data of drivers.modbus, found with importlib.resources (not a path relative to a checkout)."""

from __future__ import annotations

import importlib.resources
import re
from pathlib import Path

import pytest

from agent.config import loader
from tests.daemon import REPO


def test_the_bundled_profiles_are_package_data_of_the_modbus_driver() -> None:
    bundled = loader.bundled_profiles()
    assert bundled == Path(str(importlib.resources.files("drivers.modbus"))) / "profiles"
    names = sorted(p.stem for p in bundled.glob("*.yaml"))
    documented = re.findall(r"^\| `([a-z0-9-]+)` \|", (REPO / "docs" / "PROFILES.md").read_text(), re.M)
    assert names and names == sorted(documented)
    assert not (REPO / "config" / "profiles").exists()  # one copy only


def test_lookup_order_first_match_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "site" / "fieldgate.yaml"
    beside, extra = config.parent / "profiles", tmp_path / "extra"
    beside.mkdir(parents=True)
    extra.mkdir()
    name = "eastron-sdm120"
    bundled = loader.bundled_profiles() / f"{name}.yaml"
    monkeypatch.delenv("FIELDGATE_PROFILES", raising=False)
    assert loader.profile_dirs(config) == [beside, Path("/etc/fieldgate/profiles"), loader.bundled_profiles()]
    assert loader.find_profile(name, config) == bundled
    (beside / f"{name}.yaml").write_text("points: {}\n")
    assert loader.find_profile(name, config) == beside / f"{name}.yaml"
    (extra / f"{name}.yaml").write_text("points: {}\n")
    monkeypatch.setenv("FIELDGATE_PROFILES", str(extra))
    assert loader.profile_dirs(config)[0] == extra
    assert loader.find_profile(name, config) == extra / f"{name}.yaml"
    assert loader.find_profile("no-such-profile", config) is None
