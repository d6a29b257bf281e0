"""A user's own pipeline, from a package trainflow has never seen, end to end with no edit to
trainflow: tabular regression on Parquet files the test generates.

The package (``tabreg``) is written into a temporary folder with its distribution metadata
(``tabreg-0.1.dist-info/entry_points.txt`` declaring the ``trainflow.pipelines`` entry point),
put on ``sys.path`` / ``PYTHONPATH`` (what ``pip install`` does for a wheel) and discovered by
``importlib.metadata``. Its DAG file lives in a temporary DAG folder. ``dag.test()`` then runs
shard → train (torchrun, 2 processes) → evaluate vs its baseline → register → gate. The
package's files are the ones docs/custom-pipeline.md walks through.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PIPELINE_PY = '''
"""Tabular regression on Parquet/CSV rows: y from the features x0..x3; RMSE vs the train mean."""

import numpy as np

from trainflow.tasks.datasets.table import resolve_table_source, table_split
from trainflow.tasks.pipelines import Metric, PipelineSpec

FEATURES = ["x0", "x1", "x2", "x3"]


def evaluate(manifest, predict, split="eval"):
    """RMSE / MAE of the served model on ``split`` and of the train mean (the baseline)."""
    rows = manifest.read_table(split).to_pandas()
    y = rows["y"].to_numpy(np.float64)
    pred = np.asarray(predict(rows[FEATURES]), dtype=np.float64).reshape(-1)
    mean = np.full_like(y, manifest.read_table("train", columns=["y"]).column("y").to_numpy().mean())
    metrics = {}
    for prefix, p in (("", pred), ("baseline_", mean)):
        metrics[prefix + "rmse"] = float(np.sqrt(np.mean((p - y) ** 2)))
        metrics[prefix + "mae"] = float(np.mean(np.abs(p - y)))
    return {"metrics": metrics}


PIPELINE = PipelineSpec(
    name="tabreg",
    description="Regression of y on four numeric features.",
    resolve_source=resolve_table_source,
    split=table_split(key="row_id"),
    family="tabreg.family:RegressionFamily",
    family_config="tabreg.family:RegressionConfig",
    family_settings=lambda p: {"seed": p["seed"], "hidden": p["model_size"], **p["model_options"]},
    serving="tabreg.family:serve",
    evaluate=evaluate,
    baseline_name="train mean",
    metrics=(
        Metric("rmse", higher_is_better=False, headline=True, report=True, gate=True),
        Metric("mae", higher_is_better=False, headline=True, report=True, gate=True),
    ),
    params={
        "source_url": {"default": "file:///data/tabreg", "description": "A Parquet/CSV file or folder."},
        "model": {"default": "mlp", "schema": {"enum": ["mlp"]}},
        "model_size": {"default": 16},
        "epochs": {"default": 20},
        "batch_size": {"default": 32},
        "learning_rate": {"default": 0.01},
    },
)
'''

FAMILY_PY = '''
"""The model: an MLP over the features, trained on batches the ShardLoader streams."""

import dataclasses

import numpy as np
import torch

from tabreg.pipeline import FEATURES
from trainflow.trainers.family import ShardLoaderFamily
from trainflow.trainers.serving import table_served_model


@dataclasses.dataclass
class RegressionConfig:
    seed: int = 0
    hidden: int = 16


def build(config):
    return torch.nn.Sequential(
        torch.nn.Linear(len(FEATURES), config["hidden"]), torch.nn.ReLU(), torch.nn.Linear(config["hidden"], 1)
    )


class RegressionFamily(ShardLoaderFamily):
    name = "tabreg"
    columns = FEATURES + ["y"]

    def build_model(self):
        torch.manual_seed(self.config.seed)
        return build(dataclasses.asdict(self.config))

    def to_batch(self, batch):
        return {"x": torch.stack([batch[c].float() for c in FEATURES], 1), "y": batch["y"].float()}

    def loss(self, model, batch):
        return torch.nn.functional.mse_loss(model(batch["x"]).squeeze(-1), batch["y"])

    def evaluate(self, model, split):
        table = self.manifest.read_table(split, columns=self.columns)
        batch = self.to_batch({c: torch.from_numpy(table.column(c).to_numpy().astype(np.float32)) for c in self.columns})
        with torch.no_grad():
            return {"loss": float(self.loss(model, batch))}


def serve(state, config, manifest, tmp_dir):
    model = build(config["family_config"])
    model.load_state_dict(state)
    return table_served_model(model, manifest, FEATURES, tmp_dir)
'''

DAG_PY = '''
import datetime as dt

from airflow.sdk import Asset, dag
from trainflow.airflow.dag_support import build_params, default_args, pipeline_tasks


@dag(schedule=None, start_date=dt.datetime(2026, 1, 1, tzinfo=dt.UTC), catchup=False,
     params=build_params("tabreg"), default_args=default_args(), tags=["trainflow", "tabreg"])
def tabreg_training():
    pipeline_tasks("tabreg", Asset(name="tabreg_dataset", uri="trainflow://datasets/tabreg"),
                   Asset(name="tabreg_model", uri="trainflow://models/tabreg"))


tabreg_training()
'''


def write_package(root: Path) -> None:
    """``tabreg`` and its distribution metadata (the entry point) in ``root``."""
    package = root / "tabreg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pipeline.py").write_text(textwrap.dedent(PIPELINE_PY))
    (package / "family.py").write_text(textwrap.dedent(FAMILY_PY))
    dist = root / "tabreg-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tabreg\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[trainflow.pipelines]\ntabreg = tabreg.pipeline:PIPELINE\n")


def write_data(folder: Path, num_rows: int = 800) -> None:
    """Two Parquet files of ``row_id, x0..x3, y`` with y linear in x plus noise."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    x = rng.normal(size=(num_rows, 4)).astype(np.float32)
    y = (x @ np.array([1.5, -2.0, 0.5, 1.0], np.float32) + 0.1 * rng.normal(size=num_rows)).astype(np.float32)
    folder.mkdir(parents=True)
    half = num_rows // 2
    for part, rows in enumerate((slice(0, half), slice(half, num_rows))):
        table = pa.table({"row_id": np.arange(num_rows)[rows], **{f"x{i}": x[rows, i] for i in range(4)}, "y": y[rows]})
        pq.write_table(table, folder / f"part-{part}.parquet")


