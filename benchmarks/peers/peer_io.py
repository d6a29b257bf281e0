"""Write and read the benchmark data with a peer library; run by that peer's virtualenv.

    python peer_io.py write LIB SOURCE OUT --layout row|block [--block 1024]
    python peer_io.py read LIB OUT --batch 64 --workers 0 [--limit-rows N]

LIB is ``webdataset``, ``mds`` (MosaicML Streaming), ``hf`` (Hugging Face datasets) or
``parquet`` (plain pyarrow). SOURCE is an Arrow IPC file from ``benchmarks/_data.py``. Each
command prints one JSON object: seconds, rows, bytes. Self-contained (the peer environments do
not have trainflow's dependencies). MDS: ``streaming.vision`` is replaced by an empty module
because PyPI's torchvision (a CUDA build) does not import next to the CPU torch, and only
MDSWriter/StreamingDataset are used.

OUT may be an ``s3://bucket/prefix`` URL (the endpoint comes from ``AWS_ENDPOINT_URL_S3``, a
local moto server in the benchmarks): ``parquet`` writes through pyarrow's own S3 filesystem,
``webdataset`` writes its tar shards locally and uploads each as it is closed (ShardWriter's
``post`` hook) and reads them as streamed GETs (a ``s3`` gopen handler over
boto3), ``mds`` writes with ``MDSWriter(out=(local, remote))`` (uploads as shards close) and
reads with ``StreamingDataset(remote=...)`` into a fresh local cache. ``hf`` goes through
fsspec/s3fs (``storage_options`` with the endpoint): ``save_to_disk`` to S3, and
``load_from_disk`` from S3, which downloads into a fresh local folder and maps it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
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
    if path.startswith("s3://"):
        bucket, prefix = _split(path)
        pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
        return sum(o["Size"] for page in pages for o in page.get("Contents", []))
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


# --- S3 (boto3 against AWS_ENDPOINT_URL_S3) ------------------------------------------------
_CLIENT = None


def _s3():
    global _CLIENT
    if _CLIENT is None:
        import boto3

        _CLIENT = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL_S3"])
    return _CLIENT


def _split(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    return bucket, key.rstrip("/")


def _s3_keys(url: str, suffix: str) -> list[str]:
    bucket, prefix = _split(url)
    pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
    return sorted(f"s3://{bucket}/{o['Key']}" for page in pages for o in page.get("Contents", []) if o["Key"].endswith(suffix))


def _gopen_s3(url, mode="rb", bufsize=8192, **kw):
    """WebDataset opener for ``s3://``: one streamed GET (the body is read front to back)."""
    assert mode == "rb", mode
    bucket, key = _split(url)
    return _s3().get_object(Bucket=bucket, Key=key)["Body"]


def _arrow_s3():
    from urllib.parse import urlparse

    import pyarrow.fs as pafs

    endpoint = urlparse(os.environ["AWS_ENDPOINT_URL_S3"])
    return pafs.S3FileSystem(endpoint_override=endpoint.netloc, scheme=endpoint.scheme,
                             region=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))


