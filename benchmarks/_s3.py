"""S3 for the I/O benchmarks: moto's S3 server on 127.0.0.1, started and stopped by the case.

:func:`moto_s3` starts ``python -m moto.server`` on a free local port, creates a bucket and
yields the environment a child process needs to reach it (fake credentials; ``AWS_ENDPOINT_URL_S3``
for boto3/s3fs and trainflow's storage, ``S3_ENDPOINT_URL`` for MosaicML Streaming). The server
is stopped when the block exits, also on failure. Nothing is sent anywhere but 127.0.0.1.

moto keeps objects in the server process's memory and answers on one Python thread: its ranged
GETs cost ~3× a plain GET, which penalises range readers (MDS's boto3 multipart downloads)
relative to readers that send one plain GET per file (trainflow's loader, WebDataset).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench-key-id",
    "AWS_SECRET_ACCESS_KEY": "bench-secret-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_s3(timeout: float = 60) -> Iterator[tuple[str, dict[str, str]]]:
    """Yield ``(bucket, env)`` of a fresh bucket on a local moto server; stop it at the end."""
    port = _free_port()
    log_path = Path(tempfile.gettempdir()) / f"bench-moto-{port}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        endpoint = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"moto server exited: {log_path.read_text()[-2000:]}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start within {timeout:.0f} s") from None
                time.sleep(0.2)
        env = {**FAKE_CREDENTIALS, "AWS_ENDPOINT_URL_S3": endpoint, "S3_ENDPOINT_URL": endpoint}
        bucket = f"bench-{uuid.uuid4().hex[:10]}"
        import boto3

        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=bucket)
        yield bucket, env
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(log_path)
