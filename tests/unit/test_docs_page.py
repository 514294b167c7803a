"""``/docs/``'s headers and Swagger UI's settings, on the docs blueprint alone (the browser test is in e2e)."""

from __future__ import annotations

import json
import re

import pytest
from flask import Flask

from webapp import docs


@pytest.fixture
def client():
    app = Flask(__name__)
    docs.init_app(app)
    return app.test_client()


def test_the_docs_page_and_its_files_carry_a_csp_that_allows_scripts_from_this_origin_only(client):
    for path in ("/docs/", "/docs/maskq-docs.js", "/docs/swagger-ui-bundle.js", "/docs/swagger-ui.css"):
        answer = client.get(path)
        assert answer.status_code == 200, path
        policy = dict(part.strip().split(" ", 1) for part in answer.headers["Content-Security-Policy"].split(";"))
        assert policy["script-src"] == "'self'" and policy["default-src"] == "'self'", path
        assert "unsafe" not in answer.headers["Content-Security-Policy"]
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
    assert client.get("/docs").status_code in (301, 308)  # /docs leads to /docs/


def test_the_page_has_no_inline_script_and_loads_only_its_own_files(client):
    html = client.get("/docs/").get_data(as_text=True)
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all('src="/docs/' in attributes and not body.strip() for attributes, body in scripts)
    assert all(s.startswith("/docs/") for s in re.findall(r'(?:src|href)="([^"]+)"', html))


def test_swagger_ui_does_not_persist_the_key():
    assert docs.SWAGGER_UI_CONFIG["persistAuthorization"] is False
    assert docs.SWAGGER_UI_CONFIG["validatorUrl"] is None  # nothing from validator.swagger.io either


def test_the_start_script_hands_swagger_ui_that_configuration(client):
    script = client.get("/docs/maskq-docs.js").get_data(as_text=True)
    config = json.loads(re.search(r"(\{\"url\".*\})\)\);", script).group(1))
    assert config["persistAuthorization"] is False and config["url"] == "/openapi.json"
