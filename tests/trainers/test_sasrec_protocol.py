"""SASRec sequence files (``user item`` lines in time order) and the SASRec split protocol."""

from __future__ import annotations

import numpy as np
import pytest

from trainflow.tasks.datasets.sources import SourceNotFoundError
from trainflow.tasks.datasets.textio import SourceFormatError
from trainflow.tasks.manifest import load_manifest
from trainflow.tasks.settings import Settings
from trainflow.tasks.sharding import ShardingConfig, shard_dataset
from trainflow.trainers.recommendation.sources import (
    SASREC_PROTOCOL,
    SEQUENCE_READER,
    resolve_recommendation_source,
)
from trainflow.trainers.recommendation.split import SASREC_MIN_INTERACTIONS, SASREC_NEGATIVES

NUM_ITEMS = 300


def _sequences(seed: int = 0, num_users: int = 40) -> dict[int, list[int]]:
    """User id -> items in time order; lengths 1..12, so some users are train-only."""
    rng = np.random.default_rng(seed)
    out = {}
    for user in range(1, num_users + 1):
        length = int(rng.integers(1, 13))
        out[user] = [int(x) for x in rng.choice(np.arange(1, NUM_ITEMS + 1), size=length, replace=False)]
    return out


def _write(path, sequences: dict[int, list[int]], interleave: bool = True) -> None:
    """Lines in time order per user; users interleaved (round robin) to show that only each
    user's own order matters."""
    lines = []
    if interleave:
        queues = {u: list(items) for u, items in sequences.items()}
        while any(queues.values()):
            for user, items in queues.items():
                if items:
                    lines.append(f"{user} {items.pop(0)}")
    else:
        lines = [f"{u} {i}" for u, items in sequences.items() for i in items]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings.from_env({"TRAINFLOW_DATA_DIR": str(tmp_path / "store")})


def test_a_sequence_file_or_its_folder_resolves_to_the_sasrec_reader(tmp_path, settings):
    folder = tmp_path / "games"
    folder.mkdir()
    _write(folder / "Video.txt", {1: [5, 6, 7], 2: [9]})
    (folder / "SOURCE.md").write_text("notes")
    by_folder = resolve_recommendation_source(str(folder), settings)
    by_file = resolve_recommendation_source((folder / "Video.txt").as_uri(), settings)
    for source in (by_folder, by_file):
        assert source.reader == SEQUENCE_READER and source.split_protocol == SASREC_PROTOCOL
        assert source.default_name == "games"
        rows = [b.to_pydict() for b in source.open_interactions()]
        assert rows[0]["user_id"] == [1, 2, 1, 1] and rows[0]["item_id"] == [5, 9, 6, 7]
        assert rows[0]["timestamp"] == [0, 1, 2, 3] and rows[0]["rating"] == [1.0] * 4
    assert by_folder.fingerprint == by_file.fingerprint
    # MovieLens sources keep the NCF protocol.
    (tmp_path / "ml").mkdir()
    (tmp_path / "ml" / "u.data").write_text("1\t2\t5\t100\n")
    assert resolve_recommendation_source(str(tmp_path / "ml"), settings).split_protocol == "ncf"


def test_bad_sequence_files_are_named(tmp_path, settings):
    (tmp_path / "two").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp_path / "two" / name).write_text("1 2\n")
    with pytest.raises(SourceNotFoundError, match=r"2 \*\.txt files: name one"):
        resolve_recommendation_source(str(tmp_path / "two"), settings)
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2\n1 x\n")
    with pytest.raises(SourceFormatError, match=r"bad\.txt, line 2"):
        list(resolve_recommendation_source(str(bad), settings).open_interactions())
    short = tmp_path / "short.txt"
    short.write_text("1 2\n1 2 3\n1 4\n")
    source = resolve_recommendation_source(str(short), settings)
    assert sum(b.num_rows for b in source.open_interactions()) == 2
    assert [(f, line) for f, line, _ in source.bad_rows] == [("short.txt", 2)]


def test_sasrec_protocol_holds_out_the_last_two_with_negatives_outside_train(tmp_path, settings):
    sequences = _sequences()
    path = tmp_path / "seq" / "Video.txt"
    path.parent.mkdir()
    _write(path, sequences)
    summary = shard_dataset(str(path.parent), "recommendation", config=ShardingConfig(row_group_rows=64),
                            settings=settings)
    manifest = load_manifest(summary["manifest_uri"], settings)
    stats = manifest.stats
    assert "SASRec" in stats["split_protocol"] and stats["num_negatives"] == SASREC_NEGATIVES
    assert stats["num_interactions"] == sum(len(v) for v in sequences.values())
    users = manifest.read_table("train", ["user_id"]).column("user_id").to_numpy()
    held = {u for u, items in sequences.items() if len(items) >= SASREC_MIN_INTERACTIONS}
    assert 0 < len(held) < len(sequences)  # both kinds of user are in the data
    train = manifest.read_table("train", ["user_id", "item_id", "item_idx", "is_valid"]).to_pydict()
    train_by_user: dict[int, list[int]] = {}
    valid_rows = {}
    for user, item, flag in zip(train["user_id"], train["item_id"], train["is_valid"]):
        train_by_user.setdefault(user, []).append(item)
        if flag:
            valid_rows[user] = item
    for split, position in (("valid", -2), ("eval", -1)):
        table = manifest.read_table(split, ["user_id", "item_id", "neg_item_id"]).to_pydict()
        assert sorted(table["user_id"]) == sorted(held)
        for user, item, negatives in zip(table["user_id"], table["item_id"], table["neg_item_id"]):
            assert item == sequences[user][position]
            assert len(negatives) == len(set(negatives)) == SASREC_NEGATIVES
            train_items = set(sequences[user][:-2])
            assert not (set(negatives) & train_items) and item not in negatives
    # Train: every interaction but the eval one; the valid one flagged (a trainer leaves it out).
    for user, items in sequences.items():
        expected = items[:-1] if user in held else items
        assert sorted(train_by_user.get(user, [])) == sorted(expected)
        assert valid_rows.get(user) == (items[-2] if user in held else None)
    assert set(np.unique(users)) == set(sequences)


def test_amazon_games_shards_to_the_papers_protocol(settings):
    """The real Amazon Games file of the SASRec paper (../shared/data, skipped when absent)."""
    from tests.conftest import shared_dataset

    folder = shared_dataset("sasrec_amazon_games")
    counts: dict[int, int] = {}
    last: dict[int, int] = {}
    for line in (folder / "Video.txt").read_text().split("\n"):
        if line:
            user, item = map(int, line.split())
            counts[user] = counts.get(user, 0) + 1
            last[user] = item
    summary = shard_dataset(str(folder), "recommendation", settings=settings)
    manifest = load_manifest(summary["manifest_uri"], settings)
    stats = manifest.stats
    assert (stats["num_interactions"], stats["num_users"], stats["num_items"]) == (287_107, 31_013, 23_715)
    held = sum(c >= SASREC_MIN_INTERACTIONS for c in counts.values())
    assert manifest.num_rows("eval") == manifest.num_rows("valid") == held
    assert manifest.num_rows("train") == 287_107 - held
    eval_rows = manifest.read_table("eval", ["user_id", "item_id"]).to_pydict()
    assert all(last[u] == i for u, i in zip(eval_rows["user_id"], eval_rows["item_id"]))
