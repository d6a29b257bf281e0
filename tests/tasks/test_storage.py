"""The storage module behaves the same on a local folder and on S3 (moto's server)."""

from __future__ import annotations

import json
import threading

import pytest

from trainflow.tasks.settings import get_settings
from trainflow.tasks.storage import Storage, StorageUnavailableError, safe_name


@pytest.fixture
def store(storage_root):
    return Storage(storage_root, get_settings())


def test_write_read_exists_size(store):
    assert not store.exists("a/b.bin")
    store.write_bytes("a/b.bin", b"hello")
    assert store.exists("a/b.bin")
    assert store.exists("a")
    assert store.read_bytes("a/b.bin") == b"hello"
    assert store.size("a/b.bin") == 5
    store.write_bytes("a/b.bin", b"replaced")
    assert store.read_bytes("a/b.bin") == b"replaced"


def test_missing_file_names_the_url(store):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        store.read_bytes("x/nope.txt")


def test_list_is_relative_sorted_and_empty_when_missing(store):
    for name in ("d/2.txt", "d/1.txt", "d/sub/3.txt"):
        store.write_bytes(name, name.encode())
    assert store.list("d") == ["d/1.txt", "d/2.txt", "d/sub"]
    assert store.list("d", recursive=True) == ["d/1.txt", "d/2.txt", "d/sub/3.txt"]
    assert store.list("missing") == []


def test_commit_is_atomic_and_visible(store):
    payload = json.dumps({"n": list(range(1000))}).encode()
    store.commit_bytes("v/_manifest.json", payload)
    assert store.read_bytes("v/_manifest.json") == payload
    # No temporary file is left behind or listed.
    assert store.list("v", recursive=True) == ["v/_manifest.json"]


def test_commit_readers_never_see_partial_content(store):
    old, new = b"A" * 200_000, b"B" * 300_000
    store.commit_bytes("m.json", old)
    seen = []
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            seen.append(store.read_bytes("m.json"))

    thread = threading.Thread(target=reader)
    thread.start()
    for _ in range(5):
        store.commit_bytes("m.json", new)
        store.commit_bytes("m.json", old)
    stop.set()
    thread.join()
    assert seen and all(data in (old, new) for data in seen)


def test_delete_file_and_folder(store):
    store.write_bytes("x/1", b"1")
    store.write_bytes("x/y/2", b"2")
    store.delete("x/1")
    assert not store.exists("x/1")
    store.delete("x/1")  # missing is fine
    store.delete("x", recursive=True)
    assert store.list("x", recursive=True) == []
    with pytest.raises(ValueError, match="whole storage root"):
        store.delete("", recursive=True)


def test_put_get_file_and_child(store, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x00\x01" * 1000)
    store.put_file(str(src), "files/blob.bin")
    child = store.child("files")
    assert child.read_bytes("blob.bin") == src.read_bytes()
    dst = tmp_path / "dst.bin"
    child.get_file("blob.bin", str(dst))
    assert dst.read_bytes() == src.read_bytes()
    assert child.url("blob.bin") == store.url("files/blob.bin")


def test_open_streams(store):
    with store.open("s/f.txt", "wb") as handle:
        handle.write(b"line1\nline2\n")
    with store.open("s/f.txt", "rb") as handle:
        assert handle.read().splitlines() == [b"line1", b"line2"]


@pytest.mark.parametrize("bad", ["../etc", "/abs", "a/../../b", "a\\b", "s3://x/y"])
def test_paths_never_escape_the_root(store, bad):
    with pytest.raises(ValueError):
        store.write_bytes(bad, b"x")


@pytest.mark.parametrize("bad", ["", "..", "a/b", "../x", ".hidden", "a b", "x\n"])
def test_safe_name_rejects(bad):
    with pytest.raises(ValueError, match="not a safe path component"):
        safe_name(bad)


@pytest.mark.parametrize("good", ["ml-100k", "manual__2026-11-25T15:48:00.123+00:00", "scheduled__2026_1", "v1.2"])
def test_safe_name_accepts_airflow_run_ids(good):
    assert safe_name(good) == good


def test_unreachable_s3_fails_clearly_after_bounded_retries(tf_env, monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("TRAINFLOW_S3_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("TRAINFLOW_S3_CONNECT_TIMEOUT", "1")
    store = Storage("s3://nowhere-bucket/root", get_settings())
    with pytest.raises(StorageUnavailableError, match="unreachable.*2 attempts"):
        store.write_bytes("a.txt", b"x")


def test_create_exclusive_creates_once(store):
    assert store.create_exclusive("locks/x.lease", b"first") is True
    assert store.create_exclusive("locks/x.lease", b"second") is False
    assert store.read_bytes("locks/x.lease") == b"first"  # never overwritten
    assert store.list("locks") == ["locks/x.lease"]


def test_lease_is_exclusive_and_released(store):
    import time

    from trainflow.tasks.storage import LeaseTimeoutError, lease

    inside: list[str] = []
    overlaps: list[int] = []
    active = {"n": 0}

    def worker(name):
        with lease(store, "locks/m.lease", owner=name, poll_s=0.05, timeout_s=60):
            active["n"] += 1
            overlaps.append(active["n"])
            inside.append(name)
            time.sleep(0.2)
            active["n"] -= 1

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(inside) == ["w0", "w1", "w2"] and max(overlaps) == 1
    assert not store.exists("locks/m.lease")
    # A live holder (this process) is waited for, then the waiter gives up naming the holder.
    with lease(store, "locks/m.lease", owner="holder"):
        with pytest.raises(LeaseTimeoutError, match="held by 'holder'"):
            with lease(store, "locks/m.lease", owner="waiter", timeout_s=0.3, poll_s=0.05):
                pass


def test_abandoned_lease_is_taken_over(store):
    from trainflow.tasks.storage import lease

    # A holder that died: its lease expired (another host) or its process is gone (this host).
    store.write_bytes("locks/a.lease", json.dumps({"owner": "dead", "host": "elsewhere", "pid": 1,
                                                   "expires_at": 0}).encode())
    with lease(store, "locks/a.lease", owner="next", timeout_s=5):
        assert json.loads(store.read_bytes("locks/a.lease"))["owner"] == "next"
    import socket
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    store.write_bytes("locks/a.lease", json.dumps({"owner": "dead", "host": socket.gethostname(),
                                                   "pid": int(gone.stdout), "expires_at": 4e9}).encode())
    with lease(store, "locks/a.lease", owner="next", timeout_s=5):
        pass
    assert not store.exists("locks/a.lease")
