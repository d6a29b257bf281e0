"""Loading: one shuffled epoch into torch batches, trainflow's ShardLoader vs the limit and peers.

Two data sets (``benchmarks/_data.py``): image-like records (66×200×3 uint8 + steering, batch
64) and interactions (MovieLens schema, 28 bytes a row, batch 1024); ``num_workers`` 0 and 2.
Every measurement is a fresh process; the variants run interleaved (A, B, C, A, B, C, ...)
and the medians are compared:

- ``trainflow``: :class:`trainflow.trainers.loader.ShardLoader` over the project's shards (written by
  :func:`trainflow.tasks.sharding.shard_batches`, uncompressed: the images are noise-heavy, zstd saves
  8% of the bytes), sha256 of every shard verified as it is read.
- ``memory``: the limit, the same rows as pre-built tensors, one shuffled gather per batch.
- peers (``benchmarks/setup_peers.sh``): WebDataset (tar, shuffle buffer 1000), MosaicML
  Streaming (MDS, ``predownload=512``), Hugging Face ``datasets`` (``load_from_disk``,
  shuffled index batches over the memory-mapped Arrow file). Images are one sample a record;
  interactions are blocks of 1024 rows a sample for WebDataset and MDS (one sample a 28-byte
  row would cost WebDataset a ~2 KB tar header per row), so their "shuffle" moves blocks.

S3 (``--store s3``, or ``both``, the default of a full run): every dataset is written to a
moto server the case starts on 127.0.0.1 (``benchmarks/_s3.py``) and each epoch reads it from
there: trainflow's ShardLoader through s3fs (one plain GET of each whole shard, the next one
fetched while the current is decoded, into an empty node shard cache that its DataLoader
workers share; then its checksum), WebDataset as one streamed GET per tar (a ``s3`` gopen handler over boto3), MDS
``StreamingDataset(remote=...)`` into a fresh local cache each epoch (boto3 downloads: ranged
multipart GETs above 8 MB); HF ``load_from_disk(s3://..., storage_options)`` (s3fs: downloads
the Arrow files into a local folder, then maps them). moto's ranged
GETs cost ~3× a plain GET, which penalises MDS here.

    python -m benchmarks.loading            # 20k images + 2M interactions, 5 rounds, workers 0 and 2; S3: 4k / 500k
    python -m benchmarks.loading --quick    # 512 images + 20k interactions, 1 round, workers 0, local
    python -m benchmarks.loading --data interactions --rounds 3
    python -m benchmarks.loading --store s3 --rounds 3 --workers 0
"""

from __future__ import annotations

import argparse
import shutil
import sys

from benchmarks import _data
from benchmarks._s3 import moto_s3
from benchmarks.common import (
    BENCH_DIR,
    child_env,
    emit,
    guarded,
    interleave,
    machine,
    median,
    peer_python,
    run_json,
    skip,
    spread,
)

PEERS = {"webdataset": "webdataset", "mds": "streaming", "hf": "datasets"}
S3_UNSUPPORTED: dict[str, str] = {}  # every peer is wired to S3


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", nargs="+", choices=["images", "interactions"], help="data sets (default: both)")
    parser.add_argument("--rows", type=int, help="image records (default 20,000; --quick: 512)")
    parser.add_argument("--interactions", type=int, help="interactions (default 2,000,000; --quick: 20,000)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--workers", type=int, nargs="+")
    parser.add_argument("--batch", type=int, help="rows a batch (default: images 64, interactions 1024)")
    parser.add_argument("--compression", help="trainflow shard codec (default: images none, interactions zstd)")
    parser.add_argument("--peers", nargs="*", choices=list(PEERS), help="peers to compare (default: all)")
    parser.add_argument("--store", choices=["local", "s3", "both"],
                        help="local folder, S3 (a moto server on 127.0.0.1 started here) or both "
                             "(default: both; --quick: local)")
    parser.add_argument("--s3-rows", type=int, help="S3 image records (default 4,000; --quick: as local)")
    parser.add_argument("--s3-interactions", type=int, help="S3 interactions (default 500,000; --quick: as local)")
    args = parser.parse_args(argv)
    sizes = {"images": args.rows or (512 if args.quick else 20_000),
             "interactions": args.interactions or (20_000 if args.quick else 2_000_000)}
    s3_sizes = {"images": args.s3_rows or (sizes["images"] if args.quick else 4_000),
                "interactions": args.s3_interactions or (sizes["interactions"] if args.quick else 500_000)}
    rounds = args.rounds or (1 if args.quick else 5)
    workers = args.workers or ([0] if args.quick else [0, 2])
    store = args.store or ("local" if args.quick else "both")
    kinds = args.data or ["images", "interactions"]
    lines: list[dict] = []
    if store in ("local", "both"):
        for kind in kinds:
            lines += _measure(args, kind, sizes[kind], rounds, workers, None)
    if store in ("s3", "both"):
        with moto_s3() as (bucket, env):
            for kind in kinds:
                lines += _measure(args, kind, s3_sizes[kind], rounds, workers, (bucket, env))
    return lines


