"""Driving family: frames, the constant-velocity baseline, metrics, rank batching, training."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from tests.conftest import shared_dataset
from trainflow.tasks.manifest import load_manifest
from trainflow.tasks.settings import Settings
from trainflow.tasks.sharding import shard_dataset
from trainflow.trainers.distributed import World
from trainflow.trainers.driving import (
    DrivingConfig,
    DrivingFamily,
    ForecastModel,
    build_forecaster,
    constant_velocity_forecast,
    displacement_metrics,
    forecast,
)
from trainflow.trainers.driving.data import scenario_samples
from trainflow.trainers.driving.family import epoch_batches
from trainflow.trainers.driving.geometry import agent_frame, from_agent_frame, to_agent_frame

SMALL = dict(hidden_dim=32, num_layers=2, context_dim=16, max_neighbours=4)


@pytest.fixture(scope="module")
def synthetic_manifest(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("driving")
    settings = Settings.from_env({"TRAINFLOW_DATA_DIR": str(data_dir)})
    summary = shard_dataset("synthetic://driving?num_sequences=200", "driving", settings=settings)
    return load_manifest(summary["manifest_uri"], settings)


def moving_histories(n: int, seed: int = 0) -> np.ndarray:
    """Curving, accelerating histories (n, 20, 2) in a random frame with large coordinates."""
    rng = np.random.default_rng(seed)
    t = np.arange(20) * 0.1
    speed = rng.uniform(3, 15, (n, 1)) + rng.uniform(-2, 2, (n, 1)) * t
    heading = rng.uniform(-np.pi, np.pi, (n, 1)) + rng.uniform(-0.3, 0.3, (n, 1)) * t
    steps = np.stack([np.cos(heading), np.sin(heading)], axis=-1) * speed[..., None] * 0.1
    return (np.cumsum(steps, axis=1) + rng.uniform(-3000, 3000, (n, 1, 2))).astype(np.float64)


# --- frames -------------------------------------------------------------------------------
def test_agent_frame_round_trip_is_identity():
    history = torch.from_numpy(moving_histories(64) - moving_histories(64)[:, -1:]).float()
    points = history + torch.randn(64, 20, 2) * 5
    origin, cos, sin = agent_frame(history)
    back = from_agent_frame(to_agent_frame(points, origin, cos, sin), origin, cos, sin)
    torch.testing.assert_close(back, points, atol=1e-4, rtol=0)
    # Neighbour-shaped inputs (n, K, T, 2) go through the same transforms.
    many = points[:, None].repeat(1, 3, 1, 1)
    torch.testing.assert_close(from_agent_frame(to_agent_frame(many, origin, cos, sin), origin, cos, sin), many,
                               atol=1e-4, rtol=0)


def test_agent_frame_puts_last_position_at_origin_and_heading_along_x():
    # A vehicle driving north-west at 10 m/s, ending at (5, 7).
    direction = np.array([-1.0, 1.0]) / math.sqrt(2)
    history = np.array([5.0, 7.0]) + (np.arange(20) - 19)[:, None] * 1.0 * direction
    h = torch.tensor(history[None], dtype=torch.float64)
    origin, cos, sin = agent_frame(h)
    local = to_agent_frame(h, origin, cos, sin)[0].numpy()
    np.testing.assert_allclose(local[-1], [0, 0], atol=1e-9)
    np.testing.assert_allclose(local[:, 1], 0, atol=1e-9)  # on the x axis
    np.testing.assert_allclose(local[:, 0], np.arange(20) - 19, atol=1e-9)  # moving towards +x


def test_standing_vehicle_gets_the_input_frame_heading():
    h = torch.full((1, 20, 2), 3.0) + torch.randn(1, 20, 2) * 0.01
    _, cos, sin = agent_frame(h)
    assert float(cos) == 1.0 and float(sin) == 0.0


# --- constant velocity and metrics ----------------------------------------------------------
def test_constant_velocity_is_exact_on_a_straight_constant_speed_track():
    t = np.arange(50)[None, :, None]
    track = np.array([1200.0, -800.0]) + t * np.array([0.9, -0.4])  # 9.8 m/s
    prediction = constant_velocity_forecast(track[:, :20])
    metrics = displacement_metrics(prediction, track[:, 20:])
    assert metrics["ade"] == pytest.approx(0, abs=1e-9)
    assert metrics["fde"] == pytest.approx(0, abs=1e-9)
    assert metrics["miss_rate"] == 0


def test_constant_velocity_uses_the_mean_velocity_over_the_history():
    # Speeds up from 0 to 1.9 m/frame: mean displacement (last - first) / 19 = 0.95 m/frame.
    x = np.cumsum(np.concatenate([[0.0], np.arange(1, 20) * 0.1]))
    history = np.stack([x, np.zeros(20)], axis=-1)[None]
    prediction = constant_velocity_forecast(history, num_future=3)
    mean_step = (x[-1] - x[0]) / 19
    np.testing.assert_allclose(prediction[0, :, 0], x[-1] + mean_step * np.arange(1, 4))
    np.testing.assert_allclose(prediction[0, :, 1], 0)


def test_displacement_metrics_on_hand_made_cases():
    future = np.zeros((2, 30, 2))
    forecast_ = np.zeros((2, 30, 2))
    forecast_[0, :, 1] = 1.0  # sample 0: 1 m off at every frame (FDE 1, not a miss)
    forecast_[1, :, 0] = 0.1 * np.arange(1, 31)  # sample 1: error grows 0.1 m per frame (FDE 3, a miss)
    m = displacement_metrics(forecast_, future)
    assert m["ade"] == pytest.approx((1.0 + 1.55) / 2)
    assert m["fde"] == pytest.approx((1.0 + 3.0) / 2)
    assert m["miss_rate"] == pytest.approx(0.5)
    assert m["ade_1s"] == pytest.approx((1.0 + 0.55) / 2)
    assert m["fde_1s"] == pytest.approx((1.0 + 1.0) / 2)
    assert m["ade_2s"] == pytest.approx((1.0 + 1.05) / 2)
    assert m["fde_2s"] == pytest.approx((1.0 + 2.0) / 2)
    assert m["ade_3s"] == m["ade"] and m["fde_3s"] == m["fde"]
    assert m["num_samples"] == 2
    assert displacement_metrics(forecast_, future, prefix="baseline_")["baseline_fde"] == m["fde"]


def test_displacement_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="must both be"):
        displacement_metrics(np.zeros((2, 30, 2)), np.zeros((2, 29, 2)))
    with pytest.raises(ValueError, match="no samples"):
        displacement_metrics(np.zeros((0, 30, 2)), np.zeros((0, 30, 2)))


# --- samples, model and served contract ------------------------------------------------------
def test_scenario_samples_take_complete_tracks_and_only_the_context_history():
    rng = np.random.default_rng(0)
    tracks = rng.normal(0, 20, (4, 50, 2)).astype(np.float32)
    tracks[2, :10] = np.nan  # partial: context only
    tracks[3, 19] = np.nan  # not seen at the last observed frame: no context
    types = np.array([0, 1, 2, 2])
    train = scenario_samples(tracks, types, focal_only=False, max_neighbours=3)
    assert train["history"].shape == (2, 20, 2) and train["future"].shape == (2, 30, 2)
    assert train["is_agent"].tolist() == [True, False]  # the complete tracks 0 and 1
    np.testing.assert_allclose(train["future"][1], tracks[1, 20:] - tracks[1, 19], atol=1e-4)
    np.testing.assert_allclose(train["history"][:, -1], 0, atol=1e-6)  # shifted to the last position
    agent = scenario_samples(tracks, types, focal_only=True, max_neighbours=3)
    assert agent["neighbours"].shape == (1, 3, 20, 2)
    # Context of the AGENT: tracks 1 and 2 (3 is unseen at frame 19), third slot empty.
    assert np.isnan(agent["neighbours"][0, 2]).all()
    expected = {tuple(np.round(tracks[j, 19] - tracks[0, 19], 3)) for j in (1, 2)}
    assert {tuple(np.round(agent["neighbours"][0, k, -1], 3)) for k in (0, 1)} == expected


@pytest.mark.parametrize("context_dim", [0, 16])
def test_model_forecasts_in_the_input_frame(context_dim):
    torch.manual_seed(0)
    model = ForecastModel(hidden_dim=32, num_layers=2, context_dim=context_dim, num_members=2).eval()
    history = moving_histories(16, seed=1)
    angle = 0.7
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    shift = np.array([250.0, -130.0])
    moved = history @ rotation.T + shift
    out = forecast(model, history.astype(np.float32))
    out_moved = forecast(model, moved.astype(np.float32))
    assert out.shape == (16, 30, 2) and out.dtype == np.float32
    # Rotating and shifting the input rotates and shifts the forecast the same way.
    np.testing.assert_allclose(out_moved, out @ rotation.T + shift, atol=2e-2)
    with pytest.raises(ValueError, match="shape"):
        forecast(model, np.zeros((3, 19, 2), np.float32))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="focal_weight"):
        DrivingConfig(focal_weight=0)
    with pytest.raises(ValueError, match="num_members"):
        DrivingConfig(num_members=0)
    with pytest.raises(ValueError, match="mirror_probability"):
        DrivingConfig(mirror_probability=1.5)
    with pytest.raises(ValueError, match="max_neighbours"):
        DrivingConfig(context_dim=8, max_neighbours=0)


# --- rank batching ---------------------------------------------------------------------------
@pytest.mark.parametrize("num_samples,batch_size,world_size", [(101, 8, 2), (100, 10, 3), (7, 4, 2), (64, 64, 4)])
def test_epoch_batches_cover_every_sample_once_with_equal_batch_counts(num_samples, batch_size, world_size):
    per_rank = [epoch_batches(num_samples, batch_size, seed=3, epoch=1, rank=r, world_size=world_size)
                for r in range(world_size)]
    assert len({len(batches) for batches in per_rank}) == 1
    seen = np.concatenate([b for batches in per_rank for b in batches])
    assert sorted(seen.tolist()) == list(range(num_samples))
    assert all(0 < len(b) <= batch_size for batches in per_rank for b in batches)
    again = epoch_batches(num_samples, batch_size, seed=3, epoch=1, rank=0, world_size=world_size)
    assert all(np.array_equal(a, b) for a, b in zip(again, per_rank[0], strict=True))
    other_epoch = epoch_batches(num_samples, batch_size, seed=3, epoch=2, rank=0, world_size=world_size)
    assert not all(np.array_equal(a, b) for a, b in zip(other_epoch, per_rank[0], strict=False))


def test_epoch_batches_refuse_too_few_samples():
    with pytest.raises(ValueError, match="too few"):
        epoch_batches(1, 4, seed=0, epoch=0, rank=0, world_size=2)


def _rows(batches, key="history"):
    return np.concatenate([b[key].reshape(len(b[key]), -1).numpy() for b in batches])


def _sorted_rows(rows):
    return rows[np.lexsort(rows.T[::-1])]


def test_two_ranks_cover_the_epoch_once_and_stay_in_step(synthetic_manifest):
    config = DrivingConfig(**SMALL)
    ranks = [DrivingFamily(config, synthetic_manifest, World(rank=r, world_size=2)) for r in range(2)]
    alone = DrivingFamily(config, synthetic_manifest, World())
    batches = [list(f.train_batches(epoch=3, batch_size=16)) for f in ranks]
    assert len(batches[0]) == len(batches[1]) == ranks[0].num_train_batches(16) > 1
    union = _rows(batches[0] + batches[1])
    assert len(union) == len(alone.train_samples) == ranks[0].num_train_samples(3)
    # Same samples (with the same augmentations) as one process sees in that epoch.
    np.testing.assert_array_equal(_sorted_rows(union), _sorted_rows(_rows(alone.train_batches(3, 32))))
    # Each sample once: without mirroring, the union is exactly the training samples.
    plain = dataclasses.replace(config, mirror_probability=0.0)
    ranks = [DrivingFamily(plain, synthetic_manifest, World(rank=r, world_size=2)) for r in range(2)]
    union = _rows([b for f in ranks for b in f.train_batches(epoch=0, batch_size=16)])
    expected = alone.train_samples.history.reshape(len(alone.train_samples), -1)
    np.testing.assert_array_equal(_sorted_rows(union), _sorted_rows(expected))


def test_train_batches_are_deterministic_and_resume(synthetic_manifest):
    family = DrivingFamily(DrivingConfig(**SMALL), synthetic_manifest, World(rank=1, world_size=2))
    first = list(family.train_batches(epoch=1, batch_size=16))
    second = list(family.train_batches(epoch=1, batch_size=16))
    resumed = list(family.train_batches(epoch=1, batch_size=16, skip_batches=2))
    for key in ("history", "future", "neighbours", "weight"):
        np.testing.assert_array_equal(_rows(first, key), _rows(second, key))
        np.testing.assert_array_equal(_rows(first[2:], key), _rows(resumed, key))
    assert not np.array_equal(_rows(first), _rows(family.train_batches(epoch=2, batch_size=16)))
    weights = _rows(first, "weight")
    assert set(np.unique(weights).tolist()) == {1.0, DrivingConfig().focal_weight}


# --- training --------------------------------------------------------------------------------
def test_short_training_reduces_the_loss_and_beats_constant_velocity(synthetic_manifest, tmp_path):
    from trainflow.trainers.config import TrainConfig
    from trainflow.trainers.loop import load_exported_model, run_training

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: more threads only contend
    try:
        config = DrivingConfig(**{**SMALL, "hidden_dim": 64}, num_members=2)
        run_dir = (tmp_path / "run").as_uri()
        result = run_training(
            DrivingFamily,
            config,
            TrainConfig(
                manifest_uri=synthetic_manifest.uri, run_dir=run_dir, epochs=12, batch_size=32, learning_rate=3e-3,
                parallelism="none", log_to_mlflow=False, keep_best=False, log_every_steps=5,
            ),
        )
    finally:
        torch.set_num_threads(threads)
    losses = [loss for _, loss in result["losses"]]
    assert np.mean(losses[-5:]) < 0.95 * np.mean(losses[:5])
    metrics = result["metrics"]["eval"]
    assert metrics["num_samples"] == synthetic_manifest.num_rows("eval")
    assert metrics["ade"] < 0.97 * metrics["baseline_ade"], metrics
    assert metrics["fde"] < metrics["baseline_fde"]
    assert set(metrics) >= {"ade", "fde", "miss_rate", "ade_1s", "fde_1s", "ade_2s", "fde_2s", "ade_3s", "fde_3s",
                            "baseline_ade", "baseline_fde", "baseline_miss_rate", "history_only_ade"}
    # The exported description rebuilds the model without training code.
    state, exported = load_exported_model(run_dir)
    rebuilt = build_forecaster(json.loads(json.dumps(exported["export_config"])))
    rebuilt.load_state_dict(state)
    family = DrivingFamily(config, synthetic_manifest, World())
    samples = family.focal_samples("eval")
    served = forecast(rebuilt, samples.history)
    errors = np.linalg.norm(served - samples.future, axis=-1)
    assert served.shape == samples.future.shape and np.isfinite(served).all()
    assert errors.mean() == pytest.approx(metrics["history_only_ade"], rel=1e-3)


# --- real data -------------------------------------------------------------------------------
def test_constant_velocity_baseline_matches_the_published_subset_numbers(tmp_path):
    source = shared_dataset("argoverse1_forecasting_subset")
    settings = Settings.from_env({"TRAINFLOW_DATA_DIR": str(tmp_path)})
    summary = shard_dataset(str(source), "driving", settings=settings)
    manifest = load_manifest(summary["manifest_uri"], settings)
    family = DrivingFamily(DrivingConfig(), manifest, World())
    histories, futures = [], []
    for split in ("train", "valid", "eval"):
        samples = family.focal_samples(split)
        histories.append(samples.history)
        futures.append(samples.future)
    history, future = np.concatenate(histories), np.concatenate(futures)
    assert len(history) == 1955
    m = displacement_metrics(constant_velocity_forecast(history), future)
    # SOURCE.md: constant velocity over the 2 s history on all 1,955 AGENT tracks.
    assert m["ade"] == pytest.approx(3.10, abs=0.006)
    assert m["fde"] == pytest.approx(6.92, abs=0.006)
    assert m["miss_rate"] == pytest.approx(0.77, abs=0.006)


def test_mirror_averaged_model_is_reflection_equivariant():
    torch.manual_seed(0)
    model = ForecastModel(hidden_dim=32, num_layers=2, context_dim=8, mirror_average=True).eval()
    history = torch.from_numpy(moving_histories(8, seed=2) - moving_histories(8, seed=2)[:, -1:]).float()
    neighbours = history[:, None] + torch.randn(8, 3, 1, 2) * 10
    flip = torch.tensor([1.0, -1.0])
    with torch.no_grad():
        direct = model(history, neighbours)
        mirrored = model(history * flip, neighbours * flip)
        plain = ForecastModel(hidden_dim=32, num_layers=2, context_dim=8).eval()
        plain.load_state_dict(model.state_dict())
        unaveraged = plain(history * flip, neighbours * flip)
    torch.testing.assert_close(mirrored, direct * flip, atol=1e-4, rtol=0)
    assert not torch.allclose(unaveraged, direct * flip, atol=1e-3)  # the averaging is what makes it so


def test_entry_point_arguments():
    from trainflow.trainers.driving.__main__ import DEFAULT_TRAIN, driving_argv

    argv = driving_argv(["--manifest-uri", "file:///m/_manifest.json", "--train.epochs=2"])
    assert argv[-2:] == ["--train.manifest_uri=file:///m/_manifest.json", "--train.epochs=2"]
    assert f"--train.epochs={DEFAULT_TRAIN['epochs']}" in argv[:-2]  # defaults first: overrides win
    assert driving_argv(["--config", "run.json", "--manifest-uri=s3://b/m"]) == [
        "--config", "run.json", "--train.manifest_uri=s3://b/m"]


def test_entry_point_trains_and_exports_a_servable_model(synthetic_manifest, tmp_path, monkeypatch):
    from trainflow.trainers.driving.__main__ import main

    monkeypatch.setenv("TRAINFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_dir = (tmp_path / "run").as_uri()
    result = main(["--manifest-uri", synthetic_manifest.uri, f"--train.run_dir={run_dir}", "--train.epochs=2",
                   "--train.batch_size=64", "--train.log_to_mlflow=false", "--family.hidden_dim=16",
                   "--family.context_dim=8", "--family.max_neighbours=4", "--family.num_members=1"])
    assert result["family"] == "driving" and result["epochs"] == 2
    assert set(result["metrics"]["eval"]) >= {"ade", "fde", "miss_rate", "baseline_ade", "baseline_fde"}
    config = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    model = build_forecaster(config["export_config"])
    model.load_state_dict(torch.load(tmp_path / "run" / "model" / "model.pt", weights_only=True))
    history = moving_histories(5).astype(np.float32)
    out = forecast(model, history)
    assert out.shape == (5, 30, 2) and np.isfinite(out).all()


@pytest.mark.slow  # ~70 s: two 2-rank torchrun launches
def test_fsdp_matches_ddp(synthetic_manifest, tmp_path):
    """The driving model sharded with FSDP2 trains like the replicated DDP run (real torchrun
    processes, gloo): the same loss curve and eval metrics within float32 reordering noise."""
    from trainflow.tasks.launch import LaunchConfig, run_torchrun

    results = {}
    for parallelism in ("ddp", "fsdp"):
        run_dir = tmp_path / parallelism
        config = {
            "train": {"manifest_uri": synthetic_manifest.uri, "run_dir": run_dir.as_uri(), "epochs": 2,
                      "batch_size": 32, "learning_rate": 3e-3, "log_every_steps": 1, "log_to_mlflow": False,
                      "parallelism": parallelism, "max_grad_norm": 1.0},
            "family": {**SMALL, "num_members": 1},
        }
        path = tmp_path / f"{parallelism}.json"
        path.write_text(json.dumps(config))
        run_torchrun(LaunchConfig(nproc_per_node=2), module="trainflow.trainers.driving", args=["--config", str(path)],
                     env={"OMP_NUM_THREADS": "1"}, on_line=lambda line: None)
        results[parallelism] = json.loads((run_dir / "result.json").read_text())
    ddp, fsdp = results["ddp"], results["fsdp"]
    assert (ddp["parallelism"], fsdp["parallelism"]) == ("ddp", "fsdp")
    assert fsdp["steps"] == ddp["steps"] > 5
    np.testing.assert_allclose([v for _, v in fsdp["losses"]], [v for _, v in ddp["losses"]], rtol=1e-3, atol=1e-4)
    for key in ("ade", "fde", "miss_rate"):
        assert fsdp["metrics"]["eval"][key] == pytest.approx(ddp["metrics"]["eval"][key], rel=1e-3, abs=1e-4), key
    # FSDP shards every parameter: each rank holds about half of the replicated bytes.
    full = ddp["memory"]["param_bytes"]
    assert all(b <= full / 2 + 4096 for b in fsdp["memory"]["param_bytes_per_rank"])
    assert sum(fsdp["memory"]["param_bytes_per_rank"]) >= full
