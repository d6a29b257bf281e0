"""Readers and generators: formats, errors that name the line, downloads, determinism."""

from __future__ import annotations

import hashlib
import http.server
import io
import threading
import zipfile

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainflow.tasks.datasets.sources import SourceNotFoundError, resolve_source
from trainflow.tasks.datasets.textio import SourceFormatError
from trainflow.trainers.driving import synthetic as driving_synthetic
from trainflow.trainers.recommendation import movielens, synthetic


def _read(text: str, name: str, **kwargs) -> pa.Table:
    batches = list(movielens.read_ratings(io.BytesIO(text.encode()), name, **kwargs))
    return pa.Table.from_batches(batches)


@pytest.mark.parametrize(
    "name,text",
    [
        ("u.data", "1\t10\t5\t881250949\n2\t20\t3\t891717742\n"),
        ("ratings.dat", "1::10::5::881250949\n2::20::3::891717742\n"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,10,5.0,881250949\n2,20,3.0,891717742\n"),
        ("ml-1m.train.rating", "1\t10\t5\t881250949\r\n2\t20\t3\t891717742\r\n"),
    ],
)
def test_movielens_formats(name, text):
    table = _read(text, name)
    assert table.column("user_id").to_pylist() == [1, 2]
    assert table.column("item_id").to_pylist() == [10, 20]
    assert table.column("rating").to_pylist() == [5.0, 3.0]
    assert table.column("timestamp").to_pylist() == [881250949, 891717742]


@pytest.mark.parametrize(
    "name,text,line",
    [
        ("u.data", "1\t10\t5\t881250949\n2\t20\tnan\t891717742\n", 2),
        ("ratings.dat", "1::10::5::881250949\n2::20::3::891717742\n3::30::inf::1\n", 3),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,10,5.0,881250949\n2,20,-inf,891717742\n", 3),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,10,5.0,881250949\n2,20,,891717742\n", 3),
        ("ml-1m.train.rating", "1\t10\t5\t1\n1\t11\tNaN\t2\n", 2),
    ],
)
def test_non_finite_rating_names_file_and_line(name, text, line):
    with pytest.raises(SourceFormatError, match=rf"{name.replace('.', '[.]')}, line {line}: rating is not a finite number"):
        _read(text, name)
    # also when the bad row sits in a later block, after skipped malformed rows
    filler = "".join(f"{u}\t{u}\t4\t{u}\n" for u in range(1, 200))
    bad_text = filler + "x\n" + "7\t8\tinf\t9\n"
    with pytest.raises(SourceFormatError, match=r"u[.]data, line 201: rating is not a finite number"):
        list(movielens.parse_delimited(
            io.BytesIO(bad_text.encode()), file_label="u.data", column_names=["user_id", "item_id", "rating", "timestamp"],
            column_types={"user_id": pa.int64(), "item_id": pa.int64(), "rating": pa.float32(), "timestamp": pa.int64()},
            block_bytes=256, on_bad_row=lambda *_: None, finite_columns=("rating",),
        ))


def test_unparsable_value_names_file_and_line():
    text = "1\t10\t5\t881250949\n2\t20\t3\t891717742\n3\tabc\t4\t1\n"
    with pytest.raises(SourceFormatError, match=r"u\.data, line 3: cannot parse '3\\tabc\\t4\\t1'"):
        _read(text, "u.data")


def test_wrong_field_count_raises_or_is_counted():
    text = "1\t10\t5\t881250949\n2\t20\n3\t30\t4\t1\n"
    with pytest.raises(SourceFormatError, match=r"line 2: expected 4 fields"):
        _read(text, "u.data")
    bad = []
    table = _read(text, "u.data", on_bad_row=lambda line, row: bad.append((line, row)))
    assert table.num_rows == 2 and bad == [(2, "2\t20")]


def test_empty_file_is_an_error():
    with pytest.raises(SourceFormatError, match="no data rows"):
        _read("", "u.data")


