"""The service as ``make run`` starts it (the Procfile under honcho), used as the README says."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import redis
import requests

from tests.conftest import IMAGES, ROOT, VENV_BIN, free_port, require


def make_run(tmp_path, **settings) -> tuple[subprocess.Popen, dict, str]:
    """The Procfile under honcho, as `make run` starts it, on free ports and a data folder of its own."""
    port, flower = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKQ_")}
    env.update(
        MASKQ_DATA_DIR=str(tmp_path / "var"),
        MASKQ_PORT=str(port),
        MASKQ_FLOWER_PORT=str(flower),
        MASKQ_EMBEDDED_REDIS_PORT=str(free_port()),
        MASKQ_ORT_INTRA_OP_THREADS="2",
        MASKQ_WORKER_METRICS_PORT=str(free_port()),
        **{f"MASKQ_{k.upper()}": str(v) for k, v in settings.items()},
    )
    log = (tmp_path / "honcho.log").open("ab")
    honcho = subprocess.Popen(
        [str(VENV_BIN / "python"), "-m", "cli.procfile"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if requests.get(f"{base}/readyz", timeout=2).status_code == 200:
                return honcho, env, base
        except requests.RequestException:
            pass
        assert honcho.poll() is None, (tmp_path / "honcho.log").read_text()
        assert time.monotonic() < deadline, (tmp_path / "honcho.log").read_text()[-4000:]
        time.sleep(0.5)


def test_make_run_serves_the_readme_example_and_ctrl_c_stops_everything(tmp_path):
    require((IMAGES / "ch_en_num.jpg").is_file(), "the test images in tests/data/")
    honcho, env, base = make_run(tmp_path)
    flower = env["MASKQ_FLOWER_PORT"]
    try:
        key = (tmp_path / "var" / "dev-api-key").read_text().strip()
        assert "export MASKQ_API_KEY=" in (tmp_path / "honcho.log").read_text()
        headers = {"Authorization": f"Bearer {key}"}
        with (IMAGES / "ch_en_num.jpg").open("rb") as image:
            answer = requests.post(
                f"{base}/v1/jobs",
                headers=headers,
                files={"image": image},
                data={"request": '{"model": "text-regions", "prompts": {"text": ["促销"]}, "outputs": ["rle", "png"]}'},
            )
        assert answer.status_code == 202, answer.text
        job = requests.get(f"{base}/v1/jobs/{answer.json()['id']}?wait=30", headers=headers).json()
        assert job["status"] == "succeeded"
        instance = job["result"]["instances"][0]
        assert "促销" in instance["label"] and instance["mask"]["size"] == [430, 323]
        png = requests.get(instance["png_url"], headers=headers)
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        assert requests.get(f"http://127.0.0.1:{flower}/", timeout=5).status_code == 200
        # Metrics as an operator scrapes them: gunicorn's processes together (multiprocess mode) and the
        # service-wide job series on the web; the worker's own series on its port.
        web = requests.get(f"{base}/metrics", timeout=5).text
        assert 'maskq_jobs_ended_total{code="",lane="default",model="text-regions",outcome="succeeded"} 1.0' in web
        assert 'maskq_http_requests_total{method="POST",route="/v1/jobs",status="202"} 1.0' in web
        worker = requests.get(f"http://127.0.0.1:{env['MASKQ_WORKER_METRICS_PORT']}/metrics", timeout=5).text
        assert 'maskq_worker_inference_seconds_count{model="text-regions"} 1.0' in worker
    finally:
        children = list(psutil.Process(honcho.pid).children(recursive=True)) if honcho.poll() is None else []
        os.killpg(honcho.pid, signal.SIGINT)  # Ctrl-C in the terminal
        honcho.wait(60)
    _gone, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], [p.cmdline() for p in alive]
    # The embedded Redis wrote its append-only file where the settings say.
    assert list((tmp_path / "var" / "redis").rglob("*.aof"))


def test_ctrl_c_while_a_job_runs_lets_the_worker_record_it_before_redis_stops(tmp_path):
    """Redis stops last: the worker's warm shutdown ends the running job and records it.

    The job outlasts honcho's own 5 s (its stop grace unless `make run` sets another) with room to
    spare, as a first click on a cold machine does; it counts from the moment the record says running.
    """
    from domain import keys
    from runtime.embedded_redis import RedisServer
    from tests.support.slow_models import slow_manifest

    honcho, env, base = make_run(tmp_path, models_manifest=slow_manifest(tmp_path, delay_s=8), dev_key="true")
    key = (tmp_path / "var" / "dev-api-key").read_text().strip()
    with (IMAGES / "en.jpg").open("rb") as image:
        job_id = requests.post(
            f"{base}/v1/jobs", headers={"Authorization": f"Bearer {key}"}, files={"image": image}
        ).json()["id"]
    client = redis.Redis(port=int(env["MASKQ_EMBEDDED_REDIS_PORT"]))
    deadline = time.monotonic() + 60  # a cold machine: the first job's input, imports, a pool process
    while client.hget(keys.job(job_id), "status") != b"running":
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    os.killpg(honcho.pid, signal.SIGINT)  # Ctrl-C in the terminal, mid-job
    honcho.wait(120)
    log = (tmp_path / "honcho.log").read_text()
    assert "waiting for 1 running job(s) to end before stopping" in log
    assert "SIGKILL" not in log, log[-4000:]  # every process stopped on its own, in order
    with RedisServer(free_port(), tmp_path / "var" / "redis") as server:  # the data as Redis left it
        data = redis.Redis.from_url(server.url)
        record, unacked = data.hgetall(keys.job(job_id)), data.hlen(keys.BROKER_UNACKED)
    assert record[b"status"] == b"succeeded", record
    assert unacked == 0  # and its message was acknowledged before Redis went: it is not run again
