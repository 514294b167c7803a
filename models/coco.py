"""The 80 COCO object classes, and what a phrase someone types means among them.

Pure (no files, no onnxruntime): the web checks a job's ``text`` prompts with it at submit, and
the detector (``models/adapters/detector.py``) picks its classes with it.

:func:`coco_class` maps a phrase to its class name: case, runs of spaces and a leading "a",
"an" or "the" are ignored; the 80 names, their plurals ("cups", "buses", "knives", "wine
glasses", "people", "men", "mice") and the obvious synonyms (:data:`SYNONYMS`: "mug" → cup,
"motorbike" → motorcycle, "sofa" → couch, "tv"/"television", "aeroplane"/"plane" → airplane,
"man"/"woman"/"child" → person, the PASCAL VOC spellings "diningtable", "tvmonitor",
"pottedplant"…) are known; anything else is None: the caller says so (a ``422``), never an
empty answer.
"""

from __future__ import annotations

import re

# The npm package's src/object/labels.ts, in its order (class index 0 … 79); a test checks them against the file.
COCO_LABELS: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

# Other words for a class (singular; plurals are worked out). Only unambiguous ones: "glass" (wine glass or
# a drinking glass?), "bag" (handbag or backpack?) or "table" (any table, or a dining one?) are left out.
SYNONYMS: dict[str, str] = {
    **dict.fromkeys(
        ("people", "man", "woman", "child", "kid", "boy", "girl", "human", "adult", "baby", "pedestrian"), "person"
    ),
    **dict.fromkeys(("bike", "push bike", "pushbike"), "bicycle"),
    **dict.fromkeys(("automobile",), "car"),
    **dict.fromkeys(("motorbike", "motor bike", "motor cycle"), "motorcycle"),
    **dict.fromkeys(("aeroplane", "plane", "aircraft", "airliner", "jet", "air plane"), "airplane"),
    **dict.fromkeys(("lorry",), "truck"),
    **dict.fromkeys(("ship",), "boat"),
    **dict.fromkeys(("traffic signal", "stoplight", "stop light"), "traffic light"),
    **dict.fromkeys(("hydrant",), "fire hydrant"),
    **dict.fromkeys(("puppy",), "dog"),
    **dict.fromkeys(("kitten",), "cat"),
    **dict.fromkeys(("pony",), "horse"),
    **dict.fromkeys(("rucksack", "back pack"), "backpack"),
    **dict.fromkeys(("purse", "hand bag"), "handbag"),
    **dict.fromkeys(("necktie",), "tie"),
    **dict.fromkeys(("ski",), "skis"),
    **dict.fromkeys(("ball", "football", "soccer ball", "basketball", "tennis ball", "volleyball"), "sports ball"),
    **dict.fromkeys(("baseball mitt", "mitt"), "baseball glove"),
    **dict.fromkeys(("skate board",), "skateboard"),
    **dict.fromkeys(("surf board",), "surfboard"),
    **dict.fromkeys(("tennis racquet", "racket", "racquet"), "tennis racket"),
    **dict.fromkeys(("wineglass",), "wine glass"),
    **dict.fromkeys(("mug", "coffee cup", "teacup", "tea cup", "coffee mug"), "cup"),
    **dict.fromkeys(("hotdog",), "hot dog"),
    **dict.fromkeys(("doughnut",), "donut"),
    **dict.fromkeys(("sofa", "settee"), "couch"),
    **dict.fromkeys(("pottedplant", "houseplant", "house plant", "plant", "pot plant"), "potted plant"),
    **dict.fromkeys(("diningtable", "dinner table", "kitchen table"), "dining table"),
    **dict.fromkeys(("television", "tvmonitor", "tv monitor", "tv set", "television set"), "tv"),
    **dict.fromkeys(("notebook computer",), "laptop"),
    **dict.fromkeys(("computer mouse",), "mouse"),
    **dict.fromkeys(("remote control", "tv remote"), "remote"),
    **dict.fromkeys(("computer keyboard",), "keyboard"),
    **dict.fromkeys(("phone", "cellphone", "mobile phone", "smartphone", "smart phone", "mobile"), "cell phone"),
    **dict.fromkeys(("microwave oven",), "microwave"),
    **dict.fromkeys(("fridge",), "refrigerator"),
    **dict.fromkeys(("teddy",), "teddy bear"),
    **dict.fromkeys(("hair dryer", "hairdryer", "hairdrier", "blow dryer"), "hair drier"),
    **dict.fromkeys(("tooth brush",), "toothbrush"),
}
# Plurals no rule below makes.
IRREGULAR: dict[str, str] = {
    "people": "person",
    "persons": "person",
    "men": "man",
    "women": "woman",
    "children": "child",
    "mice": "mouse",
}
ARTICLE = re.compile(r"^(?:a|an|the)\s+")
_NAMES: dict[str, str] = {label: label for label in COCO_LABELS} | SYNONYMS


def normalize_phrase(phrase: str) -> str:
    """A phrase as it is compared: casefolded, runs of spaces as one, trimmed, no leading "a"/"an"/"the"."""
    return ARTICLE.sub("", " ".join(phrase.casefold().split()))


def _singulars(phrase: str) -> list[str]:
    """What a plural phrase may be the plural of (its last word made singular), most likely first."""
    head, _, last = phrase.rpartition(" ")
    forms = [IRREGULAR[last]] if last in IRREGULAR else []
    if last.endswith("s") and len(last) > 2:
        forms.append(last[:-1])  # cups, ties, skis' "ski"
        if last.endswith("es"):
            forms.append(last[:-2])  # buses, benches, boxes, wine glasses
        if last.endswith("ies"):
            forms.append(last[:-3] + "y")  # teddies
        if last.endswith("ves"):
            forms += [last[:-3] + "f", last[:-3] + "fe"]  # knives
    return [f"{head} {form}" if head else form for form in forms]


def coco_class(phrase: str) -> str | None:
    """The COCO class name a phrase means (``"Mugs"`` → ``"cup"``), or None when it means none of the 80."""
    wanted = normalize_phrase(phrase)
    for candidate in (wanted, *_singulars(wanted)):
        if candidate in _NAMES:
            return _NAMES[candidate]
    return None


def unknown_phrases(phrases: list[str] | tuple[str, ...]) -> list[tuple[int, str]]:
    """``(index, phrase)`` of each phrase that is no COCO class."""
    return [(i, phrase) for i, phrase in enumerate(phrases) if coco_class(phrase) is None]


OPEN_VOCABULARY = (
    "any other phrase (open vocabulary) needs a SAM 3 checkpoint: serve it as a model of the manifest "
    '(README, "Models: the manifest…") and name it in the job\'s "model"'
)


def unknown_message(phrases: list[str] | tuple[str, ...] | str) -> str:
    """Why ``phrases`` are refused: what the detector knows, and how to get any phrase."""
    names = [phrases] if isinstance(phrases, str) else list(phrases)
    return (
        f"{', '.join(map(repr, names))} {'is not an object' if len(names) == 1 else 'are not objects'} this model "
        "knows. It knows the 80 COCO classes (with plurals and common synonyms such as 'mug', 'people', "
        f"'sofa', 'tv'): {', '.join(COCO_LABELS)}; {OPEN_VOCABULARY}"
    )
