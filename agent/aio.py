"""Give back the cancellations that protocol libraries swallow.

On Python 3.11, `asyncio.wait_for` loses a cancellation that arrives in the same loop iteration as the
result it waits for (CPython gh-86296, fixed in 3.12 where wait_for is built on asyncio.timeout): it returns
the result, or raises its error, as if nothing had happened. pymodbus and aiomqtt await every connect,
request, publish and subscribe through wait_for. A stop, a cycle timeout or a TaskGroup's abort that lands
at that instant is then lost, and the task goes on polling or serving a session that nobody will ever end:
the daemon never finishes stopping (seen in the stop and Sparkplug tests, a few runs in ten).

The task still counts the request (`Task.cancelling()`; nothing uncancelled it), so the loops check it after
each such call and raise the CancelledError themselves. Where nothing was lost the check costs one attribute
read, and raising it is always right: a pending request means the task must stop (an `asyncio.timeout` or a
TaskGroup that asked for it turns it back into its own outcome). For the count to mean that, the daemon's
task groups are `agent.aio.TaskGroup`, which mends a leak of the stdlib's up to 3.12.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")

# CPython gh-116720: a TaskGroup leaves its parent cancel-requested after a child's failure (see TaskGroup)
_TASKGROUP_LEAKS = sys.version_info < (3, 13)


def raise_if_cancelled() -> None:
    """Raise CancelledError if a cancellation of the current task is pending (one a library swallowed)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def settled(operation: Awaitable[T]) -> T:
    """Await a library operation built on wait_for; a cancellation it swallowed is raised after it."""
    try:
        result = await operation
    except asyncio.CancelledError:
        raise
    except BaseException:
        raise_if_cancelled()  # pymodbus turns a swallowed cancellation into "cannot connect"
        raise
    raise_if_cancelled()
    return result


class TaskGroup(asyncio.TaskGroup):
    """asyncio.TaskGroup that leaves its parent task's count of cancellation requests as it found it.

    When a child fails while the body has already reached `__aexit__` (the usual shape: create the tasks,
    wait), the group cancels its parent to wake it; up to Python 3.12 it forgets to take that request back
    (CPython gh-116720, fixed in 3.13), so `Task.cancelling()` stays at 1 after the group has raised its
    error, and `raise_if_cancelled` would take a lost connection for a stop. This subclass takes it back.
    """

    async def __aexit__(self, et: Any, exc: Any, tb: Any) -> None:
        parent = self._parent_task  # type: ignore[attr-defined]
        requested_before: bool = self._parent_cancel_requested  # type: ignore[attr-defined]
        count = parent.cancelling()
        try:
            await super().__aexit__(et, exc, tb)
        finally:
            if (
                _TASKGROUP_LEAKS
                and not requested_before
                and self._parent_cancel_requested  # type: ignore[attr-defined]
                and parent.cancelling() > count
            ):
                parent.uncancel()
