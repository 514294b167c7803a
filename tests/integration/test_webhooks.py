"""Signed webhooks to a real receiver process, delivered by a real worker, with retries, 410s and the SSRF guard.

The workers run with the test environment's squeezed schedule (five retries
0.2 s apart) and with loopback allowed, since the receivers listen there.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from standardwebhooks.webhooks import Webhook

from domain.records import JobRecord
from domain.webhook_urls import ForbiddenAddress, WebhookGuard
from stores.jobs import JobStore
from stores.webhooks import tenant_secret
from tests.conftest import authorized_client, free_port, image_bytes, settings_from
from tests.integration.helpers import submit
from tests.integration.webhook_receiver import Receiver
from workers.webhook_transport import guarded_session

pytestmark = pytest.mark.usefixtures("worker")

# What GET answers with when asked at the address the workers build file URLs from (no public_url: host:port).
BASE_URL = "http://127.0.0.1:8000"


@pytest.fixture
def receivers(tmp_path):
    started: list[Receiver] = []

    def start(responses=None, default=None, port=None) -> Receiver:
        receiver = Receiver(port or free_port(), tmp_path, responses, default).start()
        started.append(receiver)
        return receiver

    yield start
    for receiver in started:
        receiver.stop()


@pytest.fixture(scope="module")
def image():
    return image_bytes("empty_black.jpg")


def submit_with_hook(client, image, url, events=None) -> str:
    hook = {"url": url} if events is None else {"url": url, "events": events}
    answer = submit(client, image, {"webhook": hook})
    assert answer.status_code == 202, answer.get_json()
    return answer.get_json()["id"]


def job(client, job_id: str, wait: int = 30) -> dict:
    return client.get(f"/v1/jobs/{job_id}?wait={wait}", base_url=BASE_URL).get_json()


def deliveries(client, job_id: str) -> list[dict]:
    answer = client.get(f"/v1/jobs/{job_id}/deliveries")
    assert answer.status_code == 200, answer.get_json()
    return answer.get_json()["deliveries"]


def wait_for_delivery(client, job_id: str, status: str, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = deliveries(client, job_id)
        if found and found[-1]["status"] == status:
            return found[-1]
        assert time.monotonic() < deadline, f"no delivery of job {job_id} became {status}: {found}"
        time.sleep(0.05)


def verified(redis_client, settings, request: dict) -> dict:
    """The body of a received request, if its signature verifies with the tenant's secret."""
    secret = tenant_secret(redis_client, "default", settings.webhook_secret)
    return Webhook(secret).verify(request["body"], request["headers"])


def test_the_receiver_gets_job_succeeded_equal_to_get_and_signed(client, image, receivers, redis_client, settings):
    receiver = receivers()
    job_id = submit_with_hook(client, image, receiver.url, ["job.started", "job.succeeded"])
    got = receiver.wait_for(2)
    by_event = {r["headers"]["maskq-event"]: r for r in got}
    assert set(by_event) == {"job.started", "job.succeeded"}
    assert job(client, job_id)["status"] == "succeeded"
    assert verified(redis_client, settings, by_event["job.succeeded"]) == job(client, job_id)
    assert verified(redis_client, settings, by_event["job.started"])["status"] == "running"
    headers = by_event["job.succeeded"]["headers"]
    assert headers["webhook-id"].startswith("msg_") and abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    assert headers["content-type"] == "application/json"
    assert by_event["job.started"]["headers"]["webhook-id"] != headers["webhook-id"]


def test_a_tampered_body_does_not_verify(client, image, receivers, redis_client, settings):
    receiver = receivers()
    submit_with_hook(client, image, receiver.url)
    request = receiver.wait_for(1)[0]
    request["body"] = request["body"].replace("succeeded", "failed")
    with pytest.raises(Exception, match="signature"):
        verified(redis_client, settings, request)


