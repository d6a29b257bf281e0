"""The work of each pipeline step as a plain function: what the Airflow tasks call.

Each function takes the run's params (already validated by the schema) plus the settings,
returns small JSON (URIs, counts, metrics), and never imports Airflow, so a step can be run
and tested from a shell.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from typing import Any

from tasks.params import validate_params
from tasks.settings import Settings, get_settings
from tasks.sharding import ShardingConfig, shard_dataset

log = logging.getLogger(__name__)


def shard_step(params: dict[str, Any], kind: str, settings: Settings | None = None) -> dict[str, Any]:
    """Validate the params, then shard the source into a dataset version (or find it).

    Returns:
        The sharding summary (``manifest_uri``, ``version``, ``cache_hit``, split sizes,
        stats) plus the validated ``params``.
    """
    settings = settings or get_settings()
    values = validate_params(params, kind)
    log.info("settings: %s", settings.describe())
    summary = shard_dataset(
        values["source_url"],
        kind,
        name=values["dataset_name"] or None,
        config=ShardingConfig(seed=0),
        settings=settings,
    )
    if summary["cache_hit"]:
        log.info("dataset %s version %s: cache hit, reusing the committed shards", summary["name"], summary["version"])
    else:
        log.info("dataset %s version %s: new version committed", summary["name"], summary["version"])
    log.info("splits: %s", summary["splits"])
    return {**summary, "params": values}


# --- train -----------------------------------------------------------------------------------
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    # Tuned on the valid split of ML-100K (docs/quality.md); model_options override them.
    "sasrec": {"max_seq_len": 50, "dropout": 0.2, "num_negatives": 1},
    "neumf": {"num_negatives": 4},
    "gmf": {"num_negatives": 4},
    "mlp": {"num_negatives": 4},
}


def family_args(kind: str, values: dict[str, Any]) -> list[str]:
    """The model family's settings from the DAG params ``model``, ``model_size`` and
    ``model_options`` (which win), as ``--family.FIELD=VALUE`` arguments."""
    size = int(values["model_size"])
    settings: dict[str, Any] = {"seed": values["seed"]}
    if kind == "recommendation":
        model = values["model"]
        settings["model"] = model
        settings.update(MODEL_PRESETS.get(model, {}))
        if model == "sasrec":
            settings["hidden_size"] = size
        else:
            settings["gmf_factors"] = size
            settings["mlp_layers"] = [max(2 * size, 8), max(size, 4), max(size // 2, 2), max(size // 4, 1)]
    else:
        settings["hidden_dim"] = size
        if values["model"] == "mlp":
            settings["max_neighbours"] = 0
    settings.update(values.get("model_options") or {})
    return [f"--family.{key}={json.dumps(value)}" for key, value in settings.items()]


@contextlib.contextmanager
def _sqlite_schema_lock(tracking_uri: str):
    """Serialise first use of a local SQLite tracking database across processes.

    MLflow creates and migrates the schema on first connection; two task processes doing that
    at once (two DAG runs starting together on a fresh store) failed with ``duplicate column
    name``. Server-backed stores (``http(s)://``, PostgreSQL) need no lock.
    """
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    path = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_mlflow_run(settings: Settings, experiment: str, training_key: str, run_name: str, tags: dict[str, str]) -> tuple[str, str]:
    """The MLflow run of one training (DAG run): found by tag on a retry, else created.

    Safe when two DAG runs start at once: the experiment is created by whichever comes first
    (the other finds it), and a local SQLite store is initialised by one process at a time.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    with _sqlite_schema_lock(settings.mlflow_tracking_uri):  # the client creates the schema
        client = MlflowClient(settings.mlflow_tracking_uri)
        exp = client.get_experiment_by_name(experiment)
    if exp:
        experiment_id = exp.experiment_id
    else:
        try:
            experiment_id = client.create_experiment(experiment, artifact_location=settings.mlflow_artifact_root)
        except MlflowException:
            exp = client.get_experiment_by_name(experiment)  # created meanwhile by a concurrent run
            if exp is None:
                raise
            experiment_id = exp.experiment_id
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`trainflow.training_key` = '{training_key}'", max_results=1
    )
    if found:
        log.info("reusing MLflow run %s of %s (a retry)", found[0].info.run_id, training_key)
        return found[0].info.run_id, experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags={"trainflow.training_key": training_key, **tags})
    client.set_terminated(run.info.run_id, "SCHEDULED")
    return run.info.run_id, experiment_id


def child_environment(settings: Settings, threads: int) -> dict[str, str]:
    """Environment of the training processes: where to store, where to log, credentials."""
    env = {
        "TRAINFLOW_DATA_DIR": str(settings.data_dir),
        "TRAINFLOW_STORAGE_ROOT": settings.storage_root,
        "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri,
        "OMP_NUM_THREADS": str(threads),
        **settings.s3.environment(),
    }
    return env


