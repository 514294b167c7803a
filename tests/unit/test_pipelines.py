"""Pipelines of models (``steps``), adapter options and capabilities in the manifest: pure logic, no processes."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from domain.errors import ModelError
from models.adapters.base import Capabilities, Prompts, RuntimeOptions, SegmentRequest
from models.adapters.pipeline import PipelineAdapter
from models.catalog import LiveCatalog, ModelCatalog
from models.manifest import ManifestError, read_manifest
from tests.support import chain_models
from tests.support.chain_models import DETECTOR, SEGMENTER
from workers.loaded_models import LoadedModels

ROOT = Path(__file__).resolve().parents[2]
TEXT = "models.adapters.text_regions:TextRegionsAdapter"
SAM = "models.adapters.sam:SamAdapter"
OBJECTS = 'options = { objects = [[10, 10, 30, 40, "red cup"], [50, 5, 90, 25, "blue spoon"]] }'


def write(path: Path, text: str) -> Path:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def chain_manifest(
    path: Path, segmenter_version: str = "s1", chain: str = 'steps = ["detector", "segmenter"]', extra: str = ""
) -> Path:
    return write(
        path,
        (
            'default = "detector"\n'
            f'[models.detector]\nversion = "d1"\nadapter = "{DETECTOR}"\n{OBJECTS}\n'
            f'[models.segmenter]\nversion = "{segmenter_version}"\nadapter = "{SEGMENTER}"\n'
            f'[models.chain]\nversion = "c1"\n{chain}\n' + extra
        ),
    )


@pytest.fixture(autouse=True)
def no_sessions_yet():
    chain_models.SESSIONS.clear()


def test_a_two_step_pipeline_runs_on_its_steps_adapters_and_opens_no_session_of_its_own(tmp_path):
    models = LoadedModels(ModelCatalog.load(chain_manifest(tmp_path / "m.toml")), RuntimeOptions())
    models.load_all()
    assert not models.failures
    # One set of sessions per model: the pipeline shares the single-step models' adapters.
    assert dict(chain_models.SESSIONS) == {"detector": 1, "segmenter": 1}
    chain = models.choose("chain").adapter
    assert isinstance(chain, PipelineAdapter)
    assert chain.steps == [models.adapters["detector"], models.adapters["segmenter"]]

    image = np.zeros((60, 100, 3), np.uint8)
    request = SegmentRequest(image, Prompts(text=("cup", "spoon")), image_id="i", scope="t")
    [instances] = chain.segment([request])
    # One instance per box the detector found, its label and object id kept; the mask is the segmenter's.
    assert [(i.label, i.object_id, i.score) for i in instances] == [("red cup", 0, 0.5), ("blue spoon", 1, 0.5)]
    assert [tuple(np.argwhere(i.mask).min(0)) + tuple(np.argwhere(i.mask).max(0) + 1) for i in instances] == [
        (11, 11, 39, 29),
        (6, 51, 24, 89),
    ]
    assert request.report == {"segmenter": {"boxes": 2}}  # a step's notes reach the job's report
    assert models.adapters["segmenter"].calls == [1]  # the segmenter ran once, for the chain


def test_a_step_that_finds_nothing_ends_the_request_without_running_the_next_step(tmp_path):
    models = LoadedModels(ModelCatalog.load(chain_manifest(tmp_path / "m.toml")), RuntimeOptions())
    models.load_all()
    image = np.zeros((60, 100, 3), np.uint8)
    results = models.adapters["chain"].segment(
        [SegmentRequest(image, Prompts(text=("fork",))), SegmentRequest(image, Prompts(text=("spoon",)))]
    )
    assert [[i.label for i in r] for r in results] == [[], ["blue spoon"]]
    assert models.adapters["segmenter"].calls == [1]  # only the request with a box went on


def test_a_step_giving_several_candidates_per_box_gives_the_first_of_each(tmp_path):
    path = chain_manifest(tmp_path / "m.toml")
    path.write_text(
        path.read_text().replace(
            f'adapter = "{SEGMENTER}"\n', f'adapter = "{SEGMENTER}"\noptions = {{ per_box = 3 }}\n'
        )
    )
    models = LoadedModels(ModelCatalog.load(path), RuntimeOptions())
    models.load_all()
    [instances] = models.adapters["chain"].segment([SegmentRequest(np.zeros((60, 100, 3), np.uint8))])
    assert [(i.label, i.score) for i in instances] == [("red cup", 0.5), ("blue spoon", 0.5)]


def test_a_pipelines_capabilities_come_from_its_steps_and_the_web_reads_them_without_loading_it(tmp_path):
    catalog = ModelCatalog.load(chain_manifest(tmp_path / "m.toml"))
    assert catalog.capabilities("chain") == Capabilities(
        frozenset({"text"}), requires_prompt=False, stacks_batches=True
    )
    assert catalog.capabilities("segmenter").requires_prompt and catalog.prompt_kinds("segmenter") == {
        "boxes",
        "points",
    }
    assert catalog.spec("chain").steps == ("detector", "segmenter")
    assert chain_models.SESSIONS == {}  # reading the catalog sets nothing up
    # A chain starting with a model that needs a prompt needs one too; a step that does not stack batches
    # makes the chain not stack them.
    catalog = ModelCatalog.load(
        chain_manifest(
            tmp_path / "n.toml",
            chain='steps = ["segmenter", "segmenter"]',
            extra=f'[models.text]\nversion = "1"\nadapter = "{TEXT}"\n'
            '[models.text-chain]\nversion = "1"\n'
            'steps = ["detector", "chain", "segmenter"]\n',
        )
    )
    assert catalog.capabilities("chain") == Capabilities(frozenset({"boxes", "points"}), True, True)
    assert catalog.capabilities("text-chain").prompt_kinds == {"text"}
    assert catalog.setup_order().index("text-chain") > catalog.setup_order().index("chain")


@pytest.mark.parametrize(
    ("chain", "expected"),
    [
        (
            'steps = ["detector", "nothing"]',
            "model 'chain': field 'steps': 'nothing' is not a model of this manifest (detector, segmenter, chain)",
        ),
        ('steps = ["detector", "chain"]', "model 'chain': field 'steps': the steps form a cycle: chain -> chain"),
        (
            'steps = ["detector", "loop"]\n[models.loop]\nversion = "1"\nsteps = ["chain"]',
            "field 'steps': the steps form a cycle: chain -> loop -> chain",
        ),
        (
            'steps = ["segmenter", "detector"]',
            "model 'chain': field 'steps': step 'detector' cannot take box prompts, which a step after the first is "
            "given (it takes: text)",
        ),
        ("steps = []", "model 'chain': field 'steps': Tuple should have at least 1 item"),
        (
            f'steps = ["detector"]\nadapter = "{SEGMENTER}"',
            "model 'chain': give either 'adapter' (one model's adapter class) or 'steps' (a pipeline of models of "
            "this manifest), not both",
        ),
        ("", "model 'chain': give either 'adapter' (one model's adapter class) or 'steps'"),
        (
            'steps = ["detector", "segmenter"]\nfiles = { model = "x.onnx" }',
            "model 'chain': a pipeline ('steps') runs its steps' models and has no 'files' of its own",
        ),
        (
            'steps = ["detector", "segmenter"]\noptions = { speed = 2 }',
            "model 'chain': field 'options.speed': unknown option (known: score)",
        ),
    ],
)
def test_a_pipeline_with_a_missing_step_a_cycle_or_steps_that_do_not_fit_is_refused(tmp_path, chain, expected):
    path = chain_manifest(tmp_path / "m.toml", chain=chain)
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        (
            f'adapter = "{SAM}"\noptions = {{ multimsk = true }}',
            "model 'a': field 'options.multimsk': unknown option (known: multimask, mask_threshold, image_size,",
        ),
        (
            f'adapter = "{SAM}"\noptions = {{ encoder_input = "flat" }}',
            "model 'a': field 'options.encoder_input': Input should be 'auto', 'normalized' or 'resized'",
        ),
        (
            f'adapter = "{SAM}"\noptions = {{ embedding_cache_mb = -1 }}',
            "model 'a': field 'options.embedding_cache_mb': Input should be greater than or equal to 0",
        ),
        (
            f'adapter = "{TEXT}"\noptions = {{ text_scor = 0.9, box_thresh = "high" }}',
            "model 'a': field 'options.box_thresh': Input should be a valid number",
        ),
        (
            f'adapter = "{TEXT}"\noptions = {{ text_scor = 0.9 }}',
            "model 'a': field 'options.text_scor': unknown option (known: limit_side_len,",
        ),
        (
            f'adapter = "{DETECTOR}"\noptions = {{ objects = [[1, 2, 3]] }}',
            "model 'a': field 'options.objects.0.3': Field required; field 'options.objects.0.4'",
        ),
    ],
)
def test_a_typo_in_a_models_options_is_an_error_naming_the_model_and_the_field(tmp_path, entry, expected):
    path = write(tmp_path / "m.toml", f'[models.a]\nversion = "1"\n{entry}\n')
    with pytest.raises(ManifestError) as caught:
        read_manifest(path)
    assert expected in str(caught.value)


def test_the_bundled_manifest_options_and_the_test_adapters_options_are_valid():
    for manifest in (ROOT / "config" / "models.toml", ROOT / "tests" / "support" / "text_models.toml"):
        read_manifest(manifest)
    from tests.support.slow_models import slow_manifest

    read_manifest(slow_manifest(Path(os.environ.get("TMPDIR", "/tmp")), 0.5, batch_delay_s=1))


def test_a_new_version_of_a_step_is_picked_up_by_its_pipeline_and_a_step_that_fails_unloads_it(tmp_path):
    path = chain_manifest(tmp_path / "m.toml")
    models = LoadedModels(LiveCatalog(path, check_s=0.01), RuntimeOptions())
    models.load_all()
    old_chain, old_segmenter = models.adapters["chain"], models.adapters["segmenter"]
    chain_manifest(path, segmenter_version="s2")
    time.sleep(0.05)
    models.refresh()
    chain = models.adapters["chain"]
    assert chain is not old_chain and chain.steps[1] is models.adapters["segmenter"] is not old_segmenter
    assert chain.steps[1].version == "s2" and old_chain.steps[1] is old_segmenter  # a job in flight keeps its own
    assert dict(chain_models.SESSIONS) == {"detector": 1, "segmenter": 2}
    unchanged = models.adapters["detector"]
    # A pipeline whose step never loaded does not load; its fallback serves its jobs.
    write(
        path,
        path.read_text()
        .replace('version = "c1"', 'version = "c1"\nfallback = "detector"')
        .replace(
            f'adapter = "{SEGMENTER}"',
            'adapter = "tests.support.toy_models:ToyAdapter"\noptions = { fail_setup = "gone" }',
        ),
    )
    time.sleep(0.05)
    models.refresh()
    assert models.adapters["detector"] is unchanged
    choice = models.choose("chain", {"text"})
    # The old segmenter's version keeps serving (its new one failed), so the chain is set up again on it.
    assert not choice.degraded and choice.adapter.steps[1].version == "s2"
    assert models.failures["segmenter"].error == "RuntimeError: gone"


def test_a_pipeline_whose_step_is_not_loaded_fails_to_load_and_its_fallback_serves(tmp_path):
    path = write(
        tmp_path / "m.toml",
        (
            f'default = "detector"\n[models.detector]\nversion = "d1"\nadapter = "{DETECTOR}"\n{OBJECTS}\n'
            '[models.broken]\nversion = "b1"\nadapter = "tests.support.toy_models:ToyBoxesAdapter"\n'
            'options = { fail_setup = "bad file" }\n'
            '[models.chain]\nversion = "c1"\nsteps = ["detector", "broken"]\nfallback = "detector"\n'
        ),
    )
    models = LoadedModels(ModelCatalog.load(path), RuntimeOptions())
    models.load_all()
    assert set(models.failures) == {"broken", "chain"}
    assert models.failures["chain"].error == "model 'broken' is not loaded in this worker"
    choice = models.choose("chain", {"text"})
    assert choice.degraded and choice.adapter.name == "detector"
    with pytest.raises(ModelError, match="cannot take this job's prompts \\(boxes\\)"):
        models.choose("chain", {"boxes"})
