"""Command line for the steps that run without Airflow.

    python -m tasks.cli shard SOURCE_URL --kind recommendation [--name NAME]
    python -m tasks.cli manifest SOURCE_URL --kind recommendation [--name NAME] [--full]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from tasks.datasets.sources import resolve_source
from tasks.manifest import load_manifest, manifest_path
from tasks.settings import get_settings
from tasks.sharding import ShardingConfig, dataset_version, shard_dataset
from tasks.storage import Storage, safe_name


def _manifest_uri(source_url: str, kind: str, name: str | None) -> str:
    settings = get_settings()
    source = resolve_source(source_url, kind, settings)
    dataset = safe_name(name or source.default_name, "dataset name")
    version = dataset_version(source, ShardingConfig())
    return Storage.from_settings(settings).url(manifest_path(dataset, version))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.cli", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("shard", "manifest"):
        p = sub.add_parser(command)
        p.add_argument("source_url")
        p.add_argument("--kind", choices=["recommendation", "driving"], required=True)
        p.add_argument("--name", default=None)
        if command == "manifest":
            p.add_argument("--full", action="store_true", help="print the whole manifest, shards included")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "shard":
        print(json.dumps(shard_dataset(args.source_url, args.kind, name=args.name), indent=2))
        return 0
    manifest = load_manifest(_manifest_uri(args.source_url, args.kind, args.name))
    data = dict(manifest.data)
    if not args.full:
        data["splits"] = {
            split: {k: v for k, v in entry.items() if k != "shards"} | {"num_shards": len(entry["shards"])}
            for split, entry in data["splits"].items()
        }
    print(json.dumps({"manifest_uri": manifest.uri, **data}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
