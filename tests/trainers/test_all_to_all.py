"""Row-sharded tables with all-to-all lookups (``parallelism='sharded_embeddings_a2a'``), real
torchrun/gloo processes on CPU: exact lookups, row gradients and owner-side lazy Adam against
the full table; through the loop, the same training as 2 replicas exchanging the touched rows
(``row_sparse_updates``, the same lazy-Adam math with every replica updating every touched
row), every training sample once, a resume from a sharded checkpoint, per-rank table and
optimizer memory of 1/world, and an exported full model that serves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

# The same NeuMF, training settings, launcher and tolerances as the all-gather sharding tests.
from tests.trainers.test_parallel import FAMILY, LOSS_RTOL, METRIC_ATOL, TRAIN, _launch, _losses
from tests.trainers.worker_group import launch_worker
from trainflow.trainers.config import TrainConfig
from trainflow.trainers.distributed import World
from trainflow.trainers.loop import load_exported_model, run_training
from trainflow.trainers.parallel import shard_rows
from trainflow.trainers.recommendation import RecommendationConfig, RecommendationFamily
from trainflow.trainers.serving import served_module

WORKER = str(Path(__file__).with_name("all_to_all_worker.py"))
A2A = "sharded_embeddings_a2a"
pytestmark = pytest.mark.usefixtures("single_process_one_thread")


def _table_bytes(manifest, world: int, rank: int) -> int:
    users, items = manifest.stats["num_users"], manifest.stats["num_items"]
    gmf, mlp = FAMILY["gmf_factors"], FAMILY["mlp_layers"][0] // 2
    total = 0
    for rows, dim in [(users, gmf), (items, gmf), (users, mlp), (items, mlp)]:
        lo, hi = shard_rows(rows, world, rank)
        total += (hi - lo) * dim * 4
    return total


def test_lookups_row_gradients_and_updates_match_the_full_table_on_three_ranks(tmp_path):
    """Uneven shards (11 rows on 3 ranks), a rank owning no rows, a padding row, different
    numbers of lookups per rank (none on one), no_grad lookups, 3 optimizer steps against
    torch's SparseAdam on the full table, global-norm clipping of the kept rows, a plan shared
    by two tables, and four tables of mixed sizes and widths looked up in one exchange."""
    launch_worker(WORKER, 3, str(tmp_path))
    reports = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(3)]
    assert [r["cases"][0]["row_range"] for r in reports] == [[0, 4], [4, 8], [8, 11]]
    assert [r["cases"][2]["local_rows"] for r in reports] == [1, 1, 0]  # 2 rows, 3 ranks
    for report in reports:
        for case in report["cases"]:
            assert case["forward_diff"] < 1e-4 and case["no_grad_diff"] < 1e-4, case
            assert case["grad_diff"] < 1e-6, case  # the mean over ranks, like DDP
            assert case["weight_diff"] < 1e-4, case  # lazy Adam of the owned rows = SparseAdam on the table
            assert case["padding_grad"] in (None, 0.0), case
        clip = report["clip"]
        assert clip["norm"] == pytest.approx(clip["expected"], rel=1e-5)
        assert clip["after"] == pytest.approx(0.5, rel=1e-4)
    # the padding row's owner saw it looked up and kept no gradient for it
    assert reports[0]["cases"][1]["padding_grad"] == 0.0
    # Two tables looked up with one ids tensor share the plan: 6 all-to-alls, not 8, same values.
    for report in reports:
        shared = report["shared_plan"]
        assert shared["calls_both"] == 6, shared
        assert shared["forward_diff"] < 1e-5 and shared["grad_diff"] < 1e-6, shared
        assert shared["calls_after_inplace"] == 6 and shared["calls_other_tensor"] == 6, shared  # 3 + 3 forward
    # Four tables looked up together (lookup_embeddings): one exchange, 4 all-to-alls instead of 12.
    for report in reports:
        grouped = report["grouped"]
        assert grouped["calls"] == 4 and grouped["calls_no_grad"] == 3, grouped
        assert grouped["shapes_ok"], grouped
        assert grouped["forward_diff"] < 1e-5 and grouped["no_grad_diff"] < 1e-5, grouped
        assert grouped["grad_diff"] < 1e-6, grouped
    assert reports[0]["grouped"]["padding_grad"] == 0.0  # looked up, owned by rank 0, no gradient kept


@pytest.fixture(scope="module")
def exchanged(toy_manifest, tmp_path_factory):
    """The reference: 2 DDP replicas exchanging the touched rows (the same lazy Adam)."""
    family = {**FAMILY, "row_sparse_updates": True}
    return _launch(toy_manifest, tmp_path_factory.mktemp("rowsparse") / "run", 2, family=family,
                   parallelism="ddp")


def test_one_rank_trains_the_unsharded_model_with_the_same_lazy_adam(toy_manifest, tmp_path):
    """Nothing to shard: the plain model, its tables updated by lazy Adam on the touched rows
    (as on N ranks), i.e. exactly a one-process ``row_sparse_updates`` run, not dense AdamW."""
    results = {}
    for name, parallelism, family in (("a2a", A2A, FAMILY), ("rows", "ddp", {**FAMILY, "row_sparse_updates": True}),
                                      ("dense", "ddp", FAMILY)):
        config = TrainConfig(manifest_uri=toy_manifest.uri, run_dir=(tmp_path / name).as_uri(),
                             parallelism=parallelism, max_steps=6, **TRAIN)
        results[name] = run_training(RecommendationFamily, RecommendationConfig(**family), config)
    result = results["a2a"]
    assert result["parallelism"] == "none" and result["steps"] == 6
    assert result["memory"]["embedding_param_bytes"] == _table_bytes(toy_manifest, 1, 0)
    np.testing.assert_array_equal(_losses(result), _losses(results["rows"]))
    assert not np.array_equal(_losses(result), _losses(results["dense"]))  # lazy, not dense AdamW


def test_a2a_trains_like_row_exchange_resumes_and_serves(toy_manifest, tmp_path, exchanged):
    run_dir = tmp_path / "a2a"
    first = _launch(toy_manifest, run_dir, 2, parallelism=A2A, max_steps=10, checkpoint_every_steps=5)
    assert first["steps"] == 10 and first["parallelism"] == A2A
    lines: list[str] = []
    result = _launch(toy_manifest, run_dir, 2, lines=lines, parallelism=A2A)
    assert any("resuming from step 10 " in line for line in lines)
    assert result["resumed_from_step"] == 10 and result["steps"] == exchanged["steps"] > 10
    # every training sample once: the same steps and samples as the reference's epoch
    assert result["samples"] == exchanged["samples"] == result["steps"] * TRAIN["batch_size"]

    # The same training, resumed or not: losses step by step and the eval metrics.
    np.testing.assert_allclose(_losses(result), _losses(exchanged), rtol=LOSS_RTOL)
    for key, value in exchanged["metrics"]["eval"].items():
        assert result["metrics"]["eval"][key] == pytest.approx(value, abs=METRIC_ATOL), key

    # Each rank holds its rows of every table and their Adam moments; the rest is replicated.
    full, mem = exchanged["memory"], result["memory"]
    assert mem["embedding_param_bytes_per_rank"] == [_table_bytes(toy_manifest, 2, r) for r in range(2)]
    assert sum(mem["embedding_param_bytes_per_rank"]) == full["embedding_param_bytes"]
    assert mem["embedding_optimizer_bytes_per_rank"] == [2 * b for b in mem["embedding_param_bytes_per_rank"]]
    assert full["embedding_optimizer_bytes_per_rank"] == [2 * full["embedding_param_bytes"]] * 2

    # The exported model is the full one: plain keys and shapes, the eval metrics without a
    # process group, and the served module.
    state, config = load_exported_model(run_dir.as_uri())
    plain = RecommendationFamily(RecommendationConfig(**FAMILY), toy_manifest, World()).build_model()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    plain.load_state_dict(state)
    family = RecommendationFamily(RecommendationConfig(**FAMILY), toy_manifest, World())
    metrics = family.evaluate(plain, "eval")
    for key, value in result["metrics"]["eval"].items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    module, kind = served_module(state, config)
    assert kind == "recommendation"
    with torch.no_grad():
        assert torch.allclose(module(torch.arange(3), torch.arange(3)),
                              plain(torch.arange(3), torch.arange(3).unsqueeze(1)).squeeze(1), atol=1e-6)


@pytest.mark.parametrize("loss", ["bce", "softmax"])
def test_sasrec_item_table_with_padding_row(toy_manifest, tmp_path, loss):
    """Both losses: the softmax looks up a window's positives and its shared negatives (ids of
    two shapes) in one call to the sharded table."""
    hidden = 16
    family = {"model": "sasrec", "hidden_size": hidden, "max_seq_len": 8, "num_blocks": 1, "dropout": 0.0,
              "eval_batch_size": 64, "loss": loss, "num_negatives": 4 if loss == "softmax" else 1}
    result = _launch(toy_manifest, tmp_path / "sasrec", 2, family=family, parallelism=A2A, max_steps=4,
                     batch_size=32)
    assert result["parallelism"] == A2A and result["world_size"] == 2
    assert len(result["losses"]) == 4 and all(np.isfinite(v) for _, v in result["losses"])
    assert all(np.isfinite(v) for v in result["metrics"]["eval"].values())
    rows = toy_manifest.stats["num_items"] + 1  # item 0 is padding
    expected = [(shard_rows(rows, 2, r)[1] - shard_rows(rows, 2, r)[0]) * hidden * 4 for r in range(2)]
    assert result["memory"]["embedding_param_bytes_per_rank"] == expected
    state, _ = load_exported_model((tmp_path / "sasrec").as_uri())
    assert state["item_embedding.weight"].shape == (rows, hidden)
    assert torch.count_nonzero(state["item_embedding.weight"][0]) == 0  # the padding row never learnt


def test_row_sparse_updates_and_a2a_are_refused_together(toy_manifest, tmp_path):
    from trainflow.tasks.launch import LaunchError

    lines: list[str] = []
    with pytest.raises(LaunchError):
        _launch(toy_manifest, tmp_path / "both", 2, lines=lines, family={**FAMILY, "row_sparse_updates": True},
                parallelism=A2A, max_steps=1)
    assert any("supports plain tables only" in line for line in lines)
