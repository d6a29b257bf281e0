"""Choose the driving model's ``mode_blend`` on ``valid``, without retraining: an exported run's
model evaluated on a split at several blends of its single forecast with the probability-weighted
mean of its K forecasts (``trainflow.trainers.driving.model.ForecastModel``).

    python -m benchmarks._driving_blend --run-dir file:///tmp/drive/run --blends 0 0.25 0.5 0.75 1

Prints one JSON line per blend: ``{"mode_blend", "split", "ade", "fde", "ade_vs_cv", "fde_vs_cv",
"miss_rate", "min_fde_6"...}``, the values the family's ``evaluate`` reports (``*_vs_cv``: the
reduction against constant velocity on the same sequences). Choose on ``valid``; read ``eval``
once, for the blend chosen.
"""

from __future__ import annotations

import argparse
import json


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", required=True, help="an exported driving run (its model/ folder)")
    parser.add_argument("--split", default="valid")
    parser.add_argument("--blends", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    args = parser.parse_args(argv)

    import torch

    from benchmarks.common import pin_threads
    from trainflow.tasks.manifest import load_manifest
    from trainflow.tasks.settings import get_settings
    from trainflow.trainers.distributed import World
    from trainflow.trainers.driving.config import DrivingConfig
    from trainflow.trainers.driving.family import DrivingFamily
    from trainflow.trainers.driving.model import build_forecaster
    from trainflow.trainers.loop import load_exported_model

    pin_threads()
    settings = get_settings()
    state, exported = load_exported_model(args.run_dir, settings)
    if exported.get("family") != "driving":
        raise SystemExit(f"{args.run_dir} holds a {exported.get('family')!r} model, not a driving one")
    model = build_forecaster(exported["export_config"])
    model.load_state_dict(state)
    model.eval()
    known = {f.name for f in DrivingConfig.__dataclass_fields__.values()}
    config = DrivingConfig(**{k: v for k, v in exported["family_config"].items() if k in known})
    family = DrivingFamily(config, load_manifest(exported["train_config"]["manifest_uri"], settings), World())
    rows = []
    for blend in args.blends:
        model.mode_blend = blend
        with torch.no_grad():
            metrics = family.evaluate(model, args.split)
        row = {"mode_blend": blend, "split": args.split}
        for key in ("ade", "fde", "miss_rate", "min_ade_6", "min_fde_6", "baseline_ade", "baseline_fde"):
            if key in metrics:
                row[key] = round(float(metrics[key]), 4)
        row["ade_vs_cv"] = round(1 - metrics["ade"] / metrics["baseline_ade"], 4)
        row["fde_vs_cv"] = round(1 - metrics["fde"] / metrics["baseline_fde"], 4)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    main()
