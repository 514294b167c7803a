"""The service as ``make run`` starts it (the Procfile under honcho), used as the README says."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import psutil
import requests

from tests.conftest import IMAGES, ROOT, VENV_BIN, free_port, require


def test_make_run_serves_the_readme_example_and_ctrl_c_stops_everything(tmp_path):
    require((IMAGES / "ch_en_num.jpg").is_file(), "the test images in tests/data/")
    port, flower = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MASKQ_")}
    env.update(MASKQ_DATA_DIR=str(tmp_path / "var"), MASKQ_PORT=str(port), MASKQ_FLOWER_PORT=str(flower),
               MASKQ_EMBEDDED_REDIS_PORT=str(free_port()), MASKQ_ORT_INTRA_OP_THREADS="2")
    log = (tmp_path / "honcho.log").open("wb")
    honcho = subprocess.Popen([str(VENV_BIN / "honcho"), "start", "-f", "Procfile"], cwd=ROOT, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if requests.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert honcho.poll() is None, (tmp_path / "honcho.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "honcho.log").read_text()[-4000:]
            time.sleep(0.5)
        key = (tmp_path / "var" / "dev-api-key").read_text().strip()
        assert "export MASKQ_API_KEY=" in (tmp_path / "honcho.log").read_text()
        headers = {"Authorization": f"Bearer {key}"}
        with (IMAGES / "ch_en_num.jpg").open("rb") as image:
            answer = requests.post(f"{base}/v1/jobs", headers=headers, files={"image": image},
                                   data={"request": '{"prompts": {"text": ["促销"]}, "outputs": ["rle", "png"]}'})
        assert answer.status_code == 202, answer.text
        job = requests.get(f"{base}/v1/jobs/{answer.json()['id']}?wait=30", headers=headers).json()
        assert job["status"] == "succeeded"
        instance = job["result"]["instances"][0]
        assert "促销" in instance["label"] and instance["mask"]["size"] == [430, 323]
        png = requests.get(instance["png_url"], headers=headers)
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        assert requests.get(f"http://127.0.0.1:{flower}/", timeout=5).status_code == 200
    finally:
        children = [p for p in psutil.Process(honcho.pid).children(recursive=True)] if honcho.poll() is None else []
        os.killpg(honcho.pid, signal.SIGINT)  # Ctrl-C in the terminal
        try:
            honcho.wait(60)
        finally:
            log.close()
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert alive == [], [p.cmdline() for p in alive]
    # The embedded Redis wrote its append-only file where the settings say.
    assert list((tmp_path / "var" / "redis").rglob("*.aof"))
