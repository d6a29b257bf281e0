"""The pipeline contract: the registry, entry-point discovery, spec-derived params and metric
direction, and the rule that shared code names no example pipeline."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest

from trainflow.tasks.pipelines import (
    Metric,
    PipelineSpec,
    UnknownPipelineError,
    get_pipeline,
    pipeline_for_dag,
    pipeline_names,
    register_pipeline,
    unregister_pipeline,
)
from trainflow.tasks.settings import PROJECT_DIR

# Everything but the example pipelines' own packages, dags/, tests/, benchmarks/ and docs.
SHARED = ("tasks", "trainers", "plugins")
EXAMPLE_PACKAGES = ("trainers/recommendation/", "trainers/driving/")
EXAMPLE_NAMES = re.compile(
    r"\b(recommendation|driving|movielens|argoverse|sasrec|neumf|ncf|itempop|grouplens)", re.IGNORECASE
)


def _shared_files():
    out = subprocess.run(["git", "-C", str(PROJECT_DIR), "ls-files", *SHARED], capture_output=True, text=True, check=True)
    files = [f for f in out.stdout.split() if not f.startswith(EXAMPLE_PACKAGES)]
    assert any(f == "tasks/pipeline.py" for f in files)  # the selection is not empty by mistake
    return files


def test_shared_code_names_no_example_pipeline():
    """The registry is the only dispatch: no example pipeline's name (or its data's, or its
    models') in the engine, not even in a comment."""
    offenders = []
    for path in _shared_files():
        text = (PROJECT_DIR / path).read_text(errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if EXAMPLE_NAMES.search(line):
                offenders.append(f"{path}:{number}: {line.strip()}")
    assert not offenders, "example pipeline names in shared code:\n" + "\n".join(offenders)


def test_the_guard_catches_a_name(tmp_path):
    """The pattern the guard uses does find a branch on an example's name."""
    assert EXAMPLE_NAMES.search('if kind == "recommendation":')
    assert EXAMPLE_NAMES.search("from trainflow.tasks.datasets import argoverse")
    assert not EXAMPLE_NAMES.search("items recommended to anyone")


def test_examples_are_registered_through_entry_points():
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="trainflow.pipelines")}
    assert {"recommendation", "driving"} <= names
    assert {"recommendation", "driving"} <= set(pipeline_names())
    rec = get_pipeline("recommendation")
    assert rec.dag_id == "recommendation_training" and rec.registered_model_name == "trainflow-recommendation"
    assert pipeline_for_dag("driving_training") is get_pipeline("driving")
    assert pipeline_for_dag("some_other_dag") is None


def test_unknown_pipeline_is_an_error_naming_the_registered_ones():
    from trainflow.tasks.params import param_specs

    with pytest.raises(UnknownPipelineError, match=r"unknown pipeline 'recomendation' \(registered: .*driving.*recommendation"):
        get_pipeline("recomendation")
    with pytest.raises(UnknownPipelineError, match="registered:"):
        param_specs("nope")
    from trainflow.tasks.sharding import shard_dataset

    with pytest.raises(UnknownPipelineError):
        shard_dataset("synthetic://driving?num_sequences=10", "drivin")


def test_metric_direction_comes_from_the_spec():
    rec, drv = get_pipeline("recommendation"), get_pipeline("driving")
    assert rec.higher_is_better("ndcg_at_10") and rec.higher_is_better("baseline_hr_at_10")
    assert not drv.higher_is_better("ade") and not drv.higher_is_better("miss_rate")
    with pytest.raises(ValueError, match="no metric 'ade'"):
        rec.higher_is_better("ade")


def _toy_spec(name: str = "toy_lower", **kw) -> PipelineSpec:
    base = get_pipeline("driving")
    fields = dict(
        name=name,
        resolve_source=base.resolve_source,
        split=base.split,
        family=base.family,
        family_config=base.family_config,
        serving=base.serving,
        evaluate=base.evaluate,
        metrics=(Metric("rmse", higher_is_better=False, headline=True, gate=True), Metric("r2", True, gate=True)),
        params={"source_url": {"default": "synthetic://driving?num_sequences=10"}},
    )
    fields.update(kw)
    return PipelineSpec(**fields)


def test_a_new_lower_is_better_metric_is_promoted_the_right_way(tf_env):
    """A metric name the engine never heard of: the gate takes its direction from the spec."""
    from trainflow.tasks.registry import GateConfig, decide

    spec = _toy_spec()
    gate = GateConfig("rmse", 0.0, higher_is_better=spec.higher_is_better("rmse"))
    assert decide(0.5, 0.7, gate.higher_is_better, gate.margin)  # smaller rmse is better
    assert not decide(0.9, 0.7, gate.higher_is_better, gate.margin)


def test_params_come_from_the_spec():
    from trainflow.tasks.params import param_specs

    spec = _toy_spec("toy_params")
    register_pipeline(spec)
    try:
        specs = param_specs("toy_params")
        assert specs["promotion_metric"]["default"] == "rmse"
        assert specs["promotion_metric"]["schema"]["enum"] == ["rmse", "r2"]
        assert specs["registered_model_name"]["default"] == "trainflow-toy_params"
        assert specs["source_url"]["default"] == "synthetic://driving?num_sequences=10"
    finally:
        unregister_pipeline("toy_params")
    rec = param_specs("recommendation")
    assert rec["parallelism"]["schema"]["enum"] == ["ddp", "fsdp", "sharded_embeddings", "sharded_embeddings_a2a", "none"]
    assert rec["promotion_metric"]["schema"]["enum"] == ["ndcg_at_10", "hr_at_10"]
    assert param_specs("driving")["promotion_metric"]["schema"]["enum"] == ["ade", "fde", "miss_rate"]


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="at least one metric must have gate=True"):
        _toy_spec(metrics=(Metric("rmse", False),))
    with pytest.raises(ValueError, match="family must be a 'module:attribute'"):
        _toy_spec(family="nocolon")
    with pytest.raises(ValueError, match="already registered"):
        register_pipeline(_toy_spec("recommendation"))


def test_a_broken_entry_point_is_named_when_asked_for(tmp_path):
    """A plug-in that fails to import does not hide the others and is named in the error."""
    dist = tmp_path / "broken_pipe-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-pipe\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[trainflow.pipelines]\nbroken = broken_pipe_missing.module:PIPELINE\n")
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from trainflow.tasks.pipelines import get_pipeline, pipeline_names
        assert "recommendation" in pipeline_names()
        try:
            get_pipeline("broken")
        except ValueError as exc:
            print(exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "pipeline 'broken' is installed but failed to load: broken_pipe_missing.module:PIPELINE" in out.stdout
