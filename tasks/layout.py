"""The store layout: every path and file name under ``{root}``, in one place.

::

    {root}/datasets/{name}/{version}/     train/ valid/ eval/ part-*.parquet, side files
                                          _manifest.json                (commit marker, written last)
    {root}/runs/{dag_id}/{run_id}/        run_config.json               (the validated run configuration)
                                          checkpoints/step-N/ ...       (committed by _COMMITTED)
                                          best/ model/                  (model.pt + config.json)
                                          result.json                   (the trainer's result)
                                          report.json                   (what the run produced, for people)

Paths are relative to the storage root (``trainflow.tasks.storage.Storage``); every component taken from
input goes through :func:`trainflow.tasks.storage.safe_name`. A run directory is keyed by DAG run, not by
try, so a retried task resumes from the run's checkpoints.
"""

from __future__ import annotations

DATASETS_DIR = "datasets"
RUNS_DIR = "runs"

MANIFEST_NAME = "_manifest.json"
"""A dataset version's manifest: written last and atomically, its presence commits the version."""

RUN_CONFIG_NAME = "run_config.json"
CHECKPOINTS_DIR = "checkpoints"
CHECKPOINT_STEP_PREFIX = "step-"
BEST_MODEL_DIR = "best"
MODEL_DIR = "model"
MODEL_WEIGHTS_NAME = "model.pt"
MODEL_CONFIG_NAME = "config.json"
RESULT_NAME = "result.json"
REPORT_NAME = "report.json"


def dataset_dir(name: str, version: str) -> str:
    """``datasets/{name}/{version}``.

    Raises:
        ValueError: ``name`` is not a safe path component.
    """
    from trainflow.tasks.storage import safe_name

    return f"{DATASETS_DIR}/{safe_name(name, 'dataset name')}/{version}"


def manifest_path(name: str, version: str) -> str:
    """``datasets/{name}/{version}/_manifest.json``."""
    return f"{dataset_dir(name, version)}/{MANIFEST_NAME}"


def runs_dir(dag_id: str) -> str:
    """``runs/{dag_id}``: every run directory of one DAG."""
    from trainflow.tasks.storage import safe_name

    return f"{RUNS_DIR}/{safe_name(dag_id, 'dag_id')}"


def run_dir(dag_id: str, run_id: str) -> str:
    """``runs/{dag_id}/{run_id}``.

    Raises:
        ValueError: ``dag_id`` or ``run_id`` is not a safe path component.
    """
    from trainflow.tasks.storage import safe_name

    return f"{runs_dir(dag_id)}/{safe_name(run_id, 'run_id')}"


def run_dir_url(dag_id: str, run_id: str, settings=None) -> str:
    """``{root}/runs/{dag_id}/{run_id}`` as a URL: where a DAG run's checkpoints, model and
    result go.

    Raises:
        ValueError: ``dag_id`` or ``run_id`` is not a safe path component.
    """
    from trainflow.tasks.storage import Storage

    return Storage.from_settings(settings).url(run_dir(dag_id, run_id))


def checkpoint_dir(step: int) -> str:
    """``step-{step}`` (under ``checkpoints/``)."""
    return f"{CHECKPOINT_STEP_PREFIX}{step}"
