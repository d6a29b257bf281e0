"""Property-based tests of the raw readers on messy input: every input either parses into
well-formed records or fails with an error that names the file (and the line where there is
one); bad rows are never silently turned into data."""

from __future__ import annotations

import io
import math

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trainflow.tasks.datasets.textio import SourceFormatError
from trainflow.trainers.driving import argoverse
from trainflow.trainers.recommendation import movielens

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

field = st.one_of(st.integers(-5, 10**6).map(str), st.sampled_from(["", "nan", "inf", "-1.5", "abc", "3.0", " 7 "]),
                  st.text(alphabet="0123456789.,:\t eE-", max_size=6))


@PROPS
@given(st.lists(st.lists(field, min_size=0, max_size=6), min_size=0, max_size=30),
       st.sampled_from(["u.data", "ratings.dat", "ratings.csv"]))
@example(rows=[["0", "0", "0", ""]], name="u.data")  # found by Hypothesis: an empty timestamp read as null
def test_ratings_reader_parses_or_names_file_and_line(rows, name):
    sep = {"u.data": "\t", "ratings.dat": "::", "ratings.csv": ","}[name]
    header = "userId,movieId,rating,timestamp\n" if name.endswith(".csv") else ""
    text = header + "".join(sep.join(r) + "\n" for r in rows)
    bad: list[tuple[int, str]] = []
    try:
        batches = list(movielens.read_ratings(io.BytesIO(text.encode()), name,
                                              on_bad_row=lambda line, row: bad.append((line, row))))
    except SourceFormatError as exc:
        assert name in str(exc)
        assert "line" in str(exc) or "no data rows" in str(exc)
        return
    table = pa.Table.from_batches(batches)
    assert table.num_rows + len(bad) <= len(rows)
    assert table.num_rows > 0
    for column in ("user_id", "item_id", "timestamp"):
        assert pa.types.is_integer(table.schema.field(column).type)
        assert table.column(column).null_count == 0
    first_data_line = 2 if header else 1
    assert all(first_data_line <= line <= len(rows) + first_data_line - 1 for line, _ in bad)


def _scenario(agent_frames: int, bad_agent: str | None, others: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    lines = [",".join(argoverse.HEADER)]
    for t in range(agent_frames):
        x = f"{rng.normal() * 10:.3f}"
        if bad_agent is not None and t == agent_frames // 2:
            x = bad_agent
        ts = f"{315970000 + t * 0.1:.1f}"
        lines.append(f"{ts},agent,AGENT,{x},{rng.normal() * 10:.3f},MIA")
        lines.append(f"{ts},av,AV,{rng.normal():.3f},{rng.normal():.3f},MIA")
        for o in range(others):
            if rng.random() < 0.7:
                value = rng.choice(["nan", "inf", f"{rng.normal():.2f}"], p=[0.1, 0.1, 0.8])
                lines.append(f"{ts},other-{o},OTHERS,{value},{rng.normal():.3f},MIA")
    order = rng.permutation(len(lines) - 1) + 1
    return ("\n".join([lines[0], *(lines[i] for i in order)]) + "\n").encode()


@PROPS
@given(st.sampled_from([0, 1, 20, 49, 50, 51, 80]), st.sampled_from([None, "nan", "inf", "-inf"]),
       st.integers(0, 4), st.integers(0, 10_000))
def test_argoverse_scenarios_parse_or_are_rejected_with_a_reason(agent_frames, bad_agent, others, seed):
    data = _scenario(agent_frames, bad_agent, others, seed)
    try:
        record = argoverse.parse_sequence(data, seq_id="s", file_label="s.csv")
    except argoverse.SequenceRejected as exc:
        assert str(exc).startswith("s.csv: ")
        expected = "no_agent" if agent_frames == 0 else ("agent_frames" if agent_frames != 50 else "non_finite")
        assert exc.reason == expected
        return
    assert agent_frames == 50 and bad_agent is None  # only a complete, finite AGENT becomes a sample
    xy = record["tracks_xy"]
    assert xy.shape[1:] == (50, 2) and xy.dtype == np.float32
    assert np.isfinite(xy[0]).all()  # the AGENT: every frame observed and finite
    assert not np.isinf(xy).any()  # other tracks' bad values became "not observed" (NaN)
    assert record["track_types"][0] == argoverse.TRACK_AGENT and record["track_types"][1] == argoverse.TRACK_AV
    assert np.all(np.diff(record["timestamps"]) > 0)


@PROPS
@given(st.binary(max_size=300))
def test_argoverse_garbage_is_a_format_error_naming_the_file(data):
    try:
        record = argoverse.parse_sequence(b"TIMESTAMP,TRACK_ID,OBJECT_TYPE,X,Y,CITY_NAME\n" + data, seq_id="g",
                                          file_label="g.csv")
    except (SourceFormatError, argoverse.SequenceRejected) as exc:
        assert "g.csv" in str(exc)
        return
    assert math.isfinite(float(record["tracks_xy"][0].sum()))


@pytest.mark.parametrize("name,text,line", [
    ("u.data", "1\t2\t3\t100\n1\t3\t4\t\n", 2),
    ("ratings.dat", "1::2::3::100\n1::3::4::NA\n", 2),
    ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,100\n,3,4,101\n", 3),
])
def test_an_empty_id_or_timestamp_names_file_and_line(name, text, line):
    with pytest.raises(SourceFormatError, match=rf"{name}, line {line}: (timestamp|user_id) is empty or not a number"):
        list(movielens.read_ratings(io.BytesIO(text.encode()), name))
