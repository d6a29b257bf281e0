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
from trainflow.trainers.recommendation.data import Interactions, is_positive, rank_batches, sample_negatives

NUM_USERS, NUM_ITEMS = 30, 150


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is fastest and does not fight other processes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_interactions(seed: int = 0) -> Interactions:
    """Users with 6-20 interactions that mostly walk forward through the item ids (order has signal)."""
    rng = np.random.default_rng(seed)
    users, items, stamps, valid = [], [], [], []
    for user in range(NUM_USERS):
        n = int(rng.integers(6, 21))
        start = int(rng.integers(0, NUM_ITEMS))
        seq = (start + np.arange(n) * 3) % NUM_ITEMS
        ts = 1000 + np.arange(n) * 10
        ts[1] = ts[0]  # a tie on the timestamp, broken by the item id
        users += [user] * n
        items += list(seq)
        stamps += list(ts)
        flags = np.zeros(n, dtype=bool)
        flags[-1] = True  # the latest train row is the valid one (the eval one is not in train)
        valid += list(flags)
    order = rng.permutation(len(users))  # shards are shuffled: the family must sort
    arr = lambda v: np.asarray(v)[order]  # noqa: E731
    return Interactions.from_arrays(NUM_USERS, NUM_ITEMS, arr(users), arr(items), arr(stamps), arr(valid))


def toy_holdouts(data: Interactions) -> dict[str, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    keys = data.positive_keys()
    users = np.arange(NUM_USERS)
    off = data.user_offsets
    valid_items = np.array([data.items[off[u] : off[u + 1]][data.is_valid[off[u] : off[u + 1]]][0] for u in users])
    eval_items = (valid_items + 3) % NUM_ITEMS
    out = {}
    for split, pos in (("valid", valid_items), ("eval", eval_items)):
        negs = sample_negatives(rng, users, 20, np.union1d(keys, users * NUM_ITEMS + eval_items), NUM_ITEMS)
        out[split] = {"users": users, "candidates": np.concatenate([pos[:, None], negs], axis=1)}
    return out


def make_family(model: str = "gmf", rank: int = 0, world_size: int = 1, **overrides) -> RecommendationFamily:
    defaults = dict(model=model, gmf_factors=8, mlp_layers=(16, 8), hidden_size=16, max_seq_len=8, dropout=0.0)
    config = RecommendationConfig(**{**defaults, **overrides})
    data = toy_interactions()
    return RecommendationFamily(config, None, World(rank=rank, world_size=world_size), data, toy_holdouts(data))


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
def test_histories_are_in_time_order_with_item_id_tie_break():
    data = toy_interactions()
    off = data.user_offsets
    for user in range(NUM_USERS):
        seq = data.items[off[user] : off[user + 1]]
        assert data.is_valid[off[user + 1] - 1]  # the valid row is each user's latest
        first_two = sorted(seq[:2])
        assert list(seq[:2]) == first_two  # same timestamp: smaller item id first
    hist = data.histories(4)
    assert hist.shape == (NUM_USERS, 4)
    assert hist[0].tolist() == (data.items[off[0] : off[1]][-4:] + 1).tolist()


def test_negative_sampling_is_deterministic_and_excludes_positives():
    data = toy_interactions()
    keys = data.positive_keys()
    users = np.repeat(np.arange(NUM_USERS), 50)
    a = sample_negatives(np.random.default_rng(7), users, 4, keys, NUM_ITEMS)
    b = sample_negatives(np.random.default_rng(7), users, 4, keys, NUM_ITEMS)
    c = sample_negatives(np.random.default_rng(8), users, 4, keys, NUM_ITEMS)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert not is_positive(keys, np.repeat(users[:, None], 4, axis=1), a, NUM_ITEMS).any()
    assert a.min() >= 0 and a.max() < NUM_ITEMS
    assert is_positive(keys, data.users, data.items, NUM_ITEMS).all()


def test_train_batches_are_deterministic_and_resampled_each_epoch():
    fam = make_family("gmf")
    first = list(fam.train_batches(0, 16))
    again = list(fam.train_batches(0, 16))
    other = list(fam.train_batches(1, 16))
    assert all(torch.equal(x["items"], y["items"]) for x, y in zip(first, again, strict=True))
    assert not torch.equal(first[0]["items"], other[0]["items"])
    resumed = list(fam.train_batches(0, 16, skip_batches=3))
    assert len(resumed) == len(first) - 3
    assert all(torch.equal(x["items"], y["items"]) for x, y in zip(first[3:], resumed, strict=True))
    keys = fam.train.positive_keys()
    for batch in first:
        users = batch["users"].numpy()
        negs = batch["items"][:, 1:].numpy()
        assert negs.shape[1] == 4
        assert not is_positive(keys, np.repeat(users[:, None], 4, axis=1), negs, NUM_ITEMS).any()


def test_rank_batches_cover_every_sample_once_with_equal_counts():
    order = np.random.default_rng(0).permutation(101)
    parts = [rank_batches(101, 8, 3, r, order) for r in range(3)]
    assert len({len(p) for p in parts}) == 1
    seen = np.concatenate([b for p in parts for b in p])
    assert sorted(seen.tolist()) == list(range(101))


@pytest.mark.parametrize("model", ["neumf", "sasrec"])
def test_two_ranks_cover_positives_exactly_once(model):
    ranks = [make_family(model, rank=r, world_size=2) for r in range(2)]
    batches = [list(f.train_batches(0, 8)) for f in ranks]
    assert len(batches[0]) == len(batches[1]) > 1
    train = ranks[0].train
    seen: list[tuple[int, int]] = []
    if model == "neumf":
        for per_rank in batches:
            for b in per_rank:
                seen += list(zip(b["users"].tolist(), b["items"][:, 0].tolist(), strict=True))
        expected = list(zip(train.users.tolist(), train.items.tolist(), strict=True))
        assert sorted(seen) == sorted(expected)
    else:
        for per_rank in batches:
            for b in per_rank:
                seen += [int(v) for v in b["pos"][b["pos"] > 0]]
        # every train interaction but each user's first is a target once (max_seq_len=8 < history)
        off = train.user_offsets
        expected = [int(v) + 1 for u in range(NUM_USERS) for v in train.items[off[u] + 1 : off[u + 1]]]
        assert sorted(seen) == sorted(expected)
    assert ranks[0].num_train_samples(0) == ranks[1].num_train_samples(0)


def test_valid_rows_are_left_out_unless_asked():
    fam = make_family("gmf")
    assert not fam.train.is_valid.any()
    assert fam.num_train_samples(0) == len(fam.all_interactions.users) - NUM_USERS
    refit = make_family("gmf", train_on_valid=True)
    assert refit.num_train_samples(0) == len(fam.all_interactions.users)


def test_sasrec_eval_history_includes_the_valid_item():
    fam = make_family("sasrec")
    valid_hist, eval_hist = fam._history_table("valid"), fam._history_table("eval")
    valid_items = fam.holdout("valid")["candidates"][:, 0]
    assert (eval_hist[:, -1] == valid_items + 1).all()
    assert (eval_hist[:, -2] == valid_hist[:, -1]).all()
    model = fam.build_model()
    assert torch.equal(model.histories, torch.from_numpy(eval_hist))


# --- models -----------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["gmf", "mlp", "neumf", "sasrec"])
def test_forward_shapes_and_fsdp_modules(model):
    fam = make_family(model)
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
    torch.testing.assert_close(fam.build_model().state_dict(), make_family(model).build_model().state_dict())


def test_neumf_initialises_from_pretrained_gmf_and_mlp(tmp_path):
    gmf, mlp = make_family("gmf").build_model(), make_family("mlp").build_model()
    torch.save(gmf.state_dict(), tmp_path / "gmf.pt")
    torch.save(mlp.state_dict(), tmp_path / "mlp.pt")
    fam = make_family("neumf", pretrained_gmf=str(tmp_path / "gmf.pt"), pretrained_mlp=str(tmp_path / "mlp.pt"))
    net = fam.build_model()
    assert torch.equal(net.gmf.user_embedding.weight, gmf.user_embedding.weight)
    assert torch.equal(net.output.weight[:, :8], 0.5 * gmf.output.weight)
    users, items = torch.arange(4), torch.arange(12).view(4, 3)
    # with alpha = 0.5 NeuMF's logit is the mean of the two pre-trained models' logits
    torch.testing.assert_close(net(users, items), 0.5 * (gmf(users, items) + mlp(users, items)))


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="model"):
        RecommendationConfig(model="bpr")
    with pytest.raises(ValueError, match="num_negatives"):
        RecommendationConfig(num_negatives=0)
    with pytest.raises(ValueError, match="num_heads"):
        RecommendationConfig(hidden_size=10, num_heads=3)
    with pytest.raises(ValueError, match="pretrained"):
        RecommendationConfig(model="gmf", pretrained_gmf="a", pretrained_mlp="b")


