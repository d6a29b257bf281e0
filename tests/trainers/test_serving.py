"""The logged model loads in a fresh process *without trainflow importable* and reproduces
the trained model's outputs (recommendation and driving); the recommender answers unknown users
explicitly and the forecaster answers scenes through MLflow's real scoring server (``mlflow models serve``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pandas as pd
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
            if name.split(".")[0] in ("trainflow", "tasks", "trainers", "trainflow_airflow"):
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
    # An unknown user is scored by the cold-start fallback: the item's share of the training
    # interactions (before: the lowest float32, -3.4e38, as if it were a score).
    counts = manifest.read_file_table("items").column("num_train_interactions").to_numpy().astype(float)
    assert got["scores"][5] == pytest.approx(counts[0] / counts.sum())
    assert len(got["top"]) == 5


def _driving_model(tf_env):
    # neighbours_seen="history": the served model must apply the rule it was trained with (the
    # default rule, the last frame, is what the DAG tests and the old-model fixture serve).
    manifest_uri, run_dir, run_id = _train("driving", "synthetic://driving?num_sequences=80",
                                           ["--family.num_modes=4", "--family.neighbours_seen=history"])
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
                                  focal_only=True, max_neighbours=config["export_config"]["max_neighbours"],
                                  neighbours_seen=config["export_config"].get("neighbours_seen", "last"))
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
    # These scenes have neighbours that left the view before the last history frame, so the
    # trained rule (any history frame) and the default one (the last frame) give other context.
    assert config["export_config"]["neighbours_seen"] == "history"
    seen = [np.isfinite(o[:, :20]).all(-1) for o in others]
    assert any((s[:, :19].any(axis=1) & ~s[:, 19]).any() for s in seen)
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


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.mark.slow
def test_the_scoring_server_answers_unknown_users_explicitly_and_validates_top_k(tf_env, tmp_path):
    """Through ``mlflow models serve``: ``top_k`` is in the signature's params schema (a wrong
    type is refused by the server), the outputs in its output schema; an unknown user gets the
    documented cold-start fallback (the most popular training items) flagged ``cold_start``
    (before: -3.4e38 scores, and a top-k list as if nothing were wrong)."""
    from tests.conftest import free_port

    manifest_uri, run_dir, run_id = _train(
        "recommendation", "synthetic://recommendation?num_interactions=3000&num_users=30&num_items=200",
        ["--family.model=gmf", "--family.gmf_factors=8"],
    )
    logged = log_serving_model(run_dir, run_id)
    info = mlflow.models.get_model_info(logged["model_uri"])
    assert [(p.name, p.dtype.name, p.default) for p in info.signature.params.params] == [("top_k", "long", 0)]
    assert info.signature.outputs.input_names() == ["user_id", "item_id", "score", "rank", "cold_start"]

    manifest = load_manifest(manifest_uri)
    items = manifest.read_file_table("items").to_pandas()
    known_user = int(manifest.read_file_table("users").column("user_id").to_numpy()[0])
    unknown_user = 987_654
    popular = items.sort_values("num_train_interactions", ascending=False, kind="stable").item_id.tolist()[:3]
    shares = (items.set_index("item_id").num_train_interactions / items.num_train_interactions.sum()).to_dict()

    port = free_port()
    log_path = tmp_path / "serve.log"
    # MLflow runs `uvicorn` by name: this environment's bin folder first on PATH.
    env = {**os.environ, "MLFLOW_TRACKING_URI": get_settings().mlflow_tracking_uri,
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [os.path.join(os.path.dirname(sys.executable), "mlflow"), "models", "serve", "-m", logged["model_uri"],
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        # Ranking: the known user's own list, the unknown user's cold-start list, both flagged.
        status, body = _post(f"{url}/invocations", {
            "dataframe_split": {"columns": ["user_id"], "data": [[known_user], [unknown_user]]},
            "params": {"top_k": 3},
        })
        assert status == 200, body
        rows = body["predictions"]
        assert {tuple(sorted(r)) for r in rows} == {("cold_start", "item_id", "rank", "score", "user_id")}
        cold = [r for r in rows if r["user_id"] == unknown_user]
        warm = [r for r in rows if r["user_id"] == known_user]
        assert [r["item_id"] for r in cold] == popular and all(r["cold_start"] is True for r in cold)
        assert [r["score"] for r in cold] == pytest.approx([shares[i] for i in popular])
        assert len(warm) == 3 and all(r["cold_start"] is False for r in warm)
        assert [r["rank"] for r in warm] == [1, 2, 3]
        # Scoring pairs: the unknown user's score is the fallback's, never -3.4e38.
        status, body = _post(f"{url}/invocations", {
            "dataframe_split": {"columns": ["user_id", "item_id"],
                                "data": [[known_user, popular[0]], [unknown_user, popular[0]]]},
        })
        assert status == 200, body
        scores = [p if isinstance(p, float) else p["score"] for p in body["predictions"]]
        assert scores[1] == pytest.approx(shares[popular[0]]) and scores[0] > -1e30
        # top_k is declared: the server refuses a value of the wrong type.
        status, body = _post(f"{url}/invocations", {
            "dataframe_split": {"columns": ["user_id"], "data": [[known_user]]}, "params": {"top_k": "three"},
        })
        assert status == 400, body
        assert "top_k" in json.dumps(body)
    finally:
        os.killpg(server.pid, 15)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, 9)


class _CountingProgram:
    """Wraps an exported program; counts the user rows (encodings) it was asked for."""

    def __init__(self, program) -> None:
        self.program, self.encodings, self.calls = program, 0, 0

    def __call__(self, users, items):
        assert items.dim() == 2 and len(users) == len(items)
        self.encodings += len(users)
        self.calls += 1
        return self.program(users, items)


@pytest.mark.parametrize("model", ["sasrec", "neumf"])
def test_served_recommender_encodes_each_user_once_per_request(model, monkeypatch):
    """The pyfunc groups a request's rows by user: the exported ``(users, candidates)`` program
    encodes each user once (not once per row), and the scores equal the module's per-pair
    scores in the input's order, with unknown users/items answered as before."""
    import importlib.util

    from trainflow.trainers.recommendation.models import build_model
    from trainflow.trainers.recommendation.serving import ServedRecommender

    torch.manual_seed(0)
    fields = {"model": model, "max_seq_len": 6, "hidden_size": 8, "num_blocks": 1, "num_heads": 1, "dropout": 0.0,
              "gmf_factors": 4, "mlp_layers": [8, 4]}
    num_users, num_items = 7, 30
    net = build_model(fields, num_users, num_items)
    if model == "sasrec":
        net.histories.copy_(torch.randint(0, num_items + 1, (num_users, 6), dtype=torch.int32))
    module = ServedRecommender(net, model == "sasrec").eval()
    batch, candidates = torch.export.Dim("batch", min=1), torch.export.Dim("candidates", min=1)
    example = (torch.arange(4), torch.arange(12).reshape(4, 3))
    program = torch.export.export(module, example, dynamic_shapes=({0: batch}, {0: batch, 1: candidates})).module()

    spec = importlib.util.spec_from_file_location("served_pyfunc", os.path.join(
        os.path.dirname(__file__), "..", "..", "trainers", "recommendation", "pyfunc.py"))
    pyfunc = importlib.util.module_from_spec(spec)
    monkeypatch.setattr(mlflow.models, "set_model", lambda model: None)
    spec.loader.exec_module(pyfunc)
    served = pyfunc.TrainflowRecommender()
    served.program = _CountingProgram(program)
    served.user_ids = np.arange(100, 100 + num_users)  # ids are not indices
    served.item_ids = np.arange(500, 500 + num_items)
    served.popularity = np.linspace(0.1, 0.9, num_items) / 15
    served.batch = 40

    rng = np.random.default_rng(0)
    counts = [101, 101, 3, 1, 57, 101, 20]  # uneven, as a mixed request
    users = np.concatenate([np.full(c, u) for u, c in enumerate(counts)])
    items = rng.integers(0, num_items, len(users))
    shuffle = rng.permutation(len(users))  # rows of a user are interleaved with others'
    users, items = users[shuffle], items[shuffle]
    user_ids, item_ids = served.user_ids[users], served.item_ids[items]
    user_ids[:3] = 999  # unknown users: the popularity fallback
    item_ids[3] = 10_000  # an unknown item: the lowest score

    got = served.predict(None, pd.DataFrame({"user_id": user_ids, "item_id": item_ids}))
    with torch.no_grad():
        expected = module(torch.from_numpy(users), torch.from_numpy(items)).numpy().astype(np.float64)
    known = np.arange(len(users)) >= 4
    np.testing.assert_allclose(got[known], expected[known], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[:3], served.popularity[items[:3]])
    assert got[3] == pyfunc.LOWEST
    # One encoding per user and chunk of candidates, not one per row (383 rows here).
    known_counts = np.bincount(users[known], minlength=num_users)
    width = pyfunc._chunk_width(known_counts[known_counts > 0])
    assert served.program.encodings == sum(-(-c // width) for c in known_counts) < len(users) / 10
    assert served.program.calls > 1  # batched: at most served.batch cells a call


def test_chunk_width_avoids_padding_for_even_requests(monkeypatch):
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("served_pyfunc_width", os.path.join(
        os.path.dirname(__file__), "..", "..", "trainers", "recommendation", "pyfunc.py"))
    pyfunc = module_from_spec(spec)
    monkeypatch.setattr(mlflow.models, "set_model", lambda model: None)
    spec.loader.exec_module(pyfunc)
    assert pyfunc._chunk_width(np.full(50, 101)) == 101  # an evaluation request: no padding
    assert pyfunc._chunk_width(np.full(50, 1)) == 1
    assert pyfunc._chunk_width(np.asarray([24_000])) == 4096  # a top-K request: at most 4096 wide