def test_a_job_gets_only_the_events_it_asked_for(client, image, receivers):
    receiver = receivers()
    only_failures = submit_with_hook(client, image, receiver.url, ["job.failed"])
    successes = submit_with_hook(client, image, receiver.url, ["job.succeeded"])
    wait_for_delivery(client, successes, "succeeded")
    # The one worker ran the first job (and would have queued its event) before the second.
    assert job(client, only_failures)["status"] == "succeeded"
    assert [json.loads(r["body"])["id"] for r in receiver.received()] == [successes]
    assert deliveries(client, only_failures) == []


def test_a_receiver_that_fails_three_times_gets_the_event_on_the_fourth_attempt(client, image, receivers):
    receiver = receivers([{"status": 500}, {"status": 500}, {"status": 500}])
    job_id = submit_with_hook(client, image, receiver.url)
    delivery = wait_for_delivery(client, job_id, "succeeded")
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 500, 500, 200]
    assert [a["error"] for a in delivery["attempts"]] == ["HTTP 500"] * 3 + [None]
    got = receiver.received()
    assert len(got) == 4
    assert len({r["headers"]["webhook-id"] for r in got}) == 1  # one message, retried: receivers can deduplicate
    assert len({r["body"] for r in got}) == 1
    assert job(client, job_id)["status"] == "succeeded"


def test_retry_after_is_honoured(client, image, receivers):
    receiver = receivers([{"status": 503, "headers": {"Retry-After": "2"}}])
    job_id = submit_with_hook(client, image, receiver.url)
    first, second = receiver.wait_for(2)
    assert second["at"] - first["at"] >= 2.0  # the schedule alone would have waited 0.2 s
    assert wait_for_delivery(client, job_id, "succeeded")["attempts"][0]["status_code"] == 503


def test_a_receiver_down_for_the_whole_schedule_leaves_the_job_succeeded_and_can_get_it_again(
    client, image, receivers, settings
):
    port = free_port()
    job_id = submit_with_hook(client, image, f"http://127.0.0.1:{port}/hooks/maskq")
    delivery = wait_for_delivery(client, job_id, "failed")
    attempts = delivery["attempts"]
    assert len(attempts) == 1 + len(settings.webhook_retry_schedule_s)
    assert all(a["status_code"] is None and "ConnectionError" in a["error"] and a["at"] for a in attempts)
    assert job(client, job_id)["status"] == "succeeded"

    receiver = receivers(port=port)
    answer = client.post(f"/v1/jobs/{job_id}/deliveries/redeliver")
    assert answer.status_code == 202 and answer.get_json()["redelivered"] == [delivery["id"]]
    (request,) = receiver.wait_for(1)
    assert request["headers"]["webhook-id"] == delivery["id"]
    again = wait_for_delivery(client, job_id, "succeeded")
    assert [a["status_code"] for a in again["attempts"]][-1] == 200
    assert len(again["attempts"]) == len(attempts) + 1
    assert client.post(f"/v1/jobs/{job_id}/deliveries/redeliver").status_code == 409  # nothing failed now


def test_a_410_stops_further_attempts_to_that_url(client, image, receivers):
    receiver = receivers(default={"status": 410})
    first = submit_with_hook(client, image, receiver.url)
    delivery = wait_for_delivery(client, first, "disabled")
    assert [a["status_code"] for a in delivery["attempts"]] == [410]
    second = submit_with_hook(client, image, receiver.url)
    skipped = wait_for_delivery(client, second, "disabled")
    assert skipped["attempts"][0]["status_code"] is None and "410" in skipped["attempts"][0]["error"]
    assert len(receiver.received()) == 1


