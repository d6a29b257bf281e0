"""What every pipeline's DAG shares: params from the pipeline's spec, default args, the task
bodies, Airflow-side connections. A DAG file is a few lines (see ``dags/``)::

    @dag(schedule="@weekly", params=build_params("my_pipeline"), ...)
    def my_pipeline_training():
        pipeline_tasks("my_pipeline", DATASET, MODEL)

Imports nothing heavy at module level: the DAG files import it at parse time.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import urllib.parse
from typing import Any

from airflow.sdk import Param

from trainflow.tasks.params import param_specs

log = logging.getLogger(__name__)

OWNER = "trainflow"


def build_params(kind: str) -> dict[str, Param]:
    """Typed trigger-form params (JSON schema) of the registered pipeline ``kind``.

    Raises:
        trainflow.tasks.pipelines.UnknownPipelineError: no such pipeline; lists the registered ones.
    """
    params = {}
    for key, spec in param_specs(kind).items():
        schema = dict(spec["schema"])
        params[key] = Param(spec["default"], description=spec["description"], title=spec["title"], **schema)
    return params


def raw_data_asset(kind: str):
    """The Asset whose events announce new raw data for the ``kind`` pipeline
    (``trainflow://raw/<kind>``); an event's extra carries ``source_url``."""
    from airflow.sdk import Asset

    return Asset(name=f"trainflow_{kind}_raw", uri=f"trainflow://raw/{kind}")


def training_schedule(kind: str, default: str | None, raw_asset):
    """The training DAG's schedule: new raw data (``raw_asset`` events) and, where a time
    schedule is set, that too.

    Args:
        kind: The pipeline.
        default: The time schedule (cron or preset) when ``TRAINFLOW_<KIND>_SCHEDULE`` is not
            set; ``None`` for data-triggered runs only. The setting ``none`` turns it off.
        raw_asset: See :func:`raw_data_asset`.
    """
    from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable

    from trainflow.tasks.settings import pipeline_setting

    cron = pipeline_setting(kind, "SCHEDULE") or default
    if cron is None or cron.lower() == "none":
        return [raw_asset]
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=[raw_asset])


def default_args() -> dict[str, Any]:
    return {
        "owner": OWNER,
        "retries": 2,
        "retry_delay": dt.timedelta(seconds=30),
        "retry_exponential_backoff": True,
        "max_retry_delay": dt.timedelta(minutes=10),
    }


def settings_with_connections():
    """trainflow settings, with S3 credentials from the Airflow connection when it exists.

    The connection id is ``TRAINFLOW_AWS_CONN_ID`` (default ``aws_default``): login = access
    key id, password = secret key, extra ``endpoint_url`` / ``region_name``. Without the
    connection the standard AWS variables (or botocore's chain) apply. Values are passed on
    as plain settings; nothing is logged but whether a connection was used.
    """
    from trainflow.tasks.settings import get_settings

    settings = get_settings()
    conn_id = settings.aws_conn_id
    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
    except Exception:  # not defined: fall back to the environment
        return settings
    extra = conn.extra_dejson or {}
    log.info("S3 credentials from Airflow connection %r", conn_id)
    return settings.with_s3_credentials(
        access_key_id=conn.login or None,
        secret_access_key=conn.password or None,
        endpoint_url=extra.get("endpoint_url") or None,
        region=extra.get("region_name") or None,
    )


