"""Write and read the benchmark data with a peer library; run by that peer's virtualenv.

    python peer_io.py write LIB SOURCE OUT --layout row|block [--block 1024]
    python peer_io.py read LIB OUT --batch 64 --workers 0 [--limit-rows N]

LIB is ``webdataset``, ``mds`` (MosaicML Streaming), ``hf`` (Hugging Face datasets) or
``parquet`` (plain pyarrow). SOURCE is an Arrow IPC file from ``benchmarks/_data.py``. Each
command prints one JSON object: seconds, rows, bytes. Self-contained (the peer environments do
not have trainflow's dependencies). MDS: ``streaming.vision`` is replaced by an empty module
because PyPI's torchvision (a CUDA build) does not import next to the CPU torch, and only
MDSWriter/StreamingDataset are used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import types

import numpy as np


def _pin() -> None:
    import torch

    torch.set_num_threads(1)


def _source(path):
    import pyarrow as pa

    return pa.ipc.open_file(pa.memory_map(path)).read_all()


def _columns(table) -> dict[str, tuple[np.ndarray, str]]:
    """Column name -> (numpy values, kind), fixed-size binaries as (rows, width) uint8."""
    import pyarrow as pa

    out = {}
    for name in table.column_names:
        arr = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_binary(arr.type):
            w = arr.type.byte_width
            out[name] = (np.frombuffer(arr.buffers()[1], np.uint8, len(arr) * w, arr.offset * w).reshape(len(arr), w), "bytes")
        else:
            out[name] = (arr.to_numpy(), str(arr.type))
    return out


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _import_streaming():
    sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))
    import streaming

    return streaming


def _warm_imports(lib: str) -> None:
    import importlib

    if lib == "mds":
        _import_streaming()
    else:
        importlib.import_module({"webdataset": "webdataset", "hf": "datasets", "parquet": "pyarrow.parquet"}[lib])


# --- write -------------------------------------------------------------------------------
def write(lib: str, source: str, out: str, layout: str, block: int) -> dict:
    table = _source(source)
    n = table.num_rows
    cols = _columns(table)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    _warm_imports(lib)  # outside the timed part, for every library alike
    started = time.perf_counter()
    if lib == "parquet":
        import pyarrow.parquet as pq

        pq.write_table(table, os.path.join(out, "data.parquet"), compression="zstd", row_group_size=32768)
    elif lib == "hf":
        import datasets

        datasets.disable_progress_bars()
        datasets.Dataset(table).save_to_disk(out)
    elif lib in ("webdataset", "mds"):
        if layout == "row":
            samples = ({name: (v[i].tobytes() if kind == "bytes" else v[i:i + 1].tobytes()) for name, (v, kind) in cols.items()}
                       for i in range(n))
        else:
            samples = ({name: v[i:i + block].tobytes() for name, (v, _) in cols.items()} for i in range(0, n, block))
        if lib == "webdataset":
            import webdataset as wds

            with wds.ShardWriter(os.path.join(out, "shard-%06d.tar"), maxsize=128 << 20, verbose=0) as sink:
                for k, sample in enumerate(samples):
                    sink.write({"__key__": f"{k:09d}", **{f"{name}.bin": value for name, value in sample.items()}})
        else:
            streaming = _import_streaming()
            with streaming.MDSWriter(out=out, columns={name: "bytes" for name in cols}, size_limit=128 << 20) as sink:
                for sample in samples:
                    sink.write(sample)
    else:
        raise SystemExit(f"unknown library {lib!r}")
    seconds = time.perf_counter() - started
    meta = {name: {"dtype": str(v.dtype), "width": int(v.shape[1]) if v.ndim == 2 else 0} for name, (v, _) in cols.items()}
    with open(os.path.join(out, "_bench.json"), "w") as handle:
        json.dump({"rows": n, "layout": layout, "block": block, "columns": meta}, handle)
    return {"seconds": seconds, "rows": n, "bytes": _dir_bytes(out)}


# --- read --------------------------------------------------------------------------------
def _decode(sample: dict, meta: dict, block: bool):
    import torch

    out = {}
    for name, m in meta["columns"].items():
        raw = sample[name]
        arr = np.frombuffer(raw, dtype=m["dtype"])
        if m["width"]:
            arr = arr.reshape(-1, m["width"]) if block else arr
        out[name] = torch.from_numpy(arr.copy())
    return out


class _Batches:
    """An IterableDataset over batch indices, split across DataLoader workers round-robin."""

    def __init__(self, make, num_batches):
        import torch.utils.data as tud

        class DS(tud.IterableDataset):
            def __iter__(self_inner):
                info = tud.get_worker_info()
                wid, nw = (info.id, info.num_workers) if info else (0, 1)
                for b in range(wid, num_batches, nw):
                    yield make(b)

        self.ds = DS()


def read(lib: str, out: str, batch: int, workers: int, seed: int = 0) -> dict:
    import torch
    import torch.utils.data as tud

    with open(os.path.join(out, "_bench.json")) as handle:
        meta = json.load(handle)
    n, block = meta["rows"], meta["layout"] == "block"
    names = list(meta["columns"])
    _warm_imports(lib)  # outside the timed part, for every library alike
    started = time.perf_counter()
    rows = 0
    if lib == "webdataset":
        import webdataset as wds

        urls = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".tar"))
        ds = (wds.WebDataset(urls, shardshuffle=len(urls), nodesplitter=wds.split_by_node, workersplitter=wds.split_by_worker,
                             empty_check=False, seed=seed)
              .shuffle(1000 if not block else 8)
              .map(lambda s: _decode({k.removesuffix(".bin"): v for k, v in s.items() if k.endswith(".bin")}, meta, block)))
        if not block:
            ds = ds.batched(batch, partial=False)
        loader = tud.DataLoader(ds, batch_size=None, num_workers=workers)
        for b in loader:
            rows += len(b[names[0]])
    elif lib == "mds":
        streaming = _import_streaming()

        class DS(streaming.StreamingDataset):
            def __getitem__(self, i):
                return _decode(super().__getitem__(i), meta, block)

        per = 1 if block else batch
        ds = DS(local=out, shuffle=True, shuffle_seed=seed, batch_size=per, predownload=512)
        loader = tud.DataLoader(ds, batch_size=per, num_workers=workers,
                                collate_fn=(lambda xs: xs[0]) if block else None)
        for b in loader:
            rows += len(b[names[0]])
    elif lib == "hf":
        import datasets
        import pyarrow as pa

        datasets.disable_progress_bars()
        ds = datasets.load_from_disk(out).with_format("arrow")
        order = np.random.default_rng(seed).permutation(n)
        widths = {k: m["width"] for k, m in meta["columns"].items()}

        def make(b):
            t = ds[order[b * batch:(b + 1) * batch]]
            result = {}
            for k in names:
                arr = t.column(k).combine_chunks()
                if widths[k] and pa.types.is_fixed_size_binary(arr.type):
                    w = widths[k]
                    vals = np.frombuffer(arr.buffers()[1], np.uint8, len(arr) * w, arr.offset * w)
                    result[k] = torch.from_numpy(vals.reshape(len(arr), w).copy())
                elif widths[k]:  # binary: the values buffer holds the rows back to back
                    off = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset]
                    vals = np.frombuffer(arr.buffers()[2], np.uint8)[off:off + len(arr) * widths[k]]
                    result[k] = torch.from_numpy(vals.reshape(len(arr), widths[k]).copy())
                else:
                    result[k] = torch.from_numpy(arr.to_numpy(zero_copy_only=False))
            return result

        loader = tud.DataLoader(_Batches(make, n // batch).ds, batch_size=None, num_workers=workers)
        for b in loader:
            rows += len(b[names[0]])
    else:
        raise SystemExit(f"unknown library {lib!r}")
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "rows": rows, "rows_per_s": rows / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["write", "read"])
    parser.add_argument("lib")
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--layout", default="row", choices=["row", "block"])
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _pin()
    if args.command == "write":
        result = write(args.lib, args.paths[0], args.paths[1], args.layout, args.block)
    else:
        result = read(args.lib, args.paths[0], args.batch, args.workers, args.seed)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
