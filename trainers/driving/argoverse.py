"""Argoverse 1 motion-forecasting CSV reader.

Each file is one 5 s scenario sampled at 10 Hz with the header
``TIMESTAMP,TRACK_ID,OBJECT_TYPE,X,Y,CITY_NAME``. It becomes one sequence record:

* ``seq_id``: the file stem; ``city``: ``MIA`` / ``PIT``;
* ``timestamps``: the AGENT's 50 timestamps (seconds);
* ``tracks_xy``: float32 array (num_tracks, 50, 2) in the city frame (metres), NaN where a
  track has no observation at a frame; track 0 is the AGENT, track 1 the AV (ego), then the
  OTHERS in order of first appearance;
* ``track_types``: 0 = AGENT, 1 = AV, 2 = OTHERS.

Scenarios that cannot serve as training or evaluation samples (no AGENT, an AGENT without
exactly the expected frames, non-finite AGENT coordinates) raise :class:`SequenceRejected`
with the reason, which the sharding step counts and reports.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import numpy as np

from trainflow.tasks.datasets.textio import SourceFormatError

log = logging.getLogger(__name__)

READER_VERSION = "1"
HEADER = ["TIMESTAMP", "TRACK_ID", "OBJECT_TYPE", "X", "Y", "CITY_NAME"]
NUM_FRAMES = 50
TRACK_AGENT, TRACK_AV, TRACK_OTHER = 0, 1, 2
_TYPE_CODES = {"AGENT": TRACK_AGENT, "AV": TRACK_AV, "OTHERS": TRACK_OTHER}


class SequenceRejected(ValueError):
    """A scenario that is well-formed CSV but unusable as a sample; ``reason`` is a short key."""

    def __init__(self, file_label: str, reason: str, detail: str) -> None:
        super().__init__(f"{file_label}: {detail}")
        self.reason = reason


def parse_sequence(data: bytes, *, seq_id: str, file_label: str, num_frames: int = NUM_FRAMES) -> dict[str, Any]:
    """Parse one Argoverse CSV file's bytes into a sequence record (see the module doc).

    Raises:
        SourceFormatError: not an Argoverse CSV (wrong header, unparsable values).
        SequenceRejected: a valid file whose AGENT track is unusable.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if not data.strip():
        raise SourceFormatError(f"{file_label}: empty file")
    first_line = data.split(b"\n", 1)[0].decode("utf-8", "replace").strip().split(",")
    if first_line != HEADER:
        raise SourceFormatError(f"{file_label}, line 1: header {first_line!r}, expected {HEADER!r}")
    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            convert_options=pacsv.ConvertOptions(
                column_types={
                    "TIMESTAMP": pa.float64(),
                    "TRACK_ID": pa.string(),
                    "OBJECT_TYPE": pa.string(),
                    "X": pa.float64(),
                    "Y": pa.float64(),
                    "CITY_NAME": pa.string(),
                }
            ),
        )
    except pa.ArrowInvalid as exc:
        raise SourceFormatError(f"{file_label}: {exc}") from None
    ts = table.column("TIMESTAMP").to_numpy()
    track = np.asarray(table.column("TRACK_ID").to_pylist(), dtype=object)
    kind = np.asarray(table.column("OBJECT_TYPE").to_pylist(), dtype=object)
    x = table.column("X").to_numpy(zero_copy_only=False)
    y = table.column("Y").to_numpy(zero_copy_only=False)
    cities = table.column("CITY_NAME").unique().to_pylist()

    agent_rows = np.flatnonzero(kind == "AGENT")
    if agent_rows.size == 0:
        raise SequenceRejected(file_label, "no_agent", "no AGENT track")
    agent_ts = np.unique(ts[agent_rows])
    if agent_ts.size != num_frames or agent_rows.size != num_frames:
        raise SequenceRejected(
            file_label,
            "agent_frames",
            f"AGENT has {agent_rows.size} rows at {agent_ts.size} timestamps, expected {num_frames}",
        )
    if not (np.isfinite(x[agent_rows]).all() and np.isfinite(y[agent_rows]).all()):
        raise SequenceRejected(file_label, "non_finite", "AGENT has NaN or infinite coordinates")

    frame_of = {t: i for i, t in enumerate(agent_ts.tolist())}
    frame = np.array([frame_of.get(t, -1) for t in ts.tolist()], dtype=np.int64)
    # Track order: AGENT, AV, then OTHERS by first appearance.
    order: list[str] = []
    types: list[int] = []
    agent_id = track[agent_rows[0]]
    order.append(agent_id)
    types.append(TRACK_AGENT)
    av_rows = np.flatnonzero(kind == "AV")
    if av_rows.size:
        order.append(track[av_rows[0]])
        types.append(TRACK_AV)
    seen = set(order)
    for tid, k in zip(track.tolist(), kind.tolist()):
        if tid not in seen:
            seen.add(tid)
            order.append(tid)
            types.append(_TYPE_CODES.get(k, TRACK_OTHER))
    index = {tid: i for i, tid in enumerate(order)}
    xy = np.full((len(order), num_frames, 2), np.nan, dtype=np.float32)
    rows = np.flatnonzero(frame >= 0)
    track_idx = np.array([index[t] for t in track[rows].tolist()], dtype=np.int64)
    xy[track_idx, frame[rows], 0] = x[rows]
    xy[track_idx, frame[rows], 1] = y[rows]
    # Non-finite coordinates of other tracks become missing observations.
    xy[~np.isfinite(xy)] = np.nan
    return {
        "seq_id": seq_id,
        "city": cities[0] if len(cities) == 1 else ",".join(sorted(map(str, cities))),
        "timestamps": agent_ts.astype(np.float64),
        "tracks_xy": xy,
        "track_types": np.asarray(types, dtype=np.int8),
    }


def sequence_schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("seq_id", pa.string()),
            ("city", pa.string()),
            ("num_tracks", pa.int32()),
            ("timestamps", pa.list_(pa.float64())),
            # (num_tracks * 50 * 2) float32, row-major (track, frame, xy); NaN = not observed.
            ("tracks_xy", pa.list_(pa.float32())),
            ("track_types", pa.list_(pa.int8())),
        ]
    )


def records_to_batch(records: list[dict[str, Any]]):
    """A RecordBatch of :func:`sequence_schema` from parsed sequence records."""
    import pyarrow as pa

    schema = sequence_schema()
    return pa.RecordBatch.from_arrays(
        [
            pa.array([r["seq_id"] for r in records], pa.string()),
            pa.array([r["city"] for r in records], pa.string()),
            pa.array([r["tracks_xy"].shape[0] for r in records], pa.int32()),
            pa.array([r["timestamps"] for r in records], pa.list_(pa.float64())),
            pa.array([r["tracks_xy"].reshape(-1) for r in records], pa.list_(pa.float32())),
            pa.array([r["track_types"] for r in records], pa.list_(pa.int8())),
        ],
        schema=schema,
    )


def batch_tracks(batch) -> list[np.ndarray]:
    """Per-row (num_tracks, 50, 2) float32 arrays from a batch of :func:`sequence_schema`."""
    counts = batch.column("num_tracks").to_numpy()
    flat = batch.column("tracks_xy")
    offsets = flat.offsets.to_numpy()
    values = flat.values.to_numpy(zero_copy_only=False)
    return [
        values[offsets[i] : offsets[i + 1]].reshape(int(counts[i]), NUM_FRAMES, 2) for i in range(len(counts))
    ]
