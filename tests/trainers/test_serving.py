"""The logged model loads in a fresh process *without trainflow importable* and reproduces
the trained model's outputs (recommendation and driving)."""

from __future__ import annotations

import json
import os
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
        scene = model.predict(np.asarray(data["scene"], dtype=np.float32), params={"num_forecasts": 3})
        single = model.predict(np.asarray(data["scene"], dtype=np.float32), params={"num_forecasts": 1})
        print(json.dumps({"forecast": np.asarray(out).tolist(),
                          "scene": {k: np.asarray(v).tolist() for k, v in scene.items()},
                          "single": {k: np.asarray(v).tolist() for k, v in single.items()}}))
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


def _driving_model(tf_env):
    manifest_uri, run_dir, run_id = _train("driving", "synthetic://driving?num_sequences=80", ["--family.num_modes=4"])
    logged = log_serving_model(run_dir, run_id)
    state, config = load_exported_model(run_dir)
    return load_manifest(manifest_uri), run_dir, logged, state, config


def _expected_scene(state, config, tracks, others):
    """The trained model's single forecast and K forecasts (by decreasing probability), given
    the nearest neighbours as the family's own samples pick them, in the input frame."""
    from trainflow.trainers.driving.data import scenario_samples
    from trainflow.trainers.driving.model import build_forecaster

    model = build_forecaster(config["export_config"]).eval()
    model.load_state_dict(state)
    singles, modes, probs = [], [], []
    for focal, rest in zip(tracks, others, strict=True):
        sample = scenario_samples(np.concatenate([focal[None], rest]), np.array([0] + [2] * len(rest)),
                                  focal_only=True, max_neighbours=config["export_config"]["max_neighbours"])
        with torch.no_grad():
            single, forecasts, logits = model(torch.from_numpy(sample["history"]),
                                              torch.from_numpy(sample["neighbours"]), with_modes=True)
        p = torch.softmax(logits, dim=-1)[0].numpy()
        order = np.argsort(-p, kind="stable")
        origin = focal[19].astype(np.float64)
        singles.append(single[0].numpy() + origin)
        modes.append(forecasts[0].numpy()[order] + origin)
        probs.append(p[order])
    return np.stack(singles), np.stack(modes), np.stack(probs)


@pytest.mark.slow
def test_forecaster_serves_without_trainflow(tf_env):
    from trainflow.trainers.driving.evaluation import scenes
    from trainflow.trainers.driving.model import build_forecaster, forecast
    from trainflow.trainers.driving.serving import scene_array

    manifest, run_dir, logged, state, config = _driving_model(tf_env)
    _, tracks, others = scenes(manifest, "eval", limit=4)
    history = tracks[:, :20]
    model = build_forecaster(config["export_config"])
    model.load_state_dict(state)
    expected = forecast(model, history)
    scene = scene_array(history, [o[:, :20] for o in others])
    got = _fresh_predict(logged["model_uri"], {"kind": "driving", "history": history.tolist(), "scene": scene.tolist()})
    # The history-only call of the first contract: (n, 20, 2) in, (n, 30, 2) out, no neighbours.
    assert np.asarray(got["forecast"]).shape == (4, 30, 2)
    assert np.allclose(got["forecast"], expected, atol=1e-3)
    # The scene call: K forecasts by decreasing probability, and the single forecast.
    single, modes, probs = _expected_scene(state, config, tracks, others)
    answer = {k: np.asarray(v) for k, v in got["scene"].items()}
    assert answer["forecasts"].shape == (4, 3, 30, 2) and answer["probabilities"].shape == (4, 3)
    np.testing.assert_allclose(answer["forecast"], single, atol=2e-3)
    np.testing.assert_allclose(answer["forecasts"], modes[:, :3], atol=2e-3)
    np.testing.assert_allclose(answer["probabilities"], probs[:, :3] / probs[:, :3].sum(1, keepdims=True), atol=1e-4)
    assert (np.diff(answer["probabilities"], axis=1) <= 1e-6).all()
    assert not np.allclose(answer["forecast"], got["forecast"], atol=1e-3)  # the neighbours are used
    alone = {k: np.asarray(v) for k, v in got["single"].items()}
    assert alone["forecasts"].shape == (4, 1, 30, 2) and (alone["probabilities"] == 1).all()
    np.testing.assert_allclose(alone["forecasts"][:, 0], answer["forecast"], atol=1e-5)


@pytest.mark.slow
def test_forecaster_answers_scene_requests_through_the_scoring_server(tf_env):
    """``mlflow models serve`` (the real scoring server, a separate process) answers a scene
    request, the history-only request of the first contract, and refuses a bad scene."""
    import urllib.error
    import urllib.request

    from tests.conftest import free_port
    from trainflow.trainers.driving.evaluation import scenes
    from trainflow.trainers.driving.serving import scene_array

    manifest, run_dir, logged, state, config = _driving_model(tf_env)
    _, tracks, others = scenes(manifest, "eval", limit=3)
    scene = scene_array(tracks[:, :20], [o[:, :20] for o in others])
    local = mlflow.artifacts.download_artifacts(logged["model_uri"], dst_path=str(tf_env / "served"))
    with open(f"{local}/serving_input_example.json") as handle:
        example = json.load(handle)
    port = free_port()
    log = open(tf_env / "serve.log", "wb")
    # The server execs `uvicorn` by name: this interpreter's scripts folder first on PATH.
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", local, "--env-manager", "local", "-h", "127.0.0.1",
         "-p", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env,
    )

    def post(payload):
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["predictions"]

    try:
        import time

        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError):
                assert proc.poll() is None, (tf_env / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the scoring server did not come up in 180 s"
                time.sleep(1)
        answer = post({"inputs": scene.tolist(), "params": {"num_forecasts": 4}})
        single, modes, probs = _expected_scene(state, config, tracks, others)
        np.testing.assert_allclose(np.asarray(answer["forecasts"]), modes, atol=2e-3)
        np.testing.assert_allclose(np.asarray(answer["probabilities"]), probs, atol=1e-4)
        np.testing.assert_allclose(np.asarray(answer["forecast"]), single, atol=2e-3)
        # The logged input example is a scene request that serves as it is.
        assert np.asarray(post(example)["forecasts"]).shape[1:] == (4, 30, 2)
        history = post({"inputs": tracks[:, :20].tolist()})
        assert np.asarray(history).shape == (3, 30, 2)
        with pytest.raises(urllib.error.HTTPError) as refused:
            post({"inputs": scene[:, :25].tolist()})  # 25 rows: not 20 per agent
        assert "20 rows per agent" in refused.value.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
