"""The encoder cache (models/encoder_cache.py): named arrays, local bounds, and the tier shared in Redis."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import redis

from domain import keys
from models.encoder_cache import EncoderCache, EncodingSource, SharedEncodings, phrase_hash
from tests.conftest import ROOT

PART = "ab" * 32  # an encoder file's sha256

# Run in a process of its own: put (or get) one entry of three named arrays through the shared tier.
PROCESS = """
import json, sys
import numpy as np, redis
from models.encoder_cache import EncoderCache, SharedEncodings
url, part, action, out = sys.argv[1:5]
cache = EncoderCache(SharedEncodings(redis.Redis.from_url(url), budget_mb=64, ttl_s=600))
view = cache.part(part, budget_bytes=8 * 2**20)
key = view.key("tenant-a", "sha-of-the-image")
if action == "put":
    rng = np.random.default_rng(7)
    arrays = {"image_embeddings": rng.standard_normal((1, 256, 64, 64)).astype(np.float16).astype(np.float32),
              "high_res_feats_0": np.arange(32 * 8 * 8, dtype=np.float32).reshape(1, 32, 8, 8) / 4,
              "sizes": np.array([[600, 400]], dtype=np.int64)}
    view.store(key, arrays, share=True)
    np.savez(out, **arrays)
else:
    found, source = view.lookup(key, share=True)
    np.savez(out, **found)
    print(json.dumps({"source": source.value, "dtypes": {k: str(v.dtype) for k, v in found.items()},
                      "stats": view.stats()}))
"""


def in_process(url: str, action: str, out) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROCESS, url, PART, action, str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_an_entry_of_several_named_arrays_goes_through_redis_from_one_process_to_another(
    redis_server, redis_client, tmp_path
):
    in_process(redis_server.url, "put", tmp_path / "put.npz")
    [name] = list(redis_client.scan_iter(f"{keys.ENCODING_PREFIX}*"))
    assert name.decode() == keys.encoding(PART, "tenant-a", "sha-of-the-image")
    stored = redis_client.hgetall(name)
    assert stored[b"names"] == b"image_embeddings,high_res_feats_0,sizes"
    assert stored[b"image_embeddings:dtype"] == b"float16" and stored[b"sizes:dtype"] == b"int64"  # floats halved
    assert 0 < redis_client.ttl(name) <= 600

    answer = json.loads(in_process(redis_server.url, "get", tmp_path / "got.npz"))
    assert answer["source"] == "shared"
    assert answer["dtypes"] == {"image_embeddings": "float32", "high_res_feats_0": "float32", "sizes": "int64"}
    assert (answer["stats"]["hits"], answer["stats"]["misses"], answer["stats"]["entries"]) == (0, 1, 1)
    put, got = np.load(tmp_path / "put.npz"), np.load(tmp_path / "got.npz")
    assert sorted(put.files) == sorted(got.files)
    for name in put.files:  # values exact in float16 come back exact
        np.testing.assert_array_equal(got[name], put[name])
        assert got[name].shape == put[name].shape


def test_the_shared_tier_keeps_at_most_its_budget_and_a_tenant_never_reads_anothers(redis_client):
    shared = SharedEncodings(redis_client, budget_mb=1, ttl_s=60)
    view = EncoderCache(shared).part(PART, 0)  # nothing kept in this process: every lookup asks Redis
    entry = {"a": np.zeros((256, 512), np.float32)}  # 256 KiB in float16: four fit in 1 MiB
    for i in range(6):
        view.store(view.key("t", f"image-{i}"), entry, share=True)
    assert redis_client.zcard(keys.ENCODINGS) == 4
    assert view.lookup(view.key("t", "image-0"), share=True) == (None, None)  # the oldest went
    assert view.lookup(view.key("t", "image-5"), share=True)[1] is EncodingSource.SHARED
    assert view.lookup(view.key("u", "image-5"), share=True) == (None, None)
    assert view.lookup(view.key("t", "image-5"), share=False) == (None, None)  # not shared: not asked


def test_redis_away_is_a_miss_never_an_error():
    shared = SharedEncodings(redis.Redis(port=1, socket_connect_timeout=0.2), budget_mb=1, ttl_s=60)
    view = EncoderCache(shared).part(PART, 2**20)
    key = view.key("t", "i")
    assert view.lookup(key, share=True) == (None, None)
    view.store(key, {"a": np.ones(4, np.float32)}, share=True)  # kept here only
    assert view.lookup(key, share=True)[1] is EncodingSource.LOCAL


def test_two_models_on_one_part_share_entries_within_the_larger_budget_and_count_on_their_own():
    cache = EncoderCache()
    small, large = cache.part(PART, 2**20), cache.part(PART, 3 * 2**20)
    other = cache.part("cd" * 32, 2**20)
    mib = {"x": np.zeros(2**18, np.float32)}  # 1 MiB
    for i in range(3):
        small.store(small.key("t", f"i{i}"), mib, share=False)
    arrays, source = large.lookup(large.key("t", "i0"), share=False)
    assert source is EncodingSource.LOCAL and not arrays["x"].flags.writeable  # read-only: nobody changes it
    assert other.lookup(other.key("t", "i0"), share=False) == (None, None)  # another encoder file
    small.store(small.key("t", "i3"), mib, share=False)  # past 3 MiB: the least recently used (i1) goes
    assert small.lookup(small.key("t", "i1"), share=False) == (None, None)
    assert small.stats() | {"hits": None} == {
        "hits": None,
        "misses": 1,
        "encoder_runs": 4,
        "evictions": 1,
        "entries": 3,
        "bytes": 3 * 2**20,
        "budget_bytes": 3 * 2**20,
    }
    assert (large.stats()["hits"], large.stats()["encoder_runs"]) == (1, 0)


def test_a_text_encoding_is_keyed_by_its_phrase():
    view = EncoderCache().part("ef" * 32, 2**20)
    view.store(view.key("t", phrase_hash("a red cup")), {"text_embeddings": np.ones((1, 8), np.float32)}, share=False)
    assert view.lookup(view.key("t", phrase_hash("a red cup")), share=False)[1] is EncodingSource.LOCAL
    assert view.lookup(view.key("t", phrase_hash("a red cup ")), share=False) == (None, None)
    assert phrase_hash("a") != phrase_hash("b") and phrase_hash("a").startswith("text:")


def test_the_source_a_job_reports_is_written_as_before():
    assert json.dumps({"cached": True, "source": EncodingSource.LOCAL}) == '{"cached": true, "source": "this worker"}'
    assert json.dumps(EncodingSource.SHARED, indent=1) == '"shared"'
    assert [s.metric for s in EncodingSource] == ["local", "shared"]


def test_the_worker_counts_where_an_embedding_came_from_by_its_structured_source():
    from workers import metrics, pipeline

    counter = metrics.series().embeddings
    reports = [
        {"embedding": {"cached": True, "source": EncodingSource.LOCAL}},
        {"embedding": {"cached": True, "source": EncodingSource.SHARED}},
        {"embedding": {"cached": False, "source": None}},
        {},
    ]
    before = {r: counter.labels("enc-test", r)._value.get() for r in ("local", "shared", "miss")}
    for report in reports:
        pipeline.count_model_work("enc-test", 0.01, report)
    after = {r: counter.labels("enc-test", r)._value.get() for r in ("local", "shared", "miss")}
    assert {r: after[r] - before[r] for r in after} == {"local": 1, "shared": 1, "miss": 1}
