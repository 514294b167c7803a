"""Event stream ids (webapp/events.py) and the client's text/event-stream parser (maskq/client.py)."""

from __future__ import annotations

import pytest

from domain.errors import InputError
from maskq.client import EventStreamParser


def test_job_event_ids_order_by_move_then_by_change_of_place_and_read_back():
    from webapp.events import JobEventId

    ids = [JobEventId(0), JobEventId(0, 1), JobEventId(0, 2), JobEventId(1), JobEventId(2, 1), JobEventId(3)]
    assert sorted([ids[3], ids[0], ids[5], ids[1], ids[4], ids[2]]) == ids
    assert [str(i) for i in ids] == ["0", "0.1", "0.2", "1", "2.1", "3"]
    assert [JobEventId.parse(str(i)) for i in ids] == ids
    for bad in ("", "-1", "1.", "a", "1.2.3", "1" * 10, "1-running"):
        with pytest.raises(InputError):
            JobEventId.parse(bad)


def test_batch_event_ids_grow_with_jobs_done_and_the_batch_status():
    from webapp.events import BatchEventId

    ids = ["0-receiving", "0-running", "2-running", "2-canceling", "5-canceled"]
    parsed = [BatchEventId.parse(i) for i in ids]
    assert [str(p) for p in parsed] == ids
    assert [p.order for p in parsed] == sorted(p.order for p in parsed)
    assert BatchEventId.parse("3-completed").order == BatchEventId.parse("3-canceled").order
    for bad in ("3", "3-done", "x-running", "3-RUNNING"):
        with pytest.raises(InputError):
            BatchEventId.parse(bad)


def test_an_event_is_one_data_line_of_json_with_its_id_and_type():
    from webapp.events import sse

    text = sse("2.1", "position", {"queue_position": 3, "note": "a\nb"})
    assert text == 'id: 2.1\nevent: position\ndata: {"queue_position": 3, "note": "a\\nb"}\n\n'


def test_the_parser_reads_events_split_anywhere_with_any_line_ending_and_skips_comments():
    stream = b'retry: 2500\r\n\r\n: keep-alive\n\nid: 0\nevent: state\ndata: {"a":\ndata:  1}\r\rid: 1\ndata: x\n\n'
    parser, events = EventStreamParser(), []
    for i in range(len(stream)):  # one byte at a time: a CRLF split in two is still one line end
        events += parser.feed(stream[i : i + 1])
    assert events == [("state", "0", '{"a":\n 1}'), ("message", "1", "x")]
    assert parser.retry_ms == 2500 and parser.last_id == "1"


def test_an_event_without_an_id_keeps_the_last_one_and_one_without_data_is_dropped():
    parser = EventStreamParser()
    assert parser.feed(b"id: 7\nevent: end\n\n") == []  # no data: nothing dispatched, but the id is kept
    assert parser.feed(b"data: {}\n\n") == [("message", "7", "{}")]
    assert parser.feed(b"id: bad\0id\ndata: 1\n\n") == [("message", "7", "1")]  # an id with NUL is ignored
