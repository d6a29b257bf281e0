"""Driving family: frames, the constant-velocity baseline, metrics, streamed rank batches, the K
forecasts, training."""

from __future__ import annotations

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


def test_context_can_take_tracks_seen_at_any_history_frame():
    """``neighbours_seen="history"``: a track that left the view before the last history frame
    is context too, ranked by its last position seen; the served model picks the same ones."""
    import importlib.util
    import os

    from trainflow.trainers.driving.serving import _nearest

    rng = np.random.default_rng(2)
    tracks = rng.normal(0, 20, (5, 50, 2)).astype(np.float32)
    tracks[0, :20] = 0.0  # the AGENT stands at the origin
    tracks[1, :20] = [30.0, 0.0]
    tracks[2, :20] = [5.0, 0.0]
    tracks[2, 12:] = np.nan  # seen at frames 0-11, then gone: 5 m away when last seen
    tracks[3, :20] = [10.0, 0.0]
    tracks[3, :5] = np.nan  # seen from frame 5 on
    tracks[4, :] = np.nan  # never seen in the history
    tracks[4, 30:] = [1.0, 1.0]
    types = np.array([0, 1, 2, 2, 2])
    last = scenario_samples(tracks, types, focal_only=True, max_neighbours=3)
    assert np.isnan(last["neighbours"][0, 2]).all()  # only tracks 3 and 1 are seen at frame 19
    np.testing.assert_allclose(last["neighbours"][0, :2, -1], [[10.0, 0.0], [30.0, 0.0]])
    history = scenario_samples(tracks, types, focal_only=True, max_neighbours=3, neighbours_seen="history")
    picked = history["neighbours"][0]
    # Nearest first: track 2 (5 m where last seen, frame 11), track 3, track 1; never track 4.
    np.testing.assert_allclose(picked[0, 11], [5.0, 0.0])
    assert np.isnan(picked[0, 12:]).all() and np.isfinite(picked[0, :12]).all()
    np.testing.assert_allclose(picked[1, -1], [10.0, 0.0])
    np.testing.assert_allclose(picked[2, -1], [30.0, 0.0])
    with pytest.raises(ValueError, match="neighbours_seen"):
        scenario_samples(tracks, types, focal_only=True, max_neighbours=3, neighbours_seen="future")
    with pytest.raises(ValueError, match="neighbours_seen"):
        DrivingConfig(neighbours_seen="any")

    # The served side: the export's example builder and the logged pyfunc apply the same rule.
    others = tracks[1:, :20].astype(np.float64)
    for rule, expected in (("last", last["neighbours"][0, :2]), ("history", picked)):
        np.testing.assert_allclose(_nearest(others, tracks[0, 19], 3, rule), expected)
    spec = importlib.util.spec_from_file_location("served_driving_pyfunc", os.path.join(
        os.path.dirname(__file__), "..", "..", "trainers", "driving", "pyfunc.py"))
    pyfunc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pyfunc)
    served = pyfunc.TrainflowForecaster()
    served.max_neighbours = 3
    for rule, expected in (("last", last["neighbours"]), ("history", history["neighbours"])):
        served.neighbours_seen = rule
        chosen = served._nearest(tracks[None, 0, :20].astype(np.float64), others[None])
        np.testing.assert_allclose(chosen, expected, equal_nan=True)

    # The model counts a neighbour seen at any history frame (not only at the last one).
    model = ForecastModel(context_dim=16, context_pooling="attention", **{k: SMALL[k] for k in ("hidden_dim", "num_layers")}).eval()
    with torch.no_grad():
        alone = model(torch.from_numpy(history["history"]), torch.full((1, 3, 20, 2), float("nan")))
        gone = torch.full((1, 3, 20, 2), float("nan"))
        gone[0, 0] = torch.from_numpy(picked[0])
        assert not torch.allclose(model(torch.from_numpy(history["history"]), gone), alone)


