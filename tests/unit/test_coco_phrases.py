"""Phrase → COCO class (models/coco.py): the 80 names, plurals, synonyms, case, spaces, articles."""

from pathlib import Path

import pytest

from domain.errors import ValidationFailed
from models.catalog import ModelCatalog
from models.coco import COCO_LABELS, coco_class, normalize_phrase, unknown_message

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("label", COCO_LABELS)
def test_every_class_name_is_itself(label):
    assert coco_class(label) == label
    assert coco_class(label.upper()) == label


@pytest.mark.parametrize(
    ("phrase", "expected"),
    [
        ("cups", "cup"),
        ("Mug", "cup"),
        ("mugs", "cup"),
        ("  A   Cup ", "cup"),
        ("the cups", "cup"),
        ("an apple", "apple"),
        ("people", "person"),
        ("man", "person"),
        ("men", "person"),
        ("woman", "person"),
        ("women", "person"),
        ("person", "person"),
        ("persons", "person"),
        ("child", "person"),
        ("children", "person"),
        ("motorbike", "motorcycle"),
        ("motorbikes", "motorcycle"),
        ("tv", "tv"),
        ("Television", "tv"),
        ("TVs", "tv"),
        ("sofa", "couch"),
        ("couches", "couch"),
        ("aeroplane", "airplane"),
        ("planes", "airplane"),
        ("bike", "bicycle"),
        ("bicycles", "bicycle"),
        ("buses", "bus"),
        ("benches", "bench"),
        ("knives", "knife"),
        ("wine glasses", "wine glass"),
        ("dining tables", "dining table"),
        ("skis", "skis"),
        ("ski", "skis"),
        ("mice", "mouse"),
        ("ties", "tie"),
        ("sheep", "sheep"),
        ("fridge", "refrigerator"),
        ("hair dryer", "hair drier"),
        ("doughnuts", "donut"),
        ("phone", "cell phone"),
        ("teddy bears", "teddy bear"),
        ("diningtable", "dining table"),
        ("tvmonitor", "tv"),
    ],
)
def test_plurals_synonyms_case_spaces_and_articles(phrase, expected):
    assert coco_class(phrase) == expected


@pytest.mark.parametrize("phrase", ["zorblax", "", "a", "the", "cupz", "table", "glass", "bag", "s"])
def test_a_phrase_that_is_no_class_is_none(phrase):
    assert coco_class(phrase) is None


def test_normalize_phrase():
    assert normalize_phrase("  The   Red  CUP ") == "red cup"
    assert normalize_phrase("theater") == "theater"  # an article only as a word of its own


def test_the_refusal_lists_the_classes_and_says_how_to_get_any_phrase():
    message = unknown_message(["zorblax"])
    assert "'zorblax'" in message and all(label in message for label in COCO_LABELS)
    assert "SAM 3" in message


def test_the_objects_model_refuses_unknown_phrases_naming_prompts_text():
    catalog = ModelCatalog.load(ROOT / "config" / "models.toml")
    catalog.check_text("objects", ["cups", "Mug", "people"])
    catalog.check_text("text-regions", ["zorblax"])  # text in the image: any text
    with pytest.raises(ValidationFailed) as refused:
        catalog.check_text("objects", ["cup", "zorblax"])
    assert refused.value.status == 422
    assert refused.value.errors == [{"field": "prompts.text.1", "message": "'zorblax' is none of the 80 COCO classes"}]
    assert refused.value.detail.startswith("prompts.text: ")
    assert catalog.route({"text"}) == "objects" and catalog.route({"text", "points"}) == "objects"
