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

from trainflow.tasks.kubernetes import TRAINER_MODULE
from trainflow.tasks.layout import REPORT_NAME, RUN_CONFIG_NAME
from trainflow.tasks.params import validate_params
from trainflow.tasks.rendezvous import NodeChannel
from trainflow.tasks.settings import Settings, get_settings, redact_url
from trainflow.tasks.sharding import ShardingConfig, shard_dataset
from trainflow.tasks.tracking import require_tracking_server

log = logging.getLogger(__name__)


def shard_step(
    params: dict[str, Any], pipeline: Any, settings: Settings | None = None, *, source_origin: str = "form"
) -> dict[str, Any]:
    """Validate the params, then shard the source into a dataset version (or find it).

    Args:
        params: The run's params (for an unattended run, as :func:`trainflow.tasks.retraining.resolve_run_params`
            made them).
        pipeline: The pipeline's name or spec (see :mod:`trainflow.tasks.pipelines`).
        settings: Storage root and credentials.
        source_origin: Where the source came from (``form``, ``production``, ``asset_event``);
            recorded with the dataset and, at registration, on the model version.

    Returns:
        The sharding summary (``manifest_uri``, ``version``, ``cache_hit``, split sizes,
        stats) plus the validated ``params`` (the run's params from here on) and ``source_origin``.
    """
    settings = settings or get_settings()
    values = validate_params(params, pipeline)
    log.info("settings: %s", settings.describe())
    summary = shard_dataset(
        values["source_url"],
        pipeline,
        name=values["dataset_name"] or None,
        config=ShardingConfig(seed=0),
        settings=settings,
    )
    if summary["cache_hit"]:
        log.info("dataset %s version %s: cache hit, reusing the committed shards", summary["name"], summary["version"])
    else:
        log.info("dataset %s version %s: new version committed", summary["name"], summary["version"])
    log.info("splits: %s", summary["splits"])
    return {**summary, "params": values, "source_origin": source_origin}


# --- train -----------------------------------------------------------------------------------
def family_args(pipeline: Any, values: dict[str, Any]) -> list[str]:
    """The model family's settings from the DAG params (``model``, ``model_size``,
    ``model_options``, ``seed``) as ``--family.FIELD=VALUE`` arguments (the spec maps them)."""
    from trainflow.tasks.pipelines import get_pipeline

    settings = get_pipeline(pipeline).settings_for_family(values)
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
    from trainflow.tasks.storage import local_file_lock

    with local_file_lock(tracking_uri[len("sqlite:///") :].split("?", 1)[0]):
        yield


