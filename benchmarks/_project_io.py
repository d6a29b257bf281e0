"""trainflow's side of the I/O benchmarks, run in a fresh process per measurement.

    python -m benchmarks._project_io write SOURCE ROOT_URL --compression zstd [--row-group 32768]
    python -m benchmarks._project_io read MANIFEST_URI --batch 64 --workers 0
    python -m benchmarks._project_io memory SOURCE --batch 64
    python -m benchmarks._project_io copy SOURCE TARGET

``write`` shards an Arrow IPC source with :func:`trainflow.tasks.sharding.shard_batches` (the same
ShardWriter and manifest as the DAG's shard step) and prints seconds, rows and bytes; ``read``
iterates one shuffled epoch of :class:`trainflow.trainers.loader.ShardLoader` into torch batches;
``memory`` is the limit: the same rows as pre-built tensors, one shuffled gather per batch;
``copy`` copies the source file (the limit of a write; to ``s3://`` one upload per shard-sized piece).
ROOT_URL, MANIFEST_URI and TARGET may be ``s3://`` URLs (the environment names the endpoint).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def write(source: str, root: str, compression: str, row_group: int, target_mb: int) -> dict:
    import pyarrow.parquet  # noqa: F401  (imports outside the timed part, as for the peers)

    from benchmarks._data import read_source
    from trainflow.tasks.sharding import ShardingConfig, shard_batches
    from trainflow.tasks.storage import Storage

    table = read_source(source)
    config = ShardingConfig(compression=compression, row_group_rows=row_group, target_shard_bytes=target_mb << 20)
    store = Storage(root)
    if store.list(recursive=True):
        for path in store.list(recursive=True):
            store.delete(path)
    started = time.perf_counter()
    manifest = shard_batches(table.to_batches(max_chunksize=65536), table.schema, store, name="bench", kind="bench",
                             config=config)
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": manifest.num_rows("train"), "bytes": sum(s.num_bytes for s in manifest.shards("train")),
            "manifest_uri": manifest.uri}


def copy(source: str, target: str, target_mb: int = 128) -> dict:
    """Copy the source file: locally ``shutil.copyfile``; to ``s3://`` one s3fs ``pipe_file`` per
    shard-sized piece (``target_mb``) through trainflow's own fsspec/s3fs client, the limit of an
    upload (s3fs sends a piece under 100 MB as one PUT, a larger one as a multipart upload)."""
    import os
    import shutil

    if not target.startswith("s3://"):
        started = time.perf_counter()
        shutil.copyfile(source, target)
        seconds = time.perf_counter() - started
        return {"seconds": seconds, "bytes": os.path.getsize(target), "objects": 1}
    from trainflow.tasks.storage import filesystem

    fs, path = filesystem(target)
    with open(source, "rb") as handle:
        data = handle.read()  # read before the clock, as the writers read a page-cached source
    piece = target_mb << 20
    fs.ls(path.split("/", 1)[0])  # warms the client (connection, credentials) outside the timed part
    started = time.perf_counter()
    for k, start in enumerate(range(0, len(data), piece)):
        fs.pipe_file(f"{path}/part-{k:05d}", data[start:start + piece])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "bytes": len(data), "objects": -(-len(data) // piece)}


def read(manifest_uri: str, batch: int, workers: int, seed: int) -> dict:
    import os
    import shutil
    import tempfile

    import pyarrow.compute  # noqa: F401  (imports outside the timed part, as for the peers)
    import pyarrow.parquet  # noqa: F401

    from trainflow.tasks.manifest import load_manifest
    from trainflow.trainers.loader import ShardLoader

    # From S3, an empty node cache: the epoch downloads every shard, as the peers' epochs do here
    cache = tempfile.mkdtemp(prefix="bench-shard-cache-") if manifest_uri.startswith("s3://") else None
    if cache:
        os.environ["TRAINFLOW_SHARD_CACHE_DIR"] = cache
    try:
        load_manifest(manifest_uri)  # warms fsspec's filesystem
        started = time.perf_counter()
        loader = ShardLoader(load_manifest(manifest_uri), "train", batch, seed=seed, num_workers=workers)
        rows = 0
        for b in loader:
            rows += len(next(iter(b.values())))
        seconds = time.perf_counter() - started
    finally:
        if cache:
            shutil.rmtree(cache, ignore_errors=True)
    return {"seconds": seconds, "rows": rows, "rows_per_s": rows / seconds}


def memory(source: str, batch: int, seed: int) -> dict:
    import torch

    from benchmarks._data import read_source
    from trainflow.trainers.loader import _column_to_tensor

    table = read_source(source)
    tensors = {name: _column_to_tensor(table.column(name)) for name in table.column_names}
    n = table.num_rows
    started = time.perf_counter()
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    rows = 0
    for b in range(n // batch):
        idx = order[b * batch:(b + 1) * batch]
        # index_select: the fast gather (t[idx] on a (N, 39600) uint8 tensor is ~6x slower here)
        out = {name: t.index_select(0, idx) for name, t in tensors.items()}
        rows += len(out[table.column_names[0]])
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": rows, "rows_per_s": rows / seconds}


def main() -> None:
    from benchmarks.common import pin_threads

    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["write", "read", "memory", "copy"])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--compression", default="zstd")
    parser.add_argument("--row-group", type=int, default=32768)
    parser.add_argument("--target-mb", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pin_threads()
    if args.command == "write":
        result = write(args.paths[0], args.paths[1], args.compression, args.row_group, args.target_mb)
    elif args.command == "read":
        result = read(args.paths[0], args.batch, args.workers, args.seed)
    elif args.command == "copy":
        result = copy(args.paths[0], args.paths[1], args.target_mb)
    else:
        result = memory(args.paths[0], args.batch, args.seed)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