def test_scenario_samples_take_tracks_with_a_partial_future_when_asked():
    rng = np.random.default_rng(1)
    tracks = rng.normal(0, 20, (4, 50, 2)).astype(np.float32)
    tracks[1, 35:] = np.nan  # leaves the scene after 15 future frames
    tracks[2, 25:] = np.nan  # 5 future frames only
    tracks[3, 5] = np.nan  # a gap in the history: never a target
    types = np.array([0, 2, 2, 2])
    complete = scenario_samples(tracks, types, focal_only=False, max_neighbours=3)
    assert complete["history"].shape[0] == 1  # the default: complete tracks only
    partial = scenario_samples(tracks, types, focal_only=False, max_neighbours=3, min_future_frames=10)
    assert partial["history"].shape == (2, 20, 2) and partial["is_agent"].tolist() == [True, False]
    assert np.isfinite(partial["future"][1, :15]).all() and np.isnan(partial["future"][1, 15:]).all()
    np.testing.assert_allclose(partial["future"][1, :15], tracks[1, 20:35] - tracks[1, 19], atol=1e-4)
    assert len(scenario_samples(tracks, types, focal_only=False, max_neighbours=3, min_future_frames=5)["history"]) == 3


def test_attention_pooling_uses_the_neighbours_and_ignores_absent_slots():
    torch.manual_seed(0)
    model = ForecastModel(hidden_dim=32, num_layers=2, context_dim=16, num_modes=3, context_pooling="attention").eval()
    history = torch.from_numpy(moving_histories(6, seed=5) - moving_histories(6, seed=5)[:, -1:]).float()
    neighbours = history[:, None] + torch.randn(6, 3, 1, 2) * 10
    padded = torch.cat([neighbours, torch.full((6, 2, 20, 2), float("nan"))], dim=1)
    angle = 0.4
    rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    with torch.no_grad():
        single, modes, _ = model(history, neighbours, with_modes=True)
        single_padded, modes_padded, _ = model(history, padded, with_modes=True)
        moved = torch.cat([neighbours[:, :1] + 5.0, neighbours[:, 1:]], dim=1)
        rotated = model(history @ rotation.T, neighbours @ rotation.T)
        empty = model(history, torch.full((6, 4, 20, 2), float("nan")))
        alone = model(history)
    torch.testing.assert_close(single_padded, single, atol=1e-5, rtol=0)  # absent slots change nothing
    torch.testing.assert_close(modes_padded, modes, atol=1e-5, rtol=0)
    torch.testing.assert_close(rotated, single @ rotation.T, atol=2e-3, rtol=0)
    assert not torch.allclose(model(history, moved), single, atol=1e-4)  # a neighbour's motion matters
    assert torch.isfinite(empty).all()
    torch.testing.assert_close(empty, alone, atol=1e-5, rtol=0)  # no neighbour = the history-only call
    with pytest.raises(ValueError, match="pooling"):
        ForecastModel(context_dim=16, context_pooling="mean")


