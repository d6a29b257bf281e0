"""Sharding write: trainflow's ShardWriter vs a raw copy of the same bytes and the peers.

Two data sets (``benchmarks/_data.py``), local folder: synthetic interactions (MovieLens
schema, 28 bytes a row) and image-like driving records (66×200×3 uint8 + steering). Every
writer reads the same Arrow IPC source file; each measurement is a fresh process and the
variants run interleaved (A, B, C, A, B, C, ...), medians compared, each after a ``sync``
(so no writer starts while the kernel still writes back the previous one's pages). The unit is
source rows per second; the raw copy (``shutil.copyfile`` of the source) is the limit.

- ``trainflow``: :func:`trainflow.tasks.sharding.shard_batches` (the shard step's ShardWriter: Parquet
  row groups; each closed shard hashed (sha256, xxh3-128) and published on a background
  thread while the next is encoded; manifest committed last). Interactions with the default
  zstd and uncompressed (``trainflow_none``, the bytes the block-layout peers write); images
  uncompressed (``none``) and with zstd.
- peers (``benchmarks/setup_peers.sh``): ``pyarrow.parquet.write_table`` (zstd), WebDataset
  ``ShardWriter`` and MosaicML ``MDSWriter`` (images: one sample a record; interactions: blocks
  of 1024 rows a sample, since one tiny sample a row costs them a header each), Hugging Face
  ``Dataset.save_to_disk``.

S3 (``--store s3``, or ``both``, the default of a full run): the same writers against a moto
server the case starts on 127.0.0.1 (``benchmarks/_s3.py``); the limit is an upload of the
source bytes, one s3fs ``pipe_file`` per 128 MB piece through trainflow's own client (one PUT
below 100 MB, as for the sizes measured). pyarrow writes
through its own S3 filesystem, WebDataset uploads each tar as it closes (``post`` hook), MDS
with ``out=(local, s3://...)``; HF ``save_to_disk(s3://..., storage_options)`` through s3fs.

    python -m benchmarks.sharding_write           # 5M interactions, 20k images, 3 rounds; S3: 1M, 2k
    python -m benchmarks.sharding_write --quick   # 50k interactions, 256 images, 1 round, local
    python -m benchmarks.sharding_write --store s3 --rounds 5
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
    flush_dirty_pages,
    guarded,
    interleave,
    machine,
    median,
    peer_python,
    run_json,
    skip,
    spread,
)

PEERS = {"parquet": "pyarrow", "webdataset": "webdataset", "mds": "streaming", "hf": "datasets"}
S3_UNSUPPORTED: dict[str, str] = {}  # every peer is wired to S3


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--data", nargs="+", choices=["interactions", "images"], help="data sets (default: both)")
    parser.add_argument("--interactions", type=int)
    parser.add_argument("--images", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--store", choices=["local", "s3", "both"],
                        help="local folder, S3 (a moto server on 127.0.0.1 started here) or both "
                             "(default: both; --quick: local)")
    parser.add_argument("--s3-interactions", type=int, help="S3 size (default 1,000,000; --quick: as local)")
    parser.add_argument("--s3-images", type=int, help="S3 size (default 2,000; --quick: as local)")
    args = parser.parse_args(argv)
    sizes = {"interactions": args.interactions or (50_000 if args.quick else 5_000_000),
             "images": args.images or (256 if args.quick else 20_000)}
    s3_sizes = {"interactions": args.s3_interactions or (sizes["interactions"] if args.quick else 1_000_000),
                "images": args.s3_images or (sizes["images"] if args.quick else 2_000)}
    rounds = args.rounds or (1 if args.quick else 3)
    store = args.store or ("local" if args.quick else "both")
    kinds = args.data or ["interactions", "images"]
    sizes = {k: v for k, v in sizes.items() if k in kinds}
    s3_sizes = {k: v for k, v in s3_sizes.items() if k in kinds}
    lines: list[dict] = []
    peers = {}
    for lib, module in PEERS.items():
        py, why = peer_python(module)
        if py is None:
            for kind in sizes:
                for where in ([""] if store == "local" else ["_s3"] if store == "s3" else ["", "_s3"]):
                    lines.append(skip(f"sharding_write_{kind}{where}_{lib}", "rows/s", why))
        else:
            peers[lib] = py
    if store in ("local", "both"):
        for kind, size in sizes.items():
            lines += _measure(kind, size, rounds, peers, None)
    if store in ("s3", "both"):
        with moto_s3() as (bucket, env):
            for kind, size in s3_sizes.items():
                lines += _measure(kind, size, rounds, peers, (bucket, env))
    return lines


def _measure(kind: str, size: int, rounds: int, peers: dict[str, str], s3: tuple[str, dict] | None) -> list[dict]:
    """One data set on one store (``s3`` = ``(bucket, env)`` of a moto server, else local)."""
    lines: list[dict] = []
    sfx = "_s3" if s3 else ""
    env = child_env(**s3[1]) if s3 else None
    source = _data.source(kind, size)
    rows = _data.read_source(source).num_rows  # synthetic sizes are approximate
    source_bytes = source.stat().st_size
    work = _data.cache_dir() / f"write-{kind}-{size}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    target = f"s3://{s3[0]}/write-{kind}-{size}" if s3 else None

    def where(name: str) -> str:
        return f"{target}/{name}" if s3 else str(work / name)

    layout = "row" if kind == "images" else "block"

    def project(compression: str) -> float:
        root = f"{target}/trainflow-{compression}/v1" if s3 else (work / f"trainflow-{compression}" / "v1").as_uri()
        out = run_json([sys.executable, "-m", "benchmarks._project_io", "write", str(source), root,
                        "--compression", compression], env=env)
        assert out["rows"] == rows, out
        return rows / out["seconds"]

    variants = {
        "copy": lambda: rows / run_json([sys.executable, "-m", "benchmarks._project_io", "copy", str(source),
                                         where("copy") if s3 else where("copy.arrow")], env=env)["seconds"],
        "trainflow": lambda: project("zstd" if kind == "interactions" else "none"),
    }
    if kind == "images":
        variants["trainflow_zstd"] = lambda: project("zstd")
    else:  # the same bytes MDS and WebDataset write: uncompressed
        variants["trainflow_none"] = lambda: project("none")
    errors: dict[str, str] = {}
    for lib, py in peers.items():
        if s3 and lib in S3_UNSUPPORTED:
            lines.append(skip(f"sharding_write_{kind}{sfx}_{lib}", "rows/s", S3_UNSUPPORTED[lib], {"storage": "s3"}))
            continue
        variants[lib] = guarded(lambda lib=lib, py=py: rows / run_json(
            [py, str(BENCH_DIR / "peers" / "peer_io.py"), "write", lib, str(source), where(lib),
             "--layout", layout], env=env)["seconds"], errors, lib)
    values = interleave(variants, rounds, before=flush_dirty_pages)
    for lib, error in errors.items():
        lines.append(skip(f"sharding_write_{kind}{sfx}_{lib}", "rows/s", f"{lib} failed: {error}"))
        values.pop(lib)
    med = {k: median(v) for k, v in values.items()}
    common = {"rows": rows, "source_mb": round(source_bytes / 1e6, 1), "storage": "s3 (moto, 127.0.0.1)" if s3 else "local",
              "rounds": rounds, "peer_layout": layout, "machine": machine()}
    copy_is = ("upload of the source bytes, one s3fs pipe_file per 128 MB piece" if s3
               else "raw copy of the source bytes")
    for name, value in med.items():
        lines.append(emit(f"sharding_write_{kind}{sfx}_{name}", round(value), "rows/s", round(med["copy"]),
                          {**common, "baseline_is": copy_is, "runs": [round(x) for x in values[name]],
                           "min_max": spread(values[name]), "mb_per_s": round(value * source_bytes / rows / 1e6, 1)}))
    for lib in [p for p in peers if p in med]:
        lines.append(emit(f"sharding_write_{kind}{sfx}_trainflow_vs_{lib}", round(med["trainflow"]), "rows/s",
                          round(med[lib]), {**common, "baseline_is": lib}))
    shutil.rmtree(work, ignore_errors=True)
    return lines


if __name__ == "__main__":
    main()
