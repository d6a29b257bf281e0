"""Recommendation family: metrics, sampling, rank partitioning, models, a short training run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.conftest import shared_dataset
from trainflow.tasks.metrics import hit_ratio, ndcg, rank_of_positive, ranking_metrics
from trainflow.trainers.distributed import World
from trainflow.trainers.recommendation import RecommendationConfig, RecommendationFamily
from trainflow.trainers.recommendation.data import (
    PositiveFilter,
    UserHistories,
    history_windows,
    sample_negatives,
)

NUM_USERS, NUM_ITEMS = 30, 150
TOY_SOURCE = f"synthetic://recommendation?num_interactions=500&num_users={NUM_USERS}&num_items={NUM_ITEMS}"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest and does not fight other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def toy_manifest(tmp_path_factory):
    """A committed recommendation dataset of 30 users, 150 items, ~500 interactions, sharded
    into small row groups so the loader has several windows to stream."""
    from trainflow.tasks.manifest import load_manifest
    from trainflow.tasks.sharding import ShardingConfig, shard_dataset

    data_dir = tmp_path_factory.mktemp("rec") / "tfdata"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRAINFLOW_DATA_DIR", str(data_dir))
        mp.delenv("TRAINFLOW_STORAGE_ROOT", raising=False)
        uri = shard_dataset(TOY_SOURCE, "recommendation",
                            config=ShardingConfig(row_group_rows=64, num_negatives=20))["manifest_uri"]
        yield load_manifest(uri)


def train_rows(manifest) -> dict[str, np.ndarray]:
    """The whole train split (the tests' reference; the family never reads it whole)."""
    table = manifest.read_table("train", columns=["user_idx", "item_idx", "timestamp", "is_valid"])
    return {c: table.column(c).to_numpy() for c in table.column_names}


def user_sequences(manifest, include_valid: bool) -> dict[int, list[int]]:
    """Each user's train items in time order (ties by item id)."""
    rows = train_rows(manifest)
    keep = np.ones(len(rows["user_idx"]), bool) if include_valid else ~rows["is_valid"]
    u, i, ts = rows["user_idx"][keep], rows["item_idx"][keep], rows["timestamp"][keep]
    order = np.lexsort((i, ts, u))
    out: dict[int, list[int]] = {}
    for user, item in zip(u[order].tolist(), i[order].tolist(), strict=True):
        out.setdefault(user, []).append(item)
    return out


def make_family(manifest, model: str = "gmf", rank: int = 0, world_size: int = 1, **overrides) -> RecommendationFamily:
    defaults = dict(model=model, gmf_factors=8, mlp_layers=(16, 8), hidden_size=16, max_seq_len=8, dropout=0.0)
    config = RecommendationConfig(**{**defaults, **overrides})
    return RecommendationFamily(config, manifest, World(rank=rank, world_size=world_size))


# --- metrics ------------------------------------------------------------------------------
def test_metrics_on_hand_made_scores():
    pos = np.array([0.9, 0.5, 0.1])
    neg = np.array([[0.1, 0.2, 0.3], [0.6, 0.4, 0.7], [0.2, 0.3, 0.4]])
    ranks = rank_of_positive(pos, neg)
    assert ranks.tolist() == [0, 2, 3]
    assert hit_ratio(ranks, 1) == pytest.approx(1 / 3)
    assert hit_ratio(ranks, 3) == pytest.approx(2 / 3)
    assert ndcg(ranks, 3) == pytest.approx((1.0 + 1 / math.log2(4)) / 3)
    m = ranking_metrics(ranks, 10)
    assert m["hr_at_10"] == 1.0
    assert m["ndcg_at_10"] == pytest.approx((1.0 + 1 / math.log2(4) + 1 / math.log2(5)) / 3)
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 4) / 3)


def test_ties_and_nan_never_favour_the_positive():
    pos = np.zeros(2)
    neg = np.zeros((2, 99))
    ranks = rank_of_positive(pos, neg)
    assert ranks.tolist() == [99, 99]  # all equal: the positive is last, HR@10 = 0
    assert hit_ratio(ranks, 10) == 0.0
    assert rank_of_positive(np.array([1.0]), np.array([[1.0, 0.0, 2.0]])).tolist() == [2]
    assert rank_of_positive(np.array([np.nan]), np.array([[0.0, 1.0]])).tolist() == [2]
    assert rank_of_positive(np.array([0.5]), np.array([[np.nan, 1.0]])).tolist() == [1]


