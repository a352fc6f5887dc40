"""The config model kit is chosen once, at the process's entry (agent/config/modelkit.py), and the daemon's
code uses nothing of pydantic that the plain kit lacks.

The comparison of both kits over every example config is tests/unit/test_plainmodel.py; here: the choice
itself, and a static check of every module the daemon imports against pydantic's own API.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pydantic
import pytest

from agent import registry
from agent.config import plainmodel

REPO = Path(__file__).resolve().parents[2]


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )


# What the daemon imports: `fieldgate run`'s modules, the runtime and what it starts lazily (the uplinks,
# the local API, the lamp schedules, the config diff), and every driver of the registry with its config.
DAEMON_PATH = """
import importlib, json, sys
from agent.config import modelkit
modelkit.select("plain")
from agent import registry
for name in ["agent.verbs.run", "agent.runtime", "agent.upstream.mqtt", "agent.upstream.formats.ngsild", "agent.upstream.ngsild_http",
             "agent.upstream.formats.sparkplug", "agent.upstream.formats.thingsboard",
             "agent.control.localapi", "agent.config.diff"]:
    importlib.import_module(name)
for entry in registry.DRIVERS.values():
    for path in (entry.config, entry.driver):
        importlib.import_module(path.partition(":")[0])
for path in registry.BUSES.values():
    importlib.import_module(path.partition(":")[0])
mods = {m: getattr(sys.modules[m], "__file__", None) for m in sys.modules if m.split(".")[0] in ("agent", "drivers")}
print(json.dumps({"modules": mods, "pydantic": sorted(m for m in sys.modules if m.startswith("pydantic"))}))
"""


@pytest.fixture(scope="module")
def daemon_modules() -> dict[str, str]:
    proc = _run(DAEMON_PATH)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["pydantic"] == [], "the daemon's modules imported pydantic"
    modules: dict[str, str] = {m: f for m, f in out["modules"].items() if f}
    return modules


# pydantic's model API that the plain kit does not have: a daemon calling it fails only in production.
PYDANTIC_ONLY = sorted(
    name
    for name in dir(pydantic.BaseModel)
    if name.startswith("model_") and not hasattr(plainmodel.BaseModel, name) and name != "model_config"
)
# Code that runs only under pydantic although the daemon imports its module: validators (the plain kit
# never validates) and the child's snapshot (it reads `model_fields` by name, not as an attribute).
VALIDATOR = re.compile(r"@(field_validator|model_validator)\b")


def _uses(source: str) -> list[tuple[int, str]]:
    """(line, name) of each pydantic-only attribute used outside a validator's body."""
    found = []
    decorated = False  # a validator's decorator was seen, its def not yet
    body: int | None = None  # the indent of the validator's def while inside its body
    for number, line in enumerate(source.splitlines(), 1):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if body is not None and stripped and indent <= body:
            body = None
        if VALIDATOR.match(stripped):
            decorated = True
            continue
        if decorated and stripped.startswith("def "):
            decorated, body = False, indent
            continue
        if body is not None:
            continue
        for name in PYDANTIC_ONLY:
            if re.search(rf"\.{name}\b", line):
                found.append((number, name))
    return found


def test_the_list_of_pydantic_only_names_is_meaningful() -> None:
    assert {"model_validate", "model_fields", "model_fields_set", "model_json_schema"} <= set(PYDANTIC_ONLY)
    assert "model_dump" not in PYDANTIC_ONLY and "model_copy" not in PYDANTIC_ONLY


def test_the_daemon_path_is_the_whole_daemon(daemon_modules: dict[str, str]) -> None:
    assert {"agent.runtime", "agent.upstream.mqtt", "agent.pipeline.store", "agent.config.models"} <= set(
        daemon_modules
    )
    assert {registry.DRIVERS["modbus"].driver.partition(":")[0], "drivers.ble.driver"} <= set(daemon_modules)


def test_the_daemon_calls_no_pydantic_only_api(daemon_modules: dict[str, str]) -> None:
    bad = []
    for module, file in sorted(daemon_modules.items()):
        for number, name in _uses(Path(file).read_text(encoding="utf-8")):
            bad.append(f"{Path(file).relative_to(REPO)}:{number}: .{name} (pydantic only; {module})")
    assert bad == [], "\n".join(bad)


def test_the_static_check_sees_a_call_outside_validators() -> None:
    source = textwrap.dedent(
        """
        class A(Model):
            @model_validator(mode="after")
            def _check(self):
                return self.model_fields_set

            def used(self):
                return type(self).model_validate({})
        """
    )
    assert _uses(source) == [(8, "model_validate")]


def test_the_kit_is_chosen_at_entry_and_a_late_choice_raises() -> None:
    proc = _run(
        """
        from agent.config import modelkit
        modelkit.select("plain")
        from agent.config.models import FieldgateConfig
        from agent.config import plainmodel
        assert issubclass(FieldgateConfig, plainmodel.BaseModel), FieldgateConfig.__mro__
        assert modelkit.selected() == "plain"
        try:
            modelkit.select("pydantic")
        except modelkit.ModelKitChosenLate as exc:
            print("refused:", exc)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert "refused: model kit 'pydantic' selected after config models were built on 'plain'" in proc.stdout


def test_the_cli_selects_pydantic_for_verbs_and_plain_for_run() -> None:
    source = (REPO / "agent" / "cli.py").read_text()
    assert 'modelkit.select("plain" if first == "run" else "pydantic")' in source
    proc = _run(
        """
        import sys
        from agent.cli import main
        main(["check", "-c", "config/fieldgate.example.yaml"])
        from agent.config import modelkit
        print(modelkit.selected())
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "pydantic"
