"""trainflow.trainers.loader: exactly-once coverage, world-size invariance, shuffling, resume, verification."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from trainflow.tasks.manifest import ShardVerificationError, load_manifest
from trainflow.trainers.distributed import World
from trainflow.trainers.loader import ShardLoader

COLUMNS = ["user_idx", "item_idx", "rating"]


def _rows(loader) -> list[list[int]]:
    return [b["row_index"].tolist() for b in loader]


def _loader(manifest, rank=0, world_size=1, batch_size=32, **kwargs):
    return ShardLoader(manifest, "train", batch_size, world=World(rank=rank, world_size=world_size),
                       columns=COLUMNS, with_row_index=True, seed=3, window_row_groups=2, **kwargs)


def test_exactly_once_across_two_ranks_and_two_workers(toy_manifest):
    n = toy_manifest.num_rows("train")
    per_rank = [_rows(_loader(toy_manifest, rank=r, world_size=2, num_workers=2)) for r in range(2)]
    expected_batches = n // 64
    assert [len(batches) for batches in per_rank] == [expected_batches, expected_batches]
    assert all(len(b) == 32 for batches in per_rank for b in batches)
    seen = [row for batches in per_rank for b in batches for row in b]
    assert len(seen) == len(set(seen)) == expected_batches * 64  # no duplicates
    assert set(seen) <= set(range(n))
    assert n - len(seen) < 64  # only the remainder of the last global batch is dropped


def test_pad_covers_every_row_once_among_masked_rows(toy_manifest):
    n = toy_manifest.num_rows("train")
    real: list[int] = []
    counts = []
    for r in range(2):
        loader = _loader(toy_manifest, rank=r, world_size=2, remainder="pad", num_workers=2)
        batches = list(loader)
        counts.append(len(batches))
        for b in batches:
            real.extend(b["row_index"][b["sample_mask"]].tolist())
    assert counts == [-(-n // 64)] * 2
    assert sorted(real) == list(range(n))


def test_batches_do_not_depend_on_the_number_of_ranks(toy_manifest):
    one = _rows(_loader(toy_manifest, batch_size=64))
    two = [_rows(_loader(toy_manifest, rank=r, world_size=2, batch_size=32)) for r in range(2)]
    assert len(one) == len(two[0])
    for b, rows in enumerate(one):
        assert rows == two[0][b] + two[1][b]


def test_columns_values_match_the_shards(toy_manifest):
    table = toy_manifest.read_table("train", columns=COLUMNS)
    batch = next(iter(_loader(toy_manifest)))
    idx = batch["row_index"].numpy()
    assert batch["user_idx"].dtype == torch.int32 and batch["rating"].dtype == torch.float32
    np.testing.assert_array_equal(batch["user_idx"].numpy(), table.column("user_idx").to_numpy()[idx])
    np.testing.assert_array_equal(batch["rating"].numpy(), table.column("rating").to_numpy()[idx])


def test_shuffle_depends_on_seed_and_epoch_only(toy_manifest):
    loader = _loader(toy_manifest)
    epoch0 = _rows(loader)
    assert loader.epoch == 1  # a full pass moves to the next epoch
    epoch1 = _rows(loader)
    assert epoch0 != epoch1
    assert sorted(sum(epoch0, [])) != list(range(len(sum(epoch0, []))))  # actually shuffled
    again = _loader(toy_manifest)
    assert _rows(again) == epoch0
    plain = ShardLoader(toy_manifest, "train", 32, columns=COLUMNS, with_row_index=True, shuffle=False)
    assert sum(_rows(plain), []) == list(range(len(plain) * 32))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_epoch_equals_uninterrupted(toy_manifest, num_workers):
    def transform(batch, info):
        batch["noise"] = torch.randint(0, 1000, (3,), generator=info.generator)
        return batch

    full = _loader(toy_manifest, rank=1, world_size=2, num_workers=num_workers, transform=transform)
    full.set_epoch(1)
    expected = [(b["row_index"].tolist(), b["noise"].tolist()) for b in full]

    first = _loader(toy_manifest, rank=1, world_size=2, num_workers=num_workers, transform=transform)
    first.set_epoch(1)
    got = []
    for b in first:
        got.append((b["row_index"].tolist(), b["noise"].tolist()))
        if len(got) == 5:
            break
    state = first.state_dict()
    assert state["epoch"] == 1 and state["position"] == 5

    resumed = _loader(toy_manifest, rank=1, world_size=2, num_workers=num_workers, transform=transform)
    resumed.load_state_dict(state)
    got += [(b["row_index"].tolist(), b["noise"].tolist()) for b in resumed]
    assert got == expected


def test_state_from_another_global_batch_is_refused(toy_manifest):
    state = _loader(toy_manifest, batch_size=32).state_dict()
    with pytest.raises(ValueError, match="global batch"):
        _loader(toy_manifest, batch_size=16).load_state_dict(state)
    # other windows give another epoch order: resuming there would break exactly-once
    with pytest.raises(ValueError, match="window_bytes"):
        _loader(toy_manifest, batch_size=32, window_bytes=1000).load_state_dict(state)
    with pytest.raises(ValueError, match="window_row_groups"):
        ShardLoader(toy_manifest, "train", 32, columns=COLUMNS, with_row_index=True, seed=3,
                    window_row_groups=3).load_state_dict(state)


def test_list_columns_become_2d_tensors(toy_manifest):
    loader = ShardLoader(toy_manifest, "valid", 16, columns=["user_idx", "neg_item_idx"], shuffle=False)
    batch = next(iter(loader))
    assert batch["neg_item_idx"].shape == (16, 20)
    first = toy_manifest.read_table("valid", columns=["neg_item_idx"]).column(0)[0].as_py()
    assert batch["neg_item_idx"][0].tolist() == first


def test_unknown_column_is_named(toy_manifest):
    with pytest.raises(ValueError, match="no_such_column"):
        ShardLoader(toy_manifest, "train", 8, columns=["no_such_column"])


def test_corrupt_shard_fails_with_its_name(toy_manifest, toy_settings, tmp_path):
    import shutil

    base = toy_manifest.base_url.removeprefix("file://")
    copy = tmp_path / "copy"
    shutil.copytree(base, copy)
    shard = toy_manifest.shards("train")[3].path
    with open(copy / shard, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02")
    manifest = load_manifest(str(copy), toy_settings)
    with pytest.raises(ShardVerificationError, match=os.path.basename(shard)):
        for _ in ShardLoader(manifest, "train", 32, columns=COLUMNS, window_row_groups=1):
            pass


def test_fixed_size_binary_columns_become_uint8_rows(tmp_path):
    import pyarrow as pa

    from trainflow.tasks.sharding import ShardingConfig, shard_batches
    from trainflow.tasks.storage import Storage

    schema = pa.schema([("id", pa.int64()), ("image", pa.binary(12))])
    images = np.arange(40 * 12, dtype=np.uint8).reshape(40, 12)
    batch = pa.RecordBatch.from_arrays(
        [pa.array(np.arange(40)), pa.FixedSizeBinaryArray.from_buffers(pa.binary(12), 40, [None, pa.py_buffer(images.tobytes())])],
        schema=schema,
    )
    store = Storage((tmp_path / "images" / "v1").as_uri())
    config = ShardingConfig(row_group_rows=8, target_shard_bytes=1024, compression="none")
    manifest = shard_batches([batch], schema, store, name="images", kind="images", config=config)
    assert len(manifest.shards("train")) > 1
    seen = 0
    for b in ShardLoader(manifest, "train", 6, seed=1, window_row_groups=2):
        assert b["image"].dtype == torch.uint8 and b["image"].shape == (6, 12)
        assert torch.equal(b["image"], torch.from_numpy(images[b["id"].numpy()]))
        seen += 6
    assert seen == 36  # 40 // 6 batches of 6 (remainder dropped)
    with pytest.raises(ValueError, match=r"\['image'\]"):
        other = pa.schema([("id", pa.int64()), ("image", pa.binary())])
        shard_batches([pa.RecordBatch.from_arrays([pa.array([1]), pa.array([b"x"])], schema=other)], schema,
                      Storage((tmp_path / "bad" / "v1").as_uri()), name="bad", kind="images")


@pytest.mark.parametrize("width", [12, 3000])
def test_batches_gather_every_column_type_from_multi_row_group_windows(tmp_path, width):
    """Batches are gathered straight from a window's row groups: wide rows one by one, narrow
    fixed-width columns vectorised, anything else (strings, lists, nulls) through Arrow. Every
    value must be the one of its row, whatever row group of the window it came from."""
    import pyarrow as pa

    from trainflow.tasks.sharding import ShardingConfig, shard_batches
    from trainflow.tasks.storage import Storage

    n = 300
    ids = np.arange(n)
    images = (ids[:, None] * 7 + np.arange(width)[None, :]).astype(np.uint8)
    schema = pa.schema([("id", pa.int64()), ("image", pa.binary(width)), ("score", pa.float32()),
                        ("maybe", pa.int32()), ("name", pa.string()), ("track", pa.list_(pa.float32()))])
    batch = pa.RecordBatch.from_arrays([
        pa.array(ids),
        pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(images.tobytes())]),
        pa.array(ids / 2, pa.float32()),
        pa.array([None if i % 7 == 0 else i for i in ids], pa.int32()),
        pa.array([f"row-{i}" for i in ids]),
        pa.array([[float(i)] * (i % 3 + 1) for i in ids], pa.list_(pa.float32())),
    ], schema=schema)
    store = Storage((tmp_path / "mixed" / "v1").as_uri())
    config = ShardingConfig(row_group_rows=16, target_shard_bytes=8 * width * 16, compression="none")
    manifest = shard_batches([batch], schema, store, name="mixed", kind="mixed", config=config)
    assert len(manifest.shards("train")) > 2
    seen = []
    for b in ShardLoader(manifest, "train", 10, seed=3, window_row_groups=3, remainder="pad"):
        got = b["id"].numpy()
        seen.extend(got[b["sample_mask"].numpy()].tolist())
        assert b["image"].shape == (10, width)
        assert torch.equal(b["image"], torch.from_numpy(images[got]))
        assert torch.equal(b["score"], torch.from_numpy((got / 2).astype(np.float32)))
        maybe = b["maybe"].numpy()
        assert all(np.isnan(m) if i % 7 == 0 else m == i for i, m in zip(got, maybe))
        assert b["name"] == [f"row-{i}" for i in got]
        offsets = b["track_offsets"].numpy()
        assert np.diff(offsets).tolist() == [i % 3 + 1 for i in got]
        assert b["track"].numpy().tolist() == [float(i) for i in got for _ in range(i % 3 + 1)]
    assert sorted(seen) == ids.tolist()


def test_window_bytes_caps_windows_of_wide_rows(tmp_path):
    import pyarrow as pa

    from trainflow.tasks.sharding import ShardingConfig, shard_batches
    from trainflow.tasks.storage import Storage

    n, width = 200, 4000
    schema = pa.schema([("id", pa.int64()), ("image", pa.binary(width))])
    images = np.zeros((n, width), np.uint8)
    batch = pa.RecordBatch.from_arrays(
        [pa.array(np.arange(n)), pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, pa.py_buffer(images)])],
        schema=schema,
    )
    config = ShardingConfig(row_group_rows=20, target_shard_bytes=200_000, compression="none")
    manifest = shard_batches([batch], schema, Storage((tmp_path / "wide" / "v1").as_uri()), name="wide", kind="wide",
                             config=config)
    # a row group is ~80 kB: a 100 kB cap leaves one per window, no cap leaves window_row_groups
    capped = ShardLoader(manifest, "train", 8, seed=2, window_row_groups=4, window_bytes=100_000)
    assert [len(w) for w in capped._windows(capped._epoch_units(0))] == [1] * 10
    uncapped = ShardLoader(manifest, "train", 8, seed=2, window_row_groups=4, window_bytes=None)
    assert [len(w) for w in uncapped._windows(uncapped._epoch_units(0))] == [4, 4, 2]
    for loader in (capped, uncapped):
        seen = [i for b in loader for i in b["id"].tolist()]
        assert sorted(seen) == list(range(n))
    # capped: every window's 20 rows stay together, so each batch of 8 holds rows of at most
    # two consecutive row groups of the epoch order
    first = next(iter(capped))["id"].numpy()
    assert len({int(i) // 20 for i in first}) <= 2
    with pytest.raises(ValueError, match="window_bytes"):
        ShardLoader(manifest, "train", 8, window_bytes=0)


def test_workers_read_shards_from_s3(s3_env):
    """DataLoader workers are forked: the parent's s3fs filesystem (and its event loop) cannot be
    used there, so each worker must open its own and read the same rows as in-process loading."""
    from trainflow.tasks.settings import get_settings
    from trainflow.tasks.sharding import ShardingConfig, shard_dataset

    settings = get_settings()
    config = ShardingConfig(row_group_rows=128, target_shard_bytes=4096, num_negatives=5)
    summary = shard_dataset("synthetic://recommendation?num_interactions=1500&num_users=60&num_items=200&seed=4",
                            "recommendation", config=config, settings=settings)
    manifest = load_manifest(summary["manifest_uri"], settings)
    assert manifest.uri.startswith("s3://")
    manifest.storage.fs.ls(manifest.storage.url().removeprefix("s3://"))  # the parent uses s3fs before forking
    in_process = _rows(_loader(manifest, num_workers=0))
    with_workers = _rows(_loader(manifest, num_workers=2))
    assert with_workers == in_process and len(in_process) == manifest.num_rows("train") // 32


def test_no_decoding_thread_outlives_the_iteration(toy_manifest):
    """The prefetch thread is joined when an epoch ends or the consumer stops early: a daemon
    thread still inside pyarrow at interpreter exit aborts the process (seen as exit code 134)."""
    import threading

    def prefetchers():
        return [t for t in threading.enumerate() if t.name in ("shard-prefetch", "shard-fetch")]

    assert sum(1 for _ in _loader(toy_manifest, prefetch_windows=1)) > 2
    assert prefetchers() == []
    loader = _loader(toy_manifest, prefetch_windows=1)
    iterator = iter(loader)
    next(iterator)
    iterator.close()  # the consumer stops after one batch (break, exception, ...)
    assert prefetchers() == []


def test_boolean_columns_match_the_shards_in_order(toy_manifest):
    """Booleans are bit-packed in Arrow: the loader unpacks them once per window."""
    expected = toy_manifest.read_table("train", columns=["is_valid", "user_idx"])
    loader = ShardLoader(toy_manifest, "train", 100, columns=["is_valid", "user_idx"], shuffle=False,
                         remainder="pad")
    batches = list(loader)
    mask = torch.cat([b["sample_mask"] for b in batches])
    flags = torch.cat([b["is_valid"] for b in batches])[mask]
    assert flags.dtype == torch.bool and flags.any() and not flags.all()
    assert flags.tolist() == expected.column("is_valid").to_pylist()
    users = torch.cat([b["user_idx"] for b in batches])[mask]
    assert users.tolist() == expected.column("user_idx").to_pylist()


def test_several_splits_read_as_one_cover_each_row_once(toy_manifest):
    """A refit on train + valid reads both splits as one: every row of each once per epoch,
    across ranks, ``row_index`` counting through the splits in the order given."""
    cols = ["user_idx", "item_idx"]
    tables = [toy_manifest.read_table(split, columns=cols) for split in ("train", "eval")]
    n = sum(t.num_rows for t in tables)
    seen, values = [], {}
    for r in range(2):
        loader = ShardLoader(toy_manifest, ("train", "eval"), 32, world=World(rank=r, world_size=2), columns=cols,
                             with_row_index=True, seed=3, window_row_groups=2, remainder="pad")
        assert loader.num_rows == n
        for b in loader:
            rows = b["row_index"][b["sample_mask"]].tolist()
            seen.extend(rows)
            values.update(zip(rows, zip(b["user_idx"][b["sample_mask"]].tolist(),
                                        b["item_idx"][b["sample_mask"]].tolist(), strict=True), strict=True))
    assert sorted(seen) == list(range(n))
    users = np.concatenate([t.column("user_idx").to_numpy() for t in tables])
    items = np.concatenate([t.column("item_idx").to_numpy() for t in tables])
    assert all(values[i] == (users[i], items[i]) for i in range(n))
    with pytest.raises(ValueError, match="distinct"):
        ShardLoader(toy_manifest, ("train", "train"), 32)
    with pytest.raises(ValueError, match="not in split 'eval'"):
        ShardLoader(toy_manifest, ("train", "eval"), 32, columns=["rating"])