# --- data -------------------------------------------------------------------------------
def test_positive_filter_has_no_false_negatives_and_few_false_positives():
    rng = np.random.default_rng(0)
    users, items = rng.integers(0, 5000, 50_000), rng.integers(0, 3000, 50_000)
    bloom = PositiveFilter(3000, 50_000)
    bloom.add(users, items)
    assert bloom.contains(users, items).all()
    others = rng.integers(0, 3000, 50_000)
    fresh = ~np.isin(users * 3000 + others, users * 3000 + items)
    assert bloom.contains(users[fresh], others[fresh]).mean() < 0.01
    assert bloom.nbytes == (1 << 20) // 8  # 16 bits a key, a power of two
    assert PositiveFilter(3000, 10**9, max_bytes=1 << 20).nbytes == 1 << 20  # capped: size does not follow the keys


def test_negative_sampling_is_deterministic_and_excludes_positives():
    bloom = PositiveFilter(NUM_ITEMS, 300)
    pos_users = np.repeat(np.arange(NUM_USERS), 10)
    pos_items = (pos_users * 7 + np.tile(np.arange(10), NUM_USERS)) % NUM_ITEMS
    bloom.add(pos_users, pos_items)
    users = np.repeat(np.arange(NUM_USERS), 50)
    a = sample_negatives(np.random.default_rng(7), users, 4, bloom, NUM_ITEMS)
    b = sample_negatives(np.random.default_rng(7), users, 4, bloom, NUM_ITEMS)
    c = sample_negatives(np.random.default_rng(8), users, 4, bloom, NUM_ITEMS)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    positive = set(zip(pos_users.tolist(), pos_items.tolist(), strict=True))
    assert not any((u, i) in positive for u, row in zip(users.tolist(), a.tolist(), strict=True) for i in row)
    assert a.min() >= 0 and a.max() < NUM_ITEMS


def test_history_windows_cover_every_target_once_from_the_end():
    windows = history_windows(np.array([0, 1, 2, 9, 4]), 3)
    assert windows.tolist() == [[2, 1, 2], [3, 6, 9], [3, 3, 6], [3, 1, 3], [4, 1, 4]]


def test_histories_without_the_valid_item_close_the_gap():
    h = UserHistories(np.array([[0, 3, 4, 5], [1, 2, 3, 4]], np.int32), np.array([[0, 0, 0, 1], [0, 0, 0, 0]], bool))
    assert h.sequences(include_valid=False).tolist() == [[0, 0, 3, 4], [1, 2, 3, 4]]
    assert h.latest(2, include_valid=True).tolist() == [[4, 5], [3, 4]]
    assert h.latest(6, include_valid=False).tolist() == [[0, 0, 0, 0, 3, 4], [0, 0, 1, 2, 3, 4]]


def test_family_histories_match_the_split_in_time_order(toy_manifest):
    fam = make_family(toy_manifest, "sasrec", max_seq_len=4, history_windows=2)
    everything, without_valid = user_sequences(toy_manifest, True), user_sequences(toy_manifest, False)
    for user in range(NUM_USERS):
        expect = (np.asarray(everything.get(user, []), dtype=np.int64)[-4:] + 1).tolist()
        row = fam._history_table("eval")[user].tolist()
        assert row[len(row) - len(expect):] == expect and not any(row[: len(row) - len(expect)])
        expect = (np.asarray(without_valid.get(user, []), dtype=np.int64)[-4:] + 1).tolist()
        row = fam._history_table("valid")[user].tolist()
        assert row[len(row) - len(expect):] == expect
    valid = fam.holdout("valid")
    assert (fam._history_table("eval")[valid["users"], -1] == valid["candidates"][:, 0] + 1).all()
    model = fam.build_model()
    assert torch.equal(model.histories, torch.from_numpy(fam._history_table("eval")))


def test_train_batches_are_deterministic_and_resampled_each_epoch(toy_manifest):
    fam = make_family(toy_manifest, "gmf")
    first = list(fam.train_batches(0, 16))
    again = list(fam.train_batches(0, 16))
    other = list(fam.train_batches(1, 16))
    assert all(torch.equal(x["items"], y["items"]) for x, y in zip(first, again, strict=True))
    assert not torch.equal(first[0]["items"], other[0]["items"])
    resumed = list(fam.train_batches(0, 16, skip_batches=3))
    assert len(resumed) == len(first) - 3
    assert all(torch.equal(x["items"], y["items"]) for x, y in zip(first[3:], resumed, strict=True))
    # the training positives (the valid rows are not, as they are no training targets here)
    positive = {(u, i) for u, items in user_sequences(toy_manifest, include_valid=False).items() for i in items}
    for batch in first:
        negs = batch["items"][:, 1:]
        assert negs.shape[1] == 4
        assert not any((u, i) in positive for u, row in zip(batch["users"].tolist(), negs.tolist(), strict=True)
                       for i in row)


