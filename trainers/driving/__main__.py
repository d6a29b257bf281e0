"""Train the driving family, alone or under torchrun (the same code path)::

    python -m trainflow.trainers.driving --manifest-uri file:///.../_manifest.json
    torchrun --standalone --nproc-per-node 2 -m trainflow.trainers.driving --manifest-uri file:///.../_manifest.json

Any field of the loop's ``TrainConfig`` or of :class:`~trainflow.trainers.driving.DrivingConfig` can be
set with ``--train.FIELD=VALUE`` / ``--family.FIELD=VALUE``, or from ``--config FILE.json``
(``{"train": {...}, "family": {...}}``). Without ``--config``, the training settings tuned on
the Argoverse subset's ``valid`` split (:data:`DEFAULT_TRAIN`) come first and any override
wins over them.
"""

from __future__ import annotations

import json
import sys
from typing import Any

DEFAULT_TRAIN: dict[str, Any] = {
    "epochs": 30,
    "batch_size": 128,
    "learning_rate": 1e-3,
    "weight_decay": 0.01,
    "optimizer": "adamw",
    "lr_schedule": "cosine",
    "warmup_steps": 50,
    "dag_id": "driving_training",
}


def driving_argv(argv: list[str]) -> list[str]:
    """Loop arguments from this entry point's: ``--manifest-uri`` becomes
    ``--train.manifest_uri``, and :data:`DEFAULT_TRAIN` is prepended unless ``--config`` is given."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--manifest-uri":
            value = next(args, None)
            if value is None:
                raise SystemExit("--manifest-uri needs a value")
            out.append(f"--train.manifest_uri={value}")
        elif arg.startswith("--manifest-uri="):
            out.append("--train.manifest_uri=" + arg.split("=", 1)[1])
        else:
            out.append(arg)
    if not any(a == "--config" or a.startswith("--config=") for a in out):
        out = [f"--train.{key}={json.dumps(value)}" for key, value in DEFAULT_TRAIN.items()] + out
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from trainflow.trainers.driving import DrivingConfig, DrivingFamily
    from trainflow.trainers.loop import main as loop_main

    return loop_main(DrivingFamily, DrivingConfig, driving_argv(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
