"""A fast answer when the MLflow tracking server refuses connections.

MLflow retries every failed HTTP request with exponential backoff (``MLFLOW_HTTP_REQUEST_MAX_RETRIES``
7, ``MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR`` 2): a server that is simply not running (connection
refused) was declared unreachable only after about 265 s per call, and an Airflow task with its
retries spent about 15 minutes per DAG run on it. :func:`require_tracking_server` opens one TCP
connection to the server first: refused on every one of a few quick attempts means nothing
listens there, which no backoff will change, so it fails in seconds naming the server. A
connection that times out (a slow or overloaded network) is left to MLflow's own retries.
"""

from __future__ import annotations

import logging
import socket
import time
import urllib.parse

from trainflow.tasks.settings import redact_url

log = logging.getLogger(__name__)


class TrackingServerUnreachableError(RuntimeError):
    """The MLflow tracking server refused every connection: nothing listens at its address."""


def require_tracking_server(
    tracking_uri: str,
    *,
    attempts: int = 3,
    delay_s: float = 1.0,
    connect_timeout_s: float = 5.0,
    error: type[Exception] = TrackingServerUnreachableError,
) -> None:
    """Fail fast if the ``http(s)://`` tracking server at ``tracking_uri`` refuses connections.

    Other URIs (``sqlite:///``, ``file:``, ``databricks``) are not servers trainflow can probe
    and pass unchecked; so does a server that accepts the connection or lets it time out.

    Args:
        tracking_uri: ``MLFLOW_TRACKING_URI``.
        attempts: Connection attempts, ``delay_s`` apart (a server being restarted gets
            ``(attempts - 1) * delay_s`` seconds to come back).
        delay_s: Seconds between attempts.
        connect_timeout_s: Timeout of one attempt; a timeout ends the probe (MLflow retries).
        error: The exception class raised (the registry raises its ``RegistryUnavailableError``).

    Raises:
        TrackingServerUnreachableError: every attempt was refused (the message names the
            server, its password masked, and what to do), or ``error`` when given.
    """
    parts = urllib.parse.urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port that is not a number: let MLflow report the URI
        return
    for attempt in range(1, attempts + 1):
        try:
            with socket.create_connection((parts.hostname, port), timeout=connect_timeout_s):
                return
        except ConnectionRefusedError:
            if attempt < attempts:
                time.sleep(delay_s)
        except OSError as exc:  # a timeout, DNS, an unreachable network: MLflow's retries decide
            log.info("MLflow at %s: connection attempt failed (%s); leaving it to MLflow's retries",
                     redact_url(tracking_uri), type(exc).__name__)
            return
    raise error(
        f"MLflow at {redact_url(tracking_uri)} is unreachable: it refuses connections, nothing listens on {parts.hostname}:{port} "
        f"({attempts} attempts over {(attempts - 1) * delay_s:g} s). Start the tracking server, or point "
        "MLFLOW_TRACKING_URI at the one that runs"
    )
