"""MQTT uplink: stored rows -> QoS 1 publish -> ack (delete) after PUBACK; reconnect; live and backlog lanes.

Two lanes share one connection. The live lane carries rows appended since the
connection came up, straight from memory, batched by `batch_max` /
`batch_interval`. The backlog lane replays, from SQLite in seq order, every
row older than that boundary (what an outage or a restart left behind),
marked `"backlog": true`. Each lane has its own in-flight slots (live 2, backlog `max_inflight`),
so live data stays fresh while a backlog drains.

Rows are deleted from the store only after the broker's PUBACK for the
message that carried them; from their publish until then they are pinned in
the store (not evictable), so `evicted` counts exactly the readings never
sent. Rows in flight when the link drops are sent again on the next
connection (at-least-once; duplicates are limited to the messages in flight:
at most `max_inflight` backlog + 2 live messages).

What goes on the wire is the format's (`agent/upstream/formats/`: fieldgate JSON, Sparkplug B, ThingsBoard): it
encodes each batch into messages, gives the will and the birth messages, and handles its platform's
commands. With several upstreams each uplink has its own lane in the buffer (`lane`): its acks mark rows
for that lane only, and a row leaves the buffer once every lane has acknowledged it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt

from agent.aio import TaskGroup, raise_if_cancelled, settled
from agent.config.models import MqttConfig, mqtt_endpoint
from agent.errors import StoreError, UpstreamError
from agent.pipeline import metrics
from agent.pipeline.reading import now_ms
from agent.pipeline.store import AsyncStore, StoredRow
from agent.upstream import payloads
from agent.upstream.formats import Catalog, CommandExecutor, Message, MqttFormat
from agent.upstream.formats.fieldgate import FieldgateFormat

log = logging.getLogger("fieldgate.uplink")

RECONNECT_MIN = 0.1
RECONNECT_MAX = 1.5  # full jitter: each wait is uniform in [0, cap]; a broker back sees data within 2 s
FAILOVER_SPREAD = 0.5  # after losing a connected broker, the next attempt waits uniform [0, this] (no herd)
PROBE_TIMEOUT = 1.0  # with several brokers, one that does not answer a TCP connect this fast is skipped
CONNECT_TIMEOUT = 3.0  # with several brokers, one that accepts TCP but sends no CONNACK this fast is skipped
LIVE_INFLIGHT = 2  # live messages awaiting PUBACK at once (the backlog has `max_inflight` of its own)
ACK_RETRY = 1.0  # seconds between attempts to delete acknowledged rows while the disk refuses
LIVE_LIMIT_BATCHES = 20  # past this many batches waiting live, the surplus goes the backlog way
LIVE_EARLY = 0.2  # a live batch may leave this fraction of batch_interval early (see _live_lane)
UNANSWERED_MAX = 1000  # command results kept in memory while the link is down
SUBSCRIBE_RETRY_MAX = (
    30.0  # a subscription the broker refused is asked again, waits doubling from 1 s to this
)


Handler = Callable[[bytes], Awaitable[dict[str, Any] | None]]


@dataclass(frozen=True, slots=True)
class Subscription:
    """A topic the gateway listens to; the handler's answer (if any) goes to `result_topic`."""

    topic: str
    handler: Handler
    result_topic: str | None = None
    retain: bool = False


def make_format(
    cfg: MqttConfig,
    gateway_id: str,
    version: str,
    topics: payloads.Topics,
    catalog: Catalog | None = None,
    execute: CommandExecutor | None = None,
    state_file: Path | None = None,
) -> MqttFormat:
    """The format `cfg.format` names (Sparkplug's protobuf module is imported only when chosen).

    `state_file`: where a format keeps what must outlive a restart (Sparkplug: the last bdSeq)."""
    if cfg.format == "sparkplug":
        from agent.upstream.formats.sparkplug import SparkplugFormat

        sp = cfg.sparkplug
        bd_seq_file = state_file.with_name(state_file.name + ".bdseq") if state_file is not None else None
        return SparkplugFormat(
            sp.group_id,
            sp.edge_node_id or gateway_id,
            catalog,
            execute,
            version,
            bd_seq_file,
            sp.primary_host_id,
        )
    if cfg.format == "thingsboard":
        from agent.upstream.formats.thingsboard import ThingsBoardFormat

        return ThingsBoardFormat(catalog, execute)
    return FieldgateFormat(topics, gateway_id, version, cfg.compression)


