"""Row-sharded embedding tables (``parallelism='sharded_embeddings'``), real torchrun/gloo
processes on CPU: exact lookups and gradients, per-rank memory ~1/world_size, the same
metrics as the replicated (DDP) run, resume from a sharded checkpoint, and an exported model
that serves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.trainers.worker_group import launch_worker
from trainflow.tasks.launch import LaunchConfig, run_torchrun
from trainflow.trainers.config import TrainConfig
from trainflow.trainers.distributed import World
from trainflow.trainers.loop import load_exported_model, run_training
from trainflow.trainers.parallel import shard_rows
from trainflow.trainers.recommendation import RecommendationConfig, RecommendationFamily
from trainflow.trainers.serving import served_module

WORKER = str(Path(__file__).with_name("parallel_worker.py"))
# NeuMF: four tables (GMF and MLP user/item) plus an MLP tower and an output layer.
FAMILY = {"model": "neumf", "gmf_factors": 8, "mlp_layers": [16, 8], "dropout": 0.0, "num_negatives": 2,
          "eval_batch_size": 64}
TRAIN = {"epochs": 1, "batch_size": 64, "learning_rate": 0.01, "log_every_steps": 1, "log_to_mlflow": False}
# Tolerances of sharded vs replicated: the same sums in another order (float32 rounding),
# amplified by Adam on near-zero gradients; measured differences are ~1e-6.
LOSS_RTOL, METRIC_ATOL = 1e-3, 1e-3


pytestmark = pytest.mark.usefixtures("single_process_one_thread")


def _launch(manifest, run_dir: Path, nproc: int, lines: list[str] | None = None, family: dict | None = None,
            **train) -> dict:
    cfg = {"train": {"manifest_uri": manifest.uri, "run_dir": run_dir.as_uri(), **TRAIN, **train},
           "family": family or FAMILY}
    path = run_dir.parent / f"{run_dir.name}.json"
    path.write_text(json.dumps(cfg))
    sink = lines if lines is not None else []
    run_torchrun(LaunchConfig(nproc_per_node=nproc), module="trainflow.trainers.recommendation",
                 args=["--config", str(path)], env={"OMP_NUM_THREADS": "1"}, on_line=sink.append)
    return json.loads((run_dir / "result.json").read_text())


def _losses(result: dict) -> np.ndarray:
    return np.array([loss for _, loss in result["losses"]])


def _table_shapes(manifest) -> list[tuple[int, int]]:
    users, items = manifest.stats["num_users"], manifest.stats["num_items"]
    gmf, mlp = FAMILY["gmf_factors"], FAMILY["mlp_layers"][0] // 2
    return [(users, gmf), (items, gmf), (users, mlp), (items, mlp)]


def _table_bytes(manifest, world: int, rank: int) -> int:
    """float32 bytes of this rank's rows of every table (torch.chunk layout)."""
    total = 0
    for rows, dim in _table_shapes(manifest):
        lo, hi = shard_rows(rows, world, rank)
        total += (hi - lo) * dim * 4
    return total


def test_lookups_and_gradients_match_the_full_table_on_three_ranks(tmp_path):
    """Uneven shards (11 rows on 3 ranks), a rank with no rows, padding rows, different
    numbers of lookups per rank, no_grad lookups and global-norm clipping."""
    launch_worker(WORKER, 3, str(tmp_path))
    reports = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(3)]
    ranges = [r["cases"][0]["row_range"] for r in reports]
    assert ranges == [[0, 4], [4, 8], [8, 11]]
    assert [r["cases"][2]["local_rows"] for r in reports] == [1, 1, 0]  # 2 rows, 3 ranks
    for report in reports:
        for case in report["cases"]:
            assert case["forward_diff"] < 1e-6 and case["no_grad_diff"] < 1e-6, case
            assert case["grad_diff"] < 1e-6, case  # the mean over ranks, like DDP
            assert case["padding_grad"] in (None, 0.0), case
        clip = report["clip"]
        assert clip["norm"] == pytest.approx(clip["expected"], rel=1e-5)
        assert clip["after"] == pytest.approx(0.5, rel=1e-4)


@pytest.fixture(scope="module")
def replicated(toy_manifest, tmp_path_factory):
    """The reference: the same run on 2 ranks with DDP."""
    return _launch(toy_manifest, tmp_path_factory.mktemp("ddp") / "run", 2, parallelism="ddp")


def test_one_rank_holds_the_whole_tables(toy_manifest, tmp_path):
    config = TrainConfig(manifest_uri=toy_manifest.uri, run_dir=(tmp_path / "one").as_uri(),
                         parallelism="sharded_embeddings", max_steps=3, **TRAIN)
    result = run_training(RecommendationFamily, RecommendationConfig(**FAMILY), config)
    assert result["parallelism"] == "none"  # nothing to shard on one rank
    memory = result["memory"]
    assert memory["embedding_param_bytes"] == _table_bytes(toy_manifest, 1, 0)
    assert memory["embedding_optimizer_bytes"] == 2 * memory["embedding_param_bytes"]  # AdamW: exp_avg, exp_avg_sq