def _measure(args, kind: str, rows: int, rounds: int, workers: list[int], s3: tuple[str, dict] | None) -> list[dict]:
    """One epoch per variant of data set ``kind`` on one store (``s3`` = ``(bucket, env)`` of a
    moto server, else local)."""
    sfx = "_s3" if s3 else ""
    env = child_env(**s3[1]) if s3 else None
    source = _data.source(kind, rows)
    batch = args.batch or (64 if kind == "images" else 1024)
    # images: uncompressed, 1024-row row groups (40 MB); interactions: the shard step's defaults
    compression = args.compression or ("none" if kind == "images" else "zstd")
    row_group = 1024 if kind == "images" else 32768
    layout = "row" if kind == "images" else "block"
    work = _data.cache_dir() / f"loading-{kind}-{rows}-{'-'.join(args.peers) if args.peers is not None else 'all'}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)

    def where(name: str) -> str:
        return f"s3://{s3[0]}/loading-{kind}-{rows}/{name}" if s3 else str(work / name)

    lines: list[dict] = []
    # Prepare every dataset once (not timed here: that is benchmarks/sharding_write.py).
    written = run_json([sys.executable, "-m", "benchmarks._project_io", "write", str(source),
                        where("trainflow") if s3 else (work / "trainflow").as_uri(),
                        "--compression", compression, "--row-group", str(row_group)], env=env)
    manifest_uri = written["manifest_uri"]
    peers = {}
    for lib, module in PEERS.items():
        if args.peers is not None and lib not in args.peers:
            continue
        py, why = peer_python(module)
        if py is None:
            lines.append(skip(f"loading_{kind}{sfx}_{lib}", "rows/s", why, {"rows": rows}))
            continue
        if s3 and lib in S3_UNSUPPORTED:
            lines.append(skip(f"loading_{kind}{sfx}_{lib}", "rows/s", S3_UNSUPPORTED[lib], {"rows": rows, "storage": "s3"}))
            continue
        try:
            run_json([py, str(BENCH_DIR / "peers" / "peer_io.py"), "write", lib, str(source), where(lib),
                      "--layout", layout], env=env)
        except RuntimeError as exc:
            lines.append(skip(f"loading_{kind}{sfx}_{lib}", "rows/s", f"{lib} could not write the data: {str(exc)[-300:]}"))
            continue
        peers[lib] = py
    common = {"data": kind, "rows": rows, "batch": batch, "storage": "s3 (moto, 127.0.0.1)" if s3 else "local",
              "rounds": rounds, "shard_compression": compression, "shard_row_group": row_group, "peer_layout": layout,
              "machine": machine()}
    for nw in workers:
        errors: dict[str, str] = {}
        variants = {
            # guarded like the peers: a failing loader is a reported line, the others still run
            "trainflow": guarded(lambda nw=nw: run_json(
                [sys.executable, "-m", "benchmarks._project_io", "read", manifest_uri, "--batch", str(batch),
                 "--workers", str(nw)], env=env)["rows_per_s"], errors, "trainflow"),
            "memory": lambda: run_json([sys.executable, "-m", "benchmarks._project_io", "memory", str(source),
                                        "--batch", str(batch)])["rows_per_s"],
        }
        for lib, py in peers.items():
            variants[lib] = guarded(lambda lib=lib, py=py, nw=nw: run_json(
                [py, str(BENCH_DIR / "peers" / "peer_io.py"), "read", lib, where(lib), "--batch", str(batch),
                 "--workers", str(nw)], env=env)["rows_per_s"], errors, lib)
        values = interleave(variants, rounds)
        for lib, error in errors.items():
            lines.append(skip(f"loading_{kind}{sfx}_{lib}_nw{nw}", "rows/s", f"{lib} failed: {error}"))
            values.pop(lib)
        med = {k: median(v) for k, v in values.items()}
        limit = med["memory"]
        for name, value in med.items():
            if name == "memory" and nw:
                continue  # the limit does not depend on workers
            lines.append(emit(f"loading_{kind}{sfx}_{name}" + ("" if name == "memory" else f"_nw{nw}"), round(value),
                              "rows/s", round(limit), {**common, "num_workers": nw, "baseline_is": "memory (the limit)",
                                                       "runs": [round(x) for x in values[name]],
                                                       "min_max": spread(values[name])}))
        for lib in [p for p in peers if p in med and "trainflow" in med]:
            lines.append(emit(f"loading_{kind}{sfx}_trainflow_vs_{lib}_nw{nw}", round(med["trainflow"]), "rows/s",
                              round(med[lib]), {**common, "num_workers": nw, "baseline_is": lib}))
    shutil.rmtree(work, ignore_errors=True)
    return lines


if __name__ == "__main__":
    main()
