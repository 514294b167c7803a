"""The OpenAPI document: built from the app's routes and the models the code validates with."""

from __future__ import annotations

import pytest

from config.settings import Settings
from tests.conftest import free_port


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    from webapp.app import create_app

    # Building the app and its document talks to no server: an unused port is fine.
    folder = tmp_path_factory.mktemp("openapi")
    return create_app(
        Settings(
            redis_url=f"redis://127.0.0.1:{free_port()}/0",
            data_dir=folder,
            storage_dir=folder / "storage",
            max_wait_s=7,
        )
    )


@pytest.fixture(scope="module")
def document(app):
    from webapp.openapi import build_document

    with app.app_context():
        return build_document(app)


def test_every_route_of_api_md_is_described_with_its_answers(document):
    paths = document["paths"]
    for path, method in [
        ("/v1/jobs", "post"),
        ("/v1/jobs/{job_id}", "get"),
        ("/v1/jobs/{job_id}", "delete"),
        ("/v1/models", "get"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
        ("/openapi.json", "get"),
    ]:
        assert method in paths.get(path, {}), (method, path)
    submit = paths["/v1/jobs"]["post"]
    assert {"200", "202", "400", "401", "403", "409", "413", "415", "422", "429", "503"} <= set(submit["responses"])
    assert set(submit["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    assert [p["name"] for p in submit["parameters"]] == ["Idempotency-Key", "Prefer", "Cancel-After"]
    cancel_after = submit["parameters"][2]["schema"]  # the header's form, as the service reads it
    assert cancel_after["pattern"].startswith("^") and cancel_after["maxLength"] == 32
    assert "Cancel-After" in [p["name"] for p in paths["/v1/batches"]["post"]["parameters"]]
    assert "cancel_at" in document["components"]["schemas"]["Job"]["properties"]
    read = paths["/v1/jobs/{job_id}"]["get"]
    assert {"200", "400", "401", "404", "429"} <= set(read["responses"])
    wait = next(p for p in read["parameters"] if p["name"] == "wait")
    assert wait["schema"]["maximum"] == 7  # from the settings, as the code checks it
    assert document["security"] == [{"bearer": []}] and paths["/healthz"]["get"]["security"] == []
    assert "Retry-After" in document["components"]["responses"]["429"]["headers"]


def test_the_request_schemas_are_the_validating_models_own(document):
    from domain.schemas import JobRequest

    schemas = document["components"]["schemas"]
    own = JobRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    assert schemas["JobRequest"] == {k: v for k, v in own.items() if k != "$defs"}
    for name, schema in own["$defs"].items():
        assert schemas[name] == schema
    json_body = schemas["JsonSubmission"]
    assert set(own["properties"]) | {"image"} == set(json_body["properties"])


def test_a_route_added_later_is_in_the_document_without_anyone_writing_it(tmp_path):
    from webapp.app import create_app
    from webapp.openapi import build_document

    app = create_app(Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", data_dir=tmp_path))

    def later(job_id: str):
        """Something new about a job."""

    app.add_url_rule("/v1/jobs/<job_id>/later", "later", later, methods=["GET"])
    with app.app_context():
        operation = build_document(app)["paths"]["/v1/jobs/{job_id}/later"]["get"]
    assert operation["summary"] == "Something new about a job."
    assert [p["name"] for p in operation["parameters"]] == ["job_id"]


def test_a_job_document_as_the_record_makes_it_fits_the_job_schema():
    from domain.documents import job_document
    from domain.records import JobRecord, JobState
    from webapp.openapi import Job

    record = JobRecord(
        id="a" * 32,
        tenant="acme",
        lane="batch",
        model="text-regions",
        input_key="k",
        image_sha256="",
        width=4,
        height=3,
        status=JobState.FAILED,
        started_at=1.0,
        finished_at=2.0,
        error={"code": "input", "message": "bad"},
    )
    result = {
        "width": 4,
        "height": 3,
        "instances": [
            {"mask": {"size": [3, 4], "counts": "04"}, "bbox": [0, 0, 2, 2], "area": 4, "score": 0.9, "label": "x"}
        ],
    }
    document = job_document(record, result)
    job = Job.model_validate(document)
    assert job.status == "failed" and job.error.code == "input" and job.result.instances[0].bbox == (0, 0, 2, 2)
    with pytest.raises(ValueError):
        Job.model_validate({**document, "status": "lost"})