def test_loss_learns_only_from_the_observed_future_frames(synthetic_manifest):
    config = DrivingConfig(**SMALL, num_members=2, num_modes=3, context_pooling="attention", min_future_frames=10)
    family = DrivingFamily(config, synthetic_manifest, World())
    torch.manual_seed(0)
    model = family.build_model().eval()  # no dropout: the loss is a function of the batch
    batch = next(iter(family.train_batches(epoch=0, batch_size=16)))
    future = batch["future"].clone()
    future[0, 12:] = float("nan")  # the first sample's track leaves after 12 frames
    weight = torch.zeros_like(batch["weight"])
    weight[0] = 3.0  # only that sample counts
    partial = {**batch, "future": future, "weight": weight}
    loss = family.loss(model, partial)
    with torch.no_grad():
        single, modes, logits = model(batch["history"][:1], batch["neighbours"][:1], per_member=True, with_modes=True)
    truth = future[0, :12]
    # Mean error over the 12 observed frames, no final term (3 s is not observed), per member.
    members = torch.linalg.vector_norm(single[:, 0, :12] - truth, dim=-1).mean(dim=-1).mean()
    per_mode = torch.linalg.vector_norm(modes[0, :, :12] - truth, dim=-1).mean(dim=-1)
    best = int(per_mode.argmin())
    nll = torch.nn.functional.cross_entropy(logits[:1], torch.tensor([best]))
    expected = members + config.mode_weight * (per_mode[best] + nll)
    torch.testing.assert_close(loss.detach(), expected, atol=1e-4, rtol=1e-5)
    model.train()
    family.loss(model, partial).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_time_shift_moves_the_scene_clock_and_leaves_the_future_tail_unobserved(synthetic_manifest):
    base = DrivingConfig(**SMALL)
    shifted_config = DrivingConfig(**SMALL, min_future_frames=10, max_time_shift=10)
    plain = list(DrivingFamily(base, synthetic_manifest, World()).train_batches(epoch=0, batch_size=64))
    family = DrivingFamily(shifted_config, synthetic_manifest, World())
    shifted = list(family.train_batches(epoch=0, batch_size=64))
    again = list(family.train_batches(epoch=0, batch_size=64))
    np.testing.assert_array_equal(_rows(shifted, "future"), _rows(again, "future"))  # deterministic
    future = _rows(shifted, "future").reshape(-1, 30, 2)
    observed = np.isfinite(future).all(axis=-1).sum(axis=1)
    assert observed.min() >= 10 and (observed < 30).any() and (observed == 30).any()
    # Each sample's future is a contiguous prefix: the shifted frames are cut from its end.
    assert all(np.isfinite(f[:n]).all() and np.isnan(f[n:]).all() for f, n in zip(future, observed, strict=True))
    assert not np.array_equal(_rows(plain, "history"), _rows(shifted, "history"))
    with pytest.raises(ValueError, match="max_time_shift"):
        DrivingConfig(min_future_frames=25, max_time_shift=10)
    with pytest.raises(ValueError, match="min_future_frames"):
        DrivingConfig(min_future_frames=0)
    with pytest.raises(ValueError, match="context_pooling"):
        DrivingConfig(context_pooling="mean")
    with pytest.raises(ValueError, match="context_dim"):
        DrivingConfig(context_dim=10)
    assert DrivingConfig(context_dim=10, context_pooling="max").context_dim == 10


def test_scale_augmentation_scales_each_scenario_by_one_factor(synthetic_manifest):
    """``scale_augmentation``: every position of a scenario's samples (history, future, context)
    times one factor in [1 - x, 1 + x], drawn per (seed, epoch, scenario); the rest unchanged."""
    # No mirroring or context dropout, so that only the scale differs from the plain batches.
    fixed = dict(SMALL, mirror_probability=0.0, context_dropout=0.0)
    plain = list(DrivingFamily(DrivingConfig(**fixed), synthetic_manifest, World()).train_batches(0, 64))
    family = DrivingFamily(DrivingConfig(**fixed, scale_augmentation=0.2), synthetic_manifest, World())
    scaled = list(family.train_batches(0, 64))
    np.testing.assert_array_equal(_rows(scaled, "future"), _rows(list(family.train_batches(0, 64)), "future"))
    scenario = np.concatenate([b["scenario"].numpy() for b in scaled])
    assert np.array_equal(scenario, np.concatenate([b["scenario"].numpy() for b in plain]))
    factors = []
    for key in ("history", "future", "neighbours"):
        a, b = _rows(plain, key), _rows(scaled, key)
        assert np.array_equal(np.isnan(a), np.isnan(b))
        moved = np.abs(a) > 1.0
        ratio = np.where(moved, b / np.where(moved, a, 1.0), np.nan)
        factors.append(np.nanmean(ratio, axis=1))
        # One factor per sample, the same for all its positions.
        assert np.nanmax(np.abs(ratio - factors[-1][:, None])) < 1e-4
    per_sample = np.nanmean(np.stack(factors), axis=0)
    assert 0.8 - 1e-5 <= np.nanmin(per_sample) and np.nanmax(per_sample) <= 1.2 + 1e-5
    assert np.nanstd(per_sample) > 0.05  # factors vary between scenarios...
    for row in np.unique(scenario):  # ...and not within one
        same = per_sample[scenario == row]
        assert np.nanmax(same) - np.nanmin(same) < 1e-4
    with pytest.raises(ValueError, match="scale_augmentation"):
        DrivingConfig(scale_augmentation=1.0)


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


