"""`fieldgate run` pauses the cyclic garbage collector while it imports its modules (agent/verbs/run.py): it must be
on again before the runtime starts, whatever the validation's outcome."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.verbs import run


@pytest.fixture(autouse=True)
def _collector_on_afterwards() -> object:
    yield
    gc.enable()


def test_the_collector_is_on_again_once_the_modules_are_imported(tmp_path: Path) -> None:
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text("gateway: {id: gw1}\n")  # no upstream: refused, after the imports
    run.pause_gc_for_start_up()
    assert not gc.isenabled()
    with pytest.raises(ConfigError):
        asyncio.run(run.serve(str(cfg)))
    assert gc.isenabled()


def test_resume_gc_leaves_a_running_collector_alone() -> None:
    run.resume_gc()
    assert gc.isenabled()
