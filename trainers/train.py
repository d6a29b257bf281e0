"""The one trainer entry for every pipeline, alone or under torchrun (the same code path)::

    python -m trainflow.trainers.train --pipeline NAME --config run_config.json
    torchrun --standalone --nproc-per-node 2 -m trainflow.trainers.train --pipeline NAME --config URL

``--config`` is the run configuration the train step validated and wrote whole
(``{"pipeline", "train": {...}, "family": {...}}``, a local path or a storage URL);
``--train.FIELD=VALUE`` / ``--family.FIELD=VALUE`` override single fields. The pipeline's
``train_defaults`` come first, so the file and the overrides win over them. ``--pipeline`` may
be left out when the file names it.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def pipeline_argv(argv: list[str]) -> tuple[str | None, list[str]]:
    """(``--pipeline`` value or ``None``, the other arguments)."""
    name = None
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == "--pipeline":
            name = next(args, None)
            if name is None:
                raise SystemExit("--pipeline needs a value")
        elif arg.startswith("--pipeline="):
            name = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    return name, rest


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train the pipeline named by ``--pipeline`` (or by the config file)."""
    from trainflow.tasks.pipelines import get_pipeline
    from trainflow.trainers.loop import main as loop_main
    from trainflow.trainers.loop import read_run_config

    name, rest = pipeline_argv(sys.argv[1:] if argv is None else argv)
    if name is None:
        config = next((a.split("=", 1)[1] for a in rest if a.startswith("--config=")), None)
        if config is None and "--config" in rest and rest.index("--config") + 1 < len(rest):
            config = rest[rest.index("--config") + 1]
        name = read_run_config(config).get("pipeline") if config else None
        if not name:
            raise SystemExit("name the pipeline: --pipeline NAME (or a config file with a 'pipeline' key)")
    spec = get_pipeline(name)
    family_cls, config_cls = spec.load_family()
    defaults = [f"--train.{key}={json.dumps(value)}" for key, value in spec.train_defaults.items()]
    overrides = [a for a in rest if a.startswith(("--train.", "--family."))]
    others = [a for a in rest if a not in overrides]
    # Order: pipeline defaults < the config file < explicit overrides (parse_args applies the
    # file first, then the --section.FIELD arguments in order).
    return loop_main(family_cls, config_cls, others + _not_in_file(defaults, others) + overrides)


def _not_in_file(defaults: list[str], others: list[str]) -> list[str]:
    """The defaults whose field the config file does not set (a default must not beat the file)."""
    from trainflow.trainers.loop import read_run_config

    config = None
    for i, arg in enumerate(others):
        if arg.startswith("--config="):
            config = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(others):
            config = others[i + 1]
    if config is None:
        return defaults
    train = read_run_config(config).get("train", {})
    return [d for d in defaults if d[len("--train."):].split("=", 1)[0] not in train]


if __name__ == "__main__":
    main()