def _small_multimodal_scene(n: int, seed: int):
    """A small 4-mode model (eval mode) and ``n`` agent-frame histories with 3 neighbours each."""
    torch.manual_seed(0)
    model = ForecastModel(hidden_dim=32, num_layers=2, context_dim=8, num_modes=4).eval()
    history = torch.from_numpy(moving_histories(n, seed=seed)).float()
    history = history - history[:, -1:]
    return model, history, history[:, None] + torch.randn(n, 3, 1, 2) * 10


def test_modes_are_k_forecasts_in_the_input_frame_with_logits():
    model, history, neighbours = _small_multimodal_scene(6, seed=3)
    with torch.no_grad():
        single, modes, logits = model(history, neighbours, with_modes=True)
        angle = 1.1
        rotation = torch.tensor([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        _, modes_rotated, logits_rotated = model(history @ rotation.T, neighbours @ rotation.T, with_modes=True)
    assert single.shape == (6, 30, 2) and modes.shape == (6, 4, 30, 2) and logits.shape == (6, 4)
    torch.testing.assert_close(single, model(history, neighbours))  # the single forecast is unchanged
    torch.testing.assert_close(modes_rotated, modes @ rotation.T, atol=2e-3, rtol=0)
    torch.testing.assert_close(logits_rotated, logits, atol=1e-4, rtol=0)
    assert not torch.allclose(modes[:, 0], modes[:, 1])
    with pytest.raises(ValueError, match="num_modes"):
        ForecastModel(hidden_dim=8, num_layers=1, context_dim=0)(history, with_modes=True)


def test_mode_blend_mixes_the_single_forecast_with_the_modes_expected_position():
    """Outside training the single forecast is (1 - b) x the ensemble's + b x the
    probability-weighted mean of the K forecasts; training (and per-member) forecasts are not
    blended; the blend travels in the exported model's config."""
    model, history, neighbours = _small_multimodal_scene(5, seed=4)
    with torch.no_grad():
        ensemble, modes, logits = model(history, neighbours, with_modes=True)
        expected = (logits.softmax(-1)[:, :, None, None] * modes).sum(1)
        assert not torch.allclose(ensemble, expected)
        for blend in (0.3, 1.0):
            model.mode_blend = blend
            single, modes_b, _ = model(history, neighbours, with_modes=True)
            torch.testing.assert_close(single, (1 - blend) * ensemble + blend * expected)
            torch.testing.assert_close(model(history, neighbours), single)  # without with_modes too
            torch.testing.assert_close(modes_b, modes)  # the K forecasts are not changed
        model.train()
        model.mode_blend = 0.5
        for member in model.modules():  # dropout off, so training and eval forwards compare
            if isinstance(member, torch.nn.Dropout):
                member.p = 0.0
        torch.testing.assert_close(model(history, neighbours), ensemble)
    with pytest.raises(ValueError, match="mode_blend"):
        DrivingConfig(mode_blend=1.5)
    with pytest.raises(ValueError, match="mode_blend"):
        DrivingConfig(mode_blend=0.5, num_modes=0)
    config = DrivingFamily.__new__(DrivingFamily)
    config.config = DrivingConfig(mode_blend=0.4)
    assert build_forecaster(DrivingFamily.export_config(config)).mode_blend == 0.4


def test_multimodal_metrics_score_the_forecast_closest_at_the_end():
    from trainflow.trainers.driving.evaluation import multimodal_metrics

    future = np.zeros((2, 30, 2))
    forecasts = np.zeros((2, 3, 30, 2))
    forecasts[0, 0, :, 0] = 5.0  # 5 m off everywhere, the most probable
    forecasts[0, 1, :, 1] = np.linspace(0, 1, 30)  # ends 1 m off: the one scored
    forecasts[0, 2, :, 1] = 3.0
    forecasts[1, :, :, 0] = np.array([4.0, 2.5, 3.0])[:, None]  # all miss; the best ends 2.5 m off
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    baseline = np.ones((2, 30, 2))
    m = multimodal_metrics(forecasts, probs, future, baseline)
    assert m["min_fde_3"] == pytest.approx((1.0 + 2.5) / 2)
    assert m["min_ade_3"] == pytest.approx((0.5 + 2.5) / 2)
    assert m["miss_rate_3"] == pytest.approx(0.5)
    assert m["top_ade_3"] == pytest.approx((5.0 + 2.5) / 2)  # the most probable of each scene
    assert m["min_fde_3_1s"] == pytest.approx((forecasts[0, 1, 9, 1] + 2.5) / 2)
    assert m["baseline_min_fde_3"] == pytest.approx(math.sqrt(2))
    with pytest.raises(ValueError, match="must be"):
        multimodal_metrics(forecasts[:, :, :20], probs, future)


def test_scene_array_stacks_agents_with_an_observed_flag():
    from trainflow.trainers.driving.serving import scene_array

    history = moving_histories(2, seed=4)[:, :20]
    others = [np.full((2, 20, 2), 7.0), np.zeros((0, 20, 2))]
    others[0][1, :5] = np.nan  # not seen in the first 0.5 s
    scene = scene_array(history, others)
    assert scene.shape == (2, 60, 3) and scene.dtype == np.float32
    np.testing.assert_allclose(scene[:, :20, :2], history, rtol=1e-6)
    assert (scene[:, :20, 2] == 1).all()
    assert (scene[0, 20:, 2] == 1).sum() == 35 and (scene[0, 40:45, :] == 0).all()
    assert (scene[1, 20:] == 0).all()  # no neighbours: padding, never observed


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="focal_weight"):
        DrivingConfig(focal_weight=0)
    with pytest.raises(ValueError, match="num_members"):
        DrivingConfig(num_members=0)
    with pytest.raises(ValueError, match="mirror_probability"):
        DrivingConfig(mirror_probability=1.5)
    with pytest.raises(ValueError, match="max_neighbours"):
        DrivingConfig(context_dim=8, max_neighbours=0)


# --- streamed rank batches -------------------------------------------------------------------
def _rows(batches, key="history"):
    return np.concatenate([b[key].reshape(len(b[key]), -1).numpy() for b in batches])


def _sorted_rows(rows):
    return rows[np.lexsort(rows.T[::-1])]


def _scenarios(batches):
    """Scenario rows of the samples that count (weight > 0), one entry per scenario per batch."""
    rows = []
    for b in batches:
        counted = b["weight"] > 0
        rows.extend(np.unique(b["scenario"][counted].numpy()).tolist())
    return rows


def test_two_ranks_cover_the_epoch_once_and_stay_in_step(synthetic_manifest):
    config = DrivingConfig(**SMALL)
    ranks = [DrivingFamily(config, synthetic_manifest, World(rank=r, world_size=2)) for r in range(2)]
    alone = DrivingFamily(config, synthetic_manifest, World())
    batches = [list(f.train_batches(epoch=3, batch_size=16)) for f in ranks]
    assert len(batches[0]) == len(batches[1]) == ranks[0].num_train_batches(16) > 1
    # Every training scenario exactly once across the two ranks (the padded tail weighs 0).
    num_rows = synthetic_manifest.num_rows("train")
    per_rank = [_scenarios(b) for b in batches]
    assert sorted(per_rank[0] + per_rank[1]) == list(range(num_rows))
    assert not set(per_rank[0]) & set(per_rank[1])
    # Same samples (with the same augmentations) as one process sees in that epoch with the
    # same global batch.
    union = _rows(batches[0] + batches[1])
    single = list(alone.train_batches(3, 32))
    np.testing.assert_array_equal(_sorted_rows(union), _sorted_rows(_rows(single)))
    assert sorted(_scenarios(single)) == list(range(num_rows))


def test_a_rank_streams_only_its_share_of_the_train_split(synthetic_manifest, monkeypatch):
    """No rank reads the train split whole: the family never asks the manifest for it (the
    loader reads shard row groups window by window), and a rank's batches hold its share only."""
    from trainflow.tasks.manifest import Manifest

    def guarded(name):
        original = getattr(Manifest, name)

        def read(self, split, *args, **kwargs):
            if split == "train":
                raise AssertionError(f"the train split was read whole ({name})")
            return original(self, split, *args, **kwargs)

        return read

    for name in ("iter_batches", "read_table"):
        monkeypatch.setattr(Manifest, name, guarded(name))
    num_rows = synthetic_manifest.num_rows("train")
    family = DrivingFamily(DrivingConfig(**SMALL), synthetic_manifest, World(rank=0, world_size=2))
    loader = family.train_loader(16)
    rows_handed = 0
    for batch in loader:
        rows_handed += len(batch["row_index"])
    assert rows_handed == loader.num_batches() * loader.batch_size
    assert rows_handed <= num_rows // 2 + loader.batch_size  # its half, at most one padded batch more
    counted = _scenarios(list(family.train_batches(epoch=0, batch_size=16)))
    assert len(counted) <= (num_rows + 1) // 2
    assert not hasattr(family, "train_samples")  # no split-wide array of samples


def test_a_refit_trains_on_the_valid_scenarios_too_and_never_on_eval(synthetic_manifest):
    """``train_on_valid``: every train and valid scenario once an epoch across the ranks (the
    valid ones numbered after the train ones), no eval scenario."""
    config = DrivingConfig(**SMALL, train_on_valid=True)
    ranks = [DrivingFamily(config, synthetic_manifest, World(rank=r, world_size=2)) for r in range(2)]
    n_train, n_valid = synthetic_manifest.num_rows("train"), synthetic_manifest.num_rows("valid")
    assert n_valid > 0
    seen = [row for f in ranks for row in _scenarios(list(f.train_batches(epoch=0, batch_size=16)))]
    assert sorted(seen) == list(range(n_train + n_valid))
    assert ranks[0].num_train_samples(0) == round((n_train + n_valid) * config.samples_per_scenario)
    # each valid scenario gives at least its AGENT's sample, with the weight of an AGENT
    refit = [b for f in ranks for b in f.train_batches(epoch=0, batch_size=16)]
    from_valid = np.concatenate([(b["scenario"].numpy() >= n_train) & (b["weight"].numpy() > 0) for b in refit])
    weights = np.concatenate([b["weight"].numpy() for b in refit])[from_valid]
    assert from_valid.sum() >= n_valid and (weights == config.focal_weight).sum() == n_valid
    plain = DrivingFamily(DrivingConfig(**SMALL), synthetic_manifest, World())
    assert plain.train_splits == ("train",)
    assert ranks[0].trains_on_valid and not plain.trains_on_valid  # the loop then keeps the last epoch


def test_batch_size_in_samples_becomes_scenarios_per_batch(synthetic_manifest):
    family = DrivingFamily(DrivingConfig(**SMALL, samples_per_scenario=4.0), synthetic_manifest, World())
    assert family.scenarios_per_batch(64) == 16 and family.scenarios_per_batch(1) == 1
    assert family.num_train_samples(0) == 4 * synthetic_manifest.num_rows("train")
    with pytest.raises(ValueError, match="samples_per_scenario"):
        DrivingConfig(samples_per_scenario=0)


def test_train_batches_are_deterministic_and_resume(synthetic_manifest):
    family = DrivingFamily(DrivingConfig(**SMALL), synthetic_manifest, World(rank=1, world_size=2))
    first = list(family.train_batches(epoch=1, batch_size=16))
    second = list(family.train_batches(epoch=1, batch_size=16))
    resumed = list(family.train_batches(epoch=1, batch_size=16, skip_batches=2))
    for key in ("history", "future", "neighbours", "weight", "scenario"):
        np.testing.assert_array_equal(_rows(first, key), _rows(second, key))
        np.testing.assert_array_equal(_rows(first[2:], key), _rows(resumed, key))
    assert not np.array_equal(_rows(first), _rows(family.train_batches(epoch=2, batch_size=16)))
    weights = _rows(first, "weight")
    assert set(np.unique(weights).tolist()) <= {0.0, 1.0, DrivingConfig().focal_weight}
    assert {1.0, DrivingConfig().focal_weight} <= set(np.unique(weights).tolist())


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
    # The blend tool scores the exported run: blend 0 is the run's own evaluation.
    from benchmarks._driving_blend import main as score_blends

    rows = score_blends(["--run-dir", run_dir, "--split", "eval", "--blends", "0", "1"])
    assert [r["mode_blend"] for r in rows] == [0.0, 1.0] and {r["split"] for r in rows} == {"eval"}
    assert rows[0]["ade"] == pytest.approx(metrics["ade"], rel=1e-3)
    assert rows[0]["fde"] == pytest.approx(metrics["fde"], rel=1e-3)
    assert rows[1]["ade"] != pytest.approx(rows[0]["ade"], rel=1e-6)
    assert rows[0]["ade_vs_cv"] == pytest.approx(1 - metrics["ade"] / metrics["baseline_ade"], abs=1e-3)


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


def test_a_model_registered_before_the_scene_contract_is_scored_on_histories(synthetic_manifest):
    """The evaluator (and so the gate's re-scoring of an old champion) calls a history-only model
    with histories and scores it at K = 1; it has no K = 6 metrics."""
    import mlflow

    from trainflow.tasks.settings import PROJECT_DIR
    from trainflow.trainers.driving.evaluation import evaluate_driving, takes_scenes

    old = mlflow.pyfunc.load_model(str(PROJECT_DIR / "tests" / "fixtures" / "before_plugins" / "models" / "driving"))
    assert not takes_scenes(old.predict)
    report = evaluate_driving(synthetic_manifest, old.predict)
    metrics = report["metrics"]
    assert metrics["num_samples"] == synthetic_manifest.num_rows("eval")
    assert np.isfinite(metrics["ade"]) and metrics["baseline_ade"] > 0
    assert not any(key.startswith(("min_", "history_only_")) for key in metrics)
    assert report["examples"]["forecasts"] is None


def test_time_reversal_plays_the_scene_backwards(synthetic_manifest):
    from trainflow.trainers.driving.data import loader_batch_samples

    # One scenario, two complete tracks moving at different constant speeds; frame t at x = speed * t.
    t = np.arange(50, dtype=np.float32)
    tracks = np.stack([np.stack([2.0 * t, 0 * t], -1), np.stack([1.0 * t, 3.0 + 0 * t], -1)])
    batch = {"num_tracks": np.array([2]), "tracks_xy": tracks.reshape(1, -1), "track_types": np.array([[0, 2]]),
             "row_index": np.array([7])}
    forward, _ = loader_batch_samples(batch, focal_only=False, max_neighbours=1)
    backward, _ = loader_batch_samples(batch, focal_only=False, max_neighbours=1, time_reversed=np.array([True]))
    # Forwards the AGENT's history ends at frame 19 (x = 38); backwards it is frames 49..30, ending at
    # frame 30 (x = 60), and its future runs back to frame 0 (x = 0): 60 m behind the origin.
    np.testing.assert_allclose(forward.future[0, -1], [2.0 * 49 - 38, 0])
    np.testing.assert_allclose(backward.history[0, 0], [2.0 * 49 - 60, 0])
    np.testing.assert_allclose(backward.future[0, -1], [-60, 0])
    assert bool(backward.is_agent[0]) and not bool(backward.is_agent[1])
    # The neighbour's context is its own reversed frames 49..30, in the AGENT's frame.
    np.testing.assert_allclose(backward.neighbours[0, 0, -1], [30 - 60, 3])
    # Through the family: every scenario reversed; the futures are the plain runs' pasts, so the
    # batches differ, and the draw is the same on a second pass (seeded per scenario and epoch).
    # (complete tracks only: reversed, a complete track stays complete, so both give the same samples)
    plain = DrivingFamily(DrivingConfig(**SMALL, mirror_probability=0.0, min_future_frames=30), synthetic_manifest,
                          World())
    family = DrivingFamily(DrivingConfig(**SMALL, mirror_probability=0.0, min_future_frames=30,
                                         time_reverse_probability=1.0), synthetic_manifest, World())
    reversed_rows = _rows(list(family.train_batches(epoch=0, batch_size=64)), "future")
    np.testing.assert_array_equal(reversed_rows, _rows(list(family.train_batches(epoch=0, batch_size=64)), "future"))
    assert reversed_rows.shape == _rows(list(plain.train_batches(epoch=0, batch_size=64)), "future").shape
    assert not np.array_equal(reversed_rows, _rows(list(plain.train_batches(epoch=0, batch_size=64)), "future"))
    with pytest.raises(ValueError, match="time_reverse_probability"):
        DrivingConfig(time_reverse_probability=1.5)