def _covered(batches, model):
    seen = []
    for b in batches:
        if model == "sasrec":
            seen += [int(v) - 1 for v in b["pos"][b["pos"] > 0]]
        else:
            seen += list(zip(b["users"].tolist(), b["items"][:, 0].tolist(), strict=True))
    return seen


@pytest.mark.parametrize("model", ["neumf", "sasrec"])
def test_two_ranks_cover_positives_exactly_once(toy_manifest, model):
    ranks = [make_family(toy_manifest, model, rank=r, world_size=2, history_windows=4) for r in range(2)]
    batches = [list(f.train_batches(0, 8)) for f in ranks]
    assert len(batches[0]) == len(batches[1]) > 1
    seen = _covered(batches[0], model) + _covered(batches[1], model)
    sequences = user_sequences(toy_manifest, include_valid=False)
    if model == "neumf":
        expected = [(u, i) for u, items in sequences.items() for i in items]
    else:
        # every train interaction but each user's first is a target once, among each user's
        # latest history_windows (4) x max_seq_len (8) (max_seq_len < most histories)
        assert max(len(v) for v in sequences.values()) > 33
        expected = [i for items in sequences.values() for i in items[1:][-32:]]
    assert sorted(seen) == sorted(expected)
    assert ranks[0].num_train_samples(0) == ranks[1].num_train_samples(0)


