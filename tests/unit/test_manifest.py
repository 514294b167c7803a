"""The model manifest: validation errors, fp16 files, providers, change detection; and what a
worker process makes of it (load, swap, fallback) with toy adapters: pure logic, no processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from config.settings import Settings
from domain.errors import ModelError
from models.adapters.base import ModelSpec, RuntimeOptions
from models.catalog import LiveCatalog, ModelCatalog, describe_models
from models.manifest import ManifestError, ManifestFile, read_manifest
from workers.loaded_models import LoadedModels

ROOT = Path(__file__).resolve().parents[2]
TEXT = "models.adapters.text_regions:TextRegionsAdapter"
TOY = "tests.support.toy_models:ToyAdapter"
BOXES = "tests.support.toy_models:ToyBoxesAdapter"
# A model whose files come from a package, one of them converted at install time (%s: the convert table).
SOURCED = (
    '[models.a]\nversion = "1"\nadapter = "models.adapters.detector:DetectorAdapter"\n'
    'files = { graph = "g.json", model = "m.onnx" }\n'
    'sha256 = { graph = "' + "a" * 64 + '", model = "' + "b" * 64 + '" }\n'
    '[models.a.source]\nnpm = "pkg@1.0.0"\nsha256 = "' + "c" * 64 + '"\n'
    'members = { graph = "package/g.json" }\n%s\n'
)


def write(path: Path, text: str) -> Path:
    """Replace the file atomically, as an operator's deploy tool should."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def manifest(tmp_path: Path, body: str, name: str = "models.toml") -> Path:
    return write(tmp_path / name, body)


def test_the_bundled_manifest_serves_text_regions_by_default():
    catalog = ModelCatalog.load(ROOT / "config" / "models.toml")
    assert catalog.default == "text-regions"
    spec = catalog.spec(None)
    assert spec.adapter == TEXT and spec.max_batch_size == 1 and spec.fallback is None
    assert spec.providers is None  # the deployment's MASKQ_ORT_PROVIDERS apply


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            '[models.a]\nversion = "1"\nadapter = "%s"\nmax_batch = 4\n' % TEXT,
            "model 'a': field 'max_batch': unknown field (known: version, adapter,",
        ),
        (
            '[models.a]\nversion = "1"\nadapter = "%s"\nmax_batch_size = 0\n' % TEXT,
            "model 'a': field 'max_batch_size': Input should be greater than or equal to 1",
        ),
        ('[models.a]\nadapter = "%s"\n' % TEXT, "model 'a': field 'version': Field required"),
        (
            '[models.a]\nversion = ""\nadapter = "%s"\n' % TEXT,
            "model 'a': field 'version': String should have at least 1",
        ),
        (
            '[models.a]\nversion = "1"\nadapter = "text_regions"\n',
            "model 'a': field 'adapter': String should match pattern",
        ),
        (
            '[models.a]\nversion = "1"\nadapter = "no.such.module:Thing"\n',
            "model 'a': field 'adapter': cannot import 'no.such.module:Thing': ModuleNotFoundError",
        ),
        (
            '[models.a]\nversion = "1"\nadapter = "models.adapters.base:Prompts"\n',
            "model 'a': field 'adapter': 'models.adapters.base:Prompts' is not a ModelAdapter subclass",
        ),
        (
            '[models.a]\nversion = "1"\nadapter = "%s"\nproviders = ["GPU"]\n' % TEXT,
            "model 'a': field 'providers': unknown provider 'GPU'",
        ),
        (
            '[models.a]\nversion = "1"\nadapter = "%s"\nproviders = ["CUDA", "CUDAExecutionProvider"]\n' % TEXT,
            "model 'a': field 'providers': lists a provider twice",
        ),
        (
            '[models.a]\nversion = "1"\nadapter = "%s"\nproviders = []\n' % TEXT,
            "model 'a': field 'providers': Tuple should have at least 1 item",
        ),
        (
            '[models.a]\nversion = "1"\nadapter = "%s"\nfp16 = "sometimes"\n' % TEXT,
            "model 'a': field 'fp16': Input should be a valid boolean",
        ),
        (
            '[models.a]\nversion = "1"\nadapter = "%s"\nmemory_mb = -5\n' % TEXT,
            "model 'a': field 'memory_mb': Input should be greater than 0",
        ),
        (
            '[models.a]\nversion = "1"\nadapter = "%s"\nsoft_time_limit_s = 9\nhard_time_limit_s = 3\n' % TEXT,
            "model 'a': soft_time_limit_s (9.0) must be below hard_time_limit_s (3.0)",
        ),
        (
            '[models.a]\nversion = "1"\nadapter = "%s"\nfallback = "b"\n' % TEXT,
            "model 'a': field 'fallback': 'b' is not a model of this manifest (a)",
        ),
        (
            '[models.a]\nversion = "1"\nadapter = "%s"\nfallback = "a"\n' % TEXT,
            "model 'a': field 'fallback': the fallbacks form a cycle: a -> a",
        ),
        (
            '[models.a]\nversion = "1"\nadapter = "%s"\nfallback = "b"\n'
            '[models.b]\nversion = "1"\nadapter = "%s"\nfallback = "c"\n'
            '[models.c]\nversion = "1"\nadapter = "%s"\nfallback = "b"\n' % (TEXT, TEXT, TEXT),
            "model 'b': field 'fallback': the fallbacks form a cycle: b -> c -> b",
        ),
        (
            'default = "zzz"\n[models.a]\nversion = "1"\nadapter = "%s"\n' % TEXT,
            "default: 'zzz' is not a model of this manifest (a)",
        ),
        ('[models."a b"]\nversion = "1"\nadapter = "%s"\n' % TEXT, "model 'a b': a name is 1-64 letters"),
        ('default = "a"\n', "field 'models': Field required"),
        ("[models]\n", "field 'models': Dictionary should have at least 1 item"),
        (
            'defualt = "a"\n[models.a]\nversion = "1"\nadapter = "%s"\n' % TEXT,
            "field 'defualt': unknown field (known: default, routes, models)",
        ),
        ('[models.a\nversion = "1"\n', "not a readable TOML/YAML model manifest"),
        (
            SOURCED % 'convert = { format = "tfjs-graph-model", graph = "model", output = "graph" }',
            "model 'a': source.convert.graph 'model' is not one of source.members",
        ),
        (
            SOURCED % 'convert = { format = "tfjs-graph-model", graph = "graph", output = "graph" }',
            "model 'a': source.convert.output 'graph' must name a file of 'files' that is not fetched",
        ),
        (
            (SOURCED % 'convert = { format = "tfjs-graph-model", graph = "graph", output = "model" }').replace(
                ', model = "' + "b" * 64 + '"', ""
            ),
            "model 'a': a converted file needs its sha256: give sha256.model",
        ),
        (
            SOURCED % 'convert = { format = "keras", graph = "graph", output = "model" }',
            "model 'a': field 'source.convert.format': Input should be 'tfjs-graph-model'",
        ),
    ],
)
def test_an_invalid_manifest_is_refused_naming_the_model_and_the_field(tmp_path, body, expected):
    path = manifest(tmp_path, body)
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert expected in str(caught.value)
    assert str(path) in str(caught.value)