@contextlib.contextmanager
def fail_fast_on_bad_input():
    """Bad input (params, a missing or malformed source) fails the task at once: a retry
    cannot fix it. Infrastructure errors (an unreachable store) still go through retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from trainflow.tasks.datasets.sources import SourceNotFoundError
    from trainflow.tasks.datasets.textio import SourceFormatError
    from trainflow.tasks.manifest import ManifestError, ShardVerificationError

    try:
        yield
    except (ValueError, SourceNotFoundError, SourceFormatError, ManifestError, ShardVerificationError) as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


def production_config(kind: str) -> dict[str, Any] | None:
    """The ``kind`` pipeline's production configuration: the Airflow Variable
    ``trainflow_<kind>_production`` if set, else the setting ``TRAINFLOW_<KIND>_PRODUCTION``
    (see :mod:`trainflow.tasks.retraining`); ``None`` when neither is."""
    from airflow.sdk import Variable

    from trainflow.tasks.retraining import parse_production_config, production_variable
    from trainflow.tasks.settings import pipeline_setting

    raw = Variable.get(production_variable(kind), default=None)
    origin = f"Airflow Variable {production_variable(kind)!r}"
    if raw in (None, ""):
        raw, origin = pipeline_setting(kind, "PRODUCTION"), f"setting TRAINFLOW_{kind.upper()}_PRODUCTION"
    config = parse_production_config(raw, kind)
    if config is not None:
        from trainflow.tasks.settings import redact_url

        log.info("production configuration of %s from the %s: source %s", kind, origin, redact_url(config["source_url"]))
    return config


def triggering_event_extras(context: dict[str, Any], asset) -> list[dict[str, Any]]:
    """The extras of the ``asset`` events that triggered this run, oldest first."""
    accessor = context.get("triggering_asset_events")
    if not accessor:
        return []
    try:
        events = list(accessor[asset])
    except KeyError:
        return []
    events.sort(key=lambda event: str(getattr(event, "timestamp", "")))
    return [dict(getattr(event, "extra", None) or {}) for event in events]


def run_params(context: dict[str, Any], kind: str, raw_asset=None) -> tuple[dict[str, Any], str]:
    """The params this run trains with and where its data comes from (``form``,
    ``production``, ``asset_event``): manual runs keep the form; scheduled runs take the
    production configuration; Asset-triggered runs the event's ``source_url``. Raises
    :class:`trainflow.tasks.retraining.RunSourceError` (bad input, never retried) when there is none."""
    from trainflow.tasks.retraining import UNATTENDED_RUN_TYPES, resolve_run_params

    kind_of_run = run_type(context)
    production = production_config(kind) if kind_of_run in UNATTENDED_RUN_TYPES else None
    events = triggering_event_extras(context, raw_asset) if raw_asset is not None else []
    return resolve_run_params(dict(context["params"]), kind_of_run, kind, production=production, events=events)


def dataset_params(context: dict[str, Any], dataset: dict[str, Any] | None) -> dict[str, Any]:
    """The run's params as the ``shard`` task settled them (production configuration or the
    triggering event applied); the form's params for a result without them."""
    params = (dataset or {}).get("params")
    return dict(params) if params else dict(context["params"])


def run_shard(context: dict[str, Any], kind: str, asset, raw_asset=None) -> dict[str, Any]:
    """Body of the ``shard`` task: settle the run's data (see :func:`run_params`), shard (or
    reuse) the dataset and annotate the Asset event."""
    from trainflow.tasks.pipeline import shard_step
    from trainflow.tasks.settings import redact_url

    with fail_fast_on_bad_input():
        params, origin = run_params(context, kind, raw_asset)
        log.info("%s run: source %s (from the %s)", run_type(context) or "manual", redact_url(params["source_url"]), origin)
        result = shard_step(params, kind, settings_with_connections(), source_origin=origin)
    outlet_events = context.get("outlet_events")
    if outlet_events is not None:
        outlet_events[asset].extra = {
            "manifest_uri": result["manifest_uri"],
            "version": result["version"],
            "cache_hit": result["cache_hit"],
            "source_origin": origin,
        }
    return result


def _ids(context: dict[str, Any]) -> tuple[str, str, int]:
    ti = context["ti"]
    return ti.dag_id, ti.run_id, int(ti.try_number)