def train_step(
    params: dict[str, Any],
    dataset: dict[str, Any],
    *,
    kind: str,
    dag_id: str,
    run_id: str,
    try_number: int,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Train with torchrun on the dataset version, then log the servable model to MLflow.

    A retry of the same DAG run reuses its run directory (so training resumes from the last
    committed checkpoint) and its MLflow run.

    Returns:
        The trainer's result (metrics, model and checkpoint URIs, steps, samples/s, world
        size...) plus ``mlflow_run_id``, ``mlflow_experiment_id``, ``model_uri`` (the pyfunc
        model) and ``try_number``.
    """
    import subprocess
    import sys

    from tasks.launch import LaunchConfig, read_result, run_dir_url, run_torchrun

    settings = settings or get_settings()
    values = validate_params(params, kind)
    training_key = f"{dag_id}/{run_id}"
    mlflow_run_id, experiment_id = ensure_mlflow_run(
        settings,
        f"trainflow-{kind}",
        training_key,
        run_name=f"{dag_id} {run_id}",
        tags={"trainflow.dag_id": dag_id, "trainflow.run_id": run_id, "trainflow.dataset_version": dataset["version"]},
    )
    run_dir = run_dir_url(dag_id, run_id, settings)
    nproc = 1 if values["parallelism"] == "none" else values["nproc_per_node"]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cpus // nproc) if values["device"] == "cpu" else 4
    args = [
        f"--train.manifest_uri={dataset['manifest_uri']}",
        f"--train.run_dir={run_dir}",
        f"--train.dag_id={dag_id}",
        f"--train.run_id={run_id}",
        f"--train.epochs={values['epochs']}",
        f"--train.batch_size={values['batch_size']}",
        f"--train.learning_rate={values['learning_rate']}",
        f"--train.parallelism={values['parallelism']}",
        f"--train.device={values['device']}",
        f"--train.precision={values['precision']}",
        f"--train.compile={json.dumps(values['compile'])}",
        f"--train.pin_memory={json.dumps(values['device'] == 'cuda')}",
        f"--train.seed={values['seed']}",
        f"--train.mlflow_tracking_uri={settings.mlflow_tracking_uri}",
        f"--train.mlflow_run_id={mlflow_run_id}",
        *family_args(kind, values),
    ]
    launch = LaunchConfig(nnodes=1, nproc_per_node=nproc, max_restarts=values.get("max_restarts", 1), rdzv_id="trainflow")
    env = child_environment(settings, threads)
    log.info("training %s on %d process(es) (%s, %s): run dir %s", values["model"], nproc, values["parallelism"], values["device"], run_dir)
    run_torchrun(launch, module=f"trainers.{kind}", args=args, env=env, logger=log)
    result = read_result(run_dir, settings)
    if result.get("resumed_from_step"):
        log.info("training resumed from the committed checkpoint at step %d of %s (try %d)",
                 result["resumed_from_step"], run_dir, try_number)
    log.info("logging the servable model to MLflow run %s", mlflow_run_id)
    out = subprocess.run(
        [sys.executable, "-m", "trainers.serving", "--run-dir", run_dir, "--mlflow-run-id", mlflow_run_id],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    for line in out.stderr.splitlines()[-20:]:
        log.info("serving: %s", line)
    if out.returncode != 0:
        raise RuntimeError(f"exporting the servable model failed (exit {out.returncode}): {out.stderr[-2000:]}")
    serving = json.loads(out.stdout.strip().splitlines()[-1])
    summary = {k: result.get(k) for k in ("steps", "epochs", "samples_per_s", "world_size", "train_seconds", "best_epoch", "resumed_from_step")}
    log.info("training done: %s", summary)
    return {
        **{k: v for k, v in result.items() if k not in ("history", "losses")},
        "mlflow_run_id": mlflow_run_id,
        "mlflow_experiment_id": experiment_id,
        "model_uri": serving["model_uri"],
        "try_number": try_number,
    }


# --- evaluate --------------------------------------------------------------------------------
def evaluate_model_step(kind: str, train: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """Score the trained model on its dataset's eval split vs the baseline; log to its run."""
    from tasks.evaluation import evaluate_step

    return evaluate_step(
        kind, train["model_uri"], train["manifest_uri"], mlflow_run_id=train["mlflow_run_id"], settings=settings
    )