def ensure_mlflow_run(settings: Settings, experiment: str, training_key: str, run_name: str, tags: dict[str, str]) -> tuple[str, str]:
    """The MLflow run of one training (DAG run): found by tag on a retry, else created.

    Safe when two DAG runs start at once: the experiment is created by whichever comes first
    (the other finds it), and a local SQLite store is initialised by one process at a time.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    require_tracking_server(settings.mlflow_tracking_uri)  # refused: fail in seconds, not after 265 s of retries
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
        **settings.mlflow_environment(),  # the tracking URI without its password, the credentials apart
    }
    return env


def train_step(
    params: dict[str, Any],
    dataset: dict[str, Any],
    *,
    pipeline: Any,
    dag_id: str,
    run_id: str,
    try_number: int,
    settings: Settings | None = None,
    nodes: NodeChannel | None = None,
    kubernetes: Any | None = None,
) -> dict[str, Any]:
    """Train with torchrun on the dataset version, then log the servable model to MLflow.

    A retry of the same DAG run reuses its run directory (so training resumes from the last
    committed checkpoint) and its MLflow run. With ``nnodes > 1`` this is node 0: it publishes
    the rendezvous plan through ``nodes`` (see :mod:`trainflow.tasks.rendezvous`) and runs its share of
    the ranks; the other nodes run :func:`train_node_step`. With ``launcher=kubernetes`` the
    training runs as a job on the cluster of the ``kubernetes`` client (see
    :mod:`trainflow.tasks.kubernetes`).

    Returns:
        The trainer's result (metrics, model and checkpoint URIs, steps, samples/s, world
        size...) plus ``mlflow_run_id``, ``mlflow_experiment_id``, ``model_uri`` (the pyfunc
        model) and ``try_number``.

    Raises:
        ValueError: ``nnodes > 1`` without ``nodes``, or ``launcher=kubernetes`` without a client.
        trainflow.tasks.rendezvous.RendezvousTimeout: a node never joined; names it and the timeout.
    """
    from trainflow.tasks.launch import LaunchConfig, LaunchError, read_result, run_dir_url, run_torchrun
    from trainflow.tasks.pipelines import get_pipeline

    settings = settings or get_settings()
    spec = get_pipeline(pipeline)
    values = validate_params(params, spec)
    training_key = f"{dag_id}/{run_id}"
    mlflow_run_id, experiment_id = ensure_mlflow_run(
        settings,
        spec.experiment_name,
        training_key,
        run_name=f"{dag_id} {run_id}",
        tags={"trainflow.dag_id": dag_id, "trainflow.run_id": run_id, "trainflow.dataset_version": dataset["version"]},
    )
    run_dir = run_dir_url(dag_id, run_id, settings)
    nproc = 1 if values["parallelism"] == "none" else values["nproc_per_node"]
    threads = _threads_per_rank(values, nproc)
    args = trainer_args(spec, values, dataset, run_dir=run_dir, dag_id=dag_id, run_id=run_id,
                        settings=settings, mlflow_run_id=mlflow_run_id)
    env = child_environment(settings, threads)
    if values["launcher"] == "kubernetes":
        from trainflow.tasks.kubernetes import run_kubernetes_training

        if kubernetes is None:
            raise ValueError("launcher=kubernetes needs a Kubernetes client (the DAG side builds it from the connection)")
        run_kubernetes_training(
            kubernetes, kind=spec.name, values=values, args=args, dag_id=dag_id, run_id=run_id, try_number=try_number,
            settings=settings, logger=log,
        )
    else:
        nnodes = values["nnodes"]
        launch = LaunchConfig(nnodes=1, nproc_per_node=nproc, max_restarts=values.get("max_restarts", 1), rdzv_id="trainflow")
        if nnodes > 1:
            launch, plan = _publish_node0_plan(values, nproc, threads, args, dag_id, run_id, try_number, nodes)
        log.info("training %s on %d node(s) x %d process(es) (%s, %s): run dir %s", values["model"], nnodes, nproc,
                 values["parallelism"], values["device"], run_dir)
        try:
            run_torchrun(launch, module=TRAINER_MODULE, args=args, env=env, logger=log)
        except LaunchError as exc:
            if nnodes > 1:
                _raise_rendezvous_error(exc, nodes, launch, node_rank=0)
            raise
        if nnodes > 1:
            # A node task retried after this point must not join the finished rendezvous.
            nodes.publish({**plan, "state": "finished"})
    result = read_result(run_dir, settings)
    if result.get("resumed_from_step"):
        log.info("training resumed from the committed checkpoint at step %d of %s (try %d)",
                 result["resumed_from_step"], run_dir, try_number)
    serving = _export_servable(run_dir, mlflow_run_id, env)
    summary = {k: result.get(k) for k in ("steps", "epochs", "samples_per_s", "world_size", "num_nodes", "train_seconds", "best_epoch", "resumed_from_step")}
    log.info("training done: %s", summary)
    return {
        **{k: v for k, v in result.items() if k not in ("history", "losses")},
        "mlflow_run_id": mlflow_run_id,
        "mlflow_experiment_id": experiment_id,
        "model_uri": serving["model_uri"],
        "try_number": try_number,
    }


def train_node_step(
    params: dict[str, Any],
    node_rank: int,
    *,
    pipeline: Any,
    nodes: NodeChannel,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Node ``node_rank`` (1..nnodes-1) of a multi-node training: wait for node 0's plan, then
    run this node's torchrun in the same rendezvous. Node 0's task returns the result.

    Returns:
        ``{"node_rank", "nnodes", "rdzv_endpoint", "rdzv_id", "nproc_per_node", "already_finished"}``
        (``already_finished``: a retry that found node 0's training done and ran nothing).

    Raises:
        trainflow.tasks.rendezvous.NodeFailed: node 0 failed before training started.
        trainflow.tasks.rendezvous.RendezvousTimeout: node 0 (or another node) never joined.
    """
    from trainflow.tasks.launch import LaunchConfig, LaunchError, run_torchrun
    from trainflow.tasks.rendezvous import wait_for_plan

    settings = settings or get_settings()
    values = validate_params(params, pipeline)
    if not 1 <= node_rank < values["nnodes"]:
        raise ValueError(f"node_rank must be in [1, {values['nnodes']}), got {node_rank}")
    plan = wait_for_plan(nodes, node_rank, values["rdzv_join_timeout_s"])
    summary = {"node_rank": node_rank, "nnodes": plan["nnodes"], "nproc_per_node": plan["nproc_per_node"],
               "rdzv_endpoint": plan["rdzv_endpoint"], "rdzv_id": plan["rdzv_id"]}
    if plan.get("state") == "finished":
        # A retry of this task after the whole world finished (e.g. it failed after torchrun).
        log.info("node %d: node 0 reports training %s finished; nothing left to run", node_rank, plan["rdzv_id"])
        return {**summary, "already_finished": True}
    launch = LaunchConfig(
        nnodes=plan["nnodes"],
        nproc_per_node=plan["nproc_per_node"],
        node_rank=node_rank,
        rdzv_endpoint=plan["rdzv_endpoint"],
        rdzv_id=plan["rdzv_id"],
        rdzv_join_timeout_s=plan["rdzv_join_timeout_s"],
        max_restarts=plan["max_restarts"],
        rdzv_is_host=False if plan["auto_endpoint"] else None,
    )
    env = child_environment(settings, int(plan["threads"]))
    log.info("node %d of %d: joining rendezvous %s (id %s) with %d process(es)", node_rank, launch.nnodes,
             launch.rdzv_endpoint, launch.rdzv_id, launch.nproc_per_node)
    try:
        run_torchrun(launch, module=TRAINER_MODULE, args=plan["args"], env=env, logger=log)
    except LaunchError as exc:
        _raise_rendezvous_error(exc, nodes, launch, node_rank=node_rank)
        raise
    log.info("node %d done: node 0's task returns the training result", node_rank)
    return {**summary, "already_finished": False}