def airflow_run_url(context: dict[str, Any]) -> str:
    """Link to the DAG run in the Airflow UI (``AIRFLOW__API__BASE_URL``, default local)."""
    base = os.environ.get("AIRFLOW__API__BASE_URL", "http://127.0.0.1:8080").rstrip("/")
    dag_id, run_id, _ = _ids(context)
    return f"{base}/dags/{urllib.parse.quote(dag_id, safe='')}/runs/{urllib.parse.quote(run_id, safe=':')}"


TRAIN_TASK = "train"
TRAIN_NODE_TASK = "train_node"
RENDEZVOUS_XCOM_KEY = "rendezvous"


def node_channel(context: dict[str, Any], params: dict[str, Any]):
    """The node tasks' channel (:class:`trainflow.tasks.rendezvous.NodeChannel`) over this DAG run:
    node 0's plan in XCom (key ``rendezvous`` of ``train``), the node tasks' states from the
    execution API. Node ``r > 0`` is map index ``r - 1`` of ``train_node``."""
    from trainflow.tasks.rendezvous import NodeChannel

    ti = context["ti"]
    dag_id, run_id = ti.dag_id, ti.run_id

    def publish(plan: dict[str, Any]) -> None:
        ti.xcom_push(key=RENDEZVOUS_XCOM_KEY, value=plan)

    def fetch() -> dict[str, Any] | None:
        value = ti.xcom_pull(task_ids=TRAIN_TASK, key=RENDEZVOUS_XCOM_KEY, map_indexes=-1)
        if isinstance(value, list):  # several tries' values are never kept; be lenient anyway
            value = next((v for v in value if v), None)
        return value or None

    def node_states() -> dict[int, str | None]:
        states = ti.get_task_states(dag_id=dag_id, task_ids=[TRAIN_TASK, TRAIN_NODE_TASK], run_ids=[run_id])
        by_task = (states or {}).get(run_id, {})
        nnodes = int(params.get("nnodes", 1))
        out: dict[int, str | None] = {0: _state(by_task.get(TRAIN_TASK))}
        for rank in range(1, nnodes):
            out[rank] = _state(by_task.get(f"{TRAIN_NODE_TASK}_{rank - 1}"))
        return out

    def describe(rank: int) -> str:
        return f"task {TRAIN_TASK}" if rank == 0 else f"task {TRAIN_NODE_TASK}[{rank - 1}]"

    return NodeChannel(publish=publish, fetch=fetch, node_states=node_states, describe=describe)


def _state(value: Any) -> str | None:
    return None if value is None else str(getattr(value, "value", value))


def kubernetes_client():
    """A ``kubernetes.client.ApiClient`` for the Airflow connection ``TRAINFLOW_KUBERNETES_CONN_ID``
    (default ``kubernetes_default``; in-cluster config or a kube config, as the provider's
    ``KubernetesHook`` resolves it)."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

    from trainflow.tasks.settings import get_settings

    conn_id = get_settings().kubernetes_conn_id
    log.info("Kubernetes client from Airflow connection %r", conn_id)
    return KubernetesHook(conn_id=conn_id).get_conn()


def run_train(context: dict[str, Any], kind: str, dataset: dict[str, Any]) -> dict[str, Any]:
    """Body of the ``train`` task: torchrun on this machine (node 0 when ``nnodes > 1``) or a
    Kubernetes job; resumes on a retry."""
    from trainflow.airflow.links import persist_mlflow_links
    from trainflow.tasks.pipeline import train_step

    dag_id, run_id, try_number = _ids(context)
    params = dataset_params(context, dataset)
    if try_number > 1:
        log.info("try %d: training resumes from the last committed checkpoint of this DAG run", try_number)
    launcher = params.get("launcher", "local")
    multi_node = launcher == "local" and int(params.get("nnodes", 1)) > 1
    with fail_fast_on_bad_input():
        result = train_step(
            params,
            dataset,
            pipeline=kind,
            dag_id=dag_id,
            run_id=run_id,
            try_number=try_number,
            settings=settings_with_connections(),
            nodes=node_channel(context, params) if multi_node else None,
            kubernetes=kubernetes_client() if launcher == "kubernetes" else None,
        )
    persist_mlflow_links(context, experiment_id=result["mlflow_experiment_id"], run_id=result["mlflow_run_id"])
    return result


def run_train_node(context: dict[str, Any], kind: str, node_rank: int, dataset: dict[str, Any] | None = None) -> dict[str, Any]:
    """Body of a ``train_node`` task: node ``node_rank`` joins node 0's rendezvous."""
    from trainflow.tasks.pipeline import train_node_step

    params = dataset_params(context, dataset)
    with fail_fast_on_bad_input():
        return train_node_step(
            params, node_rank, pipeline=kind, nodes=node_channel(context, params), settings=settings_with_connections()
        )