def test_a_rank_never_materialises_the_whole_split(toy_manifest):
    """Each rank's training rows per epoch are its share (about N / 2 of 2 ranks); what the
    family keeps is sized by users (and a fixed filter), with no array of the split's length."""
    n = toy_manifest.num_rows("train")
    assert n > 4 * NUM_USERS
    for model in ("neumf", "sasrec"):
        for rank in range(2):
            fam = make_family(toy_manifest, model, rank=rank, world_size=2)
            if model == "neumf":
                loader = fam.train_loader(8)
                handed = sum(len(b["users"]) for b in fam.train_batches(0, 8))
                assert loader.num_batches() * 8 == -(-n // 16) * 8  # rows streamed to this rank: half, padded
                assert handed <= loader.num_batches() * 8 < n
            held = [v for v in vars(fam).values() if isinstance(v, np.ndarray)]
            held += [fam.histories.items, fam.histories.is_valid] if fam.histories is not None else []
            assert all(len(a) < n for a in held), [a.shape for a in held]
            assert fam.scan_rows == n  # read once, streamed, when the family started


def test_sasrec_keeps_only_the_latest_windows_of_long_histories(toy_manifest):
    fam = make_family(toy_manifest, "sasrec", max_seq_len=2, history_windows=1)
    seen = _covered(fam.train_batches(0, 8), "sasrec")
    sequences = user_sequences(toy_manifest, include_valid=False)
    assert sorted(seen) == sorted(i for items in sequences.values() for i in items[1:][-2:])
    assert fam.histories.keep == 4


def test_valid_rows_are_left_out_unless_asked(toy_manifest):
    fam = make_family(toy_manifest, "gmf")
    n, valid = toy_manifest.num_rows("train"), toy_manifest.num_rows("valid")
    assert fam.num_train_samples(0) == n - valid == sum(len(b["users"]) for b in fam.train_batches(0, 16))
    refit = make_family(toy_manifest, "gmf", train_on_valid=True)
    assert refit.num_train_samples(0) == n == sum(len(b["users"]) for b in refit.train_batches(0, 16))
    assert refit.trains_on_valid and not fam.trains_on_valid  # the loop then keeps the last epoch


# --- models -----------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["gmf", "mlp", "neumf", "sasrec"])
def test_forward_shapes_and_fsdp_modules(toy_manifest, model):
    fam = make_family(toy_manifest, model)
    net = fam.build_model()
    batch = next(iter(fam.train_batches(0, 5)))
    if model == "sasrec":
        assert batch["seq"].shape == (5, 8) and batch["neg"].shape == (5, 8, 4)
        assert net(seq=batch["seq"], items=batch["neg"]).shape == (5, 8, 4)
        assert net(users=torch.arange(3), items=torch.ones(3, 7, dtype=torch.long)).shape == (3, 7)
    else:
        assert batch["items"].shape == (5, 5)
        assert net(batch["users"], batch["items"]).shape == (5, 5)
    assert fam.loss(net, batch).dim() == 0
    embeddings = fam.fsdp_modules(net)
    assert embeddings and all(isinstance(m, torch.nn.Embedding) for m in embeddings)
    scores = fam.score(net, "eval", np.arange(4), fam.holdout("eval")["candidates"][:4])
    assert scores.shape == (4, 21)
    assert fam.build_model().state_dict().keys() == net.state_dict().keys()
    torch.testing.assert_close(fam.build_model().state_dict(), make_family(toy_manifest, model).build_model().state_dict())


def test_neumf_initialises_from_pretrained_gmf_and_mlp(toy_manifest, tmp_path):
    gmf, mlp = make_family(toy_manifest, "gmf").build_model(), make_family(toy_manifest, "mlp").build_model()
    torch.save(gmf.state_dict(), tmp_path / "gmf.pt")
    torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
    fam = make_family(toy_manifest, "neumf", pretrained_gmf=str(tmp_path / "gmf.pt"), pretrained_mlp=str(tmp_path / "mlp.pt"))
    net = fam.build_model()
    assert torch.equal(net.gmf.user_embedding.weight, gmf.user_embedding.weight)
    assert torch.equal(net.output.weight[:, :8], 0.5 * gmf.output.weight)
    users, items = torch.arange(4), torch.arange(12).view(4, 3)
    # with alpha = 0.5 NeuMF's logit is the mean of the two pre-trained models' logits
    torch.testing.assert_close(net(users, items), 0.5 * (gmf(users, items) + mlp(users, items)))


@pytest.mark.parametrize("model", ["neumf", "sasrec"])
@pytest.mark.parametrize("loss", ["bce", "softmax"])
def test_loss_is_the_chosen_one_over_real_positions_only(toy_manifest, model, loss):
    fam = make_family(toy_manifest, model, loss=loss, num_negatives=6)
    net = fam.build_model()
    net.eval()
    batch = next(iter(fam.train_batches(0, 8)))
    with torch.no_grad():
        if model == "sasrec":
            real = batch["pos"] > 0
            assert bool(real.any()) and not bool(real.all())  # the windows are left-padded
            hidden = net.encode(batch["seq"])  # (B, L, d), by hand from here
            table = net.item_embedding.weight
            if loss == "softmax":  # 6 negatives a window, the same at each of its positions
                assert batch["neg"].shape == (8, 6)
                negs = batch["neg"].unsqueeze(1).expand(-1, batch["pos"].shape[1], -1)
            else:
                assert batch["neg"].shape == (8, 8, 6)
                negs = batch["neg"]
            items = torch.cat([batch["pos"].unsqueeze(-1), negs], dim=-1)
            logits = torch.einsum("bld,blkd->blk", hidden, table[items])[real].double()
            # a negative is never one of the user's positives (the window's items among them)
            targets = batch["pos"].masked_fill(~real, -1)[:, None, None, :]  # (B, 1, 1, L)
            assert not (negs.unsqueeze(-1) == targets).any()
        else:
            logits = net(batch["users"], batch["items"]).double()
        assert logits.shape[1] == 7
        if loss == "bce":  # every candidate on its own: the positive's label 1, the negatives' 0
            by_hand = -(torch.log(torch.sigmoid(logits[:, 0])).sum() + torch.log(1 - torch.sigmoid(logits[:, 1:])).sum())
            by_hand = by_hand / logits.numel()
        else:  # the positive against its negatives
            by_hand = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
        got = fam.loss(net, batch).double()
    torch.testing.assert_close(got, by_hand, rtol=1e-5, atol=1e-6)
    # a softmax and a BCE over the same logits differ: the option is not ignored
    other = make_family(toy_manifest, model, loss="bce" if loss == "softmax" else "softmax", num_negatives=6)
    with torch.no_grad():
        assert abs(other.loss(net, batch).item() - got.item()) > 1e-3


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="model"):
        RecommendationConfig(model="bpr")
    with pytest.raises(ValueError, match="num_negatives"):
        RecommendationConfig(num_negatives=0)
    with pytest.raises(ValueError, match="num_heads"):
        RecommendationConfig(hidden_size=10, num_heads=3)
    with pytest.raises(ValueError, match="loss must be one of bce, softmax"):
        RecommendationConfig(loss="bpr")
    with pytest.raises(ValueError, match="pretrained"):
        RecommendationConfig(model="gmf", pretrained_gmf="a", pretrained_mlp="b")


