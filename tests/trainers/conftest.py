"""A tiny committed recommendation dataset shared by the trainer tests (built once)."""

from __future__ import annotations

import pytest
import torch

from trainflow.tasks.manifest import load_manifest
from trainflow.tasks.settings import Settings
from trainflow.tasks.sharding import ShardingConfig, shard_dataset

TOY_SOURCE = "synthetic://recommendation?num_interactions=2000&num_users=100&num_items=300&seed=0"


@pytest.fixture(scope="session")
def toy_settings(tmp_path_factory) -> Settings:
    data_dir = tmp_path_factory.mktemp("toydata")
    return Settings.from_env({"TRAINFLOW_DATA_DIR": str(data_dir)})


@pytest.fixture(scope="session")
def toy_manifest(toy_settings):
    """~1900 train rows in 8 shards of 128-row row groups; 20 negatives per holdout row."""
    config = ShardingConfig(row_group_rows=128, target_shard_bytes=4096, num_negatives=20)
    summary = shard_dataset(TOY_SOURCE, "recommendation", config=config, settings=toy_settings)
    return load_manifest(summary["manifest_uri"], toy_settings)


@pytest.fixture
def single_process_one_thread(monkeypatch):
    """The in-process trainer runs as a lone process (no torchrun variables leaking from the
    environment) with one torch thread, so results compare across runs and with torchrun ranks."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