def peer_node_ranks(params: dict[str, Any]) -> list[int]:
    """Node ranks that get a ``train_node`` task: ``1..nnodes-1`` with the local launcher."""
    if params.get("launcher", "local") != "local":
        return []
    return list(range(1, int(params.get("nnodes", 1))))


def run_evaluate(context: dict[str, Any], kind: str, train: dict[str, Any]) -> dict[str, Any]:
    """Body of the ``evaluate`` task."""
    from trainflow.airflow.links import persist_mlflow_links
    from trainflow.tasks.pipeline import evaluate_model_step

    persist_mlflow_links(context, experiment_id=train["mlflow_experiment_id"], run_id=train["mlflow_run_id"])
    return evaluate_model_step(kind, train, settings_with_connections())


def run_register(
    context: dict[str, Any], kind: str, dataset: dict[str, Any], train: dict[str, Any], evaluation: dict[str, Any], asset
) -> dict[str, Any]:
    """Body of the ``register`` task: a model version, the gate, and the model Asset event."""
    from trainflow.airflow.links import persist_mlflow_links
    from trainflow.tasks.pipeline import register_model_step, run_report, write_run_report

    dag_id, run_id, _ = _ids(context)
    result = register_model_step(
        dataset_params(context, dataset),
        dataset,
        train,
        evaluation,
        pipeline=kind,
        dag_id=dag_id,
        run_id=run_id,
        airflow_run_url=airflow_run_url(context),
        run_type=run_type(context),
        settings=settings_with_connections(),
    )
    persist_mlflow_links(
        context,
        experiment_id=train["mlflow_experiment_id"],
        run_id=train["mlflow_run_id"],
        model_name=result["name"],
        model_version=result["version"],
    )
    report = run_report(kind, dataset, train, evaluation, result)
    log.info("run report: %s", write_run_report(report, dag_id, run_id, settings_with_connections()))
    _annotate_model_event(context, asset, result)
    return result


def _annotate_model_event(context: dict[str, Any], asset, result: dict[str, Any]) -> None:
    """The model Asset event's extra: which version, its aliases and the decision."""
    outlet_events = context.get("outlet_events")
    if outlet_events is not None:
        outlet_events[asset].extra = {
            "registered_model": result["name"],
            "version": result["version"],
            "aliases": result["aliases"],
            "decision": result["decision"]["outcome"],
        }


def run_type(context: dict[str, Any]) -> str:
    """The DAG run's type as a plain string (``manual``, ``scheduled``, ``asset_triggered``...)."""
    value = getattr(context.get("dag_run"), "run_type", "") or ""
    return str(getattr(value, "value", value))


