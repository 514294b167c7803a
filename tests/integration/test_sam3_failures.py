"""A SAM 3 export whose files are broken is a model that did not load, with the reason, never a crash loop.

One real worker serves text-regions and four copies of the tiny SAM 3 export, each broken in
one way a user's copy can be: a part cut in half (with the tool's sha256 in the manifest, and
without it, as a hand-written entry would be), the tokenizer missing, the tokenizer not JSON.
The front end must list each as unavailable with a reason naming the file; a job for one is a
``503`` at submit when its file is missing (no worker could run it) and a failed job with code
``model`` and the same reason when the file is there but bad; and the worker's process must stay
the same process, still serving text-regions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import image_bytes
from tests.integration.helpers import run_to_end, small_png, submit

TRUNCATED = "sam3-truncated"  # detector.onnx cut in half; the manifest has the tool's sha256
TRUNCATED_UNCHECKED = "sam3-truncated-unchecked"  # the same, no sha256: ONNX Runtime meets it
NO_TOKENIZER = "sam3-no-tokenizer"
BAD_TOKENIZER = "sam3-bad-tokenizer"  # not JSON, and no sha256 for it: the tokenizers package meets it
TEXT_REGIONS = "models.adapters.text_regions:TextRegionsAdapter"


def toml_value(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)  # strings, numbers, booleans: JSON's spelling is TOML's


def entry(name: str, base: dict, files: dict[str, str], sha256: dict[str, str]) -> str:
    fields = {k: base[k] for k in ("version", "adapter", "memory_mb")}
    lines = [f"[models.{name}]", *(f"{k} = {toml_value(v)}" for k, v in fields.items())]
    lines += [
        f"options = {toml_value(base['options'])}",
        f"sha256 = {toml_value(sha256)}",
        "files = " + toml_value(files),
    ]
    return "\n".join(lines) + "\n"


def broken_copies(tiny_sam3, folder: Path) -> dict[str, Path]:
    """The broken files, and the manifest serving text-regions and the four broken models."""
    base = tiny_sam3.entry()
    files, sha256 = base["files"], base["sha256"]
    folder.mkdir(parents=True, exist_ok=True)
    truncated = folder / "detector.onnx"
    data = Path(files["detector"]).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    bad_tokenizer = folder / "tokenizer.json"
    bad_tokenizer.write_text("<html><body>429 Too Many Requests</body></html>")  # what a failed download saves
    missing = folder / "gone" / "tokenizer.json"
    without_tokenizer_sha = {k: v for k, v in sha256.items() if k != "tokenizer"}
    manifest = folder / "models.toml"
    manifest.write_text(
        'default = "text-regions"\n\n'
        f'[models.text-regions]\nversion = "pp-ocrv4-det+rec"\nadapter = "{TEXT_REGIONS}"\n\n'
        + entry(TRUNCATED, base, dict(files, detector=str(truncated)), sha256)
        + entry(TRUNCATED_UNCHECKED, base, dict(files, detector=str(truncated)), {})
        + entry(NO_TOKENIZER, base, dict(files, tokenizer=str(missing)), sha256)
        + entry(BAD_TOKENIZER, base, dict(files, tokenizer=str(bad_tokenizer)), without_tokenizer_sha)
    )
    return {"manifest": manifest, "truncated": truncated, "bad_tokenizer": bad_tokenizer, "missing": missing}


@pytest.fixture(scope="module")
def broken(tmp_path_factory, base_env, tiny_sam3):
    from tests.conftest import IsolatedStack

    folder = tmp_path_factory.mktemp("sam3-broken")
    paths = broken_copies(tiny_sam3, folder / "files")
    stack = IsolatedStack.start(folder, base_env, MASKQ_MODELS_MANIFEST=str(paths["manifest"]))
    worker = stack.worker("sam3-broken")
    yield stack, worker, paths
    stack.close()


def models_by_name(client) -> dict[str, dict]:
    return {m["name"]: m for m in client.get("/v1/models").get_json()["models"]}


def test_each_broken_model_is_listed_unavailable_with_a_reason_naming_its_file(broken):
    stack, _, paths = broken
    models = models_by_name(stack.client())
    assert models["text-regions"]["available"] is True and "error" not in models["text-regions"]
    reasons = {
        TRUNCATED: ("detector file", str(paths["truncated"]), "corrupt or not the expected one", "sha256"),
        TRUNCATED_UNCHECKED: (str(paths["truncated"]), "INVALID_PROTOBUF"),
        NO_TOKENIZER: ("tokenizer file is missing",),
        BAD_TOKENIZER: ("tokenizer", str(paths["bad_tokenizer"])),
    }
    for name, words in reasons.items():
        model = models[name]
        assert model["available"] is False and model["loaded"] is False, model
        for word in words:
            assert word in model["error"], (name, model["error"])


def test_a_job_for_a_model_whose_file_is_missing_is_a_503_at_submit(broken):
    stack, _, _ = broken
    answer = submit(stack.client(), image_bytes("en.jpg"), {"model": NO_TOKENIZER, "prompts": {"text": ["cup"]}})
    assert answer.status_code == 503, answer.get_json()
    detail = answer.get_json()["detail"]
    assert f"'{NO_TOKENIZER}'" in detail and "tokenizer file is missing" in detail


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (TRUNCATED, "corrupt or not the expected one"),
        (TRUNCATED_UNCHECKED, "INVALID_PROTOBUF"),
        (BAD_TOKENIZER, "tokenizer"),
    ],
)
def test_a_job_for_a_model_whose_file_is_bad_fails_with_code_model_and_the_reason(broken, model, reason):
    stack, worker, paths = broken
    pool = set(worker.children())
    job = run_to_end(stack.client(), small_png(), {"model": model, "prompts": {"text": ["cup"]}})
    assert job["status"] == "failed" and job["error"]["code"] == "model", job
    message = job["error"]["message"]
    assert f"model '{model}'" in message and "failed to load" in message and reason in message, message
    assert str(paths["bad_tokenizer" if model == BAD_TOKENIZER else "truncated"]) in message
    assert worker.alive and set(worker.children()) == pool  # the job failed; the process did not


def test_the_worker_stays_the_same_process_and_keeps_serving_text_regions(broken):
    stack, worker, _ = broken
    pool = set(worker.children())
    for seed in range(2):
        job = run_to_end(stack.client(), small_png(seed), {"model": "text-regions"})
        assert job["status"] == "succeeded", job
    assert worker.alive and set(worker.children()) == pool  # no restart, no crash loop
    # Each broken model was tried once, at start: not once per job.
    assert worker.log().count(f"model {TRUNCATED_UNCHECKED} version") == 1, worker.log()[-3000:]
