"""Command line for the steps that run without Airflow.

    python -m trainflow.tasks.cli shard SOURCE_URL --kind PIPELINE [--name NAME] [--verify sha256]
    python -m trainflow.tasks.cli manifest SOURCE_URL --kind PIPELINE [--name NAME] [--full]
    python -m trainflow.tasks.cli pipelines                         # the registered pipelines
    python -m trainflow.tasks.cli report DAG_ID [--run-id RUN_ID]   # the last (or that) finished run, for people
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from trainflow.tasks.datasets.sources import resolve_source
from trainflow.tasks.manifest import VERIFY_MODES, load_manifest, manifest_path
from trainflow.tasks.pipelines import get_pipeline, pipeline_names
from trainflow.tasks.settings import get_settings
from trainflow.tasks.sharding import ShardingConfig, dataset_version, shard_dataset
from trainflow.tasks.storage import Storage, safe_name


def _manifest_uri(source_url: str, kind: str, name: str | None) -> str:
    settings = get_settings()
    source = resolve_source(source_url, kind, settings)
    dataset = safe_name(name or source.default_name, "dataset name")
    version = dataset_version(source, ShardingConfig(), get_pipeline(kind).split_version)
    return Storage.from_settings(settings).url(manifest_path(dataset, version))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainflow.tasks.cli", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for command in ("shard", "manifest"):
        p = sub.add_parser(command)
        p.add_argument("source_url")
        p.add_argument("--kind", "--pipeline", dest="kind", choices=pipeline_names(), required=True,
                       help="a registered pipeline")
        p.add_argument("--name", default=None)
        if command == "manifest":
            p.add_argument("--full", action="store_true", help="print the whole manifest, shards included")
        else:
            p.add_argument(
                "--verify", choices=VERIFY_MODES, default=None,
                help="how a committed version is checked before reuse (damage is repaired): auto (default; "
                "sizes + xxh3-128 locally, sizes remotely), sizes, xxh3_128, sha256 (full re-hash)",
            )
    sub.add_parser("pipelines", help="list the registered pipelines")
    report = sub.add_parser("report")
    report.add_argument("dag_id")
    report.add_argument("--json", action="store_true", help="print the report as JSON")
    report.add_argument("--run-id", default=None, help="this DAG run's report (default: the latest finished run's)")
    args = parser.parse_args(argv)
    if args.command == "report":
        return print_report(args.dag_id, as_json=args.json, run_id=args.run_id)
    if args.command == "pipelines":
        for name in pipeline_names():
            spec = get_pipeline(name)
            print(f"{name:<20} dag {spec.dag_id}, model {spec.registered_model_name}: {spec.description}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "shard":
        print(json.dumps(shard_dataset(args.source_url, args.kind, name=args.name, verify=args.verify), indent=2))
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


def run_report(dag_id: str, run_id: str) -> dict | None:
    """The report of one DAG run (``{root}/runs/{dag_id}/{run_id}/report.json``), or ``None``."""
    from trainflow.tasks.pipeline import REPORT_NAME

    store = Storage.from_settings(get_settings())
    path = f"runs/{safe_name(dag_id, 'dag_id')}/{safe_name(run_id, 'run_id')}/{REPORT_NAME}"
    try:
        return json.loads(store.read_bytes(path))
    except FileNotFoundError:
        return None


def print_report(dag_id: str, as_json: bool = False, run_id: str | None = None) -> int:
    """Print the run report of ``dag_id``'s run ``run_id`` (default: the latest finished run):
    dataset, training, metrics, registry."""
    from trainflow.tasks.pipeline import latest_run_report

    report = run_report(dag_id, run_id) if run_id else latest_run_report(dag_id)
    if report is None:
        print(f"no report of run {run_id} of {dag_id}" if run_id else f"no finished run of {dag_id} yet")
        return 1
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    d, t, r = report["dataset"], report["training"], report["registry"]
    splits = ", ".join(f"{k} {v:,}" for k, v in (d.get("splits") or {}).items())
    print(f"dataset   {d['name']} version {d['version']} ({'cache hit' if d['cache_hit'] else 'new version'}; {splits})")
    print(
        f"training  {t['world_size']} process(es), {t['parallelism']} on {t['device']}: {t['epochs']} epochs, "
        f"{t['steps']} steps, {t['samples_per_s']:.0f} samples/s, {t['train_seconds']:.1f} s"
    )
    print(f"metrics   (eval split)      model   {report['baseline']}")
    for key, pair in report["metrics"].items():
        base = "" if pair["baseline"] is None else f"{pair['baseline']:.4f}"
        print(f"          {key:<18} {pair['model']:.4f}   {base}")
    print(f"registry  {r['name']} version {r['version']}, aliases {', '.join(r['aliases']) or '-'}: {r['decision']}")
    print(f"          {r['reason']}")
    print(f"mlflow    run {report['mlflow']['run_id']}, model {report['mlflow']['model_uri']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
