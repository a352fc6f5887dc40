"""Local lamp schedules: steps at local times or at sunset/sunrise, applied through the command processor.

The gateway keeps the lamps running when the platform is unreachable: each
schedule says which value its targets should hold from each step on. At
start-up (after a power cut, a reboot) the runner applies the step that
should hold *now* — the last one that has passed, looking back over previous
days — then sleeps until the next step. Every action is a command
(`source="schedule"`), so it is validated like a platform command and lands
in the audit trail.

A platform or local command on a scheduled point overrides the schedule for
that point until the schedule's next step, or for the duration the command's
`override` field gives (`"2h"`); then the schedule's current state is
applied again. A step that fails is retried with backoff until the next step
replaces it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

# The models of `schedules:` live with the config's (the validating child builds them); re-exported here.
from agent.config.control import DEFAULT_TIMEZONE, WEEKDAYS, ScheduleConfig, StepTime
from agent.config.control import ScheduleStep as ScheduleStep
from agent.config.control import Target as Target
from agent.config.control import parse_at as parse_at
from agent.config.control import schedule_problems as schedule_problems
from agent.control.commands import OVERRIDE_LIMIT_MS, CommandEvent, CommandProcessor
from agent.control.suntimes import sun_event
from agent.pipeline.reading import now_ms

log = logging.getLogger(__name__)

# Longest single sleep: the wall clock may jump (NTP setting the clock of an RTC-less Pi after boot),
# so the runner wakes at least this often and recomputes from the clock rather than trusting one long sleep.
MAX_SLEEP_S = 60.0
# Reports of schedule actions taken while the platform is unreachable wait (in order, the newest kept)
# and are sent when it is back: the lamps do not wait for the platform, the platform still learns.
REPORT_RETRY_S = 5.0
MAX_UNREPORTED = 200


@dataclass(frozen=True, slots=True, order=True)
class StepEvent:
    """One occurrence of a step: when (UTC ms), which step (index), and its local date."""

    ts: int
    index: int
    day: date = field(compare=False)
    value: Any = field(compare=False)

    @property
    def key(self) -> tuple[int, int]:
        return (self.ts, self.index)


class ScheduleTimeline:
    """The step occurrences of one schedule in time: pure, for tests and for the runner."""

    def __init__(
        self, config: ScheduleConfig, zone: ZoneInfo, latitude: float | None, longitude: float | None
    ):
        self.config = config
        self.zone = zone
        self.latitude = latitude
        self.longitude = longitude
        self._steps = [(s, s.time_spec()) for s in config.steps]

    def occurrences(self, day: date) -> list[StepEvent]:
        """The steps of one local date, in time order (steps at the same instant keep their config order)."""
        events = []
        weekday = WEEKDAYS[day.weekday()]
        for index, (step, spec) in enumerate(self._steps):
            if step.weekdays is not None and weekday not in step.weekdays:
                continue
            instant = self._instant(day, spec)
            if instant is None:
                continue
            events.append(StepEvent(int(instant.timestamp() * 1000), index, day, step.value))
        return sorted(events)

    def _instant(self, day: date, spec: StepTime) -> datetime | None:
        if spec.clock is not None:
            # A time that does not exist (02:30 on the spring-forward night) resolves with the offset before
            # the change, i.e. one hour later on the wall; a repeated one (autumn) takes the first occurrence.
            return datetime.combine(day, spec.clock, tzinfo=self.zone)
        if self.latitude is None or self.longitude is None or spec.sun is None:
            return None
        instant = sun_event(day, self.latitude, self.longitude, spec.sun)
        if instant is None:
            return None  # polar day or night: no such event that day
        return instant + timedelta(seconds=spec.offset_s)

    def _local_day(self, ts_ms: int) -> date:
        return datetime.fromtimestamp(ts_ms / 1000, tz=self.zone).date()

    def _window(self, ts_ms: int, before: int, after: int) -> list[StepEvent]:
        today = self._local_day(ts_ms)
        events: list[StepEvent] = []
        for offset in range(-before, after + 1):
            events.extend(self.occurrences(today + timedelta(days=offset)))
        return sorted(events)

    def current(self, ts_ms: int) -> StepEvent | None:
        """The step that should hold at `ts_ms`: the last one that has passed (up to 8 days back).

        Several days are looked at together because an offset step (sunset+5h) may fall after midnight,
        later than the next day's first fixed step, and weekday filters may leave whole days empty.
        """
        past = [e for e in self._window(ts_ms, 8, 1) if e.ts <= ts_ms]
        return past[-1] if past else None

    def next_after(self, ts_ms: int) -> StepEvent | None:
        """The first step strictly after `ts_ms` (up to 8 days ahead)."""
        future = [e for e in self._window(ts_ms, 1, 8) if e.ts > ts_ms]
        return future[0] if future else None


@dataclass(slots=True)
class _TargetState:
    applied: tuple[int, int] | None = None  # key of the step event last applied successfully
    failed_step: tuple[int, int] | None = None
    attempts: int = 0
    retry_at: int | None = None
    override_until: int | None = None


class ScheduleRunner:
    """Applies one schedule: the current state at start-up, then each step when it comes."""

    def __init__(
        self,
        name: str,
        config: ScheduleConfig,
        processor: CommandProcessor,
        *,
        latitude: float | None = None,
        longitude: float | None = None,
        default_timezone: str | None = None,
        clock: Callable[[], int] = now_ms,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        on_result: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self.processor = processor
        self.zone = ZoneInfo(config.timezone or default_timezone or DEFAULT_TIMEZONE)
        self.timeline = ScheduleTimeline(config, self.zone, latitude, longitude)
        self.clock = clock
        self.sleep = sleep
        self.on_result = on_result
        self.targets = [(t.device, t.point) for t in config.all_targets()]
        self.state: dict[tuple[str, str], _TargetState] = {t: _TargetState() for t in self.targets}
        self._wake = asyncio.Event()
        # An async on_result answers whether the report went out; unsent ones wait here for the reporter.
        self._report_async = inspect.iscoroutinefunction(on_result)
        self.unreported: deque[dict[str, Any]] = deque(maxlen=MAX_UNREPORTED)
        self._report_ready = asyncio.Event()
        processor.add_listener(self._on_command)

    @classmethod
    def from_config(
        cls, name: str, config: ScheduleConfig, processor: CommandProcessor, gateway: Any, **kwargs: Any
    ) -> ScheduleRunner:
        """Takes latitude, longitude and the default timezone from `gateway.location` (may be None)."""
        location = getattr(gateway, "location", None)
        return cls(
            name,
            config,
            processor,
            latitude=getattr(location, "latitude", None),
            longitude=getattr(location, "longitude", None),
            default_timezone=getattr(location, "timezone", None),
            **kwargs,
        )

    def _on_command(self, event: CommandEvent) -> None:
        """A platform/local command on one of our points: stand aside until the next step or its override."""
        target = (event.device, event.point)
        if event.source == "schedule" or target not in self.state or not event.ok:
            return
        if event.override_s is not None:
            # Bounded by the latest instant `_local` can show (the command processor refuses longer ones).
            until = int(min(event.ts + event.override_s * 1000, OVERRIDE_LIMIT_MS))
        else:
            nxt = self.timeline.next_after(event.ts)
            until = nxt.ts if nxt is not None else event.ts + 86_400_000
        st = self.state[target]
        st.override_until = until
        st.retry_at = None
        log.info(
            "schedule %s: %s.%s overridden by a %s command until %s",
            self.name,
            event.device,
            event.point,
            event.source,
            self._local(until),
        )
        self._wake.set()

    def _local(self, ts_ms: int) -> str:
        return datetime.fromtimestamp(ts_ms / 1000, tz=self.zone).strftime("%Y-%m-%d %H:%M:%S %Z")

    async def step_once(self) -> int:
        """Bring every target to the state that should hold now; return when to look again (UTC ms)."""
        now = self.clock()
        current = self.timeline.current(now)
        wake_candidates: list[int] = []
        nxt = self.timeline.next_after(now)
        if nxt is not None:
            wake_candidates.append(nxt.ts)
        for device, point in self.targets:
            st = self.state[(device, point)]
            if st.override_until is not None:
                if now < st.override_until:
                    wake_candidates.append(st.override_until)
                    continue
                log.info(
                    "schedule %s: override of %s.%s ended; back to the schedule", self.name, device, point
                )
                st.override_until = None
                st.applied = None  # resume: apply the current step again
            if current is None or st.applied == current.key:
                continue
            if st.failed_step != current.key:
                st.failed_step, st.attempts, st.retry_at = None, 0, None
            if st.retry_at is not None and now < st.retry_at:
                wake_candidates.append(st.retry_at)
                continue
            result = await self.processor.execute(device, point, current.value, source="schedule")
            self._report(result, device, point, current)
            if result.get("ok"):
                st.applied, st.failed_step, st.attempts, st.retry_at = current.key, None, 0, None
            else:
                st.failed_step = current.key
                st.attempts += 1
                delay = min(self.config.retry * 2 ** (st.attempts - 1), 600.0)
                st.retry_at = self.clock() + int(delay * 1000)
                wake_candidates.append(st.retry_at)
                log.warning(
                    "schedule %s: %s.%s = %r failed (%s); retry in %gs",
                    self.name,
                    device,
                    point,
                    current.value,
                    result.get("error"),
                    delay,
                )
        return min(wake_candidates) if wake_candidates else now + int(MAX_SLEEP_S * 1000)

    def _report(self, result: dict[str, Any], device: str, point: str, event: StepEvent) -> None:
        if self.on_result is None:
            return
        doc = dict(result)
        doc.setdefault("ts", self.clock())  # failures carry no ts in SPEC §3; a schedule report needs one
        doc.update(
            device=device,
            point=point,
            source="schedule",
            schedule=self.name,
            step=self.config.steps[event.index].at,
        )
        if self._report_async:
            if len(self.unreported) == self.unreported.maxlen:
                log.warning(
                    "schedule %s: more than %d unreported actions; the oldest dropped",
                    self.name,
                    MAX_UNREPORTED,
                )
            self.unreported.append(doc)
            self._report_ready.set()
            return
        try:
            self.on_result(doc)
        except Exception:  # a broken publisher must not stop the lamps' schedule
            log.exception("schedule %s: the on_result hook failed", self.name)

    async def report_loop(self) -> None:
        """Sends queued reports in order; one that does not go out (offline) is retried every few seconds."""
        assert self.on_result is not None
        while True:
            await self._report_ready.wait()
            self._report_ready.clear()
            while self.unreported:
                doc = self.unreported[0]
                try:
                    sent = await self.on_result(doc)
                except Exception:  # a broken publisher must not stop the lamps' schedule
                    log.exception("schedule %s: the on_result hook failed", self.name)
                    sent = True  # dropped: retrying a hook that raises would repeat the failure forever
                if sent is False:
                    await self.sleep(REPORT_RETRY_S)
                    continue
                if self.unreported and self.unreported[0] is doc:
                    self.unreported.popleft()

    async def run(self) -> None:
        """Forever: apply, sleep until the next step (or a retry, or an override's end), apply again."""
        if not self.config.enabled:
            log.info("schedule %s: disabled (enabled: false)", self.name)
            return
        reporter = asyncio.ensure_future(self.report_loop()) if self._report_async else None
        try:
            await self._loop()
        finally:
            if reporter is not None:
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)

    async def _loop(self) -> None:
        log.info(
            "schedule %s: started (%s), targets %s",
            self.name,
            self.zone.key,
            ", ".join(f"{d}.{p}" for d, p in self.targets),
        )
        while True:
            self._wake.clear()  # before the step: a command arriving during it wakes the next wait at once
            wake_at = await self.step_once()
            delay = max(0.0, min((wake_at - self.clock()) / 1000, MAX_SLEEP_S))
            sleeper = asyncio.ensure_future(self.sleep(delay))
            waker = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({sleeper, waker}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sleeper, waker):
                    if not task.done():
                        task.cancel()
                await asyncio.gather(sleeper, waker, return_exceptions=True)


class Schedules:
    """The lamp schedules of the running config, one task each, replaced as a whole on a reload."""

    def __init__(self) -> None:
        self.runs: list[asyncio.Task[None]] = []

    def start(
        self,
        tg: asyncio.TaskGroup,
        configs: dict[str, ScheduleConfig],
        processor: CommandProcessor,
        gateway: Any,
        on_result: Callable[[dict[str, Any]], Awaitable[bool]],
    ) -> None:
        for name, cfg in configs.items():
            runner = ScheduleRunner.from_config(name, cfg, processor, gateway, on_result=on_result)
            self.runs.append(tg.create_task(runner.run(), name=f"schedule:{name}"))

    async def stop(self) -> None:
        for run in self.runs:
            run.cancel()
        await asyncio.gather(*self.runs, return_exceptions=True)
        self.runs = []
