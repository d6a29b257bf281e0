"""Train a recommender with the generic loop, alone or under torchrun (same code path).

    python -m trainflow.trainers.recommendation --manifest-uri file:///.../_manifest.json --model sasrec \\
        --epochs 40 --batch-size 256 --learning-rate 0.002
    torchrun --standalone --nproc-per-node 2 -m trainflow.trainers.recommendation --manifest-uri ... --model neumf

Shortcuts (``--manifest-uri``, ``--model``, ``--epochs``, ``--batch-size``, ``--learning-rate``,
``--parallelism``, ``--device``, ``--run-dir``) become the loop's ``--train.FIELD=VALUE`` /
``--family.FIELD=VALUE`` arguments; those, and ``--config FILE``, pass through unchanged.
"""

from __future__ import annotations

import sys

from trainflow.trainers.loop import main
from trainflow.trainers.recommendation.config import RecommendationConfig
from trainflow.trainers.recommendation.family import RecommendationFamily

SHORTCUTS = {
    "--manifest-uri": "train.manifest_uri",
    "--epochs": "train.epochs",
    "--batch-size": "train.batch_size",
    "--learning-rate": "train.learning_rate",
    "--parallelism": "train.parallelism",
    "--device": "train.device",
    "--run-dir": "train.run_dir",
    "--seed": "train.seed",
    "--model": "family.model",
}


def expand_shortcuts(argv: list[str]) -> list[str]:
    """``--model neumf`` / ``--model=neumf`` -> ``--family.model=neumf`` (others unchanged)."""
    out: list[str] = []
    args = iter(argv)
    for arg in args:
        flag, sep, value = arg.partition("=")
        if flag in SHORTCUTS:
            if not sep:
                value = next(args, None)
                if value is None:
                    raise SystemExit(f"{flag} needs a value")
            out.append(f"--{SHORTCUTS[flag]}={value}")
        else:
            out.append(arg)
    return out


if __name__ == "__main__":
    argv = expand_shortcuts(sys.argv[1:])
    if not any(a.startswith("--family.seed") for a in argv):
        # one seed for the loop and the family's sampling unless given separately
        argv += [f"--family.seed={a.partition('=')[2]}" for a in argv if a.startswith("--train.seed=")]
    main(RecommendationFamily, RecommendationConfig, argv)