# --- register --------------------------------------------------------------------------------
def register_model_step(
    params: dict[str, Any],
    dataset: dict[str, Any],
    train: dict[str, Any],
    evaluation: dict[str, Any],
    *,
    kind: str,
    dag_id: str,
    run_id: str,
    airflow_run_url: str = "",
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Register the model version with lineage and apply the champion/challenger gate."""
    from tasks.evaluation import evaluate_driving, evaluate_recommendation, load_predictor
    from tasks.manifest import load_manifest
    from tasks.registry import GateConfig, Lineage, code_version, register_step

    settings = settings or get_settings()
    values = validate_params(params, kind)
    manifest = load_manifest(train["manifest_uri"], settings)

    def rescore(model_uri: str) -> dict[str, float]:
        predict = load_predictor(model_uri, settings.mlflow_tracking_uri)
        if kind == "recommendation":
            return evaluate_recommendation(manifest, predict)["metrics"]
        return evaluate_driving(manifest, predict)["metrics"]

    torch_version = ""
    try:
        from importlib.metadata import version

        torch_version = version("torch")
    except Exception:  # torch is always installed with trainflow; keep registration robust
        pass
    lineage = Lineage(
        dag_id=dag_id,
        run_id=run_id,
        try_number=int(train.get("try_number", 1)),
        manifest_uri=train["manifest_uri"],
        dataset_version=dataset["version"],
        dataset_name=dataset["name"],
        mlflow_run_id=train["mlflow_run_id"],
        world_size=int(train["world_size"]),
        parallelism=str(train["parallelism"]),
        device=str(train.get("device", values["device"])),
        torch_version=torch_version,
        code_version=code_version(),
        airflow_run_url=airflow_run_url,
    )
    return register_step(
        model_uri=train["model_uri"],
        registered_model_name=values["registered_model_name"],
        metrics=evaluation["metrics"],
        lineage=lineage,
        gate=GateConfig(values["promotion_metric"], values["promotion_margin"]),
        rescore=rescore,
        dataset={"splits": dataset.get("splits", {})},
        training={
            "epochs": train.get("epochs"),
            "steps": train.get("steps"),
            "train time": f"{train.get('train_seconds', 0):.0f} s",
            "samples/s": train.get("samples_per_s"),
        },
        settings=settings,
    )


# --- report ----------------------------------------------------------------------------------
REPORT_NAME = "report.json"
REPORT_KEYS = {
    "recommendation": ("hr_at_10", "ndcg_at_10", "mrr", "coverage_at_10"),
    "driving": ("ade", "fde", "miss_rate", "ade_1s", "fde_3s"),
}


def run_report(kind: str, dataset: dict[str, Any], train: dict[str, Any], evaluation: dict[str, Any], registry: dict[str, Any]) -> dict[str, Any]:
    """What one pipeline run produced, in a few lines a user reads first."""
    metrics = evaluation["metrics"]
    return {
        "kind": kind,
        "dataset": {k: dataset.get(k) for k in ("name", "version", "cache_hit", "splits", "manifest_uri")},
        "training": {
            k: train.get(k)
            for k in (
                "world_size", "parallelism", "device", "epochs", "steps", "samples_per_s", "train_seconds",
                "best_epoch", "resumed_from_step", "run_dir", "checkpoint_uri",
            )
        },
        "metrics": {k: {"model": metrics[k], "baseline": metrics.get(f"baseline_{k}")} for k in REPORT_KEYS[kind] if k in metrics},
        "baseline": "ItemPop" if kind == "recommendation" else "constant velocity",
        "registry": {
            "name": registry["name"],
            "version": registry["version"],
            "aliases": registry["aliases"],
            "decision": registry["decision"].get("outcome"),
            "reason": registry["decision"].get("reason"),
        },
        "mlflow": {"run_id": train.get("mlflow_run_id"), "experiment_id": train.get("mlflow_experiment_id"), "model_uri": train.get("model_uri")},
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(),
    }


def write_run_report(report: dict[str, Any], dag_id: str, run_id: str, settings: Settings | None = None) -> str:
    """Write ``report.json`` into the DAG run's directory; returns its URL."""
    from tasks.launch import run_dir_url
    from tasks.storage import Storage

    settings = settings or get_settings()
    store = Storage(run_dir_url(dag_id, run_id, settings), settings)
    store.commit_bytes(REPORT_NAME, (json.dumps(report, indent=2, default=str) + "\n").encode())
    return store.url(REPORT_NAME)


def latest_run_report(dag_id: str, settings: Settings | None = None) -> dict[str, Any] | None:
    """The most recently finished run report of ``dag_id``, or ``None``."""
    from tasks.storage import Storage, safe_name

    settings = settings or get_settings()
    store = Storage.from_settings(settings).child(f"runs/{safe_name(dag_id, 'dag_id')}")
    reports = [
        json.loads(store.read_bytes(path)) for path in store.list(recursive=True) if path.endswith("/" + REPORT_NAME)
    ]
    return max(reports, key=lambda r: r.get("finished_at", ""), default=None)
