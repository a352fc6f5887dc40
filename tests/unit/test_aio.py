"""agent.aio: a cancellation that asyncio.wait_for swallows (Python 3.11) is given back."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest

from agent.aio import TaskGroup, raise_if_cancelled, settled


async def _race(use_settled: bool, error: bool = False) -> tuple[asyncio.Task[None], bool]:
    """A task awaits a wait_for (as pymodbus and aiomqtt do) whose result arrives with a stop, then would
    go on working. Returns the task once it has ended (cancelled again after 1 s if need be), and whether it
    went on past the stop."""
    fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    went_on = asyncio.Event()

    async def body() -> None:
        operation = asyncio.wait_for(fut, 10)
        with contextlib.suppress(OSError):  # as a driver takes "cannot connect" for a device error, polls on
            await (settled(operation) if use_settled else operation)
        went_on.set()
        await asyncio.sleep(3600)  # a poll loop's next sleep: only a cancellation ends it

    task = asyncio.create_task(body())
    await asyncio.sleep(0)  # the task now waits inside wait_for
    if error:  # pymodbus: the connect failed at the instant of the stop
        fut.set_exception(OSError("connection refused"))
    else:  # the answer and the stop land in the same loop iteration
        fut.set_result(1)
    task.cancel()
    await asyncio.wait([task], timeout=1)
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return task, went_on.is_set()


@pytest.mark.parametrize("error", [False, True], ids=["result", "error"])
async def test_settled_gives_back_the_cancellation(error: bool) -> None:
    task, went_on = await _race(use_settled=True, error=error)
    assert task.cancelled() and not went_on


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="wait_for keeps the cancellation from 3.12 on")
@pytest.mark.parametrize("error", [False, True], ids=["result", "error"])
async def test_wait_for_alone_loses_it_on_311(error: bool) -> None:
    """The bug the helper exists for: without it the stopped task runs on."""
    _, went_on = await _race(use_settled=False, error=error)
    assert went_on  # and was ended only by the second cancel, a second later


async def test_settled_passes_results_and_errors_through() -> None:
    async def ok() -> int:
        return 7

    async def fails() -> None:
        raise OSError("refused")

    assert await settled(ok()) == 7
    with pytest.raises(OSError, match="refused"):
        await settled(fails())


async def test_taskgroup_leaves_the_cancel_count_as_it_found_it() -> None:
    """A child failing after the body ended: the group's own wake-up request is taken back (CPython leaves it
    counted up to 3.12), so a later raise_if_cancelled does not take the failure for a stop."""

    async def crash() -> None:
        await asyncio.sleep(0.01)
        raise ValueError("lost")

    task = asyncio.current_task()
    assert task is not None
    for group in (TaskGroup, asyncio.TaskGroup):
        with pytest.raises(ExceptionGroup):
            async with group() as tg:
                tg.create_task(crash())
        if group is TaskGroup:
            assert task.cancelling() == 0
            raise_if_cancelled()  # nothing pending: does not raise
        elif sys.version_info < (3, 13):
            assert task.cancelling() == 1  # the stdlib's leak, which the subclass exists for
            task.uncancel()


async def test_taskgroup_still_propagates_a_real_stop() -> None:
    started = asyncio.Event()

    async def body() -> None:
        async with TaskGroup() as tg:
            tg.create_task(asyncio.sleep(3600))
            started.set()

    run = asyncio.create_task(body())
    await started.wait()
    run.cancel()
    await asyncio.wait([run], timeout=2)
    assert run.cancelled()