def run_config(
    pipeline: Any,
    values: dict[str, Any],
    dataset: dict[str, Any],
    *,
    run_dir: str,
    dag_id: str,
    run_id: str,
    settings: Settings,
    mlflow_run_id: str,
) -> dict[str, Any]:
    """The whole run configuration the trainer gets: ``{"pipeline", "train", "family"}``.

    ``train`` is the loop's ``TrainConfig`` (the pipeline's ``train_defaults``, then the
    params); ``family`` the family config's fields from the params (the spec maps them).
    """
    from trainflow.tasks.pipelines import get_pipeline

    spec = get_pipeline(pipeline)
    train = {
        **spec.train_defaults,
        "manifest_uri": dataset["manifest_uri"],
        "run_dir": run_dir,
        "dag_id": dag_id,
        "run_id": run_id,
        "epochs": values["epochs"],
        "batch_size": values["batch_size"],
        "learning_rate": values["learning_rate"],
        "lr_schedule": values["lr_schedule"],
        "warmup_steps": values["warmup_steps"],
        "adam_beta2": values["adam_beta2"],
        "parallelism": values["parallelism"],
        "device": values["device"],
        "precision": values["precision"],
        "compile": values["compile"],
        "pin_memory": values["device"] == "cuda",
        "seed": values["seed"],
        "checkpoint_every_minutes": values["checkpoint_every_minutes"],
        # No mlflow_tracking_uri: it may carry a password; the ranks get MLFLOW_TRACKING_URI
        # from their environment (child_environment, the Kubernetes Secret).
        "mlflow_run_id": mlflow_run_id,
    }
    return {"pipeline": spec.name, "train": train, "family": spec.settings_for_family(values)}