def test_every_problem_of_a_manifest_is_listed_at_once(tmp_path):
    path = manifest(
        tmp_path,
        '[models.a]\nversion = "1"\nadapter = "%s"\nmax_batch_size = 0\n'
        '[models.b]\nadapter = "%s"\nfp16 = "x"\n' % (TEXT, TEXT),
    )
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    message = str(caught.value)
    for part in ("model 'a': field 'max_batch_size'", "model 'b': field 'version'", "model 'b': field 'fp16'"):
        assert part in message


def test_a_missing_manifest_file_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="cannot read the model manifest"):
        read_manifest(tmp_path / "nowhere.toml")


def test_fields_are_normalised_paths_resolved_and_fp16_picks_the_fp16_files(tmp_path):
    path = manifest(
        tmp_path,
        (
            'default = "gpu"\n'
            '[models.gpu]\nversion = 3\nadapter = "%s"\nproviders = ["TensorRT", "cuda", "CPU"]\nfp16 = true\n'
            'max_batch_size = 8\nfallback = "cpu"\n'
            'files = { detector = "det.onnx", detector_fp16 = "fp16/det.onnx", recognizer = "/abs/rec.onnx" }\n'
            '[models.cpu]\nversion = "1"\nadapter = "%s"\n'
            'files = { detector = "det.onnx", detector_fp16 = "fp16/det.onnx" }\n' % (TEXT, TEXT)
        ),
    )
    catalog = ModelCatalog.load(path)
    gpu, cpu = catalog.spec("gpu"), catalog.spec("cpu")
    assert gpu.version == "3"
    assert gpu.providers == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert gpu.files == {"detector": str(tmp_path / "fp16" / "det.onnx"), "recognizer": "/abs/rec.onnx"}
    assert cpu.files == {"detector": str(tmp_path / "det.onnx")}  # fp16 off: the _fp16 twin is unused
    assert gpu.max_batch_size == 8 and catalog.fallbacks("gpu") == ["cpu"] and catalog.fallbacks("cpu") == []