@pytest.mark.parametrize("model", ["neumf", "sasrec"])
def test_short_training_reduces_loss_and_evaluates(model):
    torch.manual_seed(0)
    fam = make_family(model)
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
    assert exported["model"] == model and exported["num_items"] == NUM_ITEMS


# --- through a manifest -------------------------------------------------------------------
def test_family_on_a_synthetic_manifest(tf_env):
    from trainflow.tasks.manifest import load_manifest
    from trainflow.tasks.sharding import shard_dataset

    uri = shard_dataset("synthetic://recommendation?num_interactions=5000&num_items=400", "recommendation")["manifest_uri"]
    manifest = load_manifest(uri)
    fam = RecommendationFamily(RecommendationConfig(model="sasrec", max_seq_len=16, hidden_size=16), manifest, World())
    assert fam.num_users == manifest.stats["num_users"]
    assert len(fam.train.users) == manifest.num_rows("train") - manifest.num_rows("valid")
    metrics = fam.evaluate(fam.build_model(), "eval")
    assert metrics["num_users"] == manifest.num_rows("eval")


def test_real_ml100k_split_histories(tf_env):
    from trainflow.tasks.manifest import load_manifest
    from trainflow.tasks.sharding import shard_dataset

    source = shared_dataset("ncf_movielens_100k")
    manifest = load_manifest(shard_dataset(str(source), "recommendation")["manifest_uri"])
    fam = RecommendationFamily(RecommendationConfig(model="sasrec"), manifest, World())
    assert fam.num_train_samples(0) >= 943 and len(fam.train.users) == 99057 - 943
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


@pytest.mark.parametrize("model", ["gmf", "sasrec"])
def test_an_empty_tail_batch_gives_a_zero_loss_with_gradients(model):
    # rank_batches leaves a high rank an empty last batch when fewer samples than ranks remain
    assert [len(b) for b in rank_batches(9, 2, 4, 3, np.arange(9))] == [2, 0]
    fam = make_family(model)
    net = fam.build_model()
    full = next(iter(fam.train_batches(0, 4)))
    empty = {key: value[:0] for key, value in full.items()}
    loss = fam.loss(net, empty)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
