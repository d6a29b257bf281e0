"""The one place trainflow reads its configuration.

Everything comes from environment variables with the ``TRAINFLOW_`` prefix, MLflow's own
``MLFLOW_TRACKING_URI`` and the standard ``AWS_*`` variables. Defaults run on a laptop: a
local object store and a SQLite MLflow store under the project's data folder, CPU.

S3 credentials may instead come from an Airflow connection: the DAG side resolves it with
the Amazon provider's hook and passes the plain values to :meth:`Settings.with_s3_credentials`,
which keeps this module free of Airflow.

Secrets never appear in ``repr()``, in logs or in :meth:`Settings.describe`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent
"""The checkout (or installed tree) that holds ``tasks/``."""


def _default_data_dir() -> Path:
    return PROJECT_DIR / "data"


def _path_to_url(path: Path) -> str:
    return Path(path).resolve().as_uri()


@dataclasses.dataclass(frozen=True)
class S3Config:
    """How to reach an S3-compatible store.

    Attributes:
        endpoint_url: Custom endpoint (MinIO, moto, Ceph...); ``None`` means AWS itself.
        access_key_id: Access key, or ``None`` to let botocore find credentials itself.
        secret_access_key: Secret key; never logged.
        session_token: Optional session token; never logged.
        region: Region name.
        max_attempts: botocore retry attempts (with exponential backoff) for each call.
        connect_timeout: Seconds to wait for a connection before a retry.
        read_timeout: Seconds to wait for a response before a retry.
        operation_timeout: Upper bound in seconds on one storage call, retries included: a
            hung endpoint (one that accepts connections but never answers a write) fails
            with "object store unreachable" after this long instead of blocking forever.
    """

    endpoint_url: str | None = None
    access_key_id: str | None = dataclasses.field(default=None, repr=False)
    secret_access_key: str | None = dataclasses.field(default=None, repr=False)
    session_token: str | None = dataclasses.field(default=None, repr=False)
    region: str | None = None
    max_attempts: int = 5
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    operation_timeout: float = 900.0

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem``; contains secrets, never log it."""
        options: dict[str, Any] = {
            "config_kwargs": {
                "retries": {"max_attempts": self.max_attempts, "mode": "standard"},
                "connect_timeout": self.connect_timeout,
                "read_timeout": self.read_timeout,
            },
        }
        if self.access_key_id:
            options["key"] = self.access_key_id
        if self.secret_access_key:
            options["secret"] = self.secret_access_key
        if self.session_token:
            options["token"] = self.session_token
        client_kwargs: dict[str, Any] = {}
        if self.endpoint_url:
            client_kwargs["endpoint_url"] = self.endpoint_url
        if self.region:
            client_kwargs["region_name"] = self.region
        if client_kwargs:
            options["client_kwargs"] = client_kwargs
        return options

    def environment(self) -> dict[str, str]:
        """The standard AWS variables for a child process (torchrun, mlflow); contains secrets."""
        env = {
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_SESSION_TOKEN": self.session_token,
            "AWS_DEFAULT_REGION": self.region,
        }
        return {key: value for key, value in env.items() if value}


