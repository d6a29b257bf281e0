"""Loading: one shuffled epoch into torch batches, trainflow's ShardLoader vs the limit and peers.

Image-like records (``benchmarks/_data.py``: 66×200×3 uint8 + steering), local folder, batch
64, ``num_workers`` 0 and 2. Every measurement is a fresh process; the variants run
interleaved (A, B, C, A, B, C, ...) and the medians are compared:

- ``trainflow``: :class:`trainers.loader.ShardLoader` over the project's shards (written by
  :func:`tasks.sharding.shard_batches`, uncompressed: the images are noise-heavy, zstd saves
  8% of the bytes), sha256 of every shard verified as it is read.
- ``memory``: the limit, the same rows as pre-built tensors, one shuffled gather per batch.
- peers (``benchmarks/setup_peers.sh``): WebDataset (tar, one sample per record, shuffle
  buffer 1000), MosaicML Streaming (MDS, ``predownload=512``), Hugging Face ``datasets``
  (``load_from_disk``, shuffled index batches over the memory-mapped Arrow file).

    python -m benchmarks.loading            # 20k records, 5 rounds, workers 0 and 2
    python -m benchmarks.loading --quick    # 512 records, 1 round, workers 0
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

PEERS = {"webdataset": "webdataset", "mds": "streaming", "hf": "datasets"}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--workers", type=int, nargs="+")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--compression", default="none")
    parser.add_argument("--peers", nargs="*", choices=list(PEERS), help="peers to compare (default: all)")
    args = parser.parse_args(argv)
    rows = args.rows or (512 if args.quick else 20_000)
    rounds = args.rounds or (1 if args.quick else 5)
    workers = args.workers or ([0] if args.quick else [0, 2])
    source = _data.source("images", rows)
    work = _data.cache_dir() / f"loading-{rows}-{'-'.join(args.peers) if args.peers is not None else 'all'}"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    lines: list[dict] = []
    # Prepare every dataset once (not timed here: that is benchmarks/sharding_write.py).
    written = run_json([sys.executable, "-m", "benchmarks._project_io", "write", str(source), (work / "trainflow").as_uri(),
                        "--compression", args.compression, "--row-group", "1024"])
    manifest_uri = written["manifest_uri"]
    peers = {}
    for lib, module in PEERS.items():
        if args.peers is not None and lib not in args.peers:
            continue
        py, why = peer_python(module)
        if py is None:
            lines.append(skip(f"loading_images_{lib}", "rows/s", why, {"rows": rows}))
            continue
        try:
            run_json([py, str(BENCH_DIR / "peers" / "peer_io.py"), "write", lib, str(source), str(work / lib)])
        except RuntimeError as exc:
            lines.append(skip(f"loading_images_{lib}", "rows/s", f"{lib} could not write the data: {str(exc)[-300:]}"))
            continue
        peers[lib] = py
    common = {"rows": rows, "batch": args.batch, "storage": "local", "rounds": rounds,
              "shard_compression": args.compression, "machine": machine()}
    for nw in workers:
        variants = {
            "trainflow": lambda nw=nw: run_json([sys.executable, "-m", "benchmarks._project_io", "read", manifest_uri,
                                                 "--batch", str(args.batch), "--workers", str(nw)])["rows_per_s"],
            "memory": lambda: run_json([sys.executable, "-m", "benchmarks._project_io", "memory", str(source),
                                        "--batch", str(args.batch)])["rows_per_s"],
        }
        errors: dict[str, str] = {}
        for lib, py in peers.items():
            variants[lib] = guarded(lambda lib=lib, py=py, nw=nw: run_json(
                [py, str(BENCH_DIR / "peers" / "peer_io.py"), "read", lib, str(work / lib), "--batch", str(args.batch),
                 "--workers", str(nw)])["rows_per_s"], errors, lib)
        values = interleave(variants, rounds)
        for lib, error in errors.items():
            lines.append(skip(f"loading_images_{lib}_nw{nw}", "rows/s", f"{lib} failed: {error}"))
            values.pop(lib)
        med = {k: median(v) for k, v in values.items()}
        limit = med["memory"]
        for name, value in med.items():
            if name == "memory" and nw:
                continue  # the limit does not depend on workers
            lines.append(emit(f"loading_images_{name}" + ("" if name == "memory" else f"_nw{nw}"), round(value),
                              "rows/s", round(limit), {**common, "num_workers": nw, "baseline_is": "memory (the limit)",
                                                       "runs": [round(x) for x in values[name]],
                                                       "min_max": spread(values[name])}))
        for lib in [p for p in peers if p in med]:
            lines.append(emit(f"loading_images_trainflow_vs_{lib}_nw{nw}", round(med["trainflow"]), "rows/s",
                              round(med[lib]), {**common, "num_workers": nw, "baseline_is": lib}))
    shutil.rmtree(work, ignore_errors=True)
    return lines


if __name__ == "__main__":
    main()