def trainer_args(
    pipeline: Any,
    values: dict[str, Any],
    dataset: dict[str, Any],
    *,
    run_dir: str,
    dag_id: str,
    run_id: str,
    settings: Settings,
    mlflow_run_id: str,
) -> list[str]:
    """The trainer's command-line arguments (the same on every node and every pod): the run
    configuration, written whole into the run directory (which every node and pod reads), and
    the pipeline's name."""
    from trainflow.tasks.storage import Storage

    config = run_config(pipeline, values, dataset, run_dir=run_dir, dag_id=dag_id, run_id=run_id,
                        settings=settings, mlflow_run_id=mlflow_run_id)
    store = Storage(run_dir, settings)
    store.commit_bytes(RUN_CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    return [f"--pipeline={config['pipeline']}", f"--config={redact_url(store.url(RUN_CONFIG_NAME))}"]


def _threads_per_rank(values: dict[str, Any], nproc: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpus // nproc) if values["device"] == "cpu" else 4


def _publish_node0_plan(values, nproc, threads, args, dag_id, run_id, try_number, nodes):
    """Node 0: choose the rendezvous, publish the plan, and return its launch config."""
    from trainflow.tasks.launch import LaunchConfig
    from trainflow.tasks.rendezvous import free_port, make_plan, node_address, rendezvous_id

    if nodes is None:
        raise ValueError("nnodes > 1 needs the node channel of the orchestrator (one task per node)")
    auto = values["rdzv_endpoint"] is None
    endpoint = values["rdzv_endpoint"] or f"{node_address()}:{free_port()}"
    launch = LaunchConfig(
        nnodes=values["nnodes"],
        nproc_per_node=nproc,
        node_rank=0,
        rdzv_endpoint=endpoint,
        rdzv_id=rendezvous_id(dag_id, run_id, try_number),
        rdzv_join_timeout_s=values["rdzv_join_timeout_s"],
        max_restarts=values.get("max_restarts", 1),
        rdzv_is_host=True if auto else None,
    )
    plan = make_plan(
        nnodes=launch.nnodes, nproc_per_node=nproc, endpoint=endpoint, rdzv_id=launch.rdzv_id,
        join_timeout_s=launch.rdzv_join_timeout_s, max_restarts=launch.max_restarts, args=args, threads=threads,
        node0_host_is_auto=auto, try_number=try_number,
    )
    nodes.publish(plan)
    log.info("node 0 of %d: rendezvous %s (id %s, %s), waiting up to %d s for the other nodes",
             launch.nnodes, endpoint, launch.rdzv_id, "picked here" if auto else "from the rdzv_endpoint param",
             launch.rdzv_join_timeout_s)
    return launch, plan


def _raise_rendezvous_error(exc, nodes, launch, node_rank: int) -> None:
    """Turn torchrun's rendezvous failures into an error naming the missing nodes."""
    from trainflow.tasks.rendezvous import (
        RendezvousTimeout,
        is_rendezvous_timeout,
        is_rendezvous_unreachable,
        missing_nodes_error,
    )

    if is_rendezvous_timeout(exc.output_tail):
        raise missing_nodes_error(nodes, launch.nnodes, node_rank, str(launch.rdzv_endpoint), launch.rdzv_join_timeout_s) from exc
    if is_rendezvous_unreachable(exc.output_tail):
        raise RendezvousTimeout(
            f"node {node_rank}: the rendezvous store at {launch.rdzv_endpoint} is unreachable (node 0 stopped, or the "
            "address is not reachable from this worker; set TRAINFLOW_NODE_ADDRESS on the workers)",
            [0],
            launch.rdzv_join_timeout_s,
        ) from exc


def _export_servable(run_dir: str, mlflow_run_id: str, env: dict[str, str]) -> dict[str, Any]:
    """Log the exported model as an MLflow pyfunc model (a subprocess: keeps torch out of the task)."""
    import subprocess
    import sys

    log.info("logging the servable model to MLflow run %s", mlflow_run_id)
    out = subprocess.run(
        [sys.executable, "-m", "trainflow.trainers.serving", "--run-dir", run_dir, "--mlflow-run-id", mlflow_run_id],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    for line in out.stderr.splitlines()[-20:]:
        log.info("serving: %s", line)
    if out.returncode != 0:
        raise RuntimeError(f"exporting the servable model failed (exit {out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- evaluate --------------------------------------------------------------------------------
def evaluate_model_step(pipeline: Any, train: dict[str, Any], settings: Settings | None = None) -> dict[str, Any]:
    """Score the trained model on its dataset's eval split vs the baseline; log to its run."""
    from trainflow.tasks.evaluation import evaluate_step

    return evaluate_step(
        pipeline, train["model_uri"], train["manifest_uri"], mlflow_run_id=train["mlflow_run_id"], settings=settings
    )


# --- register --------------------------------------------------------------------------------
def register_model_step(
    params: dict[str, Any],
    dataset: dict[str, Any],
    train: dict[str, Any],
    evaluation: dict[str, Any],
    *,
    pipeline: Any,
    dag_id: str,
    run_id: str,
    airflow_run_url: str = "",
    run_type: str = "manual",
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Register the model version with lineage and apply the champion/challenger gate.

    ``run_type`` (the DAG run's) resolves ``require_approval=auto``: a manual run waits for a
    reviewer (the gate's verdict is recorded, ``champion`` does not move yet), a scheduled one
    does not. The result carries what the approval request shows (dataset, training, plots).
    """
    from trainflow.tasks.evaluation import load_predictor
    from trainflow.tasks.manifest import load_manifest
    from trainflow.tasks.params import approval_required
    from trainflow.tasks.pipelines import get_pipeline
    from trainflow.tasks.registry import GateConfig, Lineage, code_version, register_step
    from trainflow.tasks.sharding import split_protocol

    settings = settings or get_settings()
    spec = get_pipeline(pipeline)
    values = validate_params(params, spec)
    manifest = load_manifest(train["manifest_uri"], settings)

    def rescore(model_uri: str) -> dict[str, float]:
        predict = load_predictor(model_uri, settings.mlflow_tracking_uri)
        return spec.evaluate(manifest, predict, split="eval")["metrics"]

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
        split_protocol=dataset.get("split_protocol") or split_protocol(manifest),
        source_origin=str(dataset.get("source_origin", "")),
    )
    shards = [s for split in manifest.splits for s in manifest.shards(split)]
    dataset_facts = {
        "splits": dataset.get("splits", {}),
        "num_bytes": sum(s.num_bytes for s in shards),
        "num_shards": len(shards),
    }
    training = {
        "world size": train.get("world_size"),
        "parallelism": train.get("parallelism"),
        "epochs": train.get("epochs"),
        "steps": train.get("steps"),
        "train time": f"{train.get('train_seconds', 0):.0f} s",
        "samples/s": train.get("samples_per_s"),
    }
    approval = approval_required(values["require_approval"], run_type)
    result = register_step(
        model_uri=train["model_uri"],
        registered_model_name=values["registered_model_name"],
        metrics=evaluation["metrics"],
        lineage=lineage,
        gate=GateConfig(
            values["promotion_metric"],
            values["promotion_margin"],
            higher_is_better=spec.higher_is_better(values["promotion_metric"]),
            metric_order=spec.metric_order,
        ),
        rescore=rescore,
        dataset=dataset_facts,
        training={k: v for k, v in training.items() if k not in ("world size", "parallelism")},
        approval=approval,
        allow_override=bool(values["allow_gate_override"]),
        settings=settings,
    )
    # The run's own timeout (a production configuration may set it), not the form's default.
    result["approval"]["timeout_hours"] = float(values["approval_timeout_hours"])
    result["review"] = {
        "dataset": {"name": dataset["name"], "version": dataset["version"], **dataset_facts},
        # [label, value] pairs: XCom on PostgreSQL (JSONB) does not keep the order of keys.
        "training": [[k, v] for k, v in {**training, "device": train.get("device", values["device"])}.items()],
        "mlflow_run_id": train["mlflow_run_id"],
        "mlflow_experiment_id": train.get("mlflow_experiment_id"),
        "plots": list(evaluation.get("plots", [])),
        "baseline_name": spec.baseline_name,
        "airflow_run_url": airflow_run_url,
    }
    return result


# --- report ----------------------------------------------------------------------------------


def run_report(pipeline: Any, dataset: dict[str, Any], train: dict[str, Any], evaluation: dict[str, Any], registry: dict[str, Any]) -> dict[str, Any]:
    """What one pipeline run produced, in a few lines a user reads first."""
    from trainflow.tasks.pipelines import get_pipeline

    spec = get_pipeline(pipeline)
    metrics = evaluation["metrics"]
    return {
        "kind": spec.name,
        "dataset": {k: dataset.get(k) for k in ("name", "version", "cache_hit", "splits", "manifest_uri")},
        "training": {
            k: train.get(k)
            for k in (
                "world_size", "parallelism", "device", "epochs", "steps", "samples_per_s", "train_seconds",
                "best_epoch", "resumed_from_step", "run_dir", "checkpoint_uri",
            )
        },
        "metrics": {k: {"model": metrics[k], "baseline": metrics.get(f"baseline_{k}")} for k in spec.report_metrics if k in metrics},
        "baseline": spec.baseline_name,
        "registry": {
            "name": registry["name"],
            "version": registry["version"],
            "aliases": registry["aliases"],
            "decision": registry["decision"].get("outcome"),
            "reason": registry["decision"].get("reason"),
            "approval_required": bool(registry.get("approval", {}).get("required")),
        },
        "mlflow": {"run_id": train.get("mlflow_run_id"), "experiment_id": train.get("mlflow_experiment_id"), "model_uri": train.get("model_uri")},
        "finished_at": datetime.datetime.now(datetime.UTC).isoformat(),
    }


def write_run_report(report: dict[str, Any], dag_id: str, run_id: str, settings: Settings | None = None) -> str:
    """Write ``report.json`` into the DAG run's directory; returns its URL."""
    from trainflow.tasks.launch import run_dir_url
    from trainflow.tasks.storage import Storage

    settings = settings or get_settings()
    store = Storage(run_dir_url(dag_id, run_id, settings), settings)
    store.commit_bytes(REPORT_NAME, (json.dumps(report, indent=2, default=str) + "\n").encode())
    return store.url(REPORT_NAME)


def update_run_report_registry(dag_id: str, run_id: str, registry: dict[str, Any], settings: Settings | None = None) -> str | None:
    """Put a reviewer's decision into the run's ``report.json`` (written by ``register``)."""
    from trainflow.tasks.launch import run_dir_url
    from trainflow.tasks.storage import Storage

    settings = settings or get_settings()
    store = Storage(run_dir_url(dag_id, run_id, settings), settings)
    if not store.exists(REPORT_NAME):
        return None
    report = json.loads(store.read_bytes(REPORT_NAME))
    report["registry"].update(
        aliases=registry["aliases"],
        decision=registry["decision"].get("outcome"),
        reason=registry["decision"].get("reason"),
        decided_by=registry["decision"].get("decided_by"),
    )
    return write_run_report(report, dag_id, run_id, settings)


def latest_run_report(dag_id: str, settings: Settings | None = None) -> dict[str, Any] | None:
    """The most recently finished run report of ``dag_id``, or ``None``."""
    from trainflow.tasks.layout import runs_dir
    from trainflow.tasks.storage import Storage

    settings = settings or get_settings()
    store = Storage.from_settings(settings).child(runs_dir(dag_id))
    reports = [
        json.loads(store.read_bytes(path)) for path in store.list(recursive=True) if path.endswith("/" + REPORT_NAME)
    ]
    return max(reports, key=lambda r: r.get("finished_at", ""), default=None)