def test_sharded_matches_replicated_resumes_and_serves(toy_manifest, tmp_path, replicated):
    run_dir = tmp_path / "sharded"
    first = _launch(toy_manifest, run_dir, 2, parallelism="sharded_embeddings", max_steps=10,
                    checkpoint_every_steps=5)
    assert first["steps"] == 10 and first["parallelism"] == "sharded_embeddings"
    lines: list[str] = []
    sharded = _launch(toy_manifest, run_dir, 2, lines=lines, parallelism="sharded_embeddings")
    assert any("resuming from step 10 " in line for line in lines)
    assert sharded["resumed_from_step"] == 10 and sharded["steps"] == replicated["steps"] > 10

    # The same training as the replicated run.
    np.testing.assert_allclose(_losses(sharded), _losses(replicated), rtol=LOSS_RTOL)
    for key, value in replicated["metrics"]["eval"].items():
        assert sharded["metrics"]["eval"][key] == pytest.approx(value, abs=METRIC_ATOL), key

    # Each rank holds its rows of every table and their AdamW state; the rest is replicated.
    full, mem = replicated["memory"], sharded["memory"]
    assert full["embedding_param_bytes_per_rank"] == [_table_bytes(toy_manifest, 1, 0)] * 2
    assert mem["embedding_param_bytes_per_rank"] == [_table_bytes(toy_manifest, 2, r) for r in range(2)]
    assert sum(mem["embedding_param_bytes_per_rank"]) == full["embedding_param_bytes"]
    assert max(mem["embedding_param_bytes_per_rank"]) <= full["embedding_param_bytes"] / 2 + 4 * 4 * 16
    assert mem["embedding_optimizer_bytes_per_rank"] == [2 * b for b in mem["embedding_param_bytes_per_rank"]]
    dense = full["param_bytes"] - full["embedding_param_bytes"]
    assert [p - e for p, e in zip(mem["param_bytes_per_rank"], mem["embedding_param_bytes_per_rank"],
                                  strict=True)] == [dense, dense]

    # The exported model is the full, unsharded one: same keys and shapes as a plain model,
    # it builds the served module and reproduces the eval metrics without a process group.
    state, config = load_exported_model(run_dir.as_uri())
    plain = RecommendationFamily(RecommendationConfig(**FAMILY), toy_manifest, World()).build_model()
    assert {k: tuple(v.shape) for k, v in state.items()} == {k: tuple(v.shape) for k, v in plain.state_dict().items()}
    plain.load_state_dict(state)
    family = RecommendationFamily(RecommendationConfig(**FAMILY), toy_manifest, World())
    metrics = family.evaluate(plain, "eval")
    for key, value in sharded["metrics"]["eval"].items():
        assert metrics[key] == pytest.approx(value, abs=1e-6), key
    module, kind = served_module(state, config)
    assert kind == "recommendation"
    with torch.no_grad():
        scores = module(torch.arange(3), torch.arange(3))
    with torch.no_grad():
        assert torch.allclose(scores, plain(torch.arange(3), torch.arange(3).unsqueeze(1)).squeeze(1), atol=1e-6)


@pytest.mark.slow  # ~60 s: one 4-rank launch on 2 shared cores
def test_four_ranks_hold_a_quarter_of_the_sasrec_item_table(toy_manifest, tmp_path):
    """SASRec (item table with a padding row; the small position table stays replicated), with the
    sampled softmax: a window's positives and its shared negatives looked up in one call."""
    hidden = 16
    family = {"model": "sasrec", "hidden_size": hidden, "max_seq_len": 8, "num_blocks": 1, "dropout": 0.0,
              "eval_batch_size": 64, "loss": "softmax", "num_negatives": 4}
    result = _launch(toy_manifest, tmp_path / "four", 4, family=family, parallelism="sharded_embeddings",
                     max_steps=3, batch_size=32)
    assert result["parallelism"] == "sharded_embeddings" and result["world_size"] == 4
    assert all(np.isfinite(v) for v in result["metrics"]["eval"].values())
    assert len(result["losses"]) == 3 and all(np.isfinite(v) for _, v in result["losses"])
    rows = toy_manifest.stats["num_items"] + 1  # item 0 is padding
    mem = result["memory"]
    expected = [(shard_rows(rows, 4, r)[1] - shard_rows(rows, 4, r)[0]) * hidden * 4 for r in range(4)]
    assert mem["embedding_param_bytes_per_rank"] == expected
    assert max(expected) <= rows * hidden * 4 / 4 + hidden * 4
    assert mem["embedding_optimizer_bytes_per_rank"] == [2 * b for b in expected]
    state, _ = load_exported_model((tmp_path / "four").as_uri())
    assert state["item_embedding.weight"].shape == (rows, hidden)
    assert torch.count_nonzero(state["item_embedding.weight"][0]) == 0  # the padding row never learnt


def test_a_family_without_tables_is_refused_by_name(tmp_path):
    """Driving has no embedding tables: sharded_embeddings fails naming the parallelism."""
    from trainflow.trainers.driving.family import DrivingFamily
    from trainflow.trainers.loop import Trainer

    world = World(rank=0, world_size=2)
    trainer = Trainer.__new__(Trainer)
    trainer.device = torch.device("cpu")
    trainer.world = world
    family = DrivingFamily.__new__(DrivingFamily)
    with pytest.raises(ValueError, match="sharded_embeddings.*no embedding tables"):
        trainer._wrap(torch.nn.Linear(2, 2), family, "sharded_embeddings")