@dataclasses.dataclass(frozen=True)
class Settings:
    """trainflow's settings, read once from the environment.

    Attributes:
        data_dir: Local folder for the default object store, MLflow database and caches.
        storage_root: The ``{root}`` URL of every dataset and run (``file://`` or ``s3://``).
        mlflow_tracking_uri: Where MLflow runs and the model registry live.
        download_dir: Where downloaded raw datasets are cached (local folder).
        shared_data_dir: Folder of real datasets used by tests and the demo when present.
        s3: How to reach S3 when ``storage_root`` or a source URL is ``s3://``.
        mlflow_artifact_root: Artifact location of the experiments trainflow creates;
            ``None`` lets an MLflow server choose (its ``--default-artifact-root``).
        shard_cache_dir: Node-local cache of shards read from a remote store
            (:mod:`trainflow.tasks.shardcache`).
        shard_cache_bytes: Most bytes that cache holds (least recently used evicted first);
            ``0`` turns it off.
        node_address: ``TRAINFLOW_NODE_ADDRESS``: the address other nodes reach this worker at
            (multi-node rendezvous); ``None``: what the host name resolves to.
        log_level: ``TRAINFLOW_LOG_LEVEL``: the trainer processes' log level.
        mlflow_ui_url: ``TRAINFLOW_MLFLOW_UI_URL``: the MLflow UI the Airflow links open;
            ``None``: derived from the tracking URI.
        aws_conn_id: ``TRAINFLOW_AWS_CONN_ID``: the Airflow connection with S3 credentials.
        kubernetes_conn_id: ``TRAINFLOW_KUBERNETES_CONN_ID``: the Airflow connection of the
            Kubernetes launcher.
        shard_verify: How the ``shard`` step checks a committed dataset version before it
            reuses it (``TRAINFLOW_SHARD_VERIFY``): ``auto`` (sizes, plus xxh3-128 of every
            file in a local store), ``sizes``, ``xxh3_128``, or ``sha256`` (a full re-hash).
    """

    data_dir: Path
    storage_root: str
    mlflow_tracking_uri: str
    download_dir: Path
    shared_data_dir: Path
    s3: S3Config = dataclasses.field(default_factory=S3Config)
    mlflow_artifact_root: str | None = None
    shard_cache_dir: Path | None = None
    shard_cache_bytes: int = 20 << 30
    node_address: str | None = None
    log_level: str = "INFO"
    mlflow_ui_url: str | None = None
    aws_conn_id: str = "aws_default"
    kubernetes_conn_id: str = "kubernetes_default"
    shard_verify: str = "auto"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build settings from ``environ`` (default: ``os.environ``)."""
        env = os.environ if environ is None else environ
        data_dir = Path(env.get("TRAINFLOW_DATA_DIR") or _default_data_dir()).expanduser()
        storage_root = env.get("TRAINFLOW_STORAGE_ROOT") or _path_to_url(data_dir / "store")
        tracking = env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(data_dir / 'mlflow.db').resolve()}"
        download_dir = Path(env.get("TRAINFLOW_DOWNLOAD_DIR") or data_dir / "downloads").expanduser()
        shared = Path(
            env.get("TRAINFLOW_SHARED_DATA") or PROJECT_DIR.parent / "shared" / "data"
        ).expanduser()
        s3 = S3Config(
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            region=env.get("AWS_DEFAULT_REGION") or env.get("AWS_REGION") or None,
            max_attempts=_positive_int(env, "TRAINFLOW_S3_MAX_ATTEMPTS", 5),
            connect_timeout=_positive_float(env, "TRAINFLOW_S3_CONNECT_TIMEOUT", 5.0),
            read_timeout=_positive_float(env, "TRAINFLOW_S3_READ_TIMEOUT", 60.0),
            operation_timeout=_positive_float(env, "TRAINFLOW_S3_OPERATION_TIMEOUT", 900.0),
        )
        # 0 turns the shard cache off; anything else must be a positive size
        cache_off = env.get("TRAINFLOW_SHARD_CACHE_BYTES") == "0"
        cache_bytes = 0 if cache_off else _positive_int(env, "TRAINFLOW_SHARD_CACHE_BYTES", 20 << 30)
        shard_verify = env.get("TRAINFLOW_SHARD_VERIFY") or "auto"
        if shard_verify not in ("auto", "sizes", "xxh3_128", "sha256"):
            raise ValueError(
                f"TRAINFLOW_SHARD_VERIFY must be auto, sizes, xxh3_128 or sha256, got {shard_verify!r}"
            )
        artifact_root = env.get("TRAINFLOW_MLFLOW_ARTIFACT_ROOT") or None
        if artifact_root is None and not tracking.startswith(("http://", "https://", "databricks")):
            # A local store: keep artifacts beside it, never in the current directory.
            artifact_root = (data_dir / "mlartifacts").resolve().as_uri()
        return cls(
            data_dir=data_dir,
            storage_root=storage_root.rstrip("/"),
            mlflow_tracking_uri=tracking,
            download_dir=download_dir,
            shared_data_dir=shared,
            s3=s3,
            mlflow_artifact_root=artifact_root,
            shard_cache_dir=Path(env.get("TRAINFLOW_SHARD_CACHE_DIR") or data_dir / "shard-cache").expanduser(),
            shard_cache_bytes=cache_bytes,
            node_address=env.get("TRAINFLOW_NODE_ADDRESS", "").strip() or None,
            log_level=env.get("TRAINFLOW_LOG_LEVEL") or "INFO",
            mlflow_ui_url=(env.get("TRAINFLOW_MLFLOW_UI_URL") or "").rstrip("/") or None,
            aws_conn_id=env.get("TRAINFLOW_AWS_CONN_ID") or "aws_default",
            kubernetes_conn_id=env.get("TRAINFLOW_KUBERNETES_CONN_ID") or "kubernetes_default",
            shard_verify=shard_verify,
        )

    def with_s3_credentials(
        self,
        *,
        access_key_id: str | None,
        secret_access_key: str | None,
        session_token: str | None = None,
        endpoint_url: str | None = None,
        region: str | None = None,
    ) -> Settings:
        """Settings with S3 credentials from elsewhere (an Airflow connection), others kept."""
        s3 = dataclasses.replace(
            self.s3,
            access_key_id=access_key_id or self.s3.access_key_id,
            secret_access_key=secret_access_key or self.s3.secret_access_key,
            session_token=session_token or self.s3.session_token,
            endpoint_url=endpoint_url or self.s3.endpoint_url,
            region=region or self.s3.region,
        )
        return dataclasses.replace(self, s3=s3)

    def storage_options(self, url: str) -> dict[str, Any]:
        """fsspec options for ``url``: S3 settings for ``s3://``, nothing otherwise."""
        if url.startswith(("s3://", "s3a://")):
            return self.s3.storage_options()
        return {}

    def __repr__(self) -> str:
        return f"Settings({self.describe()!r})"

    def describe(self) -> dict[str, Any]:
        """A loggable summary: no keys, no secrets, no passwords in URIs."""
        return {
            "data_dir": str(self.data_dir),
            "storage_root": redact_url(self.storage_root),
            "mlflow_tracking_uri": redact_url(self.mlflow_tracking_uri),
            "download_dir": str(self.download_dir),
            "shard_cache": f"{self.shard_cache_dir} ({self.shard_cache_bytes / 2**30:g} GiB)"
            if self.shard_cache_bytes and self.shard_cache_dir
            else "off",
            "s3_endpoint_url": redact_url(self.s3.endpoint_url) if self.s3.endpoint_url else None,
            "s3_credentials": "set" if self.s3.access_key_id else "default chain",
        }


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
_SECRET_QUERY = re.compile(
    r"(?i)([?&;][^=&;#]*(?:password|passwd|pwd|secret|token|signature|credential|api[_-]?key|access[_-]?key)"
    r"[^=&;#]*=)([^&;#]*)"
)
_ENCODED_AT = re.compile(r"(?i)%40")