def run_promote(context: dict[str, Any], registered: dict[str, Any], answer: dict[str, Any], asset) -> dict[str, Any]:
    """Body of the ``promote`` task: apply the reviewer's answer to the version and record it."""
    from trainflow.airflow.links import persist_mlflow_links
    from trainflow.tasks.pipeline import update_run_report_registry
    from trainflow.tasks.registry import ReviewResponse, record_review

    user = answer.get("responded_by_user") or {}
    chosen = list(answer.get("chosen_options") or [])
    if len(chosen) != 1:
        raise ValueError(f"expected one chosen option from the approval, got {chosen!r}")
    response = ReviewResponse(
        choice=chosen[0],
        responded_at=str(answer.get("responded_at") or ""),
        responded_by=str(user.get("name", "")),
        responded_by_id=str(user.get("id", "")),
        comment=str((answer.get("params_input") or {}).get("comment") or ""),
        timed_out=bool(answer.get("timed_out")),
    )
    persist_mlflow_links(context, model_name=registered["name"], model_version=registered["version"])
    with fail_fast_on_bad_input():
        result = record_review(registered["name"], registered["version"], response, settings_with_connections())
    dag_id, run_id_, _ = _ids(context)
    try:
        update_run_report_registry(dag_id, run_id_, result, settings_with_connections())
    except Exception:  # the report is a convenience; the decision is already on the version
        log.warning("could not update the run report", exc_info=True)
    _annotate_model_event(context, asset, result)
    return result


def pipeline_tasks(kind: str, dataset_asset, model_asset, training_pool: str = "training", raw_asset=None) -> None:
    """Define shard → train → evaluate → register → approve → promote inside the current ``@dag`` body.

    ``approve`` and ``promote`` run only when the run requires approval (``require_approval``);
    otherwise ``register``'s gate decides alone and both are skipped.
    """
    from airflow.sdk import task

    from trainflow.airflow.approval import ModelApprovalOperator
    from trainflow.airflow.operators import trainflow_task

    @task(outlets=[dataset_asset])
    def shard(**context):
        """Shard the raw data (or reuse the committed version): the form's source for a manual
        run, the production configuration's for a scheduled one, the event's for an Asset-triggered one."""
        return run_shard(context, kind, dataset_asset, raw_asset)

    @trainflow_task(pool=training_pool, execution_timeout=dt.timedelta(hours=6))
    def train(dataset, **context):
        """Train with torchrun (node 0 with nnodes > 1) or a Kubernetes job; a retry resumes
        from the last committed checkpoint."""
        return run_train(context, kind, dataset)

    @task
    def plan_nodes(dataset, **context):
        """Node ranks 1..nnodes-1 (none for one node or launcher=kubernetes): one train_node each."""
        return peer_node_ranks(dataset_params(context, dataset))

    @task(
        pool=training_pool,
        execution_timeout=dt.timedelta(hours=6),
        map_index_template="node {{ task.op_kwargs['node_rank'] }}",
    )
    def train_node(node_rank, dataset, **context):
        """Node node_rank of a multi-node training: joins node 0's rendezvous (runs with train)."""
        return run_train_node(context, kind, node_rank, dataset)

    @trainflow_task(trigger_rule="none_failed")
    def evaluate(train_result, **context):
        """Score the model on the held-out split against the baseline; plots to MLflow."""
        return run_evaluate(context, kind, train_result)

    @trainflow_task(outlets=[model_asset])
    def register(dataset, train_result, evaluation, **context):
        """Register a model version and apply the champion/challenger gate."""
        return run_register(context, kind, dataset, train_result, evaluation, model_asset)

    @trainflow_task(outlets=[model_asset])
    def promote(registered, answer, **context):
        """Apply the reviewer's answer: champion on Approve; recorded on the version either way."""
        return run_promote(context, registered, answer, model_asset)

    dataset = shard()
    trained = train(dataset)
    peers = train_node.partial(dataset=dataset).expand(node_rank=plan_nodes(dataset))
    # Every node's task must succeed; with one node the mapped train_node is skipped (empty).
    evaluation = evaluate(trained)
    peers >> evaluation
    registered = register(dataset, trained, evaluation)
    approve = ModelApprovalOperator(task_id="approve", register_task_id="register")
    registered >> approve
    promote(registered, approve.output)