@pytest.mark.parametrize("model", ["neumf", "sasrec"])
def test_short_training_reduces_loss_and_evaluates(toy_manifest, model):
    torch.manual_seed(0)
    fam = make_family(toy_manifest, model)
    net = fam.build_model()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)

    def epoch_loss() -> float:
        with torch.no_grad():
            net.eval()
            losses = [fam.loss(net, b).item() for b in fam.train_batches(0, 32)]
            net.train()
        return float(np.mean(losses))

    before = epoch_loss()
    for epoch in range(15):
        for batch in fam.train_batches(epoch, 32):
            loss = fam.loss(net, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert epoch_loss() < 0.8 * before
    metrics = fam.evaluate(net, "valid")
    assert set(metrics) >= {"hr_at_10", "ndcg_at_10", "loss", "mrr"}
    assert 0.0 <= metrics["ndcg_at_10"] <= metrics["hr_at_10"] <= 1.0
    assert fam.selection_metric() == ("ndcg_at_10", "max")
    exported = fam.export_config()
    assert exported["model"] == model and exported["num_items"] == toy_manifest.stats["num_items"]


# --- through a manifest -------------------------------------------------------------------
def test_family_on_a_synthetic_manifest(tf_env):
    from trainflow.tasks.manifest import load_manifest
    from trainflow.tasks.sharding import shard_dataset

    uri = shard_dataset("synthetic://recommendation?num_interactions=5000&num_items=400", "recommendation")["manifest_uri"]
    manifest = load_manifest(uri)
    fam = RecommendationFamily(RecommendationConfig(model="sasrec", max_seq_len=16, hidden_size=16), manifest, World())
    assert fam.num_users == manifest.stats["num_users"]
    assert fam.num_train_samples(0) == len(history_windows((fam._sequences > 0).sum(axis=1), 16))
    metrics = fam.evaluate(fam.build_model(), "eval")
    assert metrics["num_users"] == manifest.num_rows("eval")


def test_real_ml100k_split_histories(tf_env):
    from trainflow.tasks.manifest import load_manifest
    from trainflow.tasks.sharding import shard_dataset

    source = shared_dataset("ncf_movielens_100k")
    manifest = load_manifest(shard_dataset(str(source), "recommendation")["manifest_uri"])
    fam = RecommendationFamily(RecommendationConfig(model="sasrec"), manifest, World())
    assert fam.num_train_samples(0) >= 943 and fam.scan_rows == 99057
    # the eval item comes after the whole history, the valid item last in it
    valid = fam.holdout("valid")
    assert (fam._history_table("eval")[valid["users"], -1] == valid["candidates"][:, 0] + 1).all()
    eval_items = fam.holdout("eval")["candidates"]
    assert eval_items.shape == (943, 100)


# --- entry point --------------------------------------------------------------------------
def test_entry_point_shortcuts():
    from trainflow.trainers.recommendation.__main__ import expand_shortcuts

    argv = ["--manifest-uri", "file:///m", "--model=neumf", "--epochs", "3", "--family.num_negatives=2"]
    assert expand_shortcuts(argv) == [
        "--train.manifest_uri=file:///m",
        "--family.model=neumf",
        "--train.epochs=3",
        "--family.num_negatives=2",
    ]


def test_generic_loop_trains_and_exports(tf_env, tmp_path):
    from trainflow.tasks.sharding import shard_dataset
    from trainflow.trainers.config import TrainConfig
    from trainflow.trainers.loop import load_exported_model, run_training

    uri = shard_dataset("synthetic://recommendation?num_interactions=5000&num_items=400", "recommendation")["manifest_uri"]
    run_dir = (tmp_path / "run").as_uri()
    train = TrainConfig(manifest_uri=uri, run_dir=run_dir, epochs=2, batch_size=64, log_to_mlflow=False)
    family = RecommendationConfig(model="sasrec", max_seq_len=16, hidden_size=16)
    result = run_training(RecommendationFamily, family, train)
    assert result["selection_metric"] == {"key": "ndcg_at_10", "mode": "max"}
    assert 0.0 <= result["metrics"]["eval"]["ndcg_at_10"] <= result["metrics"]["eval"]["hr_at_10"] <= 1.0
    state, config = load_exported_model(run_dir)
    assert config["export_config"]["model"] == "sasrec" and config["export_config"]["item_index_offset"] == 1
    assert state["histories"].shape == (config["export_config"]["num_users"], 16)


@pytest.mark.parametrize("loss", ["bce", "softmax"])
@pytest.mark.parametrize("model", ["gmf", "sasrec"])
def test_an_empty_tail_batch_gives_a_zero_loss_with_gradients(toy_manifest, model, loss):
    # the padded tail leaves a high rank an empty last batch when fewer samples than ranks remain
    fam = make_family(toy_manifest, model, loss=loss)
    net = fam.build_model()
    full = next(iter(fam.train_batches(0, 4)))
    empty = {key: value[:0] for key, value in full.items()}
    loss = fam.loss(net, empty)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
