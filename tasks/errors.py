"""The one error class for "the input is wrong", and how it crosses the torchrun boundary.

:class:`BadInputError` (a ``ValueError``) says the input is wrong (params, data, a corrupt or
missing shard, a model name) and what to do next. The same input fails the same way every
time, so nothing retries it: torchrun does not restart the ranks and Airflow does not retry
the task (``fail_fast_on_bad_input`` turns every ``ValueError`` into ``AirflowFailException``).
Infrastructure errors (a lost rank, an unreachable store or server) are not ``ValueError``\\ s
and keep their bounded retries.

Inside a torchrun rank, :func:`report_bad_input` classifies the exception that ends the rank;
bad input is written to the bad-input marker file (``TRAINFLOW_BAD_INPUT_FILE``, set by
:func:`trainflow.tasks.launch.run_torchrun`) before the rank exits. The launcher watches that file: as
soon as it appears it stops torchrun (no restart of the worker group) and raises
:class:`trainflow.tasks.launch.BadInputLaunchError`, a :class:`BadInputError` with the rank's message.
A rank that torchrun restarted before the launcher saw the marker reads it first
(:func:`raise_if_marked`) and fails at once with the same error, doing no work.

This module imports neither torch nor airflow.
"""

from __future__ import annotations

import json
import os
from typing import Any

BAD_INPUT_FILE_ENV = "TRAINFLOW_BAD_INPUT_FILE"
"""The environment variable naming the bad-input marker file of one launch."""


class BadInputError(ValueError):
    """The input is wrong; the message says what is wrong and what to do next. Never retried.

    Attributes:
        what_next: What the operator should do (also at the end of the message).
    """

    def __init__(self, message: str, what_next: str | None = None) -> None:
        self.what_next = what_next
        super().__init__(f"{message}. {what_next}" if what_next and what_next not in message else message)


def bad_input_types() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the input is wrong" wherever trainflow runs.

    ``ValueError`` (``BadInputError``, ``ParamError``, the source and format errors, an
    unknown pipeline), ``TypeError`` (a setting of the wrong type reaching a config class), and
    the manifest's and the shards' integrity errors (a damaged dataset: repair it, do not retry).
    """
    from trainflow.tasks.manifest import ManifestError, ShardVerificationError

    return (ValueError, TypeError, ShardVerificationError, ManifestError)


def is_bad_input(exc: BaseException) -> bool:
    """Whether ``exc`` means the input is wrong (never retried) rather than a fault of the
    infrastructure (retried). Storage and launch errors that wrap a fault are not."""
    from trainflow.tasks.storage import StorageError

    if isinstance(exc, StorageError) and not isinstance(exc, ValueError):
        return False
    return isinstance(exc, bad_input_types())


_WHAT_NEXT = {
    "ShardVerificationError": "",  # its message already gives the command that repairs
    "ManifestIntegrityError": "",
    "ParamError": "Fix the param and trigger a new run",
    "TypeError": "Fix the setting (model_options or the run configuration) and trigger a new run",
}


def what_next(exc: BaseException) -> str:
    """The advice to add to ``exc``'s message (empty when the message gives it already)."""
    if isinstance(exc, BadInputError) and exc.what_next:
        return ""
    advice = _WHAT_NEXT.get(type(exc).__name__)
    if advice is None:
        advice = "Fix the input named above and trigger a new run; retrying the same input fails the same way"
    return advice


def describe(exc: BaseException) -> str:
    """``"TypeName: message. what to do next"`` for a bad-input exception."""
    message = f"{type(exc).__name__}: {exc}"
    advice = what_next(exc)
    return f"{message}. {advice}" if advice else message


def report_bad_input(exc: BaseException, *, rank: int | None = None) -> bool:
    """In a torchrun rank: record ``exc`` in the launch's bad-input marker when it is bad
    input (first writer wins). Returns whether it was bad input."""
    if not is_bad_input(exc):
        return False
    path = os.environ.get(BAD_INPUT_FILE_ENV)
    if path:
        payload = {"type": type(exc).__name__, "message": describe(exc), "rank": rank}
        try:
            if os.path.exists(path):
                # A file made for us: Kubernetes' termination log (``/dev/termination-log``, a
                # bind mount that cannot be replaced), empty until a rank writes it.
                _write_if_empty(path, payload)
            else:
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "w") as handle:
                    json.dump(payload, handle)
                if not os.path.exists(path):
                    os.replace(tmp, path)
                else:
                    os.unlink(tmp)
        except OSError:
            pass  # the error file of @record still carries the message
    return True


def _write_if_empty(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` into the existing file ``path`` unless a rank wrote it first."""
    import fcntl

    with open(path, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        if handle.read().strip():
            return
        handle.seek(0)
        json.dump(payload, handle)
        handle.truncate()
        handle.flush()


def marker_from_text(text: str | None) -> dict[str, Any] | None:
    """A bad-input marker read from text (e.g. a Kubernetes container's termination message),
    or ``None`` when the text is not one."""
    if not text or not text.strip().startswith("{"):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) and data.get("message") and data.get("type") else None


def read_marker(path: str | None) -> dict[str, Any] | None:
    """The bad-input marker at ``path`` (``{"type", "message", "rank"}``), or ``None``."""
    if not path or not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            text = handle.read()
    except OSError:
        return None
    return marker_from_text(text)


def raise_if_marked() -> None:
    """In a (re)started rank: another rank of this launch already found bad input; fail at once
    with the same message instead of repeating the work that found it."""
    marker = read_marker(os.environ.get(BAD_INPUT_FILE_ENV))
    if marker is not None:
        raise BadInputError(f"another rank found bad input: {marker['message']}", what_next="")
