"""The Python client's pure parts: building a request, reading Retry-After, reading an image argument."""

from __future__ import annotations

import io
import time
from email.utils import formatdate

import pytest

from maskq.client import Job, build_request, read_image, retry_after_s
from maskq.folder_run import read_prompts_file


def test_a_request_is_built_from_keywords_leaving_out_what_is_none():
    assert build_request() == {}
    assert build_request(points=[(1, 2, 1)], text="price", model="sam", lane="interactive") == {
        "prompts": {"points": [[1, 2, 1]], "text": ["price"]},
        "model": "sam",
        "lane": "interactive",
    }
    assert build_request(text=["a", "b"], boxes=[(0, 0, 5, 5)], outputs=("rle", "png")) == {
        "prompts": {"boxes": [[0, 0, 5, 5]], "text": ["a", "b"]},
        "outputs": ["rle", "png"],
    }


def test_retry_after_is_read_as_seconds_or_an_http_date_and_capped():
    assert retry_after_s("3") == 3.0
    assert retry_after_s(None, default=0.5) == 0.5
    assert retry_after_s("soon", default=2) == 2
    assert retry_after_s("86400") == 60.0  # never sleeps more than a minute at a time
    in_ten = retry_after_s(formatdate(time.time() + 10, usegmt=True))
    assert 8 <= in_ten <= 10
    assert retry_after_s(formatdate(time.time() - 100, usegmt=True)) == 0.0


def test_an_image_is_a_path_bytes_or_an_open_file(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"png")
    assert read_image(path) == (b"png", "a.png")
    assert read_image(str(path), "b.png") == (b"png", "b.png")
    assert read_image(b"raw") == (b"raw", "image")
    assert read_image(io.BytesIO(b"stream"), "c.jpg") == (b"stream", "c.jpg")


def test_a_job_document_reads_as_a_job():
    job = Job.from_document(
        {"id": "j1", "status": "succeeded", "queue_position": None, "result": {"instances": [{"bbox": [1, 2, 3, 4]}]}}
    )
    assert job.ended and job.succeeded and job.instances == [{"bbox": [1, 2, 3, 4]}]
    queued = Job.from_document({"id": "j2", "status": "queued", "queue_position": 3})
    assert not queued.ended and queued.instances == [] and queued.queue_position == 3


def test_a_prompts_file_is_json_lines_or_csv(tmp_path):
    lines = tmp_path / "p.jsonl"
    lines.write_text('{"file": "a.jpg", "points": [[1, 2, 1]]}\n\n{"file": "b/c.jpg", "prompts": {"text": ["x"]}}\n')
    assert read_prompts_file(lines) == {"a.jpg": {"points": [[1, 2, 1]]}, "b/c.jpg": {"text": ["x"]}}
    table = tmp_path / "p.csv"
    table.write_text('file,text,points,boxes\na.jpg,price|sale,,\nb.jpg,,"[[3, 4, 0]]","[[0, 0, 9, 9]]"\n')
    assert read_prompts_file(table) == {
        "a.jpg": {"text": ["price", "sale"]},
        "b.jpg": {"points": [[3, 4, 0]], "boxes": [[0, 0, 9, 9]]},
    }
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"points": []}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):  # a line without a file
        read_prompts_file(bad)
