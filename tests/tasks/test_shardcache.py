"""The node-local cache of remote shards: one download per node, verified on every read."""

from __future__ import annotations

import hashlib
import threading
import time

import pyarrow as pa
import pytest

from trainflow.tasks.manifest import ShardVerificationError, load_manifest
from trainflow.tasks.shardcache import ShardFileCache
from trainflow.tasks.sharding import ShardingConfig, shard_dataset
from trainflow.tasks.storage import Storage

SYN = "synthetic://recommendation?num_interactions=3000&num_users=40&num_items=200&seed=5"
SMALL = ShardingConfig(target_shard_bytes=8_000, row_group_rows=300)


def _counting_reads(monkeypatch) -> list[str]:
    """Every path Storage.read_bytes fetches (the manifest and the shards)."""
    calls: list[str] = []
    original = Storage.read_bytes

    def read_bytes(self, path):
        calls.append(path)
        return original(self, path)

    monkeypatch.setattr(Storage, "read_bytes", read_bytes)
    return calls


def test_remote_shards_are_downloaded_once_then_read_from_the_cache(s3_env, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("TRAINFLOW_SHARD_CACHE_DIR", str(cache_dir))
    manifest = load_manifest(shard_dataset(SYN, "recommendation", config=SMALL)["manifest_uri"])
    assert manifest.uri.startswith("s3://")
    shards = manifest.shards("train")
    assert len(shards) > 2
    calls = _counting_reads(monkeypatch)
    first = manifest.read_table("train")
    assert sorted(c for c in calls if c.endswith(".parquet")) == sorted(s.path for s in shards)
    calls.clear()
    again = load_manifest(manifest.uri).read_table("train")  # a new reader, as the next epoch or rank
    assert [c for c in calls if c.endswith(".parquet")] == []  # nothing fetched from S3
    assert again.equals(first)
    for shard in shards:  # content-addressed files, the very bytes of the shards
        cached = cache_dir / shard.sha256[:2] / f"{shard.sha256}.parquet"
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == shard.sha256


def test_a_damaged_cache_file_is_dropped_and_fetched_again(s3_env, tmp_path, monkeypatch, caplog):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("TRAINFLOW_SHARD_CACHE_DIR", str(cache_dir))
    manifest = load_manifest(shard_dataset(SYN, "recommendation", config=SMALL)["manifest_uri"])
    shard = manifest.shards("train")[0]
    expected = manifest.read_shard_bytes(shard)
    cached = cache_dir / shard.sha256[:2] / f"{shard.sha256}.parquet"
    damaged = bytearray(cached.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    cached.write_bytes(bytes(damaged))
    calls = _counting_reads(monkeypatch)
    with caplog.at_level("WARNING", logger="trainflow.tasks.shardcache"):
        assert manifest.read_shard_bytes(shard) == expected
    assert calls == [shard.path]  # fetched again from S3
    assert "is damaged" in caplog.text and "xxh3_128" in caplog.text
    assert cached.read_bytes() == expected  # repaired


def test_a_corrupt_remote_shard_is_an_error_and_is_not_cached(s3_env, tmp_path, monkeypatch):
    cache_dir = tmp_path / "cache"
    monkeypatch.setenv("TRAINFLOW_SHARD_CACHE_DIR", str(cache_dir))
    manifest = load_manifest(shard_dataset(SYN, "recommendation", config=SMALL)["manifest_uri"])
    shard = manifest.shards("train")[1]
    data = bytearray(manifest.storage.read_bytes(shard.path))
    data[100] ^= 0xFF
    manifest.storage.write_bytes(shard.path, bytes(data))
    with pytest.raises(ShardVerificationError, match=r"train/part-00001\.parquet: xxh3_128 .*corrupt"):
        manifest.read_shard_buffer(shard)
    assert not (cache_dir / shard.sha256[:2] / f"{shard.sha256}.parquet").exists()


def test_cache_off_reads_the_store_every_time(s3_env, tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINFLOW_SHARD_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRAINFLOW_SHARD_CACHE_BYTES", "0")
    manifest = load_manifest(shard_dataset(SYN, "recommendation", config=SMALL)["manifest_uri"])
    shard = manifest.shards("train")[0]
    calls = _counting_reads(monkeypatch)
    manifest.read_shard_bytes(shard)
    manifest.read_shard_bytes(shard)
    assert calls == [shard.path, shard.path]
    assert not (tmp_path / "cache").exists()


def _blob(n: int, seed: int) -> tuple[str, pa.Buffer]:
    data = bytes((seed + i) % 251 for i in range(n))
    return hashlib.sha256(data).hexdigest(), pa.py_buffer(data)


def _check(digest: str):
    def verify(buf: pa.Buffer) -> None:
        if hashlib.sha256(memoryview(buf)).hexdigest() != digest:
            raise ValueError("sha256 differs")

    return verify


def test_least_recently_used_files_are_evicted_past_the_cap(tmp_path):
    cache = ShardFileCache(tmp_path, max_bytes=2500)
    blobs = [_blob(1000, seed) for seed in range(4)]
    for digest, data in blobs[:2]:
        cache.get(digest, 1000, lambda data=data: data, _check(digest))
    time.sleep(0.01)
    cache.get(blobs[0][0], 1000, lambda: pytest.fail("cached: no fetch"), _check(blobs[0][0]))  # used again
    time.sleep(0.01)
    cache.get(blobs[2][0], 1000, lambda: blobs[2][1], _check(blobs[2][0]))  # over the cap: evicts blob 1
    present = {d for d, _ in blobs if cache.path(d).exists()}
    assert present == {blobs[0][0], blobs[2][0]}
    assert sum(p.stat().st_size for p in tmp_path.glob("*/*.parquet")) <= 2500


def test_concurrent_readers_download_a_shard_once(tmp_path):
    cache = ShardFileCache(tmp_path, max_bytes=1 << 20)
    digest, data = _blob(50_000, 7)
    fetches = []

    def fetch():
        fetches.append(threading.get_ident())
        time.sleep(0.2)  # a slow download: the other readers arrive meanwhile
        return data

    results = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(digest, 50_000, fetch, _check(digest))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fetches) == 1
    assert len(results) == 4 and all(r.to_pybytes() == data.to_pybytes() for r in results)


def test_a_failed_fetch_caches_nothing(tmp_path):
    cache = ShardFileCache(tmp_path, max_bytes=1 << 20)
    digest, _ = _blob(100, 1)

    def fetch():
        raise ShardVerificationError("s3://b/x.parquet", "corrupt")

    with pytest.raises(ShardVerificationError, match="corrupt"):
        cache.get(digest, 100, fetch, _check(digest))
    assert list(tmp_path.glob("*/*.parquet")) == [] and list(tmp_path.glob("*/.incoming-*")) == []
