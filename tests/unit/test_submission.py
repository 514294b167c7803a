"""Reading an upload: no more than its own kind's bound is read into memory, whichever bound is larger."""

from __future__ import annotations

import io

import pytest
from flask import Flask, request
from werkzeug.test import EnvironBuilder

from domain.errors import PayloadTooLarge
from tests.support.clips import still
from webapp.submission import read_submission

IMAGE_LIMIT = 1_000
VIDEO_LIMIT = 1_000_000


def upload(data: bytes):
    """A request context whose multipart ``image`` part holds ``data`` (werkzeug's parser, as the app's)."""
    environ = EnvironBuilder(method="POST", path="/v1/jobs", data={"image": (io.BytesIO(data), "upload")}).get_environ()
    return Flask(__name__).request_context(environ)


def test_an_image_past_its_bound_is_refused_having_read_only_the_bound_though_a_clip_may_be_larger():
    with upload(b"\xff\xd8\xff" + b"\0" * (50 * IMAGE_LIMIT)) as context:
        with pytest.raises(PayloadTooLarge, match=f"image is larger than {IMAGE_LIMIT} bytes"):
            read_submission(request, IMAGE_LIMIT, max_video_bytes=VIDEO_LIMIT)
        assert context.request.files["image"].stream.tell() == IMAGE_LIMIT + 1  # the rest is never read


def test_a_clip_is_read_up_to_the_video_bound_and_refused_past_it():
    clip = still(4)
    assert len(clip) > IMAGE_LIMIT  # past an image's bound: taken as a clip
    with upload(clip):
        data, body = read_submission(request, IMAGE_LIMIT, max_video_bytes=VIDEO_LIMIT)
    assert data == clip and body == {}
    with upload(clip), pytest.raises(PayloadTooLarge, match=f"video is larger than {len(clip) - 1} bytes"):
        read_submission(request, IMAGE_LIMIT, max_video_bytes=len(clip) - 1)


class Busy(Exception):
    pass


def test_a_clip_is_announced_after_its_first_bytes_and_before_the_rest_is_read():
    """``on_video`` (the web takes a video slot there, webapp/slots.py) runs before the clip is read on; an
    image never calls it."""
    from webapp.submission import SNIFF_BYTES

    def refuse():
        raise Busy

    clip = still(4)
    with upload(clip) as context:
        with pytest.raises(Busy):
            read_submission(request, IMAGE_LIMIT, max_video_bytes=VIDEO_LIMIT, on_video=refuse)
        assert context.request.files["image"].stream.tell() == SNIFF_BYTES < len(clip)
    with upload(b"\xff\xd8\xff" + b"\0" * 500):
        data, _ = read_submission(request, IMAGE_LIMIT, max_video_bytes=VIDEO_LIMIT, on_video=refuse)
    assert len(data) == 503


def form(data: dict):
    environ = EnvironBuilder(
        method="POST", path="/v1/jobs", data=data, content_type="multipart/form-data"
    ).get_environ()
    return Flask(__name__).request_context(environ)


@pytest.mark.parametrize(
    ("data", "said"),
    [
        (
            {"image": [(io.BytesIO(b"\xff\xd8\xff"), "a.jpg"), (io.BytesIO(b"\xff\xd8\xff"), "b.jpg")]},
            "2 'image' parts",
        ),
        ({"image": "\xff\xd8\xff as text"}, "'image' part is a text field, not a file part"),
        ({}, "'image' part is missing"),
        ({"image": (io.BytesIO(b"\xff\xd8\xff"), "a.jpg"), "request": ["{}", "{}"]}, "more than one 'request' part"),
        (
            {"image": (io.BytesIO(b"\xff\xd8\xff"), "a.jpg"), "request": ["{}", (io.BytesIO(b"{}"), "r.json")]},
            "more than one 'request' part",
        ),
    ],
    ids=["two images", "image as text", "no image", "two requests", "a request field and a file"],
)
def test_a_form_that_does_not_say_one_thing_is_refused_naming_the_part(data, said):
    """Which image or request was meant is not guessed: the first of two is not taken silently."""
    from domain.errors import InputError

    with form(data), pytest.raises(InputError, match=said):
        read_submission(request, IMAGE_LIMIT, max_video_bytes=VIDEO_LIMIT)
