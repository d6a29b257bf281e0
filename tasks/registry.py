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
import re
import subprocess
from collections.abc import Callable
from typing import Any

from trainflow.tasks.settings import PROJECT_DIR, Settings, get_settings, redact_url
from trainflow.tasks.storage import Storage, lease
from trainflow.tasks.tracking import require_tracking_server

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
TAG = "trainflow."


class RegistryUnavailableError(RuntimeError):
    """The MLflow tracking/registry server could not be reached; the message names it."""


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
        split_protocol: How the dataset was split into train / valid / eval; with
            ``dataset_name`` it is the dataset's identity for the gate (same name and protocol:
            the same dataset, perhaps a newer version of it).
        source_origin: Where the run's data came from: ``form`` (a person chose it),
            ``production`` (the deployment's production configuration, a scheduled run) or
            ``asset_event`` (the Asset event that triggered the run).
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
    split_protocol: str = ""
    source_origin: str = ""

    @property
    def dataset_identity(self) -> str:
        """``name (split protocol)``: what must match between a candidate and the champion."""
        return dataset_identity(self.dataset_name, self.split_protocol)

    @property
    def training_key(self) -> str:
        return f"{self.dag_id}/{self.run_id}"

    def tags(self) -> dict[str, str]:
        tags = {TAG + k: str(v) for k, v in dataclasses.asdict(self).items() if v not in ("", None)}
        tags[TAG + "training_key"] = self.training_key
        return tags


def dataset_identity(name: str | None, split_protocol: str | None) -> str:
    """A dataset's identity as the gate compares it: its name and split protocol."""
    return f"{name or '?'} ({split_protocol or 'split protocol not recorded'})"


def same_dataset(champion_tags: dict[str, str], lineage: Lineage) -> bool:
    """Whether the champion was trained on the candidate's dataset (another version is fine).

    Same dataset name and same split protocol, as recorded in the lineage tags. A champion
    registered before the split protocol was recorded matches on the name alone.
    """
    if champion_tags.get(TAG + "dataset_name") != lineage.dataset_name:
        return False
    recorded = champion_tags.get(TAG + "split_protocol")
    return recorded is None or recorded == lineage.split_protocol


@dataclasses.dataclass(frozen=True)
class GateConfig:
    """How a challenger is judged.

    Attributes:
        metric: Metric key compared (one the pipeline declares with ``gate=True``).
        margin: Absolute improvement required over the champion (>= 0).
        higher_is_better: The metric's direction, from the pipeline's spec
            (:meth:`trainflow.tasks.pipelines.PipelineSpec.higher_is_better`).
        metric_order: Metrics listed first in comparison tables (the pipeline's headline ones).
    """

    metric: str
    margin: float = 0.0
    higher_is_better: bool = True
    metric_order: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.margin < 0:
            raise ValueError(f"promotion_margin must be >= 0, got {self.margin}")


def _client(settings: Settings):
    from mlflow import MlflowClient

    require_tracking_server(settings.mlflow_tracking_uri, error=RegistryUnavailableError)  # refused: seconds, not 265 s
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


def decide(candidate: float, reference: float, higher_is_better: bool, margin: float) -> bool:
    """Whether ``candidate`` beats ``reference`` by more than ``margin`` in the metric's direction."""
    if higher_is_better:
        return candidate > reference + margin
    return candidate < reference - margin


def comparison_table(
    metrics: dict[str, float], reference: dict[str, float] | None = None, limit: int = 12, order: tuple[str, ...] = ()
) -> dict[str, dict[str, float | None]]:
    """Per metric with a baseline: ``{"candidate", "reference", "baseline"}`` (``None`` when unknown).

    Args:
        metrics: The candidate's metrics with ``baseline_*`` keys.
        reference: What the candidate was compared with (the champion's metrics on the same
            eval set); ``None`` when it was compared with the baseline.
        limit: At most this many rows.
        order: Metrics listed first, in this order (the pipeline's headline metrics).
    """
    keys = sorted(
        (k for k in metrics if not k.startswith("baseline_") and f"baseline_{k}" in metrics),
        key=lambda k: _metric_order(k, order),
    )[:limit]
    reference = reference or {}
    return {
        k: {
            "candidate": float(metrics[k]),
            "reference": float(reference[k]) if k in reference else None,
            "baseline": float(metrics[f"baseline_{k}"]),
        }
        for k in keys
    }


def _metric_order(key: str, order: tuple[str, ...] = ()) -> tuple:
    """``order``'s metrics first, then by name with K / seconds in numeric order (hr_at_5 < hr_at_10);
    a stable order whatever order the metrics arrived in (JSONB reorders XCom keys)."""
    if key in order:
        return (0, order.index(key), "", 0)
    match = re.fullmatch(r"(.*?)(\d+)(s?)", key)
    if match:
        return (1, 0, match.group(1) + match.group(3), int(match.group(2)))
    return (1, 0, key, 0)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def improvement(candidate: float, reference: float, higher_is_better: bool) -> float:
    """How much better ``candidate`` is than ``reference`` (positive = better), whatever the direction."""
    return candidate - reference if higher_is_better else reference - candidate


def decision_line(decision: dict[str, Any] | None) -> str:
    """The ``**Decision**`` line of the model card (replaced when a reviewer decides)."""
    if not decision:
        return "**Decision**: none yet."
    line = f"**Decision**: {decision['outcome']} - {decision['reason']}"
    if decision.get("decided_by"):
        line += f" (by {decision['decided_by']}, {decision.get('decided_at', '')})"
    if decision.get("comment"):
        line += f"; comment: {decision['comment']}"
    return line


def model_card(
    name: str,
    lineage: Lineage,
    metrics: dict[str, float],
    gate: GateConfig,
    decision: dict[str, Any] | None,
    dataset: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    reference: dict[str, float] | None = None,
) -> str:
    """A markdown model card a reviewer can decide from.

    Data (name, version, split sizes, bytes), training (world size, parallelism, device,
    epochs, time...), the metrics next to the champion's and the baseline's on the same eval
    split, the gate's verdict and the decision, lineage, a link back to the Airflow DAG run,
    and the known limits.
    """
    dataset = dataset or {}
    training = training or {}
    decision = decision or {}
    against = decision.get("compared_against", "")
    champion_col = against if against.startswith("champion") else ""
    table = comparison_table(metrics, reference if champion_col else None, order=gate.metric_order)
    header = "| metric (eval split) | this version |" + (f" {champion_col} |" if champion_col else "") + " baseline |"
    sep = "|---|---:|" + ("---:|" if champion_col else "") + "---:|"
    rows = [
        f"| {k} | {_fmt(r['candidate'])} |" + (f" {_fmt(r['reference'])} |" if champion_col else "") + f" {_fmt(r['baseline'])} |"
        for k, r in table.items()
    ]
    size = ""
    if dataset.get("num_bytes"):
        size = f"; {dataset['num_bytes'] / 1e6:,.1f} MB in {dataset.get('num_shards', '?')} shard(s)"
    lines = [
        f"## {name}: model card",
        "",
        "**Data**: dataset `{}` version `{}` ({} rows{}); evaluated on the `eval` split; manifest `{}`.".format(
            lineage.dataset_name,
            lineage.dataset_version,
            ", ".join(f"{k} {v:,}" for k, v in dataset.get("splits", {}).items()) or "splits in the manifest",
            size,
            lineage.manifest_uri,
        ),
        "",
        "**Training**: world size {}, parallelism `{}` on {}{}.".format(
            lineage.world_size,
            lineage.parallelism,
            lineage.device,
            "".join(f", {k} {v}" for k, v in training.items() if v not in (None, "")),
        ),
        "",
        header,
        sep,
        *rows,
        "",
    ]
    if decision.get("metric"):
        lines += [
            "**Gate** on `{}` ({} is better, margin {}): {} - {} {} vs {} {}.".format(
                gate.metric,
                "higher" if gate.higher_is_better else "lower",
                gate.margin,
                decision.get("gate_verdict", "passed" if decision["outcome"] == "promoted" else "failed"),
                gate.metric,
                decision.get("candidate_value"),
                decision.get("compared_against"),
                decision.get("reference_value"),
            ),
            "",
        ]
    lines += [decision_line(decision or None), ""]
    lines += [
        f"**Lineage**: DAG `{lineage.dag_id}` run `{lineage.run_id}` (try {lineage.try_number}); MLflow run `{lineage.mlflow_run_id}`; code `{lineage.code_version}`; torch {lineage.torch_version}.",
    ]
    if lineage.airflow_run_url:
        lines.append(f"[Airflow DAG run]({lineage.airflow_run_url})")
    lines += [
        "",
        "**Known limits**: offline metrics on one held-out split of one dataset version; no fairness, "
        "robustness or drift analysis; the served model scores only ids / coordinates seen in the contract.",
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
    approval: bool = False,
    allow_override: bool = False,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Register ``model_uri`` (once per training run) and apply the champion/challenger gate.

    Without ``approval`` the gate decides alone: the version becomes ``champion`` when it
    passes. With ``approval`` the gate's verdict is recorded but ``champion`` does not move:
    the decision is ``pending_approval`` until :func:`record_review` applies a reviewer's
    answer; a version that failed the gate is rejected at once unless ``allow_override``.

    Args:
        model_uri: The logged model (``runs:/...``, ``models:/m-...``).
        registered_model_name: Registered model to add a version to.
        metrics: The candidate's metrics on the eval split (with ``baseline_*``).
        lineage: Where the model came from.
        gate: Metric and margin.
        rescore: Scores another model URI on the candidate's eval set; used when the champion
            was evaluated on a different dataset version.
        dataset, training: Extra facts for the model card.
        approval: Whether a reviewer decides the promotion after the gate.
        allow_override: Whether a reviewer may promote a version that failed the gate.
        settings: MLflow location (default: from the environment).

    Returns:
        ``{"name", "version", "aliases", "decision", "model_uri", "created", "approval",
        "comparison"}``; ``approval["required"]`` says whether a reviewer must answer;
        ``comparison`` is ``[{"metric", "candidate", "reference", "baseline"}, ...]``.

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
                model_uri, registered_model_name, metrics, lineage, gate, rescore, dataset, training, settings,
                approval=approval, allow_override=allow_override,
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
    settings: Settings, *, approval: bool, allow_override: bool,
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
        decision = recorded_decision(version.tags)
        reference = _tagged_metrics(version.tags, TAG + "decision.reference.")
        log.info("version %s was already decided: %s", version.version, decision.get("outcome"))
    else:
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        verdict, reference = _gate_verdict(client, name, version, metrics, lineage, gate, rescore)
        decision = _record_gate(client, name, version, verdict, reference, lineage, approval, allow_override)
    card = model_card(name, lineage, metrics, gate, decision, dataset, training, reference)
    client.update_model_version(name, version.version, description=card)
    aliases = sorted(client.get_model_version(name, version.version).aliases)
    pending = decision.get("outcome") == PENDING
    return {
        "name": name,
        "version": int(version.version),
        "aliases": aliases,
        "decision": decision,
        "model_uri": f"models:/{name}/{version.version}",
        "created": created,
        "approval": {
            "required": pending,
            "allow_override": decision.get("allow_override") == "true",
            "reason": decision.get("approval_note", ""),
        },
        # A list, not a dict: XCom on PostgreSQL (JSONB) does not keep the order of keys.
        "comparison": [
            {"metric": key, **row}
            for key, row in comparison_table(
                metrics,
                reference if str(decision.get("compared_against", "")).startswith("champion") else None,
                order=gate.metric_order,
            ).items()
        ],
    }


PENDING = "pending_approval"


def recorded_decision(tags: dict[str, str]) -> dict[str, str]:
    """The ``trainflow.decision.*`` tags of a version as a dict (without the reference metrics)."""
    prefix = TAG + "decision."
    return {
        k.removeprefix(prefix): v
        for k, v in tags.items()
        if k.startswith(prefix) and not k.startswith(prefix + "reference.")
    }


def _tagged_metrics(tags: dict[str, str], prefix: str) -> dict[str, float]:
    out = {}
    for key, value in tags.items():
        if key.startswith(prefix):
            try:
                out[key.removeprefix(prefix)] = float(value)
            except ValueError:
                continue
    return out


def _gate_verdict(client, name, version, metrics, lineage: Lineage, gate: GateConfig, rescore) -> tuple[dict[str, Any], dict[str, float]]:
    """Compare the candidate with the champion (or the baseline for the first version).

    Returns:
        The verdict (``passed``, values on both sides, what it was compared against, the
        previous champion, a reason) and the reference's metrics on the candidate's eval set.
    """
    candidate = float(metrics[gate.metric])
    dataset_mismatch = ""
    champion = champion_version(client, name)
    if champion is not None and str(champion.version) == str(version.version):
        champion = None
    if champion is not None and not same_dataset(champion.tags, lineage):
        # Not comparable: scores on two different datasets say nothing about which model is
        # better. The candidate is judged against its own baseline only and never replaces the
        # champion without a reviewer (_record_gate).
        champion_dataset = dataset_identity(champion.tags.get(TAG + "dataset_name"), champion.tags.get(TAG + "split_protocol"))
        dataset_mismatch = (
            f"trained on dataset {lineage.dataset_identity}, champion v{champion.version} on "
            f"{champion_dataset}: not comparable"
        )
    if champion is None or dataset_mismatch:
        reference_key = f"baseline_{gate.metric}"
        if reference_key not in metrics:
            raise ValueError(f"no comparable champion and no {reference_key} to compare this version with")
        reference = float(metrics[reference_key])
        reference_metrics = {k.removeprefix("baseline_"): float(v) for k, v in metrics.items() if k.startswith("baseline_")}
        against = "baseline"
    else:
        against = f"champion v{champion.version}"
        same_set = champion.tags.get(TAG + "dataset_version") == lineage.dataset_version
        stored = champion.tags.get(f"{TAG}metric.{gate.metric}")
        if same_set and stored is not None:
            reference_metrics = {
                k: v for k, v in _tagged_metrics(champion.tags, TAG + "metric.").items() if not k.startswith("baseline_")
            }
            reference = float(stored)
        elif rescore is not None:
            log.info("champion v%s was evaluated on another version of this dataset: re-scoring it on this one", champion.version)
            reference_metrics = {k: float(v) for k, v in rescore(f"models:/{name}/{champion.version}").items()}
            reference = reference_metrics[gate.metric]
            against += " (re-scored on this eval set)"
        else:
            raise ValueError(
                f"champion v{champion.version} was evaluated on dataset version "
                f"{champion.tags.get(TAG + 'dataset_version')}, not {lineage.dataset_version}, and no rescore was given"
            )
    passed = decide(candidate, reference, gate.higher_is_better, gate.margin)
    direction = "higher" if gate.higher_is_better else "lower"
    reason = f"{gate.metric} {candidate:.4f} vs {against} {reference:.4f} ({direction} is better, margin {gate.margin})"
    if dataset_mismatch:
        reason = f"{dataset_mismatch}; {reason}"
    verdict = {
        "passed": passed,
        "reason": reason,
        "metric": gate.metric,
        "candidate_value": f"{candidate:.6g}",
        "reference_value": f"{reference:.6g}",
        "improvement": f"{improvement(candidate, reference, gate.higher_is_better):.6g}",
        "direction": direction,
        "compared_against": against,
        "margin": str(gate.margin),
        "previous_champion": champion.version if champion is not None else "",
        "same_dataset": "false" if dataset_mismatch else "true",
        "dataset": lineage.dataset_identity,
    }
    if dataset_mismatch:
        verdict["dataset_mismatch"] = dataset_mismatch
    return verdict, reference_metrics


def _set_tags(client, name: str, version: str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def _promote(client, name: str, version: str, previous_champion: str, when: str) -> None:
    client.set_registered_model_alias(name, CHAMPION, version)
    if previous_champion and str(previous_champion) != str(version):
        client.set_model_version_tag(name, previous_champion, TAG + "superseded_by", str(version))
        client.set_model_version_tag(name, previous_champion, TAG + "superseded_at", when)


def _record_gate(
    client, name, version, verdict: dict[str, Any], reference: dict[str, float], lineage: Lineage, approval: bool, allow_override: bool
) -> dict[str, Any]:
    passed = verdict["passed"]
    mismatch = verdict.get("dataset_mismatch", "")
    now = dt.datetime.now(dt.UTC).isoformat()
    if not approval and mismatch:
        # Unattended promotion needs a like-for-like win; a champion trained on other data
        # is only ever replaced by a reviewer's decision.
        outcome = "rejected"
        reason = verdict["reason"] + (
            ": a run without a reviewer never replaces a champion trained on another dataset, stays challenger"
        )
        note = ""
    elif not approval:
        outcome = "promoted" if passed else "rejected"
        reason = verdict["reason"] + (": promoted" if passed else ": not better by the margin, stays challenger")
        note = ""
    elif passed or allow_override:
        outcome = PENDING
        reason = verdict["reason"] + (
            ": gate passed, waiting for a reviewer" if passed else ": gate failed, a reviewer may override it"
        )
        note = "gate passed" if passed else "gate failed; allow_gate_override is on, so approving overrides the gate"
        if mismatch:
            note = (
                f"the datasets differ ({mismatch}): the candidate was compared with its baseline only; "
                "approving replaces the champion with a model trained on other data; " + note
            )
    else:
        outcome = "rejected"
        reason = verdict["reason"] + ": not better by the margin, stays challenger (no approval asked: a failed gate is final)"
        note = "gate failed and allow_gate_override is off: nothing to approve"
    decision = {
        "outcome": outcome,
        "reason": reason,
        "decided_at": now,
        "decided_by": f"gate:{lineage.training_key}",
        "gate_verdict": "passed" if passed else "failed",
        "gate_decided_at": now,
        **{k: v for k, v in verdict.items() if k not in ("passed", "reason")},
        "approval_required": "true" if approval else "false",
        "allow_override": "true" if allow_override else "false",
    }
    if note:
        decision["approval_note"] = note
    tags = {f"{TAG}decision.{k}": v for k, v in decision.items()}
    tags.update({f"{TAG}decision.reference.{k}": f"{v:.6g}" for k, v in reference.items()})
    if outcome == "promoted":
        _promote(client, name, version.version, verdict["previous_champion"], now)
    _set_tags(client, name, version.version, tags)
    log.info("gate: %s", reason)
    return {k: str(v) for k, v in decision.items()}


# --- human review ----------------------------------------------------------------------------
APPROVE, REJECT = "Approve", "Reject"


@dataclasses.dataclass(frozen=True)
class ReviewResponse:
    """A reviewer's answer to an approval request (or the timeout default).

    Attributes:
        choice: ``Approve`` or ``Reject``.
        responded_by: Who answered (user name; empty for a timeout).
        responded_by_id: The user's id in Airflow's auth manager.
        responded_at: When (ISO 8601).
        comment: The reviewer's comment.
        timed_out: No answer came within the timeout; ``choice`` is the default.
    """

    choice: str
    responded_at: str
    responded_by: str = ""
    responded_by_id: str = ""
    comment: str = ""
    timed_out: bool = False

    def __post_init__(self) -> None:
        if self.choice not in (APPROVE, REJECT):
            raise ValueError(f"review choice must be {APPROVE!r} or {REJECT!r}, got {self.choice!r}")


@dataclasses.dataclass(frozen=True)
class ReviewOutcome:
    """What a review decides: the outcome recorded, whether ``champion`` moves, and why."""

    outcome: str
    promote: bool
    override: bool
    reason: str


def review_outcome(response: ReviewResponse, gate_passed: bool, allow_override: bool) -> ReviewOutcome:
    """The decision logic of a review (pure: no registry access).

    * a timeout rejects (the safe default), whatever the gate said;
    * Reject keeps the version ``challenger``;
    * Approve promotes a version that passed the gate; one that failed it only with
      ``allow_override`` (recorded as an override), otherwise the approval is refused.
    """
    who = response.responded_by or "a reviewer"
    if response.timed_out:
        return ReviewOutcome("timed_out", False, False, "no answer within the approval timeout: rejected by default, stays challenger")
    if response.choice == REJECT:
        return ReviewOutcome("rejected", False, False, f"rejected by {who}, stays challenger")
    if gate_passed:
        return ReviewOutcome("promoted", True, False, f"approved by {who} after the gate passed: promoted")
    if allow_override:
        return ReviewOutcome("promoted", True, True, f"approved by {who} overriding the failed gate (allow_gate_override): promoted")
    return ReviewOutcome(
        "rejected", False, False, f"approved by {who}, but the gate failed and allow_gate_override is off: stays challenger"
    )


def record_review(
    name: str, version: int | str, response: ReviewResponse, settings: Settings | None = None
) -> dict[str, Any]:
    """Apply a reviewer's answer to a version waiting for approval and record it on the version.

    Tags written (``trainflow.decision.*``): ``outcome`` (promoted / rejected / timed_out),
    ``reason``, ``decided_by`` (the user, or ``timeout``), ``decided_by_id``, ``decided_at``,
    ``approval`` (Approve / Reject / timeout), ``comment``, ``override``; the gate's verdict and
    the metrics on both sides stay from the gate. The model card's decision line is updated.
    ``champion`` moves only when the outcome is ``promoted``. A version whose decision is no
    longer pending (a retried task) is returned as recorded: nothing is decided twice.

    Raises:
        ValueError: when the version was never waiting for approval.
    """
    settings = settings or get_settings()
    # The same lease as registrations: a reviewer's promotion must not interleave with a gate
    # that is comparing against the current champion.
    with lease(Storage.from_settings(settings), registry_lease_path(settings.mlflow_tracking_uri, name),
               owner=f"review {name} v{version}"):
        return _record_review_locked(name, str(version), response, settings)


def _record_review_locked(name: str, version: str, response: ReviewResponse, settings: Settings) -> dict[str, Any]:
    client = _client(settings)
    mv = client.get_model_version(name, version)
    decision = recorded_decision(mv.tags)
    if decision.get("outcome") != PENDING:
        if decision.get("approval_required") == "true" and decision.get("approval"):
            log.info("%s v%s was already reviewed: %s", name, version, decision.get("outcome"))
            return {"name": name, "version": int(version), "aliases": sorted(mv.aliases), "decision": decision}
        raise ValueError(f"{name} v{version} is not waiting for approval (decision: {decision.get('outcome') or 'none'})")
    gate_passed = decision.get("gate_verdict") == "passed"
    result = review_outcome(response, gate_passed, decision.get("allow_override") == "true")
    outcome, reason = result.outcome, result.reason
    previous = decision.get("previous_champion", "")
    current = champion_version(client, name)
    current_v = str(current.version) if current is not None else ""
    if result.promote and current_v not in (previous, version):
        # Another version became champion while this one waited: the comparison is stale.
        outcome, reason = "rejected", (
            f"approved by {response.responded_by or 'a reviewer'}, but the champion changed from "
            f"{'v' + previous if previous else 'none'} to v{current_v} since the gate ran: stays challenger (re-run to compare)"
        )
    when = response.responded_at or dt.datetime.now(dt.UTC).isoformat()
    review = {
        "outcome": outcome,
        "reason": reason,
        "decided_by": "timeout" if response.timed_out else (response.responded_by or "unknown"),
        "decided_by_id": response.responded_by_id,
        "decided_at": when,
        "approval": "timeout" if response.timed_out else response.choice,
        "comment": response.comment,
        "override": "true" if (result.override and outcome == "promoted") else "false",
    }
    if outcome == "promoted":
        # The alias first: a retry after a crash here finds the decision still pending, the
        # champion already this version, and completes the tags.
        _promote(client, name, version, previous, when)
    _set_tags(client, name, version, {f"{TAG}decision.{k}": v for k, v in review.items()})
    decision.update(review)
    if mv.description:
        card = re.sub(r"^\*\*Decision\*\*:.*$", lambda _: decision_line(decision), mv.description, count=1, flags=re.M)
        client.update_model_version(name, version, description=card)
    log.info("review of %s v%s: %s", name, version, reason)
    aliases = sorted(client.get_model_version(name, version).aliases)
    return {"name": name, "version": int(version), "aliases": aliases, "decision": decision}


def approval_request(
    result: dict[str, Any],
    *,
    dataset: dict[str, Any] | None = None,
    training: dict[str, Any] | None = None,
    links: dict[str, Any] | None = None,
    timeout_hours: float | None = None,
    baseline_name: str = "baseline",
) -> tuple[str, str]:
    """Subject and markdown body of the approval request a reviewer sees in the Airflow UI.

    Args:
        result: What :func:`register_step` returned (decision, comparison, version).
        dataset: The dataset version (``name``, ``version``, ``splits``).
        training: World size, parallelism, device, epochs, time: a dict or ``[label, value]``
            pairs (pairs keep their order through XCom on PostgreSQL).
        links: ``mlflow_run``, ``model_version``, ``airflow_run`` URLs and ``plots``
            (``{name: url}``); missing ones are left out.
        timeout_hours: The response timeout, said in the body.
        baseline_name: What the baseline is (the pipeline's ``baseline_name``).

    Returns:
        ``(subject, body)``.
    """
    decision = result["decision"]
    name, version = result["name"], result["version"]
    links = links or {}
    dataset = dataset or {}
    training = training or {}
    metric = decision.get("metric", "")
    against = decision.get("compared_against", "baseline")
    champion_col = against if against.startswith("champion") else ""
    verdict = decision.get("gate_verdict", "")
    subject = f"Promote {name} v{version} to champion? (gate {verdict})"
    direction = decision.get("direction") or "higher"
    lines = [
        f"**{name} v{version}** is `challenger`. Approve to make it `champion`; reject to keep it `challenger`.",
        "",
        f"**Automated gate: {verdict.upper()}** on `{metric}` ({direction} is better): "
        f"{decision.get('candidate_value')} vs {against} {decision.get('reference_value')}, "
        f"improvement {float(decision.get('improvement', 0) or 0):+.4f}, required margin > {decision.get('margin')}.",
    ]
    if decision.get("dataset_mismatch"):
        lines += [
            "",
            f"⚠️ **The datasets differ**: {decision['dataset_mismatch']}. The candidate was compared with its "
            "baseline only; approving replaces the champion with a model trained on other data.",
        ]
    if verdict == "failed":
        lines += ["", "⚠️ The gate **failed**: approving is an **override** (allow_gate_override is on) and is recorded as such."]
    header = f"| metric (eval split) | candidate v{version} |" + (f" {champion_col} |" if champion_col else "") + f" {baseline_name} |"
    sep = "|---|---:|" + ("---:|" if champion_col else "") + "---:|"
    rows = []
    rows_in = sorted(result.get("comparison", []), key=lambda r: r["metric"] != metric)  # the gate's metric first
    for row in rows_in:
        key = row["metric"]
        label = f"**{key}**" if key == metric else key
        rows.append(
            f"| {label} | {_fmt(row['candidate'])} |"
            + (f" {_fmt(row['reference'])} |" if champion_col else "")
            + f" {_fmt(row['baseline'])} |"
        )
    lines += ["", header, sep, *rows, ""]
    order = {"train": 0, "valid": 1, "eval": 2}
    splits = ", ".join(
        f"{k} {v:,}" for k, v in sorted(dataset.get("splits", {}).items(), key=lambda kv: (order.get(kv[0], 3), kv[0]))
    )
    lines.append(
        f"**Dataset**: `{dataset.get('name', '?')}` version `{dataset.get('version', '?')}`" + (f" ({splits})" if splits else "") + "."
    )
    if training:
        pairs = training.items() if isinstance(training, dict) else training
        lines += ["", "**Training**: " + ", ".join(f"{k} {v}" for k, v in pairs if v not in (None, "")) + "."]
    link_parts = [f"[{label}]({links[key]})" for key, label in (
        ("mlflow_run", "MLflow run"), ("model_version", "MLflow model version"), ("airflow_run", "Airflow DAG run")
    ) if links.get(key)]
    if link_parts:
        lines += ["", "**Links**: " + " · ".join(link_parts)]
    plots = links.get("plots") or {}
    if plots:
        lines += ["", "**Plots**: " + " · ".join(f"[{label}]({url})" for label, url in plots.items())]
    if timeout_hours:
        lines += ["", f"No answer within {timeout_hours:g} h rejects it (recorded as a timeout). Add a comment: it is recorded on the model version."]
    return subject, "\n".join(lines)
