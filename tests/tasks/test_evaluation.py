"""Evaluation through the served-model contract: values against hand-checked predictors,
baselines on the same rows, metrics and plots logged to a real MLflow store."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from trainflow.tasks import metrics as M
from trainflow.tasks.evaluation import evaluate_step
from trainflow.tasks.manifest import load_manifest
from trainflow.tasks.sharding import shard_dataset
from trainflow.trainers.driving.evaluation import evaluate_driving
from trainflow.trainers.recommendation.evaluation import evaluate_recommendation

REC = "synthetic://recommendation?num_interactions=4000&num_users=40&num_items=300&seed=2"
DRV = "synthetic://driving?num_sequences=60&seed=4"


@pytest.fixture
def rec_manifest(tf_env):
    return load_manifest(shard_dataset(REC, "recommendation")["manifest_uri"])


@pytest.fixture
def drv_manifest(tf_env):
    return load_manifest(shard_dataset(DRV, "driving")["manifest_uri"])


def _oracle(manifest):
    held_out = set(zip(*(manifest.read_table("eval").column(c).to_pylist() for c in ("user_id", "item_id"))))

    def predict(frame: pd.DataFrame):
        return np.array([1.0 if (u, i) in held_out else 0.0 for u, i in zip(frame.user_id, frame.item_id)])

    return predict


def test_oracle_is_perfect_and_itempop_is_the_baseline(rec_manifest):
    report = evaluate_recommendation(rec_manifest, _oracle(rec_manifest))
    m = report["metrics"]
    assert m["hr_at_10"] == m["ndcg_at_10"] == m["hr_at_1"] == 1.0
    # The baseline: ItemPop computed by hand from the vocabulary file.
    items = rec_manifest.read_file_table("items").to_pandas()
    table = rec_manifest.read_table("eval").to_pandas()
    pop = items.num_train_interactions.to_numpy()
    ranks = [int((pop[negs] >= pop[pos]).sum()) for pos, negs in zip(table.item_idx, table.neg_item_idx)]
    assert m["baseline_hr_at_10"] == pytest.approx(M.hit_ratio(np.array(ranks), 10))
    assert m["baseline_ndcg_at_10"] == pytest.approx(M.ndcg(np.array(ranks), 10))
    assert report["curves"]["hr"][-1] == 1.0 and len(report["curves"]["k"]) == 100


def test_constant_scores_rank_last(rec_manifest):
    report = evaluate_recommendation(rec_manifest, lambda frame: np.zeros(len(frame)))
    assert report["metrics"]["hr_at_50"] == 0.0  # ties never favour the positive


def test_constant_velocity_model_equals_its_baseline(drv_manifest):
    report = evaluate_driving(drv_manifest, lambda history: M.constant_velocity_forecast(history, 30))
    m = report["metrics"]
    for key in ("ade", "fde", "miss_rate", "ade_1s", "fde_3s"):
        assert m[key] == pytest.approx(m[f"baseline_{key}"])
    assert m["ade_vs_baseline"] == pytest.approx(0.0)
    assert m["num_samples"] == drv_manifest.num_rows("eval")


def test_wrong_output_shape_is_a_clear_error(drv_manifest, rec_manifest):
    with pytest.raises(ValueError, match=r"expected \(\d+, 30, 2\)"):
        evaluate_driving(drv_manifest, lambda history: history)
    with pytest.raises(ValueError, match="scores for"):
        evaluate_recommendation(rec_manifest, lambda frame: np.zeros(3))


class PopularityModel(mlflow.pyfunc.PythonModel):
    """A real pyfunc model: scores an item by its training popularity."""

    def __init__(self, popularity: dict[int, float]):
        self.popularity = popularity

    def predict(self, context, model_input, params=None):
        return np.array([self.popularity.get(int(i), 0.0) for i in model_input["item_id"]])


def test_evaluate_step_logs_metrics_and_plots_to_mlflow(rec_manifest, tf_env):
    from trainflow.tasks.settings import get_settings

    settings = get_settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    items = rec_manifest.read_file_table("items").to_pandas()
    model = PopularityModel(dict(zip(items.item_id, items.num_train_interactions.astype(float))))
    with mlflow.start_run() as run:
        for step, value in enumerate([0.7, 0.5, 0.4]):
            mlflow.log_metric("train_loss", value, step=step)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=model,
            input_example=pd.DataFrame({"user_id": [1], "item_id": [2]}),
            pip_requirements=["mlflow"],
        )
    result = evaluate_step("recommendation", info.model_uri, rec_manifest.uri, mlflow_run_id=run.info.run_id)
    m = result["metrics"]
    assert m["hr_at_10"] == pytest.approx(m["baseline_hr_at_10"])  # the model *is* ItemPop
    logged = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    assert logged["ndcg_at_10"] == pytest.approx(m["ndcg_at_10"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {"plots/hr_at_k.png", "plots/metrics_vs_baseline.png", "plots/loss_curves.png"}
    with pytest.raises(ValueError, match="holds recommendation data"):
        evaluate_step("driving", info.model_uri, rec_manifest.uri)
