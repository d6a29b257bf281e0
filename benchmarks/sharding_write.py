"""Sharding write: trainflow's ShardWriter vs a raw copy of the same bytes and the peers.

Two data sets (``benchmarks/_data.py``), local folder: synthetic interactions (MovieLens
schema, 28 bytes a row) and image-like driving records (66×200×3 uint8 + steering). Every
writer reads the same Arrow IPC source file; each measurement is a fresh process and the
variants run interleaved (A, B, C, A, B, C, ...), medians compared. The unit is source rows
per second; the raw copy (``shutil.copyfile`` of the source) is the limit.

- ``trainflow``: :func:`tasks.sharding.shard_batches` (the shard step's ShardWriter: Parquet
  row groups, sha256 while writing, manifest committed last). Interactions with the default
  zstd; images uncompressed (``none``) and with zstd.
- peers (``benchmarks/setup_peers.sh``): ``pyarrow.parquet.write_table`` (zstd), WebDataset
  ``ShardWriter`` and MosaicML ``MDSWriter`` (images: one sample a record; interactions: blocks
  of 1024 rows a sample, since one tiny sample a row costs them a header each), Hugging Face
  ``Dataset.save_to_disk``.

    python -m benchmarks.sharding_write           # 5M interactions, 20k images, 3 rounds
    python -m benchmarks.sharding_write --quick   # 50k interactions, 256 images, 1 round
"""

from __future__ import annotations

import argparse
import shutil
import sys

from benchmarks import _data
from benchmarks.common import (
    BENCH_DIR,
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

PEERS = {"parquet": "pyarrow", "webdataset": "webdataset", "mds": "streaming", "hf": "datasets"}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--interactions", type=int)
    parser.add_argument("--images", type=int)
    parser.add_argument("--rounds", type=int)
    args = parser.parse_args(argv)
    sizes = {"interactions": args.interactions or (50_000 if args.quick else 5_000_000),
             "images": args.images or (256 if args.quick else 20_000)}
    rounds = args.rounds or (1 if args.quick else 3)
    lines: list[dict] = []
    peers = {}
    for lib, module in PEERS.items():
        py, why = peer_python(module)
        if py is None:
            for kind in sizes:
                lines.append(skip(f"sharding_write_{kind}_{lib}", "rows/s", why))
        else:
            peers[lib] = py
    for kind, size in sizes.items():
        source = _data.source(kind, size)
        rows = _data.read_source(source).num_rows  # synthetic sizes are approximate
        source_bytes = source.stat().st_size
        work = _data.cache_dir() / f"write-{kind}-{size}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        layout = "row" if kind == "images" else "block"

        def project(compression: str, kind=kind, source=source, work=work, rows=rows) -> float:
            out = run_json([sys.executable, "-m", "benchmarks._project_io", "write", str(source),
                            (work / f"trainflow-{compression}" / "v1").as_uri(), "--compression", compression])
            assert out["rows"] == rows, out
            return rows / out["seconds"]

        variants = {
            "copy": lambda source=source, work=work, rows=rows: rows / run_json(
                [sys.executable, "-m", "benchmarks._project_io", "copy", str(source), str(work / "copy.arrow")])["seconds"],
            "trainflow": lambda kind=kind: project("zstd" if kind == "interactions" else "none"),
        }
        if kind == "images":
            variants["trainflow_zstd"] = lambda: project("zstd")
        errors: dict[str, str] = {}
        for lib, py in peers.items():
            variants[lib] = guarded(lambda lib=lib, py=py, source=source, work=work, rows=rows, layout=layout: rows / run_json(
                [py, str(BENCH_DIR / "peers" / "peer_io.py"), "write", lib, str(source), str(work / lib),
                 "--layout", layout])["seconds"], errors, lib)
        values = interleave(variants, rounds)
        for lib, error in errors.items():
            lines.append(skip(f"sharding_write_{kind}_{lib}", "rows/s", f"{lib} failed: {error}"))
            values.pop(lib)
        med = {k: median(v) for k, v in values.items()}
        common = {"rows": rows, "source_mb": round(source_bytes / 1e6, 1), "storage": "local", "rounds": rounds,
                  "peer_layout": layout, "machine": machine()}
        for name, value in med.items():
            lines.append(emit(f"sharding_write_{kind}_{name}", round(value), "rows/s", round(med["copy"]),
                              {**common, "baseline_is": "raw copy of the source bytes", "runs": [round(x) for x in values[name]],
                               "min_max": spread(values[name]), "mb_per_s": round(value * source_bytes / rows / 1e6, 1)}))
        for lib in [p for p in peers if p in med]:
            lines.append(emit(f"sharding_write_{kind}_trainflow_vs_{lib}", round(med["trainflow"]), "rows/s",
                              round(med[lib]), {**common, "baseline_is": lib}))
        shutil.rmtree(work, ignore_errors=True)
    return lines


if __name__ == "__main__":
    main()