@pytest.fixture
def tabreg(tmp_path, monkeypatch):
    """The package installed (sys.path + dist-info, for this process and the ranks it starts)."""
    from trainflow.tasks.pipelines import reload_pipelines, unregister_pipeline

    site = tmp_path / "site"
    write_package(site)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", str(site))
    reload_pipelines()
    yield site
    unregister_pipeline("tabreg")
    for name in [m for m in sys.modules if m == "tabreg" or m.startswith("tabreg.")]:
        del sys.modules[name]


def test_a_pipeline_from_outside_runs_end_to_end(airflow_db, tf_env, tmp_path, tabreg, monkeypatch):
    from airflow.dag_processing.dagbag import DagBag
    from airflow.utils.state import DagRunState
    from mlflow import MlflowClient

    from trainflow.tasks.pipelines import get_pipeline, pipeline_names
    from trainflow.tasks.settings import get_settings

    assert "tabreg" in pipeline_names()  # found through the entry point, nothing registered it in code
    assert get_pipeline("tabreg").dag_id == "tabreg_training"
    data = tmp_path / "raw"
    write_data(data)
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "tabreg_training.py").write_text(textwrap.dedent(DAG_PY))
    # The user's DAG folder is one more DAG bundle of this Airflow (dag.test() runs serialized DAGs).
    local = "airflow.dag_processing.bundles.local.LocalDagBundle"
    bundles = [{"name": "dags-folder", "classpath": local, "kwargs": {}},
               {"name": "tabreg-dags", "classpath": local, "kwargs": {"path": str(dags), "refresh_interval": 0}}]
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", json.dumps(bundles))
    bag = DagBag(dag_folder=str(dags))
    assert bag.import_errors == {}
    dag = bag.dags["tabreg_training"]

    run = dag.test(run_conf={"source_url": data.as_uri(), "require_approval": "never"})
    states = {t.task_id: t.state for t in run.get_task_instances()}
    assert run.state == DagRunState.SUCCESS, states

    report = json.loads((tf_env / "store" / "runs" / "tabreg_training" / run.run_id / "report.json").read_text())
    # shard: a committed version of the table, split by the row key's hash
    splits = report["dataset"]["splits"]
    assert sum(splits.values()) == 800 and splits["eval"] > 100 and splits["valid"] > 40
    # train: torchrun with 2 processes
    assert report["training"]["world_size"] == 2 and report["training"]["epochs"] == 20
    # evaluate: the served model against the train-mean baseline; a linear target is learnt
    rmse = report["metrics"]["rmse"]
    assert rmse["model"] < 0.5 * rmse["baseline"], rmse
    assert report["baseline"] == "train mean"
    # register + gate: version 1 of trainflow-tabreg beat the baseline on rmse (lower is better)
    registry = report["registry"]
    assert registry["name"] == "trainflow-tabreg" and registry["version"] == 1
    assert registry["decision"] == "promoted" and "champion" in registry["aliases"]
    client = MlflowClient(get_settings().mlflow_tracking_uri)
    version = client.get_model_version("trainflow-tabreg", "1")
    assert version.tags["trainflow.decision.direction"] == "lower"
    assert version.tags["trainflow.decision.compared_against"] == "baseline"
    # the served model: a DataFrame of the features in, one prediction per row out
    import mlflow
    import pandas as pd

    mlflow.set_tracking_uri(get_settings().mlflow_tracking_uri)
    model = mlflow.pyfunc.load_model("models:/trainflow-tabreg@champion")
    out = model.predict(pd.DataFrame({"x0": [1.0, 0.0], "x1": [0.0, 1.0], "x2": [0.0, 0.0], "x3": [0.0, 0.0]}))
    assert out.shape == (2,) and abs(out[0] - 1.5) < 0.5 and abs(out[1] + 2.0) < 0.5

    # A second run on the same files: the dataset is a cache hit.
    again = dag.test(run_conf={"source_url": data.as_uri(), "require_approval": "never", "epochs": 1})
    assert again.state == DagRunState.SUCCESS
    report2 = json.loads((tf_env / "store" / "runs" / "tabreg_training" / again.run_id / "report.json").read_text())
    assert report2["dataset"]["cache_hit"] is True and report2["dataset"]["version"] == report["dataset"]["version"]
