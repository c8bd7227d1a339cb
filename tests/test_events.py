"""The live event hub: what a stream that (re)connects after a given event id is sent."""

from __future__ import annotations

import asyncio
import json

from farm.events import EventHub


def frames(hub: EventHub, after: int) -> list[dict]:
    """What a stream connecting after ``after`` is sent first, as the client reads it."""
    entries = asyncio.run(hub.wait(after, timeout=0.01))
    sent = []
    for entry in entries:
        id_line, data_line, blank, end = entry.encoded().split("\n")
        assert id_line == f"id: {entry.id}" and blank == end == ""
        sent.append(json.loads(data_line.removeprefix("data: ")))
    return sent


def test_a_stream_gets_exactly_what_came_after_its_last_event_and_what_is_kept_when_it_missed_more():
    hub = EventHub(ring_size=10)
    for number in range(1, 26):
        assert hub.publish("segment_done", {"job": "j1", "segments_done": number}) == number
    assert hub.last_id == 25

    # ids 16..25 are kept: a client that saw 20 gets 21..25, in order, each once
    assert [event["id"] for event in frames(hub, 20)] == [21, 22, 23, 24, 25]
    assert [event["segments_done"] for event in frames(hub, 20)] == [21, 22, 23, 24, 25]
    assert [event["id"] for event in frames(hub, 16)] == list(range(17, 26))
    # one that missed more than the ring holds gets everything kept; one that is up to date, nothing
    assert [event["id"] for event in frames(hub, 3)] == list(range(16, 26))
    assert [event["id"] for event in frames(hub, 0)] == list(range(16, 26))
    assert frames(hub, 25) == []

    hub.publish("nodes", {"nodes": [{"name": "alpha", "slots": 2}]})
    [event] = frames(hub, 25)
    assert event["id"] == 26 and event["kind"] == "nodes" and event["nodes"] == [{"name": "alpha", "slots": 2}]
    # two streams are sent the same frame (encoded once)
    first, second = asyncio.run(hub.wait(25, 0.01)), asyncio.run(hub.wait(25, 0.01))
    assert first[0].encoded() is second[0].encoded()


def test_an_empty_hub_sends_nothing_and_a_waiting_stream_wakes_on_the_next_event():
    hub = EventHub()
    assert hub.last_id == 0 and frames(hub, 0) == []

    async def wait_then_publish() -> list:
        waiting = asyncio.ensure_future(hub.wait(0, timeout=30))
        await asyncio.sleep(0)  # the stream is waiting before the event comes
        hub.publish("job_done", {"job": "j1", "state": "done"})
        return await waiting

    [entry] = asyncio.run(wait_then_publish())
    assert entry.id == 1 and entry.event["kind"] == "job_done"
