from __future__ import annotations

import pytest

from trainflow.tasks.settings import Settings, redact_text, redact_url, url_has_credentials, url_secrets


def test_defaults_run_locally(tmp_path):
    settings = Settings.from_env({"TRAINFLOW_DATA_DIR": str(tmp_path)})
    assert settings.storage_root == (tmp_path / "store").resolve().as_uri()
    assert settings.mlflow_tracking_uri == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"
    assert settings.storage_options(settings.storage_root) == {}


def test_shard_cache_settings(tmp_path):
    default = Settings.from_env({"TRAINFLOW_DATA_DIR": str(tmp_path)})
    assert default.shard_cache_dir == tmp_path / "shard-cache" and default.shard_cache_bytes == 20 << 30
    assert default.describe()["shard_cache"] == f"{tmp_path / 'shard-cache'} (20 GiB)"
    custom = Settings.from_env({"TRAINFLOW_SHARD_CACHE_DIR": str(tmp_path / "c"), "TRAINFLOW_SHARD_CACHE_BYTES": "1000"})
    assert custom.shard_cache_dir == tmp_path / "c" and custom.shard_cache_bytes == 1000
    off = Settings.from_env({"TRAINFLOW_SHARD_CACHE_BYTES": "0"})
    assert off.shard_cache_bytes == 0 and off.describe()["shard_cache"] == "off"


def test_s3_settings_from_standard_variables():
    env = {
        "TRAINFLOW_STORAGE_ROOT": "s3://bucket/prefix/",
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "very-secret-value",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }
    settings = Settings.from_env(env)
    assert settings.storage_root == "s3://bucket/prefix"
    options = settings.storage_options("s3://bucket/x")
    assert options["key"] == "AKIDEXAMPLE"
    assert options["secret"] == "very-secret-value"
    assert options["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"}
    assert options["config_kwargs"]["retries"]["max_attempts"] == 5


def test_secrets_never_appear_in_repr_or_describe():
    settings = Settings.from_env(
        {
            "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
            "AWS_SECRET_ACCESS_KEY": "very-secret-value",
            "AWS_SESSION_TOKEN": "token-value",
            "MLFLOW_TRACKING_URI": "postgresql://mlflow:db-password@127.0.0.1/mlflow",
        }
    )
    shown = repr(settings) + str(settings.describe())
    for secret in ("very-secret-value", "token-value", "db-password", "AKIDEXAMPLE"):
        assert secret not in shown
    assert settings.describe()["mlflow_tracking_uri"] == "postgresql://mlflow:***@127.0.0.1/mlflow"


def test_connection_credentials_override_environment():
    settings = Settings.from_env({"AWS_ACCESS_KEY_ID": "env-key"}).with_s3_credentials(
        access_key_id="conn-key", secret_access_key="conn-secret", endpoint_url="http://minio:9000"
    )
    assert settings.s3.access_key_id == "conn-key"
    assert settings.s3.endpoint_url == "http://minio:9000"
    assert settings.s3.environment()["AWS_SECRET_ACCESS_KEY"] == "conn-secret"


@pytest.mark.parametrize("name,value", [("TRAINFLOW_S3_MAX_ATTEMPTS", "0"), ("TRAINFLOW_S3_MAX_ATTEMPTS", "x"),
                                        ("TRAINFLOW_SHARD_CACHE_BYTES", "-5"), ("TRAINFLOW_SHARD_CACHE_BYTES", "lots")])
def test_bad_numbers_name_the_variable(name, value):
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: value})


def test_redact_url_leaves_plain_urls():
    assert redact_url("s3://bucket/a@b") == "s3://bucket/a@b"
    assert redact_url("http://u:p@h:1/x") == "http://u:***@h:1/x"


def test_mlflow_artifacts_stay_beside_a_local_store(tmp_path):
    local = Settings.from_env({"TRAINFLOW_DATA_DIR": str(tmp_path)})
    assert local.mlflow_artifact_root == (tmp_path / "mlartifacts").resolve().as_uri()
    server = Settings.from_env({"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"})
    assert server.mlflow_artifact_root is None
    explicit = Settings.from_env({"MLFLOW_TRACKING_URI": "http://x", "TRAINFLOW_MLFLOW_ARTIFACT_ROOT": "s3://b/a"})
    assert explicit.mlflow_artifact_root == "s3://b/a"