def _hf_storage_options() -> dict:
    return {"client_kwargs": {"endpoint_url": os.environ["AWS_ENDPOINT_URL_S3"]},
            "key": os.environ["AWS_ACCESS_KEY_ID"], "secret": os.environ["AWS_SECRET_ACCESS_KEY"]}


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
    remote = out.startswith("s3://")
    if remote:
        staging = tempfile.mkdtemp(prefix=f"bench-{lib}-")  # WebDataset/MDS write shards here first
        _dir_bytes(out)  # warms the S3 client outside the timed part
    else:
        if os.path.exists(out):
            shutil.rmtree(out)
        os.makedirs(out)
    _warm_imports(lib)  # outside the timed part, for every library alike
    started = time.perf_counter()
    if lib == "parquet":
        import pyarrow.parquet as pq

        if remote:
            pq.write_table(table, out.removeprefix("s3://") + "/data.parquet", compression="zstd", row_group_size=32768,
                           filesystem=_arrow_s3())
        else:
            pq.write_table(table, os.path.join(out, "data.parquet"), compression="zstd", row_group_size=32768)
    elif lib == "hf":
        import datasets

        datasets.disable_progress_bars()
        # to S3 through fsspec/s3fs (storage_options name moto's endpoint), as HF documents it
        datasets.Dataset(table).save_to_disk(out, storage_options=_hf_storage_options() if remote else None)
    elif lib in ("webdataset", "mds"):
        if layout == "row":
            samples = ({name: (v[i].tobytes() if kind == "bytes" else v[i:i + 1].tobytes()) for name, (v, kind) in cols.items()}
                       for i in range(n))
        else:
            samples = ({name: v[i:i + block].tobytes() for name, (v, _) in cols.items()} for i in range(0, n, block))
        if lib == "webdataset":
            import webdataset as wds

            def upload(fname):  # ShardWriter calls this as each shard is closed
                bucket, prefix = _split(out)
                _s3().upload_file(fname, bucket, f"{prefix}/{os.path.basename(fname)}")
                os.remove(fname)

            with wds.ShardWriter(os.path.join(staging if remote else out, "shard-%06d.tar"), maxsize=128 << 20, verbose=0,
                                 post=upload if remote else None) as sink:
                for k, sample in enumerate(samples):
                    sink.write({"__key__": f"{k:09d}", **{f"{name}.bin": value for name, value in sample.items()}})
        else:
            streaming = _import_streaming()
            with streaming.MDSWriter(out=(staging, out) if remote else out, columns={name: "bytes" for name in cols}, size_limit=128 << 20) as sink:
                for sample in samples:
                    sink.write(sample)
    else:
        raise SystemExit(f"unknown library {lib!r}")
    seconds = time.perf_counter() - started
    meta = {name: {"dtype": str(v.dtype), "width": int(v.shape[1]) if v.ndim == 2 else 0} for name, (v, _) in cols.items()}
    text = json.dumps({"rows": n, "layout": layout, "block": block, "columns": meta})
    if remote:
        shutil.rmtree(staging, ignore_errors=True)
        bucket, prefix = _split(out)
        _s3().put_object(Bucket=bucket, Key=f"{prefix}/_bench.json", Body=text.encode())
    else:
        with open(os.path.join(out, "_bench.json"), "w") as handle:
            handle.write(text)
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

    remote = out.startswith("s3://")
    if remote:
        bucket, prefix = _split(out)
        meta = json.loads(_s3().get_object(Bucket=bucket, Key=f"{prefix}/_bench.json")["Body"].read())
        cache = tempfile.mkdtemp(prefix=f"bench-{lib}-cache-")  # MDS: a fresh local cache every epoch
    else:
        with open(os.path.join(out, "_bench.json")) as handle:
            meta = json.load(handle)
    n, block = meta["rows"], meta["layout"] == "block"
    names = list(meta["columns"])
    _warm_imports(lib)  # outside the timed part, for every library alike
    started = time.perf_counter()
    rows = 0
    if lib == "webdataset":
        import webdataset as wds

        if remote:
            wds.gopen_schemes["s3"] = _gopen_s3
            urls = _s3_keys(out, ".tar")
        else:
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
        where = {"remote": out, "local": cache} if remote else {"local": out}
        ds = DS(**where, shuffle=True, shuffle_seed=seed, batch_size=per, predownload=512)
        loader = tud.DataLoader(ds, batch_size=per, num_workers=workers,
                                collate_fn=(lambda xs: xs[0]) if block else None)
        for b in loader:
            rows += len(b[names[0]])
    elif lib == "hf":
        import datasets
        import pyarrow as pa

        datasets.disable_progress_bars()
        # from S3, load_from_disk downloads the dataset into a fresh local folder, then maps it
        ds = datasets.load_from_disk(out, storage_options=_hf_storage_options() if remote else None).with_format("arrow")
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
    if remote:
        shutil.rmtree(cache, ignore_errors=True)
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