class PrimaryHostOffline(UpstreamError):
    """The Sparkplug primary host said offline: the session ends (NDEATH sent) and a new one waits for it."""


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(RECONNECT_MAX, RECONNECT_MIN * 2**attempt)], so a fleet that lost its
    broker at once does not come back in lockstep; the cap keeps "data within 2 s of the broker's return"."""
    cap = min(RECONNECT_MAX, RECONNECT_MIN * (2 ** min(attempt, 16)))
    return (rng or random).uniform(0.0, cap)


def suback_refusals(codes: Any) -> list[Any]:
    """The refusals in a SUBACK (0x80 and up): what `client.subscribe` returns is one code per topic filter,
    `ReasonCode`s (paho 2) or plain ints."""
    return [c for c in codes if (c >= 0x80 if isinstance(c, int) else c.is_failure)]


def connect_order(count: int, lost: int | None) -> list[int]:
    """The brokers to try, in order of preference, the one just lost (if any) last."""
    order = list(range(count))
    if lost is not None and count > 1:
        order.remove(lost)
        order.append(lost)
    return order


class PreferredBrokerBack(UpstreamError):
    """A preferred broker is healthy again: the session on a less preferred one ends on purpose."""


def _root_cause(exc: BaseException) -> BaseException:
    """The first leaf of a TaskGroup's exception group (the error that ended the session)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


