"""The benchmark data sets, generated once and cached as Arrow IPC files (the "source").

- ``interactions``: synthetic MovieLens-schema interactions from
  :mod:`trainflow.trainers.recommendation.synthetic` (user_id, item_id, rating, timestamp).
- ``images``: driving-camera-size records: ``image`` (66×200×3 uint8 as a fixed-size binary of
  39,600 bytes, the PilotNet input), ``steering`` (float32) and ``id`` (int64). Smooth
  road-like gradients with noise, so compression has something (but not everything) to gain.

Every writer in :mod:`benchmarks.sharding_write` reads the same source file; the raw-copy
baseline copies its bytes.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

IMAGE_SHAPE = (66, 200, 3)
IMAGE_BYTES = int(np.prod(IMAGE_SHAPE))


def cache_dir() -> Path:
    path = Path(os.environ.get("TRAINFLOW_BENCH_DIR", Path(tempfile.gettempdir()) / "trainflow-bench"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def image_schema():
    import pyarrow as pa

    return pa.schema([("id", pa.int64()), ("steering", pa.float32()), ("image", pa.binary(IMAGE_BYTES))])


def image_batches(num_rows: int, block: int = 1024, seed: int = 0):
    """RecordBatches of image records, deterministic in ``seed``."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    rows = np.arange(IMAGE_SHAPE[0], dtype=np.float32)[:, None, None] / IMAGE_SHAPE[0]
    cols = np.arange(IMAGE_SHAPE[1], dtype=np.float32)[None, :, None]
    chan = np.array([0.9, 1.0, 1.1], dtype=np.float32)[None, None, :]
    bins = np.linspace(-1, 1, 65, dtype=np.float32)
    # One road per steering bin (the road bends with the steering), noise per image.
    roads = np.stack([
        np.clip((100 + 80 * np.tanh((cols - 100 - 60 * b * rows) / 25) * rows) * chan + 40, 0, 230).astype(np.uint8)
        for b in bins
    ])
    for start in range(0, num_rows, block):
        n = min(block, num_rows - start)
        steering = rng.uniform(-1, 1, n).astype(np.float32)
        images = roads[np.searchsorted(bins, steering)]
        images += rng.integers(0, 24, images.shape, dtype=np.uint8)
        flat = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(IMAGE_BYTES), n, [None, pa.py_buffer(images.tobytes())]
        )
        yield pa.RecordBatch.from_arrays(
            [pa.array(np.arange(start, start + n, dtype=np.int64)), pa.array(steering), flat], schema=image_schema()
        )


def interaction_batches(num_rows: int):
    from trainflow.trainers.recommendation.synthetic import (
        SyntheticRecommendation,
        SyntheticRecommendationConfig,
    )

    users = max(100, min(200_000, num_rows // 50))
    config = SyntheticRecommendationConfig(num_interactions=num_rows, num_users=users, num_items=max(2000, num_rows // 200))
    yield from SyntheticRecommendation(config).iter_batches()


def source(kind: str, num_rows: int) -> Path:
    """The cached Arrow IPC file of ``kind`` with ``num_rows`` rows (generated on first use)."""
    import pyarrow as pa

    path = cache_dir() / f"source-{kind}-{num_rows}.arrow"
    if path.exists():
        return path
    batches = image_batches(num_rows) if kind == "images" else interaction_batches(num_rows)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # two cases may generate it at once
    writer = None
    for batch in batches:
        if writer is None:
            writer = pa.ipc.new_file(str(tmp), batch.schema)
        writer.write_batch(batch)
    assert writer is not None
    writer.close()
    tmp.rename(path)
    return path


def read_source(path: Path):
    """The source as a (memory-mapped) Arrow table."""
    import pyarrow as pa

    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()
