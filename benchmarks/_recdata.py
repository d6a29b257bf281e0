"""The committed synthetic recommendation dataset the training benchmarks train on (cached)."""

from __future__ import annotations

from benchmarks._data import cache_dir


def manifest_uri(num_interactions: int) -> str:
    from trainflow.tasks.settings import Settings
    from trainflow.tasks.sharding import shard_dataset

    users = max(200, num_interactions // 60)
    items = max(2000, num_interactions // 100)
    url = f"synthetic://recommendation?num_interactions={num_interactions}&num_users={users}&num_items={items}"
    settings = Settings.from_env({"TRAINFLOW_DATA_DIR": str(cache_dir() / "recdata")})
    return shard_dataset(url, "recommendation", settings=settings)["manifest_uri"]
