"""Forecasting samples cut from driving scenarios (the ``tracks_xy`` rows of a manifest).

A sample is one track: its 20 observed positions, its 30 future positions and the first 20
frames of its nearest surrounding tracks (context; never their futures). Coordinates are
shifted so that the sample's last observed position is the origin, computed in float64 before
the cast to float32 so that city-frame coordinates (thousands of metres) lose no precision;
the model is translation invariant, so this changes nothing else.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

import numpy as np

from trainflow.trainers.driving.geometry import FUTURE_FRAMES, HISTORY_FRAMES

if TYPE_CHECKING:
    from trainflow.tasks.manifest import Manifest

log = logging.getLogger(__name__)

TRACK_AGENT = 0
_COLUMNS = ["num_tracks", "tracks_xy", "track_types"]
TRAIN_COLUMNS = list(_COLUMNS)


@dataclasses.dataclass
class ForecastSamples:
    """Samples as aligned arrays (row i of each is sample i).

    Attributes:
        history: (n, 20, 2) float32 observed positions.
        future: (n, 30, 2) float32 true future positions (NaN where not observed: training
            tracks with a partial future, see ``min_future_frames``).
        neighbours: (n, K, 20, 2) float32 histories of the K nearest other tracks (NaN where not
            observed, all-NaN rows where the scenario has fewer than K).
        is_agent: (n,) bool, the sample is the scenario's focal AGENT.
        scenario: (n,) int64 index of the scenario within the split (row order).
    """

    history: np.ndarray
    future: np.ndarray
    neighbours: np.ndarray
    is_agent: np.ndarray
    scenario: np.ndarray

    def __len__(self) -> int:
        return int(self.history.shape[0])

    def subset(self, index: np.ndarray) -> ForecastSamples:
        return ForecastSamples(*(getattr(self, f.name)[index] for f in dataclasses.fields(self)))


def scenario_samples(
    tracks: np.ndarray,
    track_types: np.ndarray,
    *,
    focal_only: bool,
    max_neighbours: int,
    min_future_frames: int = FUTURE_FRAMES,
    neighbours_seen: str = "last",
) -> dict[str, np.ndarray]:
    """The samples of one scenario.

    Args:
        tracks: (num_tracks, 50, 2) positions, NaN where unobserved; track 0 is the AGENT.
        track_types: (num_tracks,) 0 AGENT, 1 AV, 2 OTHERS.
        focal_only: Only the AGENT (evaluation); otherwise every track observed at all 50
            frames (training).
        max_neighbours: Context tracks per sample (the nearest observed at the last history frame).
        min_future_frames: Training targets are the tracks observed at all 20 history frames
            and at least this many of the 30 future frames (their ``future`` is NaN where not
            observed; the loss masks it); 30 keeps complete tracks only.
        neighbours_seen: Which other tracks can be context: ``"last"``, those seen at the last
            history frame (nearest by that position); ``"history"``, those seen at any history
            frame (nearest by their last position seen in the history), so that vehicles that
            have just left the sensor's view still show where the traffic went.

    Returns:
        Arrays ``history``, ``future``, ``neighbours``, ``is_agent`` (see :class:`ForecastSamples`).
    """
    tracks = np.asarray(tracks, dtype=np.float64)
    num_frames = HISTORY_FRAMES + FUTURE_FRAMES
    if tracks.ndim != 3 or tracks.shape[1] != num_frames or tracks.shape[2] != 2:
        raise ValueError(f"tracks must have shape (num_tracks, {num_frames}, 2), got {tracks.shape}")
    if focal_only:
        targets = np.array([0])
    else:
        observed = np.isfinite(tracks).all(axis=2)  # (num_tracks, 50)
        complete_history = observed[:, :HISTORY_FRAMES].all(axis=1)
        targets = np.flatnonzero(complete_history & (observed[:, HISTORY_FRAMES:].sum(axis=1) >= min_future_frames))
    last = HISTORY_FRAMES - 1
    origin = tracks[targets, last]  # (m, 2)
    shifted = tracks[targets] - origin[:, None, :]
    # Context: other tracks seen at the last observed frame (or at any history frame), nearest first.
    if neighbours_seen not in ("last", "history"):
        raise ValueError(f"neighbours_seen must be 'last' or 'history', got {neighbours_seen!r}")
    seen_at = np.isfinite(tracks[:, :HISTORY_FRAMES]).all(axis=-1)  # (T, 20)
    if neighbours_seen == "last":
        seen = seen_at[:, last]
        where = tracks[:, last]
    else:
        seen = seen_at.any(axis=1)
        latest = HISTORY_FRAMES - 1 - np.argmax(seen_at[:, ::-1], axis=1)
        where = tracks[np.arange(len(tracks)), latest]
    distance = np.linalg.norm(where[None, :] - origin[:, None, :], axis=-1)  # (m, T)
    distance[:, ~seen] = np.inf
    distance[np.arange(len(targets)), targets] = np.inf
    order = np.argsort(distance, axis=1, kind="stable")[:, :max_neighbours]
    neighbours = np.full((len(targets), max_neighbours, HISTORY_FRAMES, 2), np.nan)
    if order.shape[1]:
        picked = tracks[order, :HISTORY_FRAMES] - origin[:, None, None, :]  # (m, k, 20, 2)
        valid = np.isfinite(np.take_along_axis(distance, order, axis=1))
        picked[~valid] = np.nan
        neighbours[:, : order.shape[1]] = picked
    return {
        "history": shifted[:, :HISTORY_FRAMES].astype(np.float32),
        "future": shifted[:, HISTORY_FRAMES:].astype(np.float32),
        "neighbours": neighbours.astype(np.float32),
        "is_agent": np.asarray(track_types)[targets] == TRACK_AGENT,
    }


def load_samples(manifest: Manifest, split: str, *, focal_only: bool, max_neighbours: int,
                 neighbours_seen: str = "last") -> ForecastSamples:
    """Every sample of ``split`` (verified shard reads, in manifest row order).

    Raises:
        ValueError: the split holds no usable sample.
    """
    from trainflow.trainers.driving.argoverse import batch_tracks

    parts: list[dict[str, np.ndarray]] = []
    scenario = 0
    for batch in manifest.iter_batches(split, columns=_COLUMNS, batch_size=256):
        types = batch.column("track_types").to_pylist()
        for tracks, track_types in zip(batch_tracks(batch), types, strict=True):
            part = scenario_samples(tracks, np.asarray(track_types), focal_only=focal_only,
                                    max_neighbours=max_neighbours, neighbours_seen=neighbours_seen)
            part["scenario"] = np.full(len(part["history"]), scenario, dtype=np.int64)
            parts.append(part)
            scenario += 1
    if not parts or sum(len(p["history"]) for p in parts) == 0:
        raise ValueError(f"{manifest.uri}: split {split!r} has no forecasting sample")
    samples = ForecastSamples(
        **{f.name: np.concatenate([p[f.name] for p in parts]) for f in dataclasses.fields(ForecastSamples)}
    )
    log.info("%s: %d samples from %d scenarios (%d focal)", split, len(samples), scenario, int(samples.is_agent.sum()))
    return samples


def _flat_list(batch: dict, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A list column of a loader batch as flat values + offsets (the loader gives a 2-D tensor
    instead when every list of the batch has the same length)."""
    values = np.asarray(batch[name])
    if f"{name}_offsets" in batch:
        return values, np.asarray(batch[f"{name}_offsets"], dtype=np.int64)
    rows, width = values.shape
    return values.reshape(-1), np.arange(rows + 1, dtype=np.int64) * width