def _userinfo_end(rest: str) -> int | None:
    """Where the userinfo of a URL ends (the index of its ``@`` in ``rest``, the URL after
    ``scheme://``), or ``None`` when it has none.

    Passwords are often pasted unencoded, so a ``/`` or an ``@`` may sit inside one: a ``:``
    before the first ``/`` and an ``@`` after it is read as a password with a ``/``
    (``s3://KEY:abc/def@bucket``), and the userinfo runs to the last ``@`` before the next
    ``/``. An ``@`` after a ``/`` with no ``:`` before that ``/`` belongs to the path
    (``s3://bucket/a@b``). In doubt (``http://host:5000/a@b``) more is masked, never less.
    """
    at = rest.find("@")
    if at < 0:
        return None
    head = rest[:at]
    slash, colon = head.find("/"), head.find(":")
    if slash >= 0 and not 0 <= colon < slash:
        return None  # the '@' is in the path
    while True:  # an unencoded '@' inside the password: the host starts after the last one
        nxt = rest.find("@", at + 1)
        if nxt < 0 or "/" in rest[at + 1 : nxt]:
            return at
        at = nxt


def url_has_credentials(url: str) -> bool:
    """Whether ``url`` carries a userinfo part (``scheme://user:password@host``), plain or
    percent-encoded (``%40``) in its first component."""
    match = _SCHEME.match(url) if isinstance(url, str) else None
    if not match:
        return False
    rest = url[match.end():]
    return _userinfo_end(rest) is not None or bool(_ENCODED_AT.search(rest.split("/", 1)[0]))