def test_small_blocks_keep_line_numbers():
    rows = "".join(f"{u}\t{u + 1}\t3\t{1000 + u}\n" for u in range(500)) + "x\t1\t1\t1\n"
    handle = io.BytesIO(rows.encode())
    with pytest.raises(SourceFormatError, match="line 501"):
        list(
            movielens.parse_delimited(
                handle,
                file_label="f",
                column_names=["user_id", "item_id", "rating", "timestamp"],
                column_types={"user_id": pa.int64(), "item_id": pa.int64(), "rating": pa.float32(), "timestamp": pa.int64()},
                block_bytes=256,
            )
        )


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**40), st.integers(0, 2**40), st.sampled_from([0.5, 1.0, 3.5, 5.0]), st.integers(0, 2**33)
        ),
        min_size=1,
        max_size=200,
    ),
    st.sampled_from(["u.data", "ratings.dat", "ratings.csv"]),
)
def test_reader_round_trips_any_valid_rows(rows, name):
    sep = {"u.data": "\t", "ratings.dat": "::", "ratings.csv": ","}[name]
    header = "userId,movieId,rating,timestamp\n" if name.endswith(".csv") else ""
    text = header + "".join(sep.join(map(str, r)) + "\n" for r in rows)
    table = _read(text, name)
    assert list(zip(*(table.column(c).to_pylist() for c in ("user_id", "item_id", "rating", "timestamp")))) == rows


def test_ncf_negative_file_errors_name_the_line():
    good = b"(0,5)\t1\t2\t3\n(1,6)\t4\t5\t6\n"
    assert list(movielens.read_ncf_negatives(io.BytesIO(good), file_label="n")) == [(0, 5, [1, 2, 3]), (1, 6, [4, 5, 6])]
    with pytest.raises(SourceFormatError, match=r"n, line 2"):
        list(movielens.read_ncf_negatives(io.BytesIO(b"(0,5)\t1\n0,5\t2\n"), file_label="n"))


