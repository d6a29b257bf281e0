"""The pipeline contract: one :class:`PipelineSpec` per kind of model and data, found by name.

The engine (sharding, the trainer, evaluation, serving, the registry, the Airflow glue) never
branches on a pipeline's name: it asks the registry for the spec and uses its attributes. A
pipeline is one package that builds a spec and registers it, either in code::

    from trainflow.tasks.pipelines import PipelineSpec, register_pipeline
    register_pipeline(PipelineSpec(name="tabular", ...))

or, for an installed package, through the ``trainflow.pipelines`` entry point group (what the
two example pipelines do, see ``pyproject.toml``)::

    [project.entry-points."trainflow.pipelines"]
    tabular = "my_package.pipeline:PIPELINE"

The entry point names a :class:`PipelineSpec` (or a function returning one). Lookup is lazy:
entry points are loaded on the first :func:`get_pipeline` / :func:`pipeline_names` call.

Heavy parts (the model family, the served model) are named as ``"module:attribute"`` strings
and imported only where they run (in the trainer, in the serving subprocess), so a DAG file
that builds its params from a spec imports neither torch nor the pipeline's model code.

Imports nothing heavy at module level and never Airflow (see DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "trainflow.pipelines"
NAME_PATTERN = r"[a-z][a-z0-9_]*"


class UnknownPipelineError(ValueError):
    """No pipeline of that name is registered; the message lists the registered ones."""


@dataclasses.dataclass(frozen=True)
class Metric:
    """One metric a pipeline's evaluator reports.

    Attributes:
        name: Metric key as logged to MLflow (``baseline_<name>`` is the baseline's value).
        higher_is_better: Direction: the gate promotes a larger value when True, a smaller one
            when False.
        headline: Shown in the task log's summary and first in comparison tables.
        report: Included in the run report (``report.json``, ``python -m trainflow.tasks.cli report``).
        gate: May be chosen as the ``promotion_metric`` of the champion/challenger gate.
        description: One line for people (the trigger form, the docs).
    """

    name: str
    higher_is_better: bool
    headline: bool = False
    report: bool = False
    gate: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", self.name) or self.name.startswith("baseline_"):
            raise ValueError(f"Metric.name {self.name!r} must be a lower_case key not starting with 'baseline_'")


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    """Everything specific to one pipeline; the engine does the rest.

    Attributes:
        name: Registry key; also the dataset ``kind`` in manifests, the MLflow experiment
            ``trainflow-<name>`` and, by default, the DAG id ``<name>_training``.
        description: One paragraph for people.
        resolve_source: ``(url, settings) -> source``: turn a ``source_url`` into a source
            object (attributes ``url``, ``default_name``, ``reader``, ``reader_version``,
            ``fingerprint``; the rest is the split protocol's business). Raise
            :class:`trainflow.tasks.datasets.sources.SourceNotFoundError` for nothing (of this kind) at
            the URL. The reader id and version are part of the dataset version.
        split: ``(source, store, config, tmp_dir) -> dict``: the split protocol: write the
            ``train`` / ``valid`` / ``eval`` shards of ``source`` with
            :class:`trainflow.tasks.sharding.ShardWriter` into ``store`` and return the manifest body
            (``splits``, ``stats`` and any extra keys such as ``files``).
        split_protocol: ``(sharding config) -> str``: how a dataset written *before* the split
            recorded ``stats["split_protocol"]`` was split (the gate compares the dataset's name
            and split protocol); optional: a split that records it needs none.
        split_version: Bumped when ``split`` writes different rows for the same source and
            config (a new sampling of negatives...); part of the dataset version when set, so
            a version written by the old split is never reused as the new one. Default ``""``:
            not part of the version (the ids stay those computed before the field existed).
        family: ``"module:Class"`` of the :class:`trainflow.trainers.family.ModelFamily`.
        family_config: ``"module:Class"`` of the family's config dataclass.
        family_settings: ``(params) -> dict``: the family config's fields from the run's
            validated params (``model``, ``model_size``, ``model_options``, ``seed``...);
            ``model_options`` must win. Default: ``seed`` plus ``model_options``.
        train_defaults: ``TrainConfig`` fields this pipeline sets unless a param does
            (e.g. ``{"optimizer": "adamw", "weight_decay": 0.01}``).
        params: Param specs this pipeline adds or overrides, by key: each a dict with any of
            ``default``, ``schema`` (JSON schema fragment), ``description``, ``title``;
            an override is merged into the common param of that key (see
            :func:`trainflow.tasks.params.param_specs`).
        metrics: The metrics its evaluator reports (direction, headline, report, gate).
        evaluate: ``(manifest, predict, split) -> report``: score a served model's
            ``predict`` on ``split``: ``{"metrics": {...with baseline_* keys}, ...}``.
        plot: ``(report, out_dir) -> [png paths]``: plots for the MLflow run; optional.
        baseline_name: What the ``baseline_*`` metrics are (``"most popular"``...).
        serving: ``"module:function"``: ``(state, config, manifest, tmp_dir) ->
            trainflow.trainers.serving.ServedModel``: the served computation, its example input,
            pyfunc code file and artifacts (see :mod:`trainflow.trainers.serving`).
        promotion_metric: The gate's default metric (default: the first gate metric).
        registered_model_name: Default MLflow registered model.
        dag_id: The DAG that runs this pipeline (the trigger-time conf check uses it).
    """

    name: str
    resolve_source: Callable[..., Any]
    split: Callable[..., dict[str, Any]]
    family: str
    family_config: str
    metrics: tuple[Metric, ...]
    evaluate: Callable[..., dict[str, Any]]
    serving: str
    description: str = ""
    family_settings: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    train_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    params: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    plot: Callable[..., list[str]] | None = None
    baseline_name: str = "baseline"
    split_protocol: Callable[[dict[str, Any]], str] | None = None
    split_version: str = ""
    promotion_metric: str | None = None
    registered_model_name: str | None = None
    dag_id: str | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(NAME_PATTERN, self.name):
            raise ValueError(f"PipelineSpec.name {self.name!r} must match {NAME_PATTERN}")
        for field in ("family", "family_config", "serving"):
            value = getattr(self, field)
            if not isinstance(value, str) or ":" not in value:
                raise ValueError(f"PipelineSpec.{field} must be a 'module:attribute' string, got {value!r}")
        if not self.metrics:
            raise ValueError(f"pipeline {self.name!r}: PipelineSpec.metrics must name at least one metric")
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"pipeline {self.name!r}: duplicate metric names in {names}")
        if not self.gate_metrics:
            raise ValueError(f"pipeline {self.name!r}: at least one metric must have gate=True")
        if self.promotion_metric is None:
            object.__setattr__(self, "promotion_metric", self.gate_metrics[0])
        elif self.promotion_metric not in self.gate_metrics:
            raise ValueError(
                f"pipeline {self.name!r}: promotion_metric {self.promotion_metric!r} is not a gate metric {self.gate_metrics}"
            )
        if self.registered_model_name is None:
            object.__setattr__(self, "registered_model_name", f"trainflow-{self.name}")
        if self.dag_id is None:
            object.__setattr__(self, "dag_id", f"{self.name}_training")

    # --- metrics ------------------------------------------------------------------------
    def metric(self, name: str) -> Metric:
        """The metric ``name`` (a ``baseline_`` prefix is ignored).

        Raises:
            ValueError: this pipeline reports no such metric; names the ones it does.
        """
        base = name.removeprefix("baseline_")
        for metric in self.metrics:
            if metric.name == base:
                return metric
        raise ValueError(
            f"pipeline {self.name!r} has no metric {name!r} (known: {', '.join(m.name for m in self.metrics)})"
        )

    def higher_is_better(self, name: str) -> bool:
        """Direction of metric ``name`` as this pipeline declares it."""
        return self.metric(name).higher_is_better

    @property
    def gate_metrics(self) -> tuple[str, ...]:
        """Metrics the gate may compare, in declaration order (the first is the default)."""
        return tuple(m.name for m in self.metrics if m.gate)

    @property
    def promotion_metrics(self) -> tuple[str, ...]:
        """The ``promotion_metric`` param's choices: the default first, then the other gate metrics."""
        return (self.promotion_metric, *(m for m in self.gate_metrics if m != self.promotion_metric))

    @property
    def metric_order(self) -> tuple[str, ...]:
        """Rows of comparison tables: the default gate metric, then the headline metrics."""
        return tuple(dict.fromkeys((self.promotion_metric, *self.headline_metrics)))

    @property
    def headline_metrics(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metrics if m.headline)

    @property
    def report_metrics(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metrics if m.report)

    @property
    def experiment_name(self) -> str:
        """The MLflow experiment of this pipeline's training runs."""
        return f"trainflow-{self.name}"

    # --- heavy parts, imported where they run -------------------------------------------
    def load_family(self) -> tuple[type, type]:
        """(family class, family config class)."""
        return load_object(self.family), load_object(self.family_config)

    def load_serving(self) -> Callable[..., Any]:
        return load_object(self.serving)

    def settings_for_family(self, params: dict[str, Any]) -> dict[str, Any]:
        """The family config's fields from the run's params (``model_options`` win)."""
        if self.family_settings is not None:
            return dict(self.family_settings(params))
        return {"seed": params.get("seed", 0), **(params.get("model_options") or {})}


def load_object(path: str) -> Any:
    """Import ``"package.module:attribute"``.

    Raises:
        ImportError: the module or attribute does not exist; names ``path``.
    """
    module_name, _, attribute = path.partition(":")
    module = importlib.import_module(module_name)
    try:
        obj = module
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ImportError(f"{path!r}: module {module_name!r} has no attribute {attribute!r}") from None
    return obj


# --- the registry -----------------------------------------------------------------------------
_REGISTRY: dict[str, PipelineSpec] = {}
_ENTRY_POINTS_LOADED = False
_LOCK = threading.RLock()


def register_pipeline(spec: PipelineSpec, *, replace: bool = False) -> PipelineSpec:
    """Add ``spec`` to the registry under ``spec.name``.

    Raises:
        ValueError: another spec already has that name (unless ``replace``).
    """
    if not isinstance(spec, PipelineSpec):
        raise TypeError(f"register_pipeline expects a PipelineSpec, got {type(spec).__name__}")
    with _LOCK:
        existing = _REGISTRY.get(spec.name)
        if existing is not None and existing is not spec and not replace:
            raise ValueError(f"a pipeline named {spec.name!r} is already registered")
        _REGISTRY[spec.name] = spec
    return spec


def unregister_pipeline(name: str) -> None:
    """Remove ``name`` from the registry (tests)."""
    with _LOCK:
        _REGISTRY.pop(name, None)


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    with _LOCK:
        if _ENTRY_POINTS_LOADED:
            return
        from importlib.metadata import entry_points

        seen: set[str] = set()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in seen or ep.name in _REGISTRY:
                continue  # the same distribution on sys.path twice (editable + site), or registered in code
            seen.add(ep.name)
            try:
                obj = ep.load()
            except Exception as exc:
                # One broken plug-in must not hide the others; it is named when asked for.
                log.error("pipeline entry point %s = %s failed to load: %s", ep.name, ep.value, exc)
                _BROKEN[ep.name] = f"{ep.value}: {type(exc).__name__}: {exc}"
                continue
            spec = obj() if callable(obj) and not isinstance(obj, PipelineSpec) else obj
            if not isinstance(spec, PipelineSpec):
                _BROKEN[ep.name] = f"{ep.value} is a {type(spec).__name__}, not a PipelineSpec"
                continue
            if spec.name != ep.name:
                _BROKEN[ep.name] = f"{ep.value} is named {spec.name!r}, not {ep.name!r}"
                continue
            _REGISTRY.setdefault(spec.name, spec)
        _ENTRY_POINTS_LOADED = True


_BROKEN: dict[str, str] = {}


def reload_pipelines() -> None:
    """Forget what was loaded from entry points and look again (after installing a package)."""
    global _ENTRY_POINTS_LOADED
    with _LOCK:
        _ENTRY_POINTS_LOADED = False
        _BROKEN.clear()
    _load_entry_points()


def pipeline_names() -> list[str]:
    """Names of the registered pipelines, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def get_pipeline(name: str | PipelineSpec) -> PipelineSpec:
    """The spec registered as ``name`` (a spec is returned as is).

    Raises:
        UnknownPipelineError: nothing registered under ``name``; lists the registered names.
    """
    if isinstance(name, PipelineSpec):
        return name
    _load_entry_points()
    spec = _REGISTRY.get(name)
    if spec is None:
        if not isinstance(name, str) or not name:
            raise UnknownPipelineError(f"pipeline must be a non-empty name, got {name!r}")
        if name in _BROKEN:
            raise UnknownPipelineError(f"pipeline {name!r} is installed but failed to load: {_BROKEN[name]}")
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise UnknownPipelineError(f"unknown pipeline {name!r} (registered: {known})")
    return spec


def pipeline_for_dag(dag_id: str) -> PipelineSpec | None:
    """The pipeline whose DAG is ``dag_id``, or ``None`` (not a trainflow DAG)."""
    _load_entry_points()
    return next((spec for spec in _REGISTRY.values() if spec.dag_id == dag_id), None)