def redact_url(url: str) -> str:
    """``url`` with its secrets masked: the password of ``scheme://user:password@host`` (a
    userinfo without ``:`` is masked whole: it is often a token), whatever it contains
    (``/``, ``@``, percent-encoding), and the values of query parameters named like secrets
    (``password``, ``token``, ``X-Amz-Signature``...). Anything else is left as is.
    """
    match = _SCHEME.match(url) if isinstance(url, str) else None
    if not match:
        return url
    rest = url[match.end():]
    end = _userinfo_end(rest)
    if end is not None:
        userinfo, host = rest[:end], rest[end + 1 :]
        rest = f"{userinfo.split(':', 1)[0]}:***@{host}" if ":" in userinfo else f"***@{host}"
    else:
        first, sep, tail = rest.partition("/")
        encoded = list(_ENCODED_AT.finditer(first))
        if encoded:  # 'KEY%3ASECRET%40bucket': a library may decode it into userinfo
            rest = f"***{first[encoded[-1].start():]}{sep}{tail}"
    return match.group(1) + "://" + _SECRET_QUERY.sub(r"\1***", rest)


def redact_text(text: str, secrets: tuple[str | None, ...] = ()) -> str:
    """``text`` (a library's error message, a log line) with every URL in it redacted
    (:func:`redact_url`) and every string of ``secrets`` replaced by ``***``.

    A library error may quote a URL without its scheme (botocore's ``Invalid bucket name
    "KEY:SECRET@bucket"``): pass the secrets it may contain (:func:`url_secrets`)."""
    text = _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), str(text))
    for secret in sorted((s for s in secrets if s and len(s) >= 3), key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def url_secrets(url: str) -> tuple[str, ...]:
    """The secret parts of ``url`` (its password or token-like userinfo, plain and
    percent-decoded), for :func:`redact_text`."""
    import urllib.parse

    match = _SCHEME.match(url) if isinstance(url, str) else None
    if not match:
        return ()
    rest = url[match.end():]
    end = _userinfo_end(rest)
    if end is not None:
        userinfo = rest[:end]
        secret = userinfo.split(":", 1)[1] if ":" in userinfo else userinfo
    else:
        first = rest.split("/", 1)[0]
        encoded = list(_ENCODED_AT.finditer(first))
        if not encoded:
            return ()
        secret = first[: encoded[-1].start()]
    return tuple({secret, urllib.parse.unquote(secret), userinfo if end is not None else secret})


def _positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {raw!r}") from None
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


def _positive_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def get_settings() -> Settings:
    """Settings from the current environment (read anew each call: tests change it)."""
    return Settings.from_env()


def pipeline_setting(pipeline: str, name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """A per-pipeline deployment setting, ``TRAINFLOW_<PIPELINE>_<NAME>`` (empty: ``None``).

    The ones trainflow reads: ``PRODUCTION`` (the production configuration of scheduled and
    data-triggered runs, see :mod:`trainflow.tasks.retraining`), ``WATCH`` (an object-store prefix the
    raw-data watcher DAG polls) and ``SCHEDULE`` (the training DAG's time schedule, read when
    the DAG file is parsed).
    """
    env = os.environ if environ is None else environ
    value = env.get(f"TRAINFLOW_{pipeline.upper()}_{name.upper()}", "").strip()
    return value or None


def watch_schedule(environ: Mapping[str, str] | None = None) -> str | None:
    """The raw-data watcher DAG's poll schedule (``TRAINFLOW_WATCH_SCHEDULE``, a cron), or ``None``."""
    env = os.environ if environ is None else environ
    return env.get("TRAINFLOW_WATCH_SCHEDULE", "").strip() or None


def extra_setting(name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """A setting a pipeline or plug-in reads for itself, ``TRAINFLOW_<NAME>`` (empty: ``None``),
    so that every ``TRAINFLOW_*`` variable is read here (e.g. a reader's download mirror)."""
    env = os.environ if environ is None else environ
    return env.get(f"TRAINFLOW_{name.upper()}", "").strip() or None