class Uplink:
    """Owns the MQTT connection and both lanes (an `Upstream`, agent/upstream/contract.py)."""

    def __init__(
        self,
        cfg: MqttConfig,
        gateway_id: str,
        store: AsyncStore,
        version: str,
        *,
        password: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        health_doc: Callable[[], dict[str, Any]] | None = None,
        on_command: Handler | None = None,
        next_seq: int = 1,
        explain_error: Callable[[BaseException], str] | None = None,
        fmt: MqttFormat | None = None,
        lane: str | None = None,
        name: str = "mqtt",
        catalog: Catalog | None = None,
        execute: CommandExecutor | None = None,
    ) -> None:
        self.cfg = cfg
        self.gateway_id = gateway_id
        self.store = store
        self.version = version
        self.password = password
        self.tls_context = tls_context
        self.health_doc = health_doc
        self.topics = payloads.Topics(cfg.topic_prefix, gateway_id)
        buffer = getattr(getattr(store, "store", None), "path", None)  # the state lives beside the buffer
        state_file = Path(f"{buffer}.{name}") if buffer is not None else None
        self.fmt: MqttFormat = fmt or make_format(
            cfg, gateway_id, version, self.topics, catalog, execute, state_file
        )
        self.lane = lane  # None: the only upstream (acks delete at once)
        self.name = name
        self.subscriptions: list[Subscription] = []
        if on_command is not None:
            self.subscriptions.append(
                Subscription(self.topics.commands, on_command, self.topics.command_results)
            )
        self.explain_error = explain_error or (lambda e: str(e) or type(e).__name__)
        self.client_id = cfg.client_id or gateway_id

        self.connected = False
        self.sent = 0  # readings acknowledged by the broker
        self.messages = 0
        self.rejected = 0  # readings the format could not encode (logged, acknowledged, never sent)
        self.last_error: str | None = None
        self.since_ts: int | None = None
        self.connections = 0
        self.urls = cfg.urls  # in order of preference (docs/FLEET.md)
        self.index = 0  # the broker in use, or tried last
        self.failovers = 0  # sessions begun on another broker than the previous session's
        self._last_node: int | None = None

        self._next_seq = next_seq  # one past the last row offered to the uplink
        self._accepting = False
        self._live: deque[tuple[float, StoredRow]] = deque()
        self._live_event = asyncio.Event()
        self._boundary = next_seq  # rows below it (and above the cursor) are backlog
        self._cursor = 0
        self._backlog_event = asyncio.Event()
        self._acks: list[int] = []
        self._ack_event = asyncio.Event()
        self._ack_failing = False
        self._client: aiomqtt.Client | None = None
        self._stopping = False
        self.on_connect: list[Callable[[], None]] = []
        self._handling: set[asyncio.Task[None]] = set()  # subscribed messages being handled
        # Answers (command results) completed while the link was down: published at the next connection.
        self._unanswered: deque[tuple[str, dict[str, Any], bool]] = deque(maxlen=UNANSWERED_MAX)
        self.beat: Callable[[], None] = lambda: None  # the progress watchdog's heartbeat

    @property
    def format_name(self) -> str:
        return self.fmt.name

    @property
    def next_seq(self) -> int:
        return self._next_seq

    # -- feeding ---------------------------------------------------------------------------------------

    def offer(self, rows: list[StoredRow]) -> None:
        """Rows just stored. Called in the event loop, in seq order, for every append."""
        if not rows:
            return
        self._next_seq = rows[-1].seq + 1
        if not self._accepting:
            return
        t = time.monotonic()
        self._live.extend((t, r) for r in rows)
        if len(self._live) > LIVE_LIMIT_BATCHES * self.cfg.batch_max:
            # The link can't keep up live: hand everything waiting to the backlog lane (still in SQLite).
            self._live.clear()
            self._boundary = self._next_seq
            self._backlog_event.set()
        self._live_event.set()

    # -- the connection loop ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The broker in use (or tried last)."""
        return self.urls[self.index]

    async def run(self) -> None:
        """Connect to the first broker that answers, in order of preference; on the loss of the one in use,
        try the others first. A round where none answers waits a jittered backoff before the next."""
        attempt = 0
        lost: int | None = None
        while not self._stopping:
            self.beat()
            outcome = "unreachable"  # no broker of this round accepted a connection
            session_time = 0.0
            for index in connect_order(len(self.urls), lost):
                started = time.monotonic()
                had = self.connections
                self.index = index
                try:
                    await self._try_session(index)
                except Exception as exc:
                    cause = _root_cause(exc)
                    if isinstance(cause, PreferredBrokerBack):
                        outcome = "failback"
                        self._disconnected("moved back to a preferred broker")
                    elif isinstance(cause, PrimaryHostOffline):
                        # Not a lost link: the session ended on purpose; connect again at once and wait there.
                        log.info("upstream %s: %s, reconnecting to wait for it", self.name, cause)
                        outcome = "host_offline"
                        self.connected = False
                        self._accepting = False
                        self._live.clear()
                    else:
                        if not isinstance(cause, aiomqtt.MqttError | OSError | TimeoutError):
                            log.error(
                                "upstream session failed: %s: %s", type(cause).__name__, cause, exc_info=cause
                            )
                        self._disconnected(self.explain_error(cause))
                raise_if_cancelled()  # a stop that aiomqtt swallowed (agent/aio.py) must not start a new session
                if self._stopping:
                    return
                if outcome in ("failback", "host_offline"):
                    break
                if self.connections != had:
                    outcome, lost, session_time = "lost", index, time.monotonic() - started
                    break
            if outcome in ("failback", "host_offline"):
                lost, attempt = None, 0
                continue
            if outcome == "lost" and session_time > 10:
                # A broker in use was lost: the others are tried first, after a short random wait so that a
                # fleet losing one broker does not land on the next in one burst.
                attempt = 0
                await asyncio.sleep(random.uniform(0.0, FAILOVER_SPREAD))
                continue
            # Nothing answered (or the session was short-lived: a flapping broker): jittered backoff.
            await asyncio.sleep(backoff_delay(attempt))
            attempt += 1

    async def _try_session(self, index: int) -> None:
        if len(self.urls) > 1:
            # With somewhere else to go, a broker that does not even accept TCP is not waited for.
            host, port = mqtt_endpoint(self.urls[index])
            async with asyncio.timeout(PROBE_TIMEOUT):
                _, writer = await asyncio.open_connection(host, port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        await self._session()

    def _disconnected(self, message: str) -> None:
        if self.connected:
            log.warning("upstream lost: %s", message)
        elif message != self.last_error:
            log.warning("upstream unreachable: %s", message)
        self.connected = False
        self._accepting = False
        self._live.clear()
        self.last_error = message
        self.since_ts = now_ms()

    def _client_for_session(self) -> aiomqtt.Client:
        death = self.fmt.will()
        will = (
            aiomqtt.Will(death.topic, death.payload, qos=death.qos, retain=death.retain)
            if death is not None
            else None
        )
        host, port = mqtt_endpoint(self.url)
        return aiomqtt.Client(
            host,
            port,
            identifier=self.client_id,
            username=self.cfg.username,
            password=self.password,
            will=will,
            clean_session=True,
            keepalive=max(int(self.cfg.keepalive), 1),
            timeout=max(self.cfg.keepalive, 10.0),
            tls_context=self.tls_context,
            max_inflight_messages=self.cfg.max_inflight + 4,
        )

    async def _session(self) -> None:
        client = self._client_for_session()
        session_timeout = client.timeout
        if len(self.urls) > 1:
            # A NATS node whose cluster is electing a new leader for its MQTT streams accepts TCP and holds
            # the CONNECT for seconds (docs/FLEET.md): try the next broker rather than wait the full timeout.
            client.timeout = CONNECT_TIMEOUT
        async with client:
            client.timeout = session_timeout
            self._client = client
            try:
                raise_if_cancelled()  # the connect (wait_for inside aiomqtt) may have swallowed a stop
                moved = self._last_node is not None and self._last_node != self.index
                if moved:
                    self.failovers += 1
                self._last_node = self.index
                self._on_connected()
                gated = getattr(self.fmt, "primary_host_id", None) is not None
                # Subscribed before the births: a platform that asks for them again (Sparkplug rebirth) as soon
                # as it sees the gateway cannot ask in between and go unheard.
                topics = [sub.topic for sub in self.subscriptions] + [t for t, _ in self.fmt.inbound()]
                refused = [t for t in topics if not await self._subscribe(client, t)]
                if not gated:
                    for message in self.fmt.birth():
                        await settled(
                            client.publish(
                                message.topic, message.payload, qos=message.qos, retain=message.retain
                            )
                        )
                async with TaskGroup() as tg:
                    if gated:
                        tg.create_task(self._lanes_while_host_online(client))
                    else:
                        # Each lane has its own in-flight slots, so a draining backlog never delays live batches.
                        tg.create_task(self._live_lane(client, asyncio.Semaphore(LIVE_INFLIGHT)))
                        tg.create_task(self._backlog_lane(client, asyncio.Semaphore(self.cfg.max_inflight)))
                    tg.create_task(self._ack_flusher())
                    tg.create_task(self._health_loop(client))
                    tg.create_task(self._message_loop(client))
                    tg.create_task(self._send_unanswered())
                    if refused:
                        tg.create_task(self._subscribe_again(client, refused))
                    if self.index > 0 and self.cfg.failback > 0:
                        tg.create_task(self._failback_watch(client))
                    if moved:
                        tg.create_task(self._rebirth_later(client))
            finally:
                self._client = None

    async def _subscribe(self, client: aiomqtt.Client, topic: str) -> bool:
        """Subscribe at QoS 1; False when the broker refuses it in its SUBACK (0x80: e.g. an ACL, or a NATS
        node that cannot create the subscription's JetStream consumer while its cluster elects leaders)."""
        failed = suback_refusals(await settled(client.subscribe(topic, qos=1)))
        if failed:
            log.warning(
                "upstream %s: %s refused the subscription to %s (%s); asking again during the session",
                self.name, self.url, topic, failed[0],
            )  # fmt: skip
        return not failed

    async def _subscribe_again(self, client: aiomqtt.Client, topics: list[str]) -> None:
        """Ask again for the subscriptions the broker refused, waits doubling up to SUBSCRIBE_RETRY_MAX, until
        each is granted: the session goes on publishing meanwhile (a refusal does not cost the telemetry)."""
        wait = 1.0
        while topics:
            await asyncio.sleep(wait)
            wait = min(wait * 2, SUBSCRIBE_RETRY_MAX)
            topics = [t for t in topics if not await self._subscribe(client, t)]
            if not topics:
                log.info("upstream %s: every subscription granted by %s", self.name, self.url)

    def _on_connected(self) -> None:
        self.connections += 1
        self.connected = True
        self.last_error = None
        self.since_ts = now_ms()
        log.info(
            "upstream %s (%s) connected to %s as %s",
            self.name,
            self.fmt.name,
            self.url,
            self.client_id,
        )
        # Everything already stored is backlog; what is offered from now on is live.
        self._live.clear()
        self._boundary = self._next_seq
        self._cursor = 0
        self._accepting = True
        self._backlog_event.set()
        for hook in self.on_connect:
            hook()

    # -- Sparkplug primary host: hold, then birth ------------------------------------------------------

    async def _lanes_while_host_online(self, client: aiomqtt.Client) -> None:
        """Births and both lanes only while the format's primary host is online (Sparkplug 3.0).

        Until its STATE says online, nothing is published: readings stay in the buffer (the live lane does
        not take them) and the connection stays up, subscribed to STATE. Online: NBIRTH, DBIRTHs, then
        everything stored since the connection came up is replayed in seq order (historical), then live.
        A valid offline STATE ends the session as the specification wants: NDEATH, DISCONNECT, and a new
        connection that waits again (`PrimaryHostOffline`)."""
        fmt: Any = self.fmt
        if not fmt.host_online:
            self._hold()
            while not fmt.host_online:
                fmt.host_changed.clear()
                await fmt.host_changed.wait()
            self._release()
        for message in fmt.birth():
            await settled(
                client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
            )
        try:
            async with TaskGroup() as tg:
                tg.create_task(self._live_lane(client, asyncio.Semaphore(LIVE_INFLIGHT)))
                tg.create_task(self._backlog_lane(client, asyncio.Semaphore(self.cfg.max_inflight)))
                while fmt.host_online:
                    fmt.host_changed.clear()
                    await fmt.host_changed.wait()
                raise PrimaryHostOffline(f"Sparkplug primary host {fmt.primary_host_id} offline")
        except* PrimaryHostOffline:
            pass
        self._hold()
        for message in fmt.goodbye():  # NDEATH, then a clean DISCONNECT (the broker keeps the will to itself)
            await settled(
                client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
            )
        raise PrimaryHostOffline(f"Sparkplug primary host {fmt.primary_host_id} offline")

    def _hold(self) -> None:
        """Nothing leaves while held: new rows stay in the buffer only (the link is up, not 'lost')."""
        self._accepting = False
        self._live.clear()
        held = f"held: Sparkplug primary host {getattr(self.fmt, 'primary_host_id', '?')} offline"
        if self.last_error != held:
            log.info("upstream %s %s: readings stay in the buffer", self.name, held)
        self.last_error = held

    def _release(self) -> None:
        """Everything stored so far goes the backlog way, in seq order; what comes next is live."""
        self.last_error = None
        self._live.clear()
        self._boundary = self._next_seq
        self._cursor = 0
        self._accepting = True
        self._backlog_event.set()

    # -- several brokers ---------------------------------------------------------------------------------

    async def _failback_watch(self, client: aiomqtt.Client) -> None:
        """On a less preferred broker: probe the preferred ones; once one has accepted an MQTT connection at
        every probe for `failback` seconds, say goodbye here and end the session (run() starts over from
        the first)."""
        period = min(max(self.cfg.failback / 4, 0.25), 15.0)
        healthy_since: dict[int, float] = {}
        while True:
            await asyncio.sleep(period)
            for index in range(self.index):
                if await self._answers(self.urls[index]):
                    healthy_since.setdefault(index, time.monotonic())
                else:
                    healthy_since.pop(index, None)
            if any(time.monotonic() - t >= self.cfg.failback for t in healthy_since.values()):
                log.info("upstream %s: %s is healthy again, leaving %s", self.name, self.urls[0], self.url)
                with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                    async with asyncio.timeout(2):
                        for m in self.fmt.goodbye():
                            await client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
                raise PreferredBrokerBack

    async def _answers(self, url: str) -> bool:
        """Whether the broker accepts an MQTT connection now (its own client id: never our session's)."""
        host, port = mqtt_endpoint(url)
        probe = aiomqtt.Client(
            host,
            port,
            identifier=f"{self.client_id}-probe",
            username=self.cfg.username,
            password=self.password,
            clean_session=True,
            timeout=PROBE_TIMEOUT * 2,
            tls_context=self.tls_context,
        )
        try:
            async with asyncio.timeout(PROBE_TIMEOUT * 3):
                async with probe:
                    return True
        except (aiomqtt.MqttError, OSError, TimeoutError):
            return False

    async def _rebirth_later(self, client: aiomqtt.Client) -> None:
        """After moving to another broker of a cluster, the old one may still publish our will (retained
        `offline`) once its keepalive expires; the retained birth messages are published again after that."""
        await asyncio.sleep(self.cfg.keepalive * 1.5 + 1.0)
        for m in self.fmt.birth():
            if m.retain:
                await settled(client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain))

    # -- lanes -----------------------------------------------------------------------------------------

    async def _publish_rows(
        self,
        client: aiomqtt.Client,
        rows: list[StoredRow],
        backlog: bool,
        slots: asyncio.Semaphore,
        tg: asyncio.TaskGroup,
    ) -> None:
        await slots.acquire()
        # In flight from here: pinned until the ack (after the PUBACK) deletes them, so that eviction can
        # never count a reading the platform receives. Rows evicted since they were read are not sent.
        # A live batch of the last append's rows (the usual live message) is pinned by a call queued ahead of
        # anything that could evict them, without waiting for it (AsyncStore.pin_fresh); others wait for `pin`.
        if backlog or not self.store.pin_fresh(rows, self.lane):
            try:
                rows = await self.store.pin(rows, self.lane)
            except BaseException:
                slots.release()
                raise
        if not rows:
            slots.release()
            return
        try:
            messages = self.fmt.encode(rows, backlog)
        except Exception as exc:
            # A row this format cannot carry never will: count it and let it go, rather than stall the lane.
            slots.release()
            log.error(
                "upstream %s: %d readings (seq %d..%d) cannot be encoded as %s, skipped: %s",
                self.name,
                len(rows),
                rows[0].seq,
                rows[-1].seq,
                self.fmt.name,
                exc,
                exc_info=exc,
            )
            self.rejected += len(rows)
            self._acks.extend(r.seq for r in rows)
            self._ack_event.set()
            return

        async def send() -> None:
            started = metrics.publish_started(self.name, len(messages))
            try:
                if len(messages) == 1:
                    m = messages[0]
                    await client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
                else:
                    # Handed to the client in order (each publish is queued before its first await).
                    await asyncio.gather(
                        *(client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain) for m in messages)
                    )
            finally:
                slots.release()
                metrics.publish_ended(self.name, len(messages))
            metrics.published(self.name, rows, started)
            self._acks.extend(r.seq for r in rows)
            self._ack_event.set()
            self.beat()
            self.sent += len(rows)
            self.messages += sum(1 for m in messages if m.seqs)

        tg.create_task(send())

    async def _live_lane(self, client: aiomqtt.Client, slots: asyncio.Semaphore) -> None:
        # A batch leaves `batch_interval` after the previous one, or up to LIVE_EARLY (20 %) of it sooner; at
        # once for the first after a connect, and at once when `batch_max` rows wait. No reading waits longer
        # than batch_interval, and a start or a reconnection shows data immediately. The early margin is what
        # lets rows stored once per interval (polls on the clock's ticks, one commit per tick) pull the
        # publishes onto their own phase within a few intervals, after which each batch leaves in the
        # wake-up that stored it (live latency ~10 ms instead of up to a whole interval). A steady trickle of
        # rows (commits every 200 ms) leaves at most once per 0.8 x batch_interval.
        spacing = self.cfg.batch_interval * (1 - LIVE_EARLY)
        last_publish = -float("inf")
        async with TaskGroup() as tg:
            while True:
                if not self._live:
                    self._live_event.clear()
                    await self._live_event.wait()
                    continue
                wait = spacing - (time.monotonic() - last_publish)
                if len(self._live) < self.cfg.batch_max and wait > 0:
                    self._live_event.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._live_event.wait()
                    continue
                n = min(len(self._live), self.cfg.batch_max)
                rows = [self._live.popleft()[1] for _ in range(n)]
                last_publish = time.monotonic()
                await self._publish_rows(client, rows, False, slots, tg)

    async def _backlog_lane(self, client: aiomqtt.Client, slots: asyncio.Semaphore) -> None:
        async with TaskGroup() as tg:
            while True:
                if self._cursor + 1 >= self._boundary:
                    self._backlog_event.clear()
                    await self._backlog_event.wait()
                    continue
                rows = await self.store.fetch(self._cursor, self._boundary, self.cfg.batch_max, self.lane)
                if not rows:
                    self._cursor = self._boundary - 1
                    continue
                self._cursor = rows[-1].seq
                await self._publish_rows(client, rows, True, slots, tg)

    async def _ack_flusher(self) -> None:
        """Delete acknowledged rows; acks arriving while a delete runs are coalesced into the next one."""
        while True:
            if not self._acks:
                self._ack_event.clear()
                await self._ack_event.wait()
                continue
            seqs, self._acks = self._acks, []
            try:
                await self.store.ack(seqs, self.lane)
            except StoreError as exc:
                # A full disk can refuse even a delete (WAL mode writes it first). Keep the seqs and try
                # again later, on the same connection: ending the session would send them all once more.
                self._acks = seqs + self._acks
                if not self._ack_failing:
                    log.error("acknowledged readings not yet deleted, will retry: %s", exc)
                self._ack_failing = True
                await asyncio.sleep(ACK_RETRY)
                continue
            if self._ack_failing:
                log.warning("acknowledged readings deleted again")
                self._ack_failing = False

    async def flush_acks(self) -> None:
        if self._acks:
            seqs, self._acks = self._acks, []
            try:
                await self.store.ack(seqs, self.lane)
            except StoreError as exc:
                log.error(
                    "%d acknowledged readings stay in the buffer and will be sent again: %s", len(seqs), exc
                )

    async def _health_loop(self, client: aiomqtt.Client) -> None:
        if self.health_doc is None:
            return
        while True:
            message = self.fmt.health(self.health_doc())
            if message is None:
                return
            await settled(
                client.publish(message.topic, message.payload, qos=message.qos, retain=message.retain)
            )
            self.beat()
            await asyncio.sleep(self.cfg.health_interval)

    async def _message_loop(self, client: aiomqtt.Client) -> None:
        """Messages from the platform (commands, ...): each handled in its own task, its answer published."""
        inbound = self.fmt.inbound()
        if not self.subscriptions and not inbound:
            return
        async with TaskGroup() as tg:
            async for message in client.messages:
                raw = message.payload if isinstance(message.payload, bytes) else str(message.payload).encode()
                handler = next((h for t, h in inbound if message.topic.matches(t)), None)
                if handler is not None:
                    tg.create_task(self._answer(client, handler, message.topic.value, raw))
                    continue
                sub = next((x for x in self.subscriptions if message.topic.matches(x.topic)), None)
                if sub is None:
                    continue
                # Not in the session's task group: losing the session must not cancel a command's write.
                task = asyncio.get_running_loop().create_task(self._handle_detached(sub, raw))
                self._handling.add(task)
                task.add_done_callback(self._handling.discard)

    async def _handle_detached(self, sub: Subscription, raw: bytes) -> None:
        """One subscribed message, outliving its session; an answer the link cannot take now waits."""
        try:
            result = await sub.handler(raw)
        except Exception as exc:
            log.error("upstream %s: message on %s not handled: %s", self.name, sub.topic, exc, exc_info=exc)
            return
        if result is None or not sub.result_topic:
            return
        if not await self.publish(sub.result_topic, result, retain=sub.retain):
            if len(self._unanswered) == self._unanswered.maxlen:
                log.warning(
                    "upstream %s: more than %d answers waiting; the oldest dropped", self.name, UNANSWERED_MAX
                )
            self._unanswered.append((sub.result_topic, result, sub.retain))

    async def _send_unanswered(self) -> None:
        """At each connection: the answers that found the link down, in order."""
        while self._unanswered:
            topic, doc, retain = self._unanswered[0]
            if not await self.publish(topic, doc, retain=retain):
                return  # the session is gone again: they wait for the next one
            if self._unanswered and self._unanswered[0][1] is doc:
                self._unanswered.popleft()

    async def _answer(
        self,
        client: aiomqtt.Client,
        handler: Callable[[str, bytes], Awaitable[list[Message]]],
        topic: str,
        raw: bytes,
    ) -> None:
        """A format's platform message: handled (never raises into the session), its answers published."""
        try:
            answers = await handler(topic, raw)
        except Exception as exc:
            log.error("upstream %s: message on %s not handled: %s", self.name, topic, exc, exc_info=exc)
            return
        for m in answers:
            await settled(client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain))

    async def publish(self, topic: str, doc: dict[str, Any], *, retain: bool = False) -> bool:
        """Publish one JSON document at QoS 1; False when offline."""
        client = self._client
        if client is None or not self.connected:
            return False
        try:
            await settled(client.publish(topic, payloads.dumps(doc), qos=1, retain=retain))
        except aiomqtt.MqttError as exc:
            log.warning("%s not published: %s", topic, exc)
            return False
        return True

    async def publish_result(self, result: dict[str, Any]) -> bool:
        """Publish a command result (also used for schedule actions); False when offline."""
        return await self.publish(self.topics.command_results, result)

    async def stop(self) -> None:
        """Say offline (retained) and leave cleanly; rows not acknowledged stay in the store."""
        self._stopping = True
        client = self._client
        if client is not None and self.connected:
            with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                async with asyncio.timeout(2):
                    for m in self.fmt.goodbye():
                        await client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
        await self.flush_acks()