@pytest.fixture
def grouplens_mirror(tmp_path, monkeypatch):
    """A local HTTP server serving an ml-100k.zip, with the release's pins pointing at it."""
    u_data = "".join(f"{u}\t{i}\t4\t{880000000 + u * 10 + i}\n" for u in range(1, 30) for i in range(1, 8)).encode()
    folder = tmp_path / "mirror"
    folder.mkdir()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("ml-100k/u.data", u_data)
        zf.writestr("ml-100k/README", "test copy")
    (folder / "ml-100k.zip").write_bytes(buffer.getvalue())
    monkeypatch.setitem(
        movielens.RELEASES,
        "movielens-100k",
        movielens.Release(
            "ml-100k.zip",
            hashlib.md5(buffer.getvalue()).hexdigest(),
            "ml-100k/u.data",
            hashlib.sha256(u_data).hexdigest(),
        ),
    )

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("TRAINFLOW_MOVIELENS_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    yield folder, u_data
    server.shutdown()


def test_release_download_verifies_extracts_and_caches(tf_env, grouplens_mirror):
    folder, u_data = grouplens_mirror
    source = resolve_source("movielens-100k", "recommendation")
    assert source.default_name == "movielens-100k"
    table = pa.Table.from_batches(list(source.open_interactions()))
    assert table.num_rows == len(u_data.splitlines())
    (folder / "ml-100k.zip").unlink()  # a second resolve must not download again
    again = resolve_source("movielens-100k", "recommendation")
    assert again.fingerprint == source.fingerprint


def test_release_download_with_wrong_checksum_is_refused(tf_env, grouplens_mirror, monkeypatch):
    monkeypatch.setitem(
        movielens.RELEASES, "movielens-100k", movielens.Release("ml-100k.zip", "0" * 32, "ml-100k/u.data")
    )
    with pytest.raises(ValueError, match="MD5 .* does not match the pinned 0000"):
        resolve_source("movielens-100k", "recommendation")
    assert not list((tf_env / "downloads" / "movielens-100k").glob("*.zip"))


@pytest.mark.parametrize(
    "url,kind,error,match",
    [
        ("movielens-7m", "recommendation", SourceNotFoundError, "known dataset name"),
        ("/nonexistent/folder", "recommendation", SourceNotFoundError, "nothing there"),
        ("synthetic://driving?num_sequences=5", "recommendation", ValueError, "generates driving data"),
        ("synthetic://recommendation?bogus=1", "recommendation", ValueError, "unknown parameter 'bogus'"),
        ("synthetic://recommendation?num_interactions=abc", "recommendation", ValueError, "not a number"),
        ("synthetic://weather", "driving", ValueError, "unknown synthetic generator"),
        ("", "driving", ValueError, "non-empty"),
    ],
)
def test_bad_source_urls_are_rejected_clearly(tf_env, url, kind, error, match):
    with pytest.raises(error, match=match):
        resolve_source(url, kind)


def test_folder_without_data_is_rejected(tf_env, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceNotFoundError, match="no MovieLens ratings file"):
        resolve_source(str(tmp_path / "empty"), "recommendation")
    with pytest.raises(SourceNotFoundError, match=r"no \.csv files"):
        resolve_source(str(tmp_path / "empty"), "driving")


def test_synthetic_recommendation_is_deterministic_and_structured():
    config = synthetic.SyntheticRecommendationConfig(num_interactions=20_000, num_users=100, num_items=500, seed=5)
    a = pa.Table.from_batches(list(synthetic.SyntheticRecommendation(config).iter_batches())).to_pandas()
    b = pa.Table.from_batches(list(synthetic.SyntheticRecommendation(config).iter_batches())).to_pandas()
    assert a.equals(b)
    assert abs(len(a) - 20_000) < 1_000
    assert a.user_id.between(1, 100).all() and a.item_id.between(1, 500).all()
    # Popularity skew: the top 10% of items take far more than 10% of interactions.
    counts = np.sort(a.item_id.value_counts().values)[::-1]
    assert counts[: len(counts) // 10].sum() > 0.3 * counts.sum()
    # Timestamps increase within each user.
    assert a.groupby("user_id").timestamp.apply(lambda s: s.is_monotonic_increasing).all()


def test_synthetic_driving_is_plausible():
    gen = driving_synthetic.SyntheticDriving(driving_synthetic.SyntheticDrivingConfig(num_sequences=20, seed=2))
    records = list(gen.iter_records())
    assert [r["seq_id"] for r in records] == [r["seq_id"] for r in gen.iter_records()]
    for record in records:
        agent = record["tracks_xy"][0]
        assert np.isfinite(agent).all()
        speed = np.linalg.norm(np.diff(agent, axis=0), axis=1) / 0.1
        assert speed.max() < 45  # m/s
        assert record["track_types"][0] == 0


def test_credentials_in_a_source_url_are_refused_without_echoing_them(tf_env):
    """botocore printed ``Invalid bucket name "KEY:SECRET@bucket"`` as is: now the URL is refused
    before any library sees it, shown masked, with where credentials go instead."""
    from trainflow.tasks.sharding import shard_dataset
    from trainflow.tasks.storage import CredentialsInUrlError

    for url in ("s3://AKIDEXAMPLE:Se/cr+et@bucket/ml/u.data", "s3://AKIDEXAMPLE:Se%2Fcr%2Bet@my-bucket/ml"):
        with pytest.raises(CredentialsInUrlError) as caught:
            shard_dataset(url, "recommendation")
        message = str(caught.value)
        assert "Se/cr+et" not in message and "Se%2Fcr%2Bet" not in message
        assert "source_url s3://AKIDEXAMPLE:***@" in message and "AWS_ACCESS_KEY_ID" in message
        assert isinstance(caught.value, ValueError)  # bad input: failed at once, never retried


@pytest.mark.parametrize("url", ["https://files.example.org/ml/u.data", "http://127.0.0.1:9/ratings.csv", "gs://b/u.data"])
def test_unsupported_scheme_is_named_as_such(tf_env, url):
    from trainflow.tasks.datasets.sources import UnsupportedSourceError

    scheme = url.split("://")[0]
    with pytest.raises(UnsupportedSourceError, match=rf"the scheme {scheme}:// is not supported; use a local path"):
        resolve_source(url, "recommendation")


def test_s3_source_without_credentials_names_the_url_and_how_to_give_them(s3_server, tf_env, monkeypatch, tmp_path):
    import boto3
    from airflow.sdk.exceptions import AirflowFailException

    from trainflow.airflow.dag_support import fail_fast_on_bad_input
    from trainflow.tasks.datasets.sources import SourceCredentialsError

    s3 = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1",
                      aws_access_key_id="testing-key-id", aws_secret_access_key="testing-secret-key")
    s3.create_bucket(Bucket="no-creds")
    s3.put_object(Bucket="no-creds", Key="ml/u.data", Body=b"1\t10\t5\t881250949\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with pytest.raises(SourceCredentialsError) as caught:
        resolve_source("s3://no-creds/ml/u.data", "recommendation")
    message = str(caught.value)
    assert "source_url s3://no-creds/ml/u.data: no valid S3 credentials" in message
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in message and "TRAINFLOW_AWS_CONN_ID" in message
    with pytest.raises(AirflowFailException, match="SourceCredentialsError"):  # the task fails, no retry
        with fail_fast_on_bad_input():
            resolve_source("s3://no-creds/ml/u.data", "recommendation")
    # The storage root on S3 without credentials: the same, bad input rather than an outage.
    from trainflow.tasks.storage import Storage, StorageCredentialsError

    with pytest.raises(StorageCredentialsError, match=r"s3://no-creds/trainflow/x: no valid S3 credentials"):
        Storage("s3://no-creds/trainflow").read_bytes("x")


def test_ratings_csv_with_an_extra_column_says_wrong_field_count(tf_env, tmp_path):
    folder = tmp_path / "ml-extra"
    folder.mkdir()
    rows = "".join(f"{u % 50},{u % 70},{u % 5 + 1},{1000 + u},tag\n" for u in range(3000))
    (folder / "ratings.csv").write_text("userId,movieId,rating,timestamp,tag\n" + rows)
    from trainflow.tasks.sharding import shard_dataset

    with pytest.raises(SourceFormatError) as caught:
        shard_dataset(str(folder), "recommendation")
    message = str(caught.value)
    assert "no data rows" not in message
    assert "wrong number of fields" in message and "3000 data rows" in message
    assert "line 2 has 5 fields, expected 4 (the header 'userId,movieId,rating,timestamp')" in message
    assert "the file's header is 'userId,movieId,rating,timestamp,tag'" in message


def test_one_malformed_line_is_counted_once_in_the_manifest(tf_env, tmp_path):
    from trainflow.tasks.manifest import load_manifest
    from trainflow.tasks.sharding import ShardingConfig, shard_dataset

    folder = tmp_path / "ml-bad"
    folder.mkdir()
    rows = [f"{u % 40 + 1}\t{u % 90 + 1}\t{u % 5 + 1}\t{1000 + u}" for u in range(2000)]
    rows.insert(500, "7\t8")  # line 501: two fields
    (folder / "u.data").write_text("\n".join(rows) + "\n")
    summary = shard_dataset(str(folder), "recommendation", config=ShardingConfig(num_negatives=5))
    cleaning = load_manifest(summary["manifest_uri"]).data["cleaning"]
    assert cleaning["skipped_malformed_rows"] == 1
    assert cleaning["skipped_malformed_examples"] == [{"file": "u.data", "line": 501, "text": "7\t8"}]
