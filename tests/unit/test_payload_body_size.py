"""agent/upstream/payloads.py reading_body: SPEC §3 bytes, held in memory at their own size (a tick's rows live
in the uplink's queues; orjson's 4 KiB output buffer per body was 40 MiB at 10,000 points)."""

from __future__ import annotations

import tracemalloc

import orjson

from agent.pipeline.reading import Reading
from agent.upstream.payloads import reading_body


def test_the_body_is_the_reading_object_of_the_spec() -> None:
    r = Reading("dev001", "r0", 1_700_000_000_000, 21.5, "degC", "uncertain")
    body = reading_body(7, r)
    assert body == orjson.dumps(
        {"seq": 7, "device": "dev001", "point": "r0", "ts": 1_700_000_000_000, "value": 21.5, "unit": "degC",
         "quality": "uncertain"}
    )  # fmt: skip
    assert (
        reading_body(8, Reading("d", "p", 1, True))
        == b'{"seq":8,"device":"d","point":"p","ts":1,"value":true}'
    )


def test_a_body_holds_little_more_than_its_length() -> None:
    readings = [Reading("dev001", f"r{i}", 1_700_000_000_000 + i, i) for i in range(200)]
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        bodies = [reading_body(i, r) for i, r in enumerate(readings)]
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    held = sum(s.size_diff for s in after.compare_to(before, "filename"))
    longest = max(len(b) for b in bodies)
    assert held / len(bodies) < longest + 200  # 4 KiB per body before the copy
