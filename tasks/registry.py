"""Registration in MLflow's model registry with lineage and a champion/challenger gate.

Contract (DESIGN.md, "Registry contract"):

* a new version carries lineage tags (dataset manifest URI and version, DAG id, run id, try
  number, code version, world size, parallelism, torch version) and a model card as its
  description, and gets the alias ``challenger`` (aliases, not the deprecated stages);
* it becomes ``champion`` only if it beats the current champion on the **same** evaluation
  set by ``margin`` on the configured metric; the first version must beat the baseline;
* every decision is recorded on the version as ``trainflow.decision.*`` tags (when, by which
  DAG run, the values on both sides, the margin, the outcome, the previous champion); the
  superseded champion is tagged ``trainflow.superseded_by``;
* a retried register step for the same training run finds its version by the
  ``trainflow.training_key`` tag instead of creating another, and does not decide twice.

The alias ``challenger`` always points at the most recent candidate, promoted or not.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import subprocess
from collections.abc import Callable
from typing import Any

from tasks.settings import PROJECT_DIR, Settings, get_settings, redact_url
from tasks.storage import Storage, lease

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
TAG = "trainflow."
LOWER_IS_BETTER = {"ade", "fde", "miss_rate", "loss"}


class RegistryUnavailableError(RuntimeError):
    """The MLflow tracking/registry server could not be reached; the message names it."""


def higher_is_better(metric: str) -> bool:
    """Whether larger values of ``metric`` are better (HR/NDCG yes; ADE/FDE/miss rate no)."""
    base = metric.removeprefix("baseline_")
    return not (base in LOWER_IS_BETTER or base.startswith(("ade_", "fde_")))


def code_version() -> str:
    """The git commit of the checkout (``+dirty`` when modified), else the package version."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(PROJECT_DIR), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if sha:
            dirty = subprocess.run(
                ["git", "-C", str(PROJECT_DIR), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "trainflow-" + version("trainflow")
    except PackageNotFoundError:
        return "unknown"


@dataclasses.dataclass(frozen=True)
class Lineage:
    """Where a model came from; every field becomes a ``trainflow.*`` tag.

    Attributes:
        dag_id, run_id, try_number: The Airflow task instance that trained it.
        manifest_uri, dataset_version, dataset_name: The dataset version trained on.
        mlflow_run_id: The MLflow run holding params, metrics and plots.
        world_size, parallelism, device: How it was trained.
        torch_version, code_version: Software versions.
        airflow_run_url: Link back to the DAG run in the Airflow UI (optional).
    """

    dag_id: str
    run_id: str
    try_number: int
    manifest_uri: str
    dataset_version: str
    dataset_name: str
    mlflow_run_id: str
    world_size: int
    parallelism: str
    device: str = "cpu"
    torch_version: str = ""
    code_version: str = ""
    airflow_run_url: str = ""

    @property
    def training_key(self) -> str:
        return f"{self.dag_id}/{self.run_id}"

    def tags(self) -> dict[str, str]:
        tags = {TAG + k: str(v) for k, v in dataclasses.asdict(self).items() if v not in ("", None)}
        tags[TAG + "training_key"] = self.training_key
        return tags


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """How a challenger is judged.

    Attributes:
        metric: Metric key compared (``ndcg_at_10``, ``ade``...).
        margin: Absolute improvement required over the champion (>= 0).
    """

    metric: str
    margin: float = 0.0

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise ValueError(f"promotion_margin must be >= 0, got {self.margin}")


def _client(settings: Settings):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=settings.mlflow_tracking_uri, registry_uri=settings.mlflow_tracking_uri)


def find_version(client, name: str, training_key: str):
    """The version of ``name`` registered for ``training_key``, or ``None``."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        # Only "no such model" means "no version yet"; an unreachable server must not look
        # like an empty registry (a retry would register a second version).
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code):
            return None
        raise
    for version in versions:
        if version.tags.get(TAG + "training_key") == training_key:
            return version
    return None


def champion_version(client, name: str):
    """The version holding the ``champion`` alias, or ``None``."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "INVALID_PARAMETER_VALUE" in str(exc.error_code):
            return None
        raise


def decide(candidate: float, reference: float, metric: str, margin: float) -> bool:
    """Whether ``candidate`` beats ``reference`` on ``metric`` by more than ``margin``."""
    if higher_is_better(metric):
        return candidate > reference + margin
    return candidate < reference - margin


def model_card(
    name: str,
    lineage: Lineage,
    metrics: dict[str, float],
    gate: GateConfig,
    decision: dict[str, Any] | None,
    dataset: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
) -> str:
    """A short markdown model card: data, training, metrics vs baseline and champion, lineage."""
    keys = [k for k in metrics if not k.startswith("baseline_") and f"baseline_{k}" in metrics]
    rows = "\n".join(f"| {k} | {metrics[k]:.4f} | {metrics['baseline_' + k]:.4f} |" for k in keys[:12])
    dataset = dataset or {}
    training = training or {}
    lines = [
        f"## {name}: model card",
        "",
        "**Data**: dataset `{}` version `{}` ({}); manifest `{}`.".format(
            lineage.dataset_name,
            lineage.dataset_version,
            ", ".join(f"{k} {v:,}" for k, v in dataset.get("splits", {}).items()) or "splits in the manifest",
            lineage.manifest_uri,
        ),
        "",
        "**Training**: {} process(es), parallelism `{}` on {}{}.".format(
            lineage.world_size,
            lineage.parallelism,
            lineage.device,
            "".join(f", {k} {v}" for k, v in training.items()),
        ),
        "",
        "| metric (eval split) | model | baseline |",
        "|---|---:|---:|",
        rows,
        "",
    ]
    if decision:
        lines += [
            f"**Gate** on `{gate.metric}` (margin {gate.margin}): {decision['outcome']} - {decision['reason']}",
            "",
        ]
    lines += [
        f"**Lineage**: DAG `{lineage.dag_id}` run `{lineage.run_id}` (try {lineage.try_number}); MLflow run `{lineage.mlflow_run_id}`; code `{lineage.code_version}`; torch {lineage.torch_version}.",
    ]
    if lineage.airflow_run_url:
        lines.append(f"[Airflow DAG run]({lineage.airflow_run_url})")
    lines += [
        "",
        "**Known limits**: offline metrics on one held-out split; no fairness or drift analysis; "
        "the served model scores only ids / coordinates seen in the contract.",
    ]
    return "\n".join(lines)


def register_step(
    *,
    model_uri: str,
    registered_model_name: str,
    metrics: dict[str, float],
    lineage: Lineage,
    gate: GateConfig,
    rescore: Callable[[str], dict[str, float]] | None = None,
    dataset: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Register ``model_uri`` (once per training run) and apply the champion/challenger gate.

    Args:
        model_uri: The logged model (``runs:/...``, ``models:/m-...``).
        registered_model_name: Registered model to add a version to.
        metrics: The candidate's metrics on the eval split (with ``baseline_*``).
        lineage: Where the model came from.
        gate: Metric and margin.
        rescore: Scores another model URI on the candidate's eval set; used when the champion
            was evaluated on a different dataset version.
        dataset, training: Extra facts for the model card.
        settings: MLflow location (default: from the environment).

    Returns:
        ``{"name", "version", "aliases", "decision", "model_uri", "created"}``.

    Raises:
        RegistryUnavailableError: MLflow could not be reached (after its HTTP retries); a
            retry of the step registers the version once (found by its training key).
    """
    from mlflow.exceptions import MlflowException

    settings = settings or get_settings()
    if gate.metric not in metrics:
        raise ValueError(f"promotion_metric {gate.metric!r} is not among the evaluated metrics {sorted(metrics)}")
    try:
        # One registration of a model at a time, across processes and workers: two DAG runs
        # racing would both compare against the same old champion and the last to write the
        # alias would win, whatever the metrics said.
        with lease(
            Storage.from_settings(settings),
            registry_lease_path(settings.mlflow_tracking_uri, registered_model_name),
            owner=f"register {lineage.training_key}",
        ):
            return _register_locked(
                model_uri, registered_model_name, metrics, lineage, gate, rescore, dataset, training, settings
            )
    except MlflowException as exc:
        if _is_unreachable(exc):
            raise RegistryUnavailableError(
                f"MLflow at {redact_url(settings.mlflow_tracking_uri)} unreachable while registering "
                f"{registered_model_name} for {lineage.training_key}: {exc.message[:500]}"
            ) from exc
        raise


def registry_lease_path(tracking_uri: str, name: str) -> str:
    """The lease file (under the storage root) that serialises registrations of ``name``."""
    digest = hashlib.sha256(f"{tracking_uri}\n{name}".encode()).hexdigest()[:32]
    return f"locks/registry/{digest}.lease"


def _is_unreachable(exc: BaseException) -> bool:
    text = str(exc)
    return any(
        marker in text
        for marker in ("Max retries exceeded", "Failed to establish a new connection", "Connection refused",
                       "ConnectionError", "Read timed out", "RemoteDisconnected")
    )


def _register_locked(
    model_uri, registered_model_name, metrics, lineage: Lineage, gate: GateConfig, rescore, dataset, training,
    settings: Settings,
) -> dict[str, Any]:
    from mlflow.exceptions import MlflowException

    client = _client(settings)
    name = registered_model_name
    try:
        client.create_registered_model(name, tags={TAG + "managed": "true"})
        log.info("created registered model %s", name)
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code) and "already exists" not in str(exc):
            raise
    existing = find_version(client, name, lineage.training_key)
    created = existing is None
    if existing is not None:
        version = existing
        log.info("found version %s of %s for %s (a retry): not registering again", version.version, name, lineage.training_key)
    else:
        import mlflow

        tags = {**lineage.tags(), **{f"{TAG}metric.{k}": f"{v:.6g}" for k, v in metrics.items()}}
        mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
        mlflow.set_registry_uri(settings.mlflow_tracking_uri)
        version = mlflow.register_model(model_uri, name, tags=tags)
        log.info("registered %s version %s from %s", name, version.version, model_uri)
    already_decided = existing is not None and existing.tags.get(TAG + "decision.outcome")
    if already_decided:
        decision = {k.removeprefix(TAG + "decision."): v for k, v in version.tags.items() if k.startswith(TAG + "decision.")}
        log.info("version %s was already decided: %s", version.version, decision.get("outcome"))
    else:
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        decision = _apply_gate(client, name, version, metrics, lineage, gate, rescore)
    card = model_card(name, lineage, metrics, gate, decision, dataset, training)
    client.update_model_version(name, version.version, description=card)
    aliases = sorted(client.get_model_version(name, version.version).aliases)
    return {
        "name": name,
        "version": int(version.version),
        "aliases": aliases,
        "decision": decision,
        "model_uri": f"models:/{name}/{version.version}",
        "created": created,
    }


def _apply_gate(client, name, version, metrics, lineage: Lineage, gate: GateConfig, rescore) -> dict[str, Any]:
    candidate = float(metrics[gate.metric])
    champion = champion_version(client, name)
    if champion is not None and str(champion.version) == str(version.version):
        champion = None
    if champion is None:
        reference_key = f"baseline_{gate.metric}"
        if reference_key not in metrics:
            raise ValueError(f"no champion yet and no {reference_key} to compare the first version with")
        reference = float(metrics[reference_key])
        against = "baseline"
    else:
        against = f"champion v{champion.version}"
        same_set = champion.tags.get(TAG + "dataset_version") == lineage.dataset_version
        stored = champion.tags.get(f"{TAG}metric.{gate.metric}")
        if same_set and stored is not None:
            reference = float(stored)
        elif rescore is not None:
            log.info("champion v%s was evaluated on another dataset version: re-scoring it on this one", champion.version)
            reference = float(rescore(f"models:/{name}/{champion.version}")[gate.metric])
            against += " (re-scored on this eval set)"
        else:
            raise ValueError(
                f"champion v{champion.version} was evaluated on dataset version "
                f"{champion.tags.get(TAG + 'dataset_version')}, not {lineage.dataset_version}, and no rescore was given"
            )
    promoted = decide(candidate, reference, gate.metric, gate.margin)
    direction = "higher" if higher_is_better(gate.metric) else "lower"
    reason = (
        f"{gate.metric} {candidate:.4f} vs {against} {reference:.4f} ({direction} is better, margin {gate.margin}): "
        + ("promoted" if promoted else "not better by the margin, stays challenger")
    )
    now = dt.datetime.now(dt.UTC).isoformat()
    decision = {
        "outcome": "promoted" if promoted else "rejected",
        "reason": reason,
        "decided_at": now,
        "decided_by": f"gate:{lineage.training_key}",
        "metric": gate.metric,
        "candidate_value": f"{candidate:.6g}",
        "reference_value": f"{reference:.6g}",
        "compared_against": against,
        "margin": str(gate.margin),
        "previous_champion": champion.version if champion is not None else "",
    }
    for key, value in decision.items():
        client.set_model_version_tag(name, version.version, f"{TAG}decision.{key}", str(value))
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version.version)
        if champion is not None:
            client.set_model_version_tag(name, champion.version, TAG + "superseded_by", str(version.version))
            client.set_model_version_tag(name, champion.version, TAG + "superseded_at", now)
    log.info("gate: %s", reason)
    return decision
