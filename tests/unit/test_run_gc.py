"""`fieldgate run` pauses the cyclic garbage collector during its start-up (agent/verbs/run.py): it must always be
on again, once the runtime is up or, if it never gets up, after GC_PAUSE_MAX_S."""

from __future__ import annotations

import asyncio
import gc

import pytest

from agent.verbs import run


@pytest.fixture(autouse=True)
def _collector_on_afterwards() -> object:
    yield
    gc.enable()


def test_the_collector_resumes_once_the_runtime_is_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "GC_AFTER_READY_S", 0.0)

    async def main() -> None:
        ready = asyncio.Event()
        run.pause_gc_for_start_up()
        resumer = asyncio.create_task(run.resume_gc(ready))
        await asyncio.sleep(0.05)
        assert not gc.isenabled()  # still starting
        ready.set()
        await asyncio.wait_for(resumer, 10)
        assert gc.isenabled()

    asyncio.run(main())


def test_the_collector_resumes_even_if_the_runtime_never_gets_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "GC_PAUSE_MAX_S", 0.05)

    async def main() -> None:
        run.pause_gc_for_start_up()
        await asyncio.wait_for(run.resume_gc(asyncio.Event()), 10)
        assert gc.isenabled()

    asyncio.run(main())