def test_a_yaml_manifest_means_the_same_as_its_toml_twin(tmp_path):
    toml = manifest(
        tmp_path,
        'default = "b"\n[models.a]\nversion = "1"\nadapter = "%s"\nfallback = "b"\n'
        'providers = ["CPU"]\n[models.b]\nversion = "2"\nadapter = "%s"\n' % (TEXT, TEXT),
    )
    yaml = manifest(
        tmp_path,
        (
            "default: b\nmodels:\n"
            f"  a: {{version: '1', adapter: '{TEXT}', fallback: b, providers: [CPU]}}\n"
            f"  b: {{version: '2', adapter: '{TEXT}'}}\n"
        ),
        name="models.yaml",
    )
    assert ModelCatalog.load(yaml).specs == ModelCatalog.load(toml).specs
    with pytest.raises(ManifestError, match="model 'a': field 'version'"):
        read_manifest(manifest(tmp_path, f"models:\n  a: {{adapter: '{TEXT}'}}\n", name="bad.yml"))


def test_a_manifest_file_change_is_noticed_once_and_not_looked_for_within_the_check_interval(tmp_path):
    path = manifest(tmp_path, "x")
    patient, eager = ManifestFile(path, check_s=60), ManifestFile(path, check_s=0)
    assert not eager.changed()
    write(path, "y")
    assert not patient.changed()  # inside its interval: not even a stat
    assert eager.changed()
    assert not eager.changed()  # seen already
    path.write_text("z")  # an edit in place, same size: the mtime tells (set apart: file clocks are coarse)
    os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns + 10**7))
    assert eager.changed()
    path.unlink()
    assert eager.changed()  # gone is a change too (and its re-read fails loudly)


def test_a_live_catalog_follows_the_file_and_keeps_the_last_good_manifest_when_a_change_is_invalid(tmp_path):
    body = '[models.a]\nversion = "%s"\nadapter = "%s"\n'
    path = manifest(tmp_path, body % ("1", TEXT))
    live = LiveCatalog(path, check_s=0.05)
    assert live.current().spec("a").version == "1" and live.error is None
    write(path, body % ("2", TEXT))
    time.sleep(0.1)
    assert live.current().spec("a").version == "2"
    write(path, body % ("3", TEXT) + "max_batch_size = -1\n")
    time.sleep(0.1)
    assert live.current().spec("a").version == "2"
    assert "model 'a': field 'max_batch_size'" in live.error
    write(path, body % ("4", TEXT))
    time.sleep(0.1)
    assert live.current().spec("a").version == "4" and live.error is None


def test_a_live_catalog_refuses_reloaded_time_limits_that_outlast_the_visibility_timeout(tmp_path):
    body = '[models.a]\nversion = "1"\nadapter = "%s"\n' % TEXT
    path = manifest(tmp_path, body)
    live = LiveCatalog(path, check_s=0.05, settings=Settings(visibility_timeout_s=100))
    write(path, body + "hard_time_limit_s = 500\n")
    time.sleep(0.1)
    assert live.current().spec("a").hard_time_limit_s is None
    assert "MASKQ_VISIBILITY_TIMEOUT_S" in live.error


def toy_manifest(path: Path, **models: str) -> Path:
    return write(path, 'default = "base"\n' + "".join(f"[models.{name}]\n{body}\n" for name, body in models.items()))


def test_a_model_that_fails_to_load_runs_its_jobs_on_the_fallback_and_says_why(tmp_path):
    path = toy_manifest(
        tmp_path / "m.toml",
        base=f'version = "b1"\nadapter = "{TOY}"',
        broken=f'version = "x1"\nadapter = "{TOY}"\nfallback = "base"\noptions = {{ fail_setup = "bad file" }}',
        alone=f'version = "y1"\nadapter = "{TOY}"\noptions = {{ fail_setup = "bad file" }}',
        boxes=f'version = "z1"\nadapter = "{BOXES}"',
        picky=f'version = "p1"\nadapter = "{TOY}"\nfallback = "boxes"\noptions = {{ fail_setup = "gone" }}',
        relay=f'version = "r1"\nadapter = "{TOY}"\nfallback = "broken"\noptions = {{ fail_setup = "gone" }}',
    )
    models = LoadedModels(ModelCatalog.load(path), RuntimeOptions())
    models.load_all()
    assert set(models.adapters) == {"base", "boxes"}
    choice = models.choose("broken", {"points"})
    assert choice.degraded and choice.adapter.name == "base" and choice.model_version is None
    assert choice.model_used == {
        "name": "base",
        "version": "b1",
        "reason": "model 'broken' version x1 failed to load: RuntimeError: bad file",
    }
    assert not models.choose("base").degraded and models.choose("base").model_version == "b1"
    with pytest.raises(
        ModelError, match="model 'alone' version y1 failed to load: RuntimeError: bad file; it has no fallback"
    ):
        models.choose("alone")
    # The fallback must be able to take the job: boxes needs a box prompt.
    assert models.choose("picky", {"boxes"}).adapter.name == "boxes"
    with pytest.raises(ModelError, match="its fallback 'boxes' cannot take this job's prompts \\(points\\)"):
        models.choose("picky", {"points"})
    with pytest.raises(ModelError, match="its fallback 'boxes' cannot take this job's prompts \\(none\\)"):
        models.choose("picky")  # boxes needs a prompt: it cannot "segment everything"
    # A chain is followed past a fallback that did not load either.
    assert models.choose("relay").adapter.name == "base"
    with pytest.raises(ModelError, match="not in this worker's model manifest"):
        models.choose("never-heard-of")
    status = {m["name"]: m for m in describe_models(ModelCatalog.load(path), [models.describe()])}
    assert status["broken"]["loaded"] is False and status["broken"]["error"] == "RuntimeError: bad file"
    assert status["base"]["loaded"] is True and "error" not in status["base"]