def loader_batch_samples(
    batch: dict,
    *,
    focal_only: bool,
    max_neighbours: int,
    min_other_displacement: float = 0.0,
    min_future_frames: int = FUTURE_FRAMES,
    time_shifts: np.ndarray | None = None,
    time_reversed: np.ndarray | None = None,
    neighbours_seen: str = "last",
) -> tuple[ForecastSamples, np.ndarray]:
    """The samples of a :class:`trainflow.trainers.loader.ShardLoader` batch of scenario rows.

    Args:
        batch: Columns ``num_tracks``, ``tracks_xy`` + ``tracks_xy_offsets``, ``track_types`` +
            ``track_types_offsets``, ``row_index`` and optionally ``sample_mask``.
        focal_only, max_neighbours, min_future_frames, neighbours_seen: As :func:`scenario_samples`.
        min_other_displacement: Leave out tracks other than the AGENT that move less than this
            (m, first to last frame).
        time_shifts: Per scenario row, frames to move the scene's clock forward before
            cutting it (augmentation: the 20 history frames start that much later and the
            future's last frames are unobserved; pairs with ``min_future_frames`` < 30).
        time_reversed: Per scenario row, True to play the scene backwards (augmentation: every
            track's 50 frames in reverse order, so a track's last 20 frames, reversed, are its
            history and its first 30 its future; applied before ``time_shifts``).

    Returns:
        The samples (``scenario`` is the scenario's row index in the split) and a bool array,
        per sample, False where the scenario is a padding row of the epoch's tail.
    """
    counts = np.asarray(batch["num_tracks"]).astype(np.int64)
    values, offsets = _flat_list(batch, "tracks_xy")
    types, type_offsets = _flat_list(batch, "track_types")
    rows = np.asarray(batch["row_index"], dtype=np.int64)
    mask = np.asarray(batch["sample_mask"], dtype=bool) if "sample_mask" in batch else np.ones(len(rows), bool)
    frames = HISTORY_FRAMES + FUTURE_FRAMES
    parts: list[dict[str, np.ndarray]] = []
    for i in range(len(counts)):
        tracks = values[offsets[i] : offsets[i + 1]].reshape(int(counts[i]), frames, 2)
        if time_reversed is not None and time_reversed[i]:
            tracks = tracks[:, ::-1]
        if time_shifts is not None and time_shifts[i] > 0:
            shift = int(time_shifts[i])
            tracks = np.concatenate([tracks[:, shift:], np.full((len(tracks), shift, 2), np.nan, tracks.dtype)], axis=1)
        part = scenario_samples(tracks, types[type_offsets[i] : type_offsets[i + 1]], focal_only=focal_only,
                                max_neighbours=max_neighbours, min_future_frames=min_future_frames,
                                neighbours_seen=neighbours_seen)
        if min_other_displacement > 0:
            # Parked cars teach little about forecasting the (moving) focal vehicles; a track
            # with a partial future is measured to its last observed position.
            seen = np.isfinite(part["future"]).all(axis=-1)
            last_seen = np.where(seen.any(axis=1), seen.shape[1] - 1 - np.argmax(seen[:, ::-1], axis=1), 0)
            end = part["future"][np.arange(len(seen)), last_seen]
            travelled = np.nan_to_num(np.linalg.norm(end - part["history"][:, 0], axis=-1))
            keep = part["is_agent"] | (travelled >= min_other_displacement)
            part = {k: v[keep] for k, v in part.items()}
        part["scenario"] = np.full(len(part["history"]), rows[i], dtype=np.int64)
        part["valid"] = np.full(len(part["history"]), mask[i])
        parts.append(part)
    names = [f.name for f in dataclasses.fields(ForecastSamples)]
    samples = ForecastSamples(**{name: np.concatenate([p[name] for p in parts]) for name in names})
    return samples, np.concatenate([p["valid"] for p in parts])