def test_a_failed_job_and_a_canceled_job_send_their_events(client, image, receivers, redis_client, settings, app):
    receiver = receivers()
    store = JobStore(redis_client, 3600)
    hook = {"url": receiver.url, "events": ["job.failed", "job.canceled"]}
    ids = []
    for _ in range(2):
        ids.append(uuid.uuid4().hex)
        store.create(
            JobRecord(
                id=ids[-1],
                tenant="default",
                lane="default",
                model="text-regions",
                input_key=f"tenants/default/jobs/{ids[-1]}/input.jpg",  # never stored
                image_sha256="",
                width=8,
                height=8,
                request={"webhook": hook},
            )
        )
    failing, canceled = ids
    assert client.delete(f"/v1/jobs/{canceled}").status_code == 200
    app.extensions["maskq"].celery.send_task("maskq.run_job", args=[failing], queue="default", task_id=failing)
    got = {r["headers"]["maskq-event"]: r for r in receiver.wait_for(2)}
    assert set(got) == {"job.failed", "job.canceled"}
    assert verified(redis_client, settings, got["job.canceled"]) == job(client, canceled)
    failed = verified(redis_client, settings, got["job.failed"])
    assert failed == job(client, failing) and failed["status"] == "failed" and failed["error"]["code"]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost:9/hook",
        "http://10.0.0.1/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/hook",
        # Numeric forms that inet_aton (and so getaddrinfo) reads as 127.0.0.1, and IPv4-translated ones.
        "http://0x7f000001:9/hook",
        "http://2130706433:9/hook",
        "http://127.1:9/hook",
        "http://0177.0.0.1:9/hook",
        "http://[::ffff:0:7f00:1]/hook",
        "http://[::ffff:0:a9fe:a9fe]/latest/meta-data/",
        "http://[fec0::1]/hook",
    ],
)
def test_a_webhook_url_pointing_at_a_private_address_is_a_422_without_the_allow_list(
    base_env, redis_client, image, url
):
    from webapp.app import create_app

    app = create_app(settings_from(base_env, webhook_allowed_networks=()))
    answer = submit(authorized_client(app), image, {"webhook": {"url": url}})
    assert answer.status_code == 422 and answer.mimetype == "application/problem+json"
    assert [e["field"] for e in answer.get_json()["errors"]] == ["webhook.url"]
    assert not list(redis_client.scan_iter(match="maskq:job:*"))  # nothing was accepted


@pytest.mark.parametrize(
    "url",
    [
        "http://0x0a000001/hook",
        "http://167772161/hook",
        "http://10.1/hook",  # 10.0.0.1
        "http://0251.0376.0251.0376/latest/meta-data/",  # 169.254.169.254
        "http://[::ffff:0:7f00:1]:9/hook",  # IPv4-translated 127.0.0.1: a translator elsewhere picks the peer
        "http://08/hook",  # ends in a number yet is no address
    ],
)
def test_with_loopback_allowed_numeric_and_translated_forms_of_other_addresses_are_a_422(
    client, redis_client, image, url
):
    answer = submit(client, image, {"webhook": {"url": url}})
    assert answer.status_code == 422 and answer.mimetype == "application/problem+json"
    assert [e["field"] for e in answer.get_json()["errors"]] == ["webhook.url"]
    assert not list(redis_client.scan_iter(match="maskq:job:*"))  # refused before any job existed


def test_the_address_is_checked_again_at_delivery(base_env, image, redis_client):
    from webapp.app import create_app

    # This front end allows 10.0.0.0/8; the workers (loopback only) must still refuse it, without connecting.
    app = create_app(settings_from(base_env, webhook_allowed_networks="10.0.0.0/8,127.0.0.0/8"))
    client = authorized_client(app)
    job_id = submit_with_hook(client, image, "http://10.255.255.1:9/hook")
    delivery = wait_for_delivery(client, job_id, "failed")
    assert len(delivery["attempts"]) == 1  # refused for good, not retried
    assert "not allowed" in delivery["attempts"][0]["error"]