def test_a_reload_swaps_changed_versions_keeps_the_old_one_if_the_new_fails_and_drops_removed_models(tmp_path):
    path = toy_manifest(
        tmp_path / "m.toml", base=f'version = "1"\nadapter = "{TOY}"', extra=f'version = "1"\nadapter = "{TOY}"'
    )
    models = LoadedModels(LiveCatalog(path, check_s=0.01), RuntimeOptions())
    models.load_all()
    in_flight = models.choose("base").adapter
    untouched = models.adapters["extra"]
    toy_manifest(path, base=f'version = "2"\nadapter = "{TOY}"', extra=f'version = "1"\nadapter = "{TOY}"')
    time.sleep(0.05)
    models.refresh()
    assert models.choose("base").adapter.version == "2"
    assert in_flight.version == "1"  # the job holding it finishes on it
    assert models.adapters["extra"] is untouched  # an unchanged table is not set up again
    toy_manifest(path, base=f'version = "3"\nadapter = "{TOY}"\noptions = {{ fail_setup = "corrupt" }}')
    time.sleep(0.05)
    models.refresh()
    assert models.choose("base").adapter.version == "2"  # the new version failed: the old one serves on
    assert models.describe() == {
        "models": {"base": "2"},
        "model_errors": {"base": {"version": "3", "error": "RuntimeError: corrupt"}},
        "providers": {"base": []},
    }  # the toy adapter has no ONNX Runtime session


def test_a_model_with_its_own_providers_must_get_one_of_them_while_the_deployment_list_falls_back_to_cpu():
    import onnxruntime as ort

    from models.adapters.onnx import create_session, provider_options
    from models.adapters.text_regions import bundled_model_files

    missing = next(
        p
        for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider")
        if p not in ort.get_available_providers()
    )
    detector = bundled_model_files()["detector"]
    models = LoadedModels(None, RuntimeOptions(providers=(missing,)))  # runtime_for needs no catalog
    deployment = models.runtime_for(ModelSpec("m", "1", TEXT))
    assert deployment.providers == (missing,) and not deployment.providers_required
    assert create_session(detector, deployment).get_providers() == ["CPUExecutionProvider"]
    own = models.runtime_for(ModelSpec("m", "1", TEXT, providers=(missing,), fp16=True))
    assert own.providers_required and own.fp16
    with pytest.raises(ModelError, match=f"none of the providers \\['{missing}'\\] is available here"):
        create_session(detector, own)
    preferred = models.runtime_for(ModelSpec("m", "1", TEXT, providers=(missing, "CPUExecutionProvider")))
    assert create_session(detector, preferred).get_providers() == ["CPUExecutionProvider"]
    # fp16 reaches TensorRT as its own provider option; CUDA takes no fp16 switch (it runs fp16 files).
    assert provider_options("TensorrtExecutionProvider", own)["trt_fp16_enable"] == "True"
    assert "trt_fp16_enable" not in provider_options("CUDAExecutionProvider", own)
    # The model's memory_mb caps its CUDA arena (512, the default).
    assert provider_options("CUDAExecutionProvider", own)["gpu_mem_limit"] == str(512 * 2**20)


def test_a_job_for_a_model_added_a_moment_ago_makes_the_worker_look_at_the_manifest_at_once(tmp_path):
    path = toy_manifest(tmp_path / "m.toml", base=f'version = "1"\nadapter = "{TOY}"')
    models = LoadedModels(LiveCatalog(path, check_s=3600), RuntimeOptions())
    models.load_all()
    toy_manifest(path, base=f'version = "1"\nadapter = "{TOY}"', new=f'version = "1"\nadapter = "{TOY}"')
    models.refresh()
    assert "new" not in models.adapters  # within the check interval: not looked at
    assert models.choose("new").adapter.name == "new"
