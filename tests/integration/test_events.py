"""Live progress as Server-Sent Events (webapp/events.py), read over real HTTP from the app in a threaded server.

Jobs that must stay queued run on an isolated Redis with no worker; the rest on real worker processes.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import requests
from werkzeug.serving import make_server

from maskq.client import Client, EventStreamParser
from tests.conftest import authorized_client, image_bytes
from tests.integration.helpers import small_png, wait_for
from tests.support.slow_models import slow_manifest


@contextlib.contextmanager
def serving(app):
    """``app`` in a real threaded HTTP server on a free port (HTTP/1.1, chunked answers, as gunicorn's)."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="events-server", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(5)


@contextlib.contextmanager
def live(stack, **overrides):
    """The stack's app served over HTTP: ``(url, headers of a key of tenant "default", the app)``."""
    from webapp.app import create_app

    app = create_app(stack.settings(**overrides))
    key = authorized_client(app).api_key
    with serving(app) as url:
        yield url, {"Authorization": f"Bearer {key}"}, app


def submit(url: str, headers: dict, image: bytes | None = None, request: dict | None = None) -> dict:
    answer = requests.post(
        f"{url}/v1/jobs",
        headers=headers,
        timeout=30,
        files={"image": ("upload.png", image or small_png())},
        data={"request": json.dumps(request or {})},
    )
    assert answer.status_code in (200, 202), answer.text
    return answer.json()


def open_stream(url: str, path: str, headers: dict, last_event_id: str | None = None) -> requests.Response:
    extra = {"Last-Event-ID": last_event_id} if last_event_id is not None else {}
    return requests.get(f"{url}{path}", headers={**headers, **extra}, stream=True, timeout=30)


def read_events(answer: requests.Response, most: int | None = None) -> list[dict]:
    """The stream's events, each ``{"id", "event", "data"}``, until it closes (or ``most`` have come).

    One reader per answer, kept on it: a half-read ``iter_content`` that is dropped closes the connection.
    """
    if not hasattr(answer, "events"):
        answer.events = _events(answer)
    events = []
    for event in answer.events:
        events.append(event)
        if most is not None and len(events) >= most:
            break
    return events


def _events(answer: requests.Response):
    parser = EventStreamParser()
    for chunk in answer.iter_content(chunk_size=None):
        for name, event_id, data in parser.feed(chunk):
            yield {"id": event_id, "event": name, "data": json.loads(data)}


def test_a_jobs_stream_shows_queued_running_and_succeeded_then_closes_with_the_final_document(isolated, tmp_path):
    isolated.worker(MASKQ_MODELS_MANIFEST=slow_manifest(tmp_path, delay_s=1.5))
    with live(isolated) as (url, headers, _):
        first = submit(url, headers, small_png(1))
        second = submit(url, headers, small_png(2))  # waits behind the first: the worker runs one at a time
        answer = open_stream(url, f"/v1/jobs/{second['id']}/events", headers)
        assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/event-stream")
        assert answer.headers["Cache-Control"] == "no-cache"
        events = read_events(answer)  # returns once the server closes the stream
    states = [e["data"]["status"] for e in events if e["event"] in ("state", "end")]
    assert states == ["queued", "running", "succeeded"], events
    assert events[0]["data"]["queue_position"] == 0 and events[0]["data"]["id"] == second["id"]
    end = events[-1]
    assert end["event"] == "end" and end["data"]["result"]["width"] == 64
    assert end["data"]["finished_at"] and end["data"]["metrics"]["total"] > 0
    # Ids are the job's own sequence of moves: as submitted, started, ended.
    assert [e["id"] for e in events if e["event"] in ("state", "end")] == ["0", "1", "2"]
    assert first["id"] != second["id"]


def test_a_queued_jobs_stream_follows_its_place_and_resumes_after_last_event_id_without_repeating(isolated):
    with live(isolated) as (url, headers, _):
        jobs = [submit(url, headers, small_png(n)) for n in range(3)]  # no worker: all stay queued
        path = f"/v1/jobs/{jobs[2]['id']}/events"
        answer = open_stream(url, path, headers)
        [queued] = read_events(answer, most=1)
        assert (queued["id"], queued["event"], queued["data"]["queue_position"]) == ("0", "state", 2)
        assert requests.delete(f"{url}/v1/jobs/{jobs[0]['id']}", headers=headers, timeout=10).status_code == 200
        [moved] = read_events(answer, most=1)
        assert (moved["id"], moved["event"], moved["data"]["queue_position"]) == ("0.1", "position", 1)
        answer.close()  # the client goes away; the job moves on without it

        isolated.jobs().start(jobs[2]["id"], "v1", worker="test:1")  # as a worker starts it
        answer = open_stream(url, path, headers, last_event_id="0.1")
        [running] = read_events(answer, most=1)
        assert (running["id"], running["event"], running["data"]["status"]) == ("1", "state", "running")
        assert requests.delete(f"{url}/v1/jobs/{jobs[2]['id']}", headers=headers, timeout=10).status_code == 200
        rest = read_events(answer)
        assert [(e["id"], e["event"], e["data"]["status"]) for e in rest] == [("2", "end", "canceled")]

        # The end seen: 204, which tells an EventSource to stop reconnecting. Seen up to "running": the end.
        assert open_stream(url, path, headers, last_event_id="2").status_code == 204
        assert [e["id"] for e in read_events(open_stream(url, path, headers, last_event_id="1"))] == ["2"]
        for bad in ("3", "x", "1.2.3", "9" * 12):
            refused = open_stream(url, path, headers, last_event_id=bad)
            assert refused.status_code == 400 and "Last-Event-ID" in refused.json()["detail"], bad

        # Reconnecting within a move: the place now, as a new event (0.2), never the state event again.
        answer = open_stream(url, f"/v1/jobs/{jobs[1]['id']}/events", headers, last_event_id="0.1")
        [snapshot] = read_events(answer, most=1)
        assert (snapshot["id"], snapshot["event"], snapshot["data"]["queue_position"]) == ("0.2", "position", 0)
        answer.close()


def test_another_tenants_job_and_batch_streams_are_404(isolated):
    with live(isolated) as (url, headers, app):
        job = submit(url, headers)
        batch = requests.post(
            f"{url}/v1/batches",
            headers=headers,
            timeout=30,
            files=[("images", ("a.png", small_png(1)))],
            data={"request": "{}"},
        ).json()
        stranger = {"Authorization": f"Bearer {authorized_client(app, tenant='other').api_key}"}
        for path in (f"/v1/jobs/{job['id']}/events", f"/v1/batches/{batch['id']}/events"):
            answer = open_stream(url, path, stranger)
            assert answer.status_code == 404 and answer.headers["Content-Type"] == "application/problem+json", path
        assert open_stream(url, f"/v1/jobs/{'0' * 32}/events", headers).status_code == 404


def test_streams_count_against_the_keys_waits_and_a_closed_one_frees_its_slot(isolated):
    with live(isolated, max_waits_per_key=2, stream_heartbeat_s=0.3) as (url, headers, _):
        job = submit(url, headers)
        path = f"/v1/jobs/{job['id']}/events"
        held = [open_stream(url, path, headers) for _ in range(2)]
        assert [a.status_code for a in held] == [200, 200]
        refused = open_stream(url, path, headers)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert "MASKQ_MAX_WAITS_PER_KEY" in refused.json()["detail"]
        # A long poll shares the bound: this key's threads are held by its streams.
        assert requests.get(f"{url}/v1/jobs/{job['id']}?wait=1", headers=headers, timeout=10).status_code == 429

        held[0].close()  # the server finds the client gone at its next write (a heartbeat) and frees the slot
        again = wait_for(
            lambda: (a := open_stream(url, path, headers)).status_code == 200 and a, timeout=10, interval=0.3
        )
        again.close()
        held[1].close()


def test_a_stream_sends_heartbeats_and_closes_after_its_longest_time_without_an_end(isolated):
    with live(isolated, max_stream_s=2, stream_heartbeat_s=0.4) as (url, headers, _):
        job = submit(url, headers)
        began = time.monotonic()
        answer = open_stream(url, f"/v1/jobs/{job['id']}/events", headers)
        body = b"".join(answer.iter_content(chunk_size=None)).decode()
        took = time.monotonic() - began
    assert 1.5 < took < 6, took
    assert body.count(": keep-alive") >= 2 and "event: end" not in body
    assert body.startswith("retry: 1000") and "event: state" in body


def test_a_batchs_stream_reports_progress_and_ends_with_the_completed_batch(isolated):
    isolated.worker()
    with live(isolated) as (url, headers, _):
        batch = requests.post(
            f"{url}/v1/batches",
            headers=headers,
            timeout=30,
            files=[("images", (f"{n}.png", small_png(n))) for n in range(3)],
            data={"request": "{}"},
        ).json()
        path = f"/v1/batches/{batch['id']}/events"
        events = read_events(open_stream(url, path, headers))
        end = events[-1]
        assert end["event"] == "end" and end["data"]["status"] == "completed", events
        assert end["data"]["done"] == end["data"]["total"] == 3 and len(end["data"]["jobs"]) == 3
        assert end["id"] == "3-completed"
        assert all(e["event"] == "progress" and "jobs" not in e["data"] for e in events[:-1])
        done = [e["data"]["done"] for e in events]
        assert done == sorted(done) and len({e["id"] for e in events}) == len(events)  # ids only grow
        assert open_stream(url, path, headers, last_event_id=end["id"]).status_code == 204
        resumed = read_events(open_stream(url, path, headers, last_event_id="1-running"))
        assert [e["id"] for e in resumed] == ["3-completed"]


def test_the_clients_wait_follows_the_stream_across_the_servers_reconnects(isolated, tmp_path):
    isolated.worker(MASKQ_MODELS_MANIFEST=slow_manifest(tmp_path, delay_s=1.5))
    with live(isolated, max_stream_s=1) as (url, headers, _):  # the server cuts every stream after a second
        key = headers["Authorization"].split()[1]
        client = Client(url, key)
        asked = []
        client.session.hooks["response"].append(lambda r, *a, **k: asked.append(r.request.path_url))
        first = client.submit(image_bytes("en.jpg"))
        second = client.submit(small_png(3))
        events = list(client.events(second.id))
        ids = [e.id for e in events]
        assert len(ids) == len(set(ids)), ids  # resumed with Last-Event-ID: nothing seen twice
        assert [e.data["status"] for e in events if e.event != "position"][-2:] == ["running", "succeeded"]
        assert events[-1].event == "end"
        assert asked.count(f"/v1/jobs/{second.id}/events") >= 2  # it did reconnect
        job = client.wait(first.id, timeout=30)
        assert job.succeeded and job.instances
        assert not any("wait=" in path for path in asked)  # no long poll: the stream was enough


def test_the_clients_wait_long_polls_when_the_server_has_no_stream_to_spare(isolated, tmp_path):
    isolated.worker(MASKQ_MODELS_MANIFEST=slow_manifest(tmp_path, delay_s=1))
    # Two threads: one stream per web process, the rest answer short requests.
    with live(isolated, web_threads=2) as (url, headers, _):
        client = Client(url, headers["Authorization"].split()[1])
        job = client.submit(small_png(4))
        taken = open_stream(url, f"/v1/jobs/{job.id}/events", headers)
        assert taken.status_code == 200
        refused = open_stream(url, f"/v1/jobs/{job.id}/events", headers)
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        asked = []
        client.session.hooks["response"].append(lambda r, *a, **k: asked.append((r.request.path_url, r.status_code)))
        assert client.wait(job.id, timeout=30).succeeded
        assert (f"/v1/jobs/{job.id}/events", 503) in asked and any("wait=" in path for path, _ in asked)
        taken.close()