def test_the_guarded_connection_refuses_a_name_that_resolves_to_loopback(receivers):
    receiver = receivers()
    with guarded_session(WebhookGuard()) as session, pytest.raises(ForbiddenAddress):
        session.post(f"http://localhost:{receiver.port}/hooks/maskq", data=b"{}", timeout=2)
    with guarded_session(WebhookGuard(("127.0.0.0/8",))) as session:
        assert session.post(f"http://localhost:{receiver.port}/hooks/maskq", data=b"{}", timeout=2).status_code == 200
    assert len(receiver.received()) == 1  # only the allowed one connected


def test_deliveries_of_an_unknown_job_are_a_404(client):
    assert client.get(f"/v1/jobs/{'0' * 32}/deliveries").status_code == 404
    assert client.post(f"/v1/jobs/{'0' * 32}/deliveries/redeliver").status_code == 404


def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_attempts_deadline(redis_client, settings):
    """Socket timeouts bound each read; a byte every 0.2 s would pass them all. The attempt has a total limit."""
    import socket
    import threading

    import requests

    from domain.webhooks import Message
    from workers.webhook_delivery import _post

    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Slow: " + b"." * 40 + b"\r\n\r\n"
    sent = []
    listener = socket.create_server(("127.0.0.1", 0))

    def trickle() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)
        try:
            for byte in answer:
                conn.sendall(bytes([byte]))
                sent.append(byte)
                time.sleep(0.2)
        except OSError:
            pass  # the client gave up and shut the connection
        conn.close()

    threading.Thread(target=trickle, daemon=True).start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/hooks/maskq"
    message = Message(
        id="msg_trickle",
        job_id="0" * 32,
        tenant="default",
        event="job.succeeded",
        url=url,
        body="{}",
        status="pending",
        generation=0,
        created_at=time.time(),
        expires_at=time.time() + 60,
    )
    with pytest.raises(requests.Timeout, match="the whole attempt"):
        _post(message, "{}", settings.model_copy(update={"webhook_timeout_s": 1.0}), redis_client)
    time.sleep(0.5)
    assert len(sent) < len(answer) / 2  # cut off after about a second, not after the whole answer (~18 s)
    listener.close()


def test_under_steady_load_a_callback_is_sent_by_the_webhooks_worker_before_the_lanes_drain(
    isolated, receivers, image, tmp_path
):
    """As `make run` starts them: inference on the lanes, deliveries on a worker of their own (no models)."""
    from tests.conftest import procfile_queues
    from tests.integration.helpers import small_png, submit, wait_for
    from tests.support.slow_models import slow_manifest

    lanes, hooks = procfile_queues("worker"), procfile_queues("webhooks")
    assert "webhooks" not in lanes.split(",") and hooks == "webhooks"
    receiver = receivers()
    isolated.worker("lanes", queues=lanes, MASKQ_MODELS_MANIFEST=slow_manifest(tmp_path, delay_s=2))
    isolated.worker("hooks", queues=hooks, MASKQ_WORKER_LOADS_MODELS="false")
    client = isolated.client()
    first = submit_with_hook(client, image, receiver.url)
    backlog = [submit(client, small_png(i)).get_json()["id"] for i in range(4)]
    wait_for(lambda: receiver.received(), 30)
    assert receiver.received()[0]["headers"]["maskq-event"] == "job.succeeded"
    assert job(client, first, wait=0)["status"] == "succeeded"
    statuses = [job(client, job_id, wait=0)["status"] for job_id in backlog]
    assert any(s in ("queued", "running") for s in statuses), statuses  # the lanes were still busy


def test_a_webhook_host_name_is_not_looked_up_in_the_request_thread(client, image, monkeypatch):
    import socket

    looked_up = []
    real = socket.getaddrinfo

    def recording(host, *args, **kwargs):
        looked_up.append(host)
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", recording)
    # An event that never fires (the job is never canceled): no delivery is ever attempted to that name.
    answer = submit(
        client, image, {"webhook": {"url": "https://hooks.example.invalid/maskq", "events": ["job.canceled"]}}
    )
    assert answer.status_code == 202, answer.get_json()
    assert "hooks.example.invalid" not in looked_up
