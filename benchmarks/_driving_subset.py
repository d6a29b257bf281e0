"""A driving data folder with a fraction of the training scenarios (for a learning curve): every
``valid`` and ``eval`` scenario of the source folder and the ``train`` scenarios whose
``sha256("subset:" + sequence id)`` falls below ``--fraction``, as symbolic links to the source's
CSV files (nothing is copied). The splits are those the sharder gives the whole folder (the same
hash of the sequence id), so ``valid`` and ``eval`` are unchanged and only ``train`` shrinks.

    python -m benchmarks._driving_subset --source /work/shared/data/argoverse1_forecasting_subset \
        --dest /tmp/argo_train50 --fraction 0.5

Prints one JSON line: the scenarios linked per split. Shard the new folder as any other
(``trainflow.tasks.sharding.shard_dataset(dest, "driving")``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os


def subset_folder(source: str, dest: str, fraction: float) -> dict[str, int]:
    """Link the kept scenarios of ``source``/data into ``dest``/data; the count per split."""
    from trainflow.tasks.sharding import ShardingConfig, hash_split

    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    config = ShardingConfig()
    os.makedirs(os.path.join(dest, "data"), exist_ok=True)
    counts: dict[str, int] = {}
    for name in sorted(os.listdir(os.path.join(source, "data"))):
        if not name.endswith(".csv"):
            continue
        seq_id = name[: -len(".csv")]
        split = hash_split(seq_id, config)
        draw = int.from_bytes(hashlib.sha256(f"subset:{seq_id}".encode()).digest()[:8], "big") / 2**64
        if split == "train" and draw >= fraction:
            continue
        counts[split] = counts.get(split, 0) + 1
        link = os.path.join(dest, "data", name)
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(os.path.join(source, "data", name)), link)
    return counts


def main(argv: list[str] | None = None) -> dict[str, int]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="a folder of Argoverse-1 CSVs under data/")
    parser.add_argument("--dest", required=True)
    parser.add_argument("--fraction", type=float, required=True, help="share of the train scenarios kept")
    args = parser.parse_args(argv)
    counts = subset_folder(args.source, args.dest, args.fraction)
    print(json.dumps(counts, sort_keys=True))
    return counts


if __name__ == "__main__":
    main()