def test_trainflow_variables_are_read_only_in_the_settings_module():
    """Settings come from ``trainflow.tasks.settings`` (its ``Settings`` fields, ``pipeline_setting``,
    ``extra_setting``); no other shared module reads a ``TRAINFLOW_*`` variable itself (the
    trainer's inert test hooks aside)."""
    import re
    import subprocess

    from trainflow.tasks.settings import PROJECT_DIR

    files = subprocess.run(["git", "-C", str(PROJECT_DIR), "ls-files", "tasks", "trainers", "plugins"],
                           capture_output=True, text=True, check=True).stdout.split()
    pattern = re.compile(r"(environ(\.get)?\s*[\(\[]|getenv\s*\()\s*f?[\"']TRAINFLOW_")
    offenders = [
        f"{path}:{n}: {line.strip()}"
        for path in files if path.endswith(".py") and path != "tasks/settings.py"
        for n, line in enumerate((PROJECT_DIR / path).read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, "\n".join(offenders)
    assert pattern.search('os.environ.get("TRAINFLOW_X")') and pattern.search("os.getenv('TRAINFLOW_Y')")


def test_the_settings_that_moved_here_keep_their_variables(monkeypatch):
    from trainflow.tasks.settings import Settings, extra_setting

    env = {"TRAINFLOW_NODE_ADDRESS": " 10.0.0.7 ", "TRAINFLOW_LOG_LEVEL": "DEBUG", "TRAINFLOW_MLFLOW_UI_URL": "http://ui:5000/",
           "TRAINFLOW_AWS_CONN_ID": "s3conn", "TRAINFLOW_KUBERNETES_CONN_ID": "k8s", "TRAINFLOW_MOVIELENS_BASE_URL": "http://m/"}
    s = Settings.from_env(env)
    assert (s.node_address, s.log_level, s.mlflow_ui_url, s.aws_conn_id, s.kubernetes_conn_id) == (
        "10.0.0.7", "DEBUG", "http://ui:5000", "s3conn", "k8s")
    d = Settings.from_env({})
    assert (d.node_address, d.log_level, d.mlflow_ui_url, d.aws_conn_id, d.kubernetes_conn_id) == (
        None, "INFO", None, "aws_default", "kubernetes_default")
    assert extra_setting("movielens_base_url", env) == "http://m/" and extra_setting("nothing", env) is None
@pytest.mark.parametrize(
    "url,shown,secret",
    [
        ("s3://AKIDEXAMPLE:abc/def+ghi@bucket/ml/u.data", "s3://AKIDEXAMPLE:***@bucket/ml/u.data", "abc/def+ghi"),
        ("s3://KEY:p@ss@bucket/a/b@c", "s3://KEY:***@bucket/a/b@c", "p@ss"),
        ("s3://KEY:se%2Fcret%40x@bucket/p", "s3://KEY:***@bucket/p", "se%2Fcret%40x"),
        ("s3://KEY%3ASECRET%40bucket/p", "s3://***%40bucket/p", "SECRET"),
        ("https://ghp_tokenvalue@github.com/o/r", "https://***@github.com/o/r", "ghp_tokenvalue"),
        ("http://user:pw/with/slashes@mlflow:5000", "http://user:***@mlflow:5000", "pw/with/slashes"),
        ("https://h/x?X-Amz-Signature=deadbeef&a=1", "https://h/x?X-Amz-Signature=***&a=1", "deadbeef"),
        ("http://h:5000/api?password=hunter2", "http://h:5000/api?password=***", "hunter2"),
    ],
)
def test_redact_url_masks_every_shape(url, shown, secret):
    assert redact_url(url) == shown
    assert secret not in redact_url(url)
    assert url_has_credentials(url) == ("***@" in shown or "***%40" in shown)


@pytest.mark.parametrize("url", ["s3://bucket/a@b", "file:///data/x@y/z", "s3://b/runs/manual__2026-12-01T10:00:00+00:00/a@b",
                                 "http://127.0.0.1:5000", "sqlite:////tmp/mlflow.db", "/plain/path@x"])
def test_redact_url_leaves_urls_without_secrets_as_they_are(url):
    assert redact_url(url) == url
    assert not url_has_credentials(url)


def test_redact_text_masks_urls_and_the_secrets_of_a_url():
    url = "s3://AKIDEXAMPLE:abc/def@bucket/x"
    botocore = 'Invalid bucket name "AKIDEXAMPLE:abc/def@bucket": Bucket name must match the regex'
    assert "abc/def" not in redact_text(botocore, url_secrets(url))
    assert redact_text(f"failed to read {url}: boom") == "failed to read s3://AKIDEXAMPLE:***@bucket/x: boom"


@pytest.mark.parametrize("url", ["s3://AKIDEXAMPLE:abc/def@bucket/prefix", "s3://AKIDEXAMPLE%3Aabc%2Fdef%40bucket/p"])
def test_credentials_in_a_storage_url_are_refused_without_echoing_them(url):
    from trainflow.tasks.storage import CredentialsInUrlError, Storage

    with pytest.raises(CredentialsInUrlError) as caught:
        Storage(url, Settings.from_env({}))
    message = str(caught.value)
    assert "abc/def" not in message and "abc%2Fdef" not in message
    assert "AWS_SECRET_ACCESS_KEY" in message and "TRAINFLOW_AWS_CONN_ID" in message
