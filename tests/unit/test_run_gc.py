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
    gc.unfreeze()


def test_the_collector_is_on_again_once_the_modules_are_imported(tmp_path: Path) -> None:
    cfg = tmp_path / "fieldgate.yaml"
    cfg.write_text("gateway: {id: gw1}\n")  # no upstream: refused, after the imports
    run.pause_gc_for_start_up()
    assert not gc.isenabled()
    with pytest.raises(ConfigError):
        asyncio.run(run.serve(str(cfg)))
    assert gc.isenabled()


def test_the_start_ups_objects_are_frozen_not_collected() -> None:
    """What the imports built lives as long as the daemon: moved out of the collector's reach, so that neither
    the start nor any later full collection scans it."""
    gc.unfreeze()
    run.pause_gc_for_start_up()
    kept = [[i] for i in range(1000)]  # container objects allocated while paused, as the imports' are
    run.resume_gc()
    assert gc.isenabled()
    assert gc.get_freeze_count() >= len(kept)
    collected = {id(o) for o in gc.get_objects()}  # the generations the collector scans
    assert not any(id(k) in collected for k in kept)


def test_resume_gc_leaves_a_running_collector_alone() -> None:
    gc.unfreeze()
    run.resume_gc()
    assert gc.isenabled()
    assert gc.get_freeze_count() == 0
