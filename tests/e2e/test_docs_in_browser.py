"""``/docs/`` in a real headless Chromium: Swagger UI runs under the page's strict Content-Security-Policy,
and a key typed into "Authorize" is not kept in the browser's storage.

The app is served on loopback by werkzeug in this process (the docs need no worker). Debian's
``chromium``, as in ``test_page.py``: without it the test is skipped, and fails under ``CI=true``.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest

from tests.conftest import require

KEY = "mq_docs_test_key_that_must_not_be_stored"


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "Playwright for Python (requirements-dev.txt)")
    executable = "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else shutil.which("chromium")
    require(executable is not None, "Debian's chromium (`make install-dev` installs it as root: apt-get)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def served(app):
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


def test_swagger_ui_runs_under_the_strict_csp_and_keeps_no_key_in_storage(browser, served):
    page = browser.new_page()
    refused: list[str] = []
    page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    page.add_init_script("""window.violations = [];
        document.addEventListener('securitypolicyviolation',
            e => window.violations.push(e.violatedDirective + ' ' + e.blockedURI));""")
    answer = page.goto(f"{served}/docs/")
    assert "script-src 'self'" in answer.headers["content-security-policy"]
    page.wait_for_selector(".opblock", timeout=30_000)  # the operations are listed: every script ran
    page.click(".auth-wrapper button.authorize")
    page.fill("#auth-bearer-value", KEY)
    page.click(".modal-ux button.modal-btn.authorize")
    page.wait_for_selector(
        ".modal-ux button[aria-label='Remove authorization']"
    )  # Swagger UI holds the key now (in memory)
    assert KEY in page.evaluate("JSON.stringify(window.ui.authSelectors.authorized().toJS())")
    assert KEY not in page.evaluate("JSON.stringify(Object.assign({}, localStorage, sessionStorage))")
    assert page.evaluate("window.violations") == [] and refused == []
    page.close()
