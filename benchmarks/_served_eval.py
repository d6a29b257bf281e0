"""Time the DAG's export and its ``evaluate`` task's scoring of the *served* recommender (the
logged pyfunc, as ``trainflow.tasks.evaluation.evaluate_step`` loads it) on a dataset's ``eval`` split. A helper, not a benchmark case (it needs a trained run).

    TRAINFLOW_DATA_DIR=/tmp/x .venv/bin/python -m benchmarks._served_eval --run-dir file:///.../run
    # only the scoring of the first N users' eval candidates, by an already logged model:
    .venv/bin/python -m benchmarks._served_eval --run-dir file:///.../run --model-uri PATH --users 1000

Prints one JSON line: export seconds, evaluate seconds, rows scored, the headline metrics and the
process's peak RSS. MLflow is the settings' tracking URI (default: a SQLite file under
``TRAINFLOW_DATA_DIR``); a fresh MLflow run holds the logged model.
"""

from __future__ import annotations

import argparse
import json
import resource
import time


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="an exported training run (its model/ folder)")
    parser.add_argument("--split", default="eval")
    parser.add_argument("--model-uri", help="a logged model to score with (default: export --run-dir's now)")
    parser.add_argument("--users", type=int, default=0,
                        help="time the scoring of the first N users' candidates only (0: the whole evaluation)")
    args = parser.parse_args(argv)

    import mlflow

    from trainflow.tasks.evaluation import load_predictor
    from trainflow.tasks.manifest import load_manifest
    from trainflow.tasks.settings import get_settings
    from trainflow.trainers.loop import load_exported_model
    from trainflow.trainers.serving import log_serving_model, pipeline_of

    settings = get_settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_experiment("served-eval-benchmark")
    export_s = None
    model_uri = args.model_uri
    if not model_uri:
        with mlflow.start_run() as run:
            run_id = run.info.run_id
        started = time.perf_counter()
        model_uri = log_serving_model(args.run_dir, run_id, settings)["model_uri"]
        export_s = round(time.perf_counter() - started, 1)
    _, config = load_exported_model(args.run_dir, settings)
    spec = pipeline_of(config)
    manifest = load_manifest(config["train_config"]["manifest_uri"], settings)
    predict = load_predictor(model_uri, settings.mlflow_tracking_uri)
    if args.users:
        import numpy as np

        from trainflow.trainers.recommendation.evaluation import _score_candidates

        table = manifest.read_table(args.split).slice(0, args.users)
        item_ids = manifest.read_file_table("items").column("item_id").to_numpy()
        candidates = np.c_[table.column("item_idx").to_numpy(), np.asarray(table.column("neg_item_idx").to_pylist())]
        started = time.perf_counter()
        _score_candidates(predict, table.column("user_id").to_numpy(), item_ids[candidates.astype(np.int64)])
        print(json.dumps({"model_uri": model_uri, "split": args.split, "users": table.num_rows,
                          "rows": int(candidates.size), "score_s": round(time.perf_counter() - started, 2),
                          "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))
        return 0
    started = time.perf_counter()
    report = spec.evaluate(manifest, predict, split=args.split)
    evaluate_s = time.perf_counter() - started
    metrics = report["metrics"]
    rows = manifest.read_table(args.split).num_rows
    print(json.dumps({
        "run_dir": args.run_dir, "split": args.split, "users": report["num_users"],
        "model_uri": model_uri, "export_s": export_s, "evaluate_s": round(evaluate_s, 1),
        "hr_at_10": metrics.get("hr_at_10"), "ndcg_at_10": metrics.get("ndcg_at_10"),
        "rows": rows, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
