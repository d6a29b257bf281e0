"""The logged model loads in a fresh process *without trainflow importable* and reproduces
the trained model's outputs (recommendation and driving)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import mlflow
import numpy as np
import pytest
import torch

from trainflow.tasks.manifest import load_manifest
from trainflow.tasks.settings import get_settings
from trainflow.tasks.sharding import shard_dataset
from trainflow.trainers.loop import load_exported_model
from trainflow.trainers.serving import log_serving_model, served_module

FRESH = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("tasks", "trainers", "trainflow.airflow"):
                raise ImportError(f"trainflow code must not be needed to serve: {name}")
            return None
    sys.meta_path.insert(0, Block())
    import mlflow, numpy as np, pandas as pd
    mlflow.set_tracking_uri(sys.argv[1])
    model = mlflow.pyfunc.load_model(sys.argv[2])
    data = json.loads(sys.argv[3])
    if data["kind"] == "recommendation":
        out = model.predict(pd.DataFrame({"user_id": data["users"], "item_id": data["items"]}))
        top = model.predict(pd.DataFrame({"user_id": data["users"][:1]}), params={"top_k": 5})
        print(json.dumps({"scores": np.asarray(out).tolist(), "top": top.item_id.tolist()}))
    else:
        out = model.predict(np.asarray(data["history"], dtype=np.float32))
        print(json.dumps({"forecast": np.asarray(out).tolist()}))
    """
)


def _train(kind: str, source: str, extra: list[str]) -> tuple[str, str, str]:
    settings = get_settings()
    manifest_uri = shard_dataset(source, kind)["manifest_uri"]
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    with mlflow.start_run() as run:
        pass
    run_dir = (settings.data_dir / "store" / "runs" / "t" / kind).as_uri()
    cmd = [
        sys.executable, "-m", f"trainflow.trainers.{kind}", f"--train.manifest_uri={manifest_uri}", "--train.epochs=1",
        f"--train.run_dir={run_dir}", f"--train.mlflow_run_id={run.info.run_id}", "--train.parallelism=none",
        "--train.batch_size=64", *extra,
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return manifest_uri, run_dir, run.info.run_id


def _fresh_predict(model_uri: str, payload: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", FRESH, get_settings().mlflow_tracking_uri, model_uri, json.dumps(payload)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_recommender_serves_without_trainflow(tf_env):
    manifest_uri, run_dir, run_id = _train(
        "recommendation", "synthetic://recommendation?num_interactions=3000&num_users=30&num_items=200", ["--family.model=sasrec", "--family.max_seq_len=20"]
    )
    logged = log_serving_model(run_dir, run_id)
    manifest = load_manifest(manifest_uri)
    users = manifest.read_file_table("users").column("user_id").to_numpy()[:5]
    items = manifest.read_file_table("items").column("item_id").to_numpy()[:5]
    state, config = load_exported_model(run_dir)
    module, _ = served_module(state, config)
    with torch.no_grad():
        expected = module(torch.arange(5), torch.arange(5)).numpy()
    got = _fresh_predict(
        logged["model_uri"],
        {"kind": "recommendation", "users": users.tolist() + [999_999], "items": items.tolist() + [int(items[0])]},
    )
    assert np.allclose(got["scores"][:5], expected, atol=1e-5)
    assert got["scores"][5] == pytest.approx(float(np.finfo(np.float32).min))  # unknown user: lowest score
    assert len(got["top"]) == 5


@pytest.mark.slow
def test_forecaster_serves_without_trainflow(tf_env):
    manifest_uri, run_dir, run_id = _train("driving", "synthetic://driving?num_sequences=80", [])
    logged = log_serving_model(run_dir, run_id)
    from trainflow.trainers.driving.evaluation import focal_tracks
    from trainflow.trainers.driving.model import build_forecaster, forecast

    _, tracks = focal_tracks(load_manifest(manifest_uri), "eval")
    history = tracks[:4, :20]
    state, config = load_exported_model(run_dir)
    model = build_forecaster(config["export_config"])
    model.load_state_dict(state)
    expected = forecast(model, history)
    got = np.asarray(_fresh_predict(logged["model_uri"], {"kind": "driving", "history": history.tolist()})["forecast"])
    assert got.shape == (4, 30, 2)
    assert np.allclose(got, expected, atol=1e-3)
