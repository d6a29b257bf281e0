"""Pipeline parameters: one definition for the Airflow trigger form and the first task's checks.

:func:`param_specs` returns, per parameter, its default and a JSON-schema fragment (type,
range, enum, description) that the DAG files turn into ``airflow.sdk.Param``; the UI renders
a typed form from it and the REST API rejects a ``conf`` that violates it. The common params
are defined here; a pipeline adds or overrides some through its spec
(:attr:`trainflow.tasks.pipelines.PipelineSpec.params`). What a schema cannot say (checks across fields,
what this machine can run, the model family's own settings, whether the data URL exists) is
checked by :func:`validate_params` in the first task, before any work, with the field named.
"""

from __future__ import annotations

import os
import re
from typing import Any

PARALLELISM = ("ddp", "fsdp", "none")
APPROVAL_MODES = ("auto", "always", "never")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
LAUNCHERS = ("local", "kubernetes")
SCHEDULES = ("constant", "cosine", "linear")  # trainflow.trainers.config.SCHEDULES (tests/tasks/test_params.py)
KUBERNETES_JOB_KINDS = ("trainjob", "pytorchjob")
ENDPOINT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9.\-]*:[0-9]{1,5}$"
REGISTERED_MODEL_NAME_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\- ()]*$"
"""What a ``registered_model_name`` may hold: no quote (it goes into MLflow filter strings such as
``name='...'``), no ``/`` or ``:`` (MLflow refuses them), no ``@`` (``models:/NAME@alias``), no
leading space."""



class ParamError(ValueError):
    """A parameter value is invalid; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"param {field!r}: {message}")
        self.field = field
        self.reason = message


def _spec(default: Any, schema: dict[str, Any], description: str, title: str | None = None) -> dict[str, Any]:
    return {"default": default, "schema": schema, "description": description, "title": title}


def param_specs(pipeline: Any) -> dict[str, dict[str, Any]]:
    """Parameters of ``pipeline`` (a registered name or a spec), in form order: the common ones
    with the pipeline's overrides merged in, then the ones the pipeline adds.

    Raises:
        trainflow.tasks.pipelines.UnknownPipelineError: no such pipeline; lists the registered ones.
    """
    from trainflow.tasks.pipelines import get_pipeline

    spec = get_pipeline(pipeline)
    specs = _common_specs()
    specs["registered_model_name"]["default"] = spec.registered_model_name
    specs["promotion_metric"]["default"] = spec.promotion_metric
    for key in ("lr_schedule", "warmup_steps", "adam_beta2"):  # the pipeline's tuned training settings
        if key in spec.train_defaults:
            specs[key]["default"] = spec.train_defaults[key]
    specs["promotion_metric"]["schema"] = {"type": "string", "enum": list(spec.promotion_metrics)}
    for key, override in spec.params.items():
        unknown = set(override) - {"default", "schema", "description", "title"}
        if unknown:
            raise ValueError(f"pipeline {spec.name!r}: param {key!r} has unknown keys {sorted(unknown)}")
        if key in specs:
            merged = dict(specs[key])
            merged["schema"] = {**specs[key]["schema"], **override.get("schema", {})}
            merged.update({k: v for k, v in override.items() if k != "schema"})
            specs[key] = merged
        else:
            if "schema" not in override or "default" not in override:
                raise ValueError(f"pipeline {spec.name!r}: the param {key!r} it adds needs a default and a schema")
            specs[key] = _spec(override["default"], dict(override["schema"]), override.get("description", ""),
                               override.get("title"))
    if specs["source_url"]["default"] is None:
        raise ValueError(f"pipeline {spec.name!r}: give the source_url param a default in PipelineSpec.params")
    specs["source_url"]["description"] += (
        f" Manual runs only: a scheduled run trains on the production configuration (Airflow Variable "
        f"trainflow_{spec.name}_production or TRAINFLOW_{spec.name.upper()}_PRODUCTION) and fails if there is none; an "
        "Asset-triggered run on the triggering event's source_url."
    )
    return specs


def _common_specs() -> dict[str, dict[str, Any]]:
    """The params every pipeline has, with generic defaults."""
    common = {
        "source_url": _spec(None, {"type": "string", "minLength": 1}, "Raw data: a URL the pipeline reads (file://, s3://...).", "Data source"),
        "dataset_name": _spec(
            None,
            {"type": ["null", "string"], "pattern": r"^[A-Za-z0-9_][A-Za-z0-9._+=@,-]*$", "maxLength": 128},
            "Name of the dataset under {root}/datasets/; empty: derived from the source.",
            "Dataset name",
        ),
        "model": _spec("default", {"type": "string"}, "Model of the pipeline's family to train.", "Model"),
        "model_size": _spec(
            64,
            {"type": "integer", "minimum": 4, "maximum": 4096},
            "Embedding / hidden size of the model (what it sets is the pipeline's family's choice).",
            "Model size",
        ),
        "model_options": _spec(
            {},
            {"type": "object"},
            "Further settings of the model family as JSON, e.g. {\"dropout\": 0.1}: fields of the pipeline's "
            "family config (see docs/trainer.md); an unknown field is refused before training starts.",
            "Model options",
        ),
        "epochs": _spec(10, {"type": "integer", "minimum": 1, "maximum": 1000}, "Training epochs.", "Epochs"),
        "batch_size": _spec(
            256,
            {"type": "integer", "minimum": 1, "maximum": 1_048_576},
            "Global batch size (all ranks); a multiple of the world size (nnodes × nproc_per_node).",
            "Batch size",
        ),
        "learning_rate": _spec(
            0.001, {"type": "number", "exclusiveMinimum": 0, "maximum": 10}, "Adam learning rate.", "Learning rate"
        ),
        "lr_schedule": _spec(
            "constant",
            {"type": "string", "enum": list(SCHEDULES)},
            "Learning-rate schedule after the warmup: constant, cosine (down to 10 % of the peak at the last "
            "step) or linear (down to 0). The default is the pipeline's own.",
            "Learning-rate schedule",
        ),
        "warmup_steps": _spec(
            0,
            {"type": "integer", "minimum": 0, "maximum": 1_000_000},
            "Optimizer steps of linear warmup from 0 to the learning rate. The default is the pipeline's own.",
            "Warmup steps",
        ),
        "adam_beta2": _spec(
            0.999,
            {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
            "Adam's decay of the squared-gradient average (beta2); Transformers often train with 0.98. "
            "The default is the pipeline's own.",
            "Adam beta2",
        ),
        "nnodes": _spec(
            1,
            {"type": "integer", "minimum": 1, "maximum": 1024},
            "Machines (torchrun nodes) to train on. launcher=local: one Airflow task per node, all in the "
            "training pool at the same time (the pool needs at least nnodes free slots); kubernetes: one pod per node.",
            "Nodes",
        ),
        "nproc_per_node": _spec(
            2,
            {"type": "integer", "minimum": 1, "maximum": 64},
            "Training processes per node (one per GPU with device=cuda; at most the CPU count with cpu).",
            "Processes per node",
        ),
        "max_restarts": _spec(
            1,
            {"type": "integer", "minimum": 0, "maximum": 10},
            "How often torchrun restarts the training processes after a rank fails; they resume from the last checkpoint.",
            "Max restarts",
        ),
        "launcher": _spec(
            "local",
            {"type": "string", "enum": list(LAUNCHERS)},
            "local: torchrun on the Airflow worker(s), one task per node; kubernetes: a Kubeflow training job "
            "(TrainJob or PyTorchJob) on the cluster of the Kubernetes connection, submitted and watched by the train task.",
            "Launcher",
        ),
        "rdzv_endpoint": _spec(
            None,
            {"type": ["null", "string"], "pattern": ENDPOINT_PATTERN, "maxLength": 260},
            "Multi-node (launcher=local): host:port of the c10d rendezvous, reachable from every node's worker "
            "(node 0's task hosts it). Empty: node 0's task picks a free port on its own machine and publishes "
            "host:port to the other node tasks through XCom.",
            "Rendezvous endpoint",
        ),
        "rdzv_join_timeout_s": _spec(
            600,
            {"type": "integer", "minimum": 5, "maximum": 86400},
            "Multi-node: seconds every node waits for all nnodes nodes to join before failing with the missing "
            "node(s) named (a node whose task never starts).",
            "Rendezvous join timeout (s)",
        ),
        "kubernetes_image": _spec(
            None,
            {"type": ["null", "string"], "maxLength": 512},
            "launcher=kubernetes: container image with trainflow installed (docker/trainer-cuda.Dockerfile builds one).",
            "Kubernetes: image",
        ),
        "kubernetes_namespace": _spec(
            "default",
            {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63},
            "launcher=kubernetes: namespace of the training job.",
            "Kubernetes: namespace",
        ),
        "kubernetes_job_kind": _spec(
            "trainjob",
            {"type": "string", "enum": list(KUBERNETES_JOB_KINDS)},
            "launcher=kubernetes: trainjob (Kubeflow Trainer v2, trainer.kubeflow.org/v1alpha1) or pytorchjob "
            "(the older Training Operator, kubeflow.org/v1).",
            "Kubernetes: job kind",
        ),
        "kubernetes_gpus_per_node": _spec(
            None,
            {"type": ["null", "integer"], "minimum": 0, "maximum": 64},
            "launcher=kubernetes: nvidia.com/gpu requested per node (pod); empty: nproc_per_node with device=cuda, "
            "0 with cpu.",
            "Kubernetes: GPUs per node",
        ),
        "kubernetes_cpu_per_node": _spec(
            None,
            {"type": ["null", "string"], "pattern": r"^[0-9]+(\.[0-9]+)?m?$", "maxLength": 16},
            "launcher=kubernetes: CPU request/limit per pod (Kubernetes quantity, e.g. \"8\" or \"7500m\"); empty: none.",
            "Kubernetes: CPU per node",
        ),
        "kubernetes_memory_per_node": _spec(
            None,
            {"type": ["null", "string"], "pattern": r"^[0-9]+(\.[0-9]+)?([EPTGMK]i?|[eE][0-9]+)?$", "maxLength": 16},
            "launcher=kubernetes: memory request/limit per pod (e.g. \"32Gi\"); empty: none.",
            "Kubernetes: memory per node",
        ),
        "kubernetes_start_timeout_s": _spec(
            900,
            {"type": "integer", "minimum": 10, "maximum": 86400},
            "launcher=kubernetes: seconds the job's pods may take to start (image pull, scheduling) before the "
            "task fails naming what they wait for; an image-pull error or an unschedulable pod fails it at once.",
            "Kubernetes: start timeout (s)",
        ),
        "parallelism": _spec(
            "ddp",
            {"type": "string", "enum": list(PARALLELISM)},
            "ddp: replicated model; fsdp: sharded parameters (FSDP2); none: a single process.",
            "Parallelism",
        ),
        "device": _spec(
            "cpu",
            {"type": "string", "enum": list(DEVICES)},
            "cpu (gloo) or cuda (nccl; one GPU per process, cuda:LOCAL_RANK, batches from pinned memory).",
            "Device",
        ),
        "precision": _spec(
            "auto",
            {"type": "string", "enum": list(PRECISIONS)},
            "auto: bf16 autocast on cuda, fp32 on cpu; bf16: bf16 autocast on either; fp32: no autocast. "
            "Weights and optimizer state stay fp32.",
            "Precision",
        ),
        "compile": _spec(
            False,
            {"type": "boolean"},
            "Compile the model with torch.compile (inductor): slower first steps, faster long runs.",
            "torch.compile",
        ),
        "checkpoint_every_minutes": _spec(
            10,
            {"type": "number", "minimum": 0, "maximum": 1440},
            "Besides the checkpoint at every epoch end, checkpoint mid-epoch once this many minutes of the "
            "run have passed since the last checkpoint (fractions allowed), so that a failure loses at most "
            "about that much training; the loader position is committed with it, so a resume continues the "
            "epoch where it stopped, each sample trained once. 0: only at epoch ends.",
            "Checkpoint every (minutes)",
        ),
        "registered_model_name": _spec(
            None,
            {"type": "string", "minLength": 1, "maxLength": 256, "pattern": REGISTERED_MODEL_NAME_PATTERN},
            "MLflow registered model to add the new version to: letters, digits, spaces and ._-() (no quotes, '/', ':' "
            "or '@': the name goes into MLflow search filters and model URIs).",
            "Registered model",
        ),
        "promotion_metric": _spec(
            None, {"type": "string"}, "Metric the champion/challenger gate compares.", "Promotion metric"
        ),
        "promotion_margin": _spec(
            0.0,
            {"type": "number", "minimum": 0, "maximum": 1},
            "How much better (absolute) the challenger must be than the champion to be promoted.",
            "Promotion margin",
        ),
        "require_approval": _spec(
            "auto",
            {
                "type": "string",
                "enum": list(APPROVAL_MODES),
                "values_display": {
                    "auto": "auto: manual runs wait for a reviewer, scheduled runs do not",
                    "always": "always: wait for a reviewer",
                    "never": "never: the automated gate alone decides",
                },
            },
            "Whether a human approves the promotion to champion (in the Airflow UI, task 'approve') after "
            "the automated gate has passed. auto: yes for a manually triggered run, no for a scheduled or "
            "Asset-triggered one (those train only on the production configuration or the event's data, never "
            "on this form's defaults). Without a reviewer, champion moves only when the gate passes on the same "
            "dataset as the champion's (same dataset name and split protocol; a newer version of it is re-scored), "
            "or, with no champion yet, against the baseline; a model trained on another dataset stays challenger.",
            "Require approval",
        ),
        "approval_timeout_hours": _spec(
            72,
            {"type": "number", "exclusiveMinimum": 0, "maximum": 720},
            "How long the approval waits for a reviewer (fractions allowed); with no answer by then the "
            "version is rejected, recorded as a timeout.",
            "Approval timeout (hours)",
        ),
        "allow_gate_override": _spec(
            False,
            {"type": "boolean"},
            "Let a reviewer promote a version that failed the automated gate (recorded as an override). "
            "Off: a failed gate is final and no approval is asked.",
            "Allow gate override",
        ),
        "seed": _spec(0, {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}, "Seed of sampling and training.", "Seed"),
    }
    return common


def unknown_params(params: dict[str, Any], pipeline: Any) -> list[str]:
    """The keys of ``params`` (a DAG run's conf) that are no param of ``pipeline``, sorted."""
    return sorted(set(params) - set(param_specs(pipeline)))


def unknown_param_message(key: str, pipeline: Any) -> str:
    """Why ``key`` is refused, with the closest known name when there is one."""
    import difflib

    known = list(param_specs(pipeline))
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown parameter ({hint}known: {', '.join(known)})"


def validate_params(
    params: dict[str, Any],
    pipeline: Any,
    cpu_count: int | None = None,
    cuda_devices: int | None = None,
    *,
    check_machine: bool = True,
) -> dict[str, Any]:
    """Check the values and the combinations a JSON schema cannot express.

    Args:
        params: The DAG run's params (defaults filled in by Airflow).
        pipeline: The pipeline's name or spec.
        cpu_count: CPUs usable here (default: this machine's).
        cuda_devices: CUDA devices here (default: none unless torch says otherwise; pass it in
            to avoid importing torch).
        check_machine: Check what this machine can run (``launcher=local``: CPUs, GPUs);
            ``False`` where the run is only being triggered (the API server).

    Returns:
        The params with every known key, defaults filled in.

    Raises:
        ParamError: naming the first bad field.
    """
    specs = param_specs(pipeline)
    unknown = sorted(set(params) - set(specs))
    if unknown:
        raise ParamError(unknown[0], unknown_param_message(unknown[0], pipeline))
    values = {key: params.get(key, spec["default"]) for key, spec in specs.items()}
    for key, spec in specs.items():
        check_schema(key, values[key], spec["schema"])
    if cpu_count is None:
        cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = values["launcher"] == "local"
    if not local:
        _check_kubernetes(values)
    elif check_machine:
        _check_local_machine(values, cpu_count, cuda_devices)
    for key in values["model_options"]:
        if not re.fullmatch(r"[a-z][a-z0-9_]*", str(key)):
            raise ParamError("model_options", f"{key!r} is not a setting name")
        if key in ("seed", "model"):
            raise ParamError("model_options", f"set {key!r} with its own param, not in model_options")
    if values["rdzv_endpoint"] is not None:
        port = int(values["rdzv_endpoint"].rpartition(":")[2])
        if not 1 <= port <= 65535:
            raise ParamError("rdzv_endpoint", f"port {port} is not in 1-65535")
    world = values["nnodes"] * values["nproc_per_node"]
    if values["parallelism"] == "none" and world > 1:
        raise ParamError("parallelism", f"'none' runs one process, but nnodes × nproc_per_node = {world}")
    if values["parallelism"] == "none":
        world = 1
    if values["batch_size"] < world:
        raise ParamError("batch_size", f"{values['batch_size']} is smaller than the world size {world}")
    if values["batch_size"] % world:
        raise ParamError(
            "batch_size",
            f"{values['batch_size']} is not a multiple of the world size {world} (nnodes {values['nnodes']} × "
            f"nproc_per_node {values['nproc_per_node']}): every rank takes an equal share of each batch",
        )
    _check_family_settings(values, pipeline)
    source = values["source_url"].strip()
    if not source:
        raise ParamError("source_url", "must not be empty")
    values["source_url"] = source
    return values


def _check_family_settings(values: dict[str, Any], pipeline: Any) -> None:
    """Build the pipeline's family config from the params, as the trainer will: an unknown
    ``model_options`` key or a value the config refuses fails here, before any process starts."""
    import dataclasses
    import difflib

    from trainflow.tasks.pipelines import get_pipeline, load_object

    spec = get_pipeline(pipeline)
    config_cls = load_object(spec.family_config)
    settings = spec.settings_for_family(values)
    fields = [f.name for f in dataclasses.fields(config_cls)] if dataclasses.is_dataclass(config_cls) else None
    if fields is not None:
        options = values.get("model_options") or {}
        for key in sorted(set(settings) - set(fields)):
            field = "model_options" if key in options else "model"
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ParamError(field, f"{key!r} is no setting of {config_cls.__name__} ({hint}known: {', '.join(fields)})")
    try:
        config_cls(**settings)
    except (TypeError, ValueError) as exc:
        raise ParamError("model_options", f"{config_cls.__name__}: {exc}") from exc


def _check_local_machine(values: dict[str, Any], cpu_count: int, cuda_devices: int | None) -> None:
    """launcher=local: the processes of one node run on this worker's machine."""
    if values["device"] == "cpu" and values["nproc_per_node"] > cpu_count:
        raise ParamError(
            "nproc_per_node",
            f"{values['nproc_per_node']} processes per node but this machine has {cpu_count} CPUs",
        )
    if values["device"] == "cuda":
        devices = cuda_devices or 0
        if values["nproc_per_node"] > devices:
            raise ParamError(
                "nproc_per_node" if devices else "device",
                f"{values['nproc_per_node']} processes need as many CUDA devices, this machine has {devices}",
            )


def _check_kubernetes(values: dict[str, Any]) -> None:
    """launcher=kubernetes: what the job needs; this machine's CPUs and GPUs do not matter."""
    image = (values["kubernetes_image"] or "").strip()
    if not image:
        raise ParamError("kubernetes_image", "launcher=kubernetes needs the image the training pods run")
    if any(c.isspace() for c in image):
        raise ParamError("kubernetes_image", f"{image!r} contains whitespace")
    values["kubernetes_image"] = image
    gpus = values["kubernetes_gpus_per_node"]
    if values["device"] == "cuda":
        if gpus is None:
            values["kubernetes_gpus_per_node"] = values["nproc_per_node"]
        elif gpus < values["nproc_per_node"]:
            raise ParamError(
                "kubernetes_gpus_per_node",
                f"{gpus} GPUs per node for nproc_per_node={values['nproc_per_node']} processes (one GPU each) with device=cuda",
            )
    elif gpus is None:
        values["kubernetes_gpus_per_node"] = 0
    if values["rdzv_endpoint"] is not None:
        raise ParamError("rdzv_endpoint", "launcher=kubernetes: the job's own service is the rendezvous; leave it empty")


def check_schema(key: str, value: Any, schema: dict[str, Any]) -> None:
    types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
    py = {
        "object": (dict,),
        "string": (str,),
        "integer": (int,),
        "number": (int, float),
        "null": (type(None),),
        "boolean": (bool,),
    }
    if isinstance(value, bool) and "boolean" not in types:
        raise ParamError(key, f"expected {' or '.join(types)}, got a boolean")
    if not any(isinstance(value, py[t]) for t in types):
        raise ParamError(key, f"expected {' or '.join(types)}, got {type(value).__name__} {value!r}")
    if value is None:
        return
    if isinstance(value, bool) and "boolean" in types:
        return
    if "enum" in schema and value not in schema["enum"]:
        raise ParamError(key, f"{value!r} is not one of {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        raise ParamError(key, f"{value} is below the minimum {schema['minimum']}")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        raise ParamError(key, f"{value} must be greater than {schema['exclusiveMinimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        raise ParamError(key, f"{value} is above the maximum {schema['maximum']}")
    if "exclusiveMaximum" in schema and value >= schema["exclusiveMaximum"]:
        raise ParamError(key, f"{value} must be less than {schema['exclusiveMaximum']}")
    if "minLength" in schema and len(value) < schema["minLength"]:
        raise ParamError(key, "must not be empty")
    if "maxLength" in schema and len(value) > schema["maxLength"]:
        raise ParamError(key, f"longer than {schema['maxLength']} characters")
    if "pattern" in schema:
        if not re.fullmatch(schema["pattern"], value):
            raise ParamError(key, f"{value!r} does not match {schema['pattern']}")


def approval_required(mode: str, run_type: str) -> bool:
    """Whether a run waits for a reviewer before ``champion`` moves.

    Args:
        mode: The ``require_approval`` param: ``auto``, ``always`` or ``never``.
        run_type: The DAG run's type (``manual``, ``scheduled``, ``asset_triggered``, ``backfill``...).

    Returns:
        ``always`` → True, ``never`` → False, ``auto`` → True only for a manually triggered run.

    Raises:
        ParamError: for an unknown mode.
    """
    if mode not in APPROVAL_MODES:
        raise ParamError("require_approval", f"{mode!r} is not one of {list(APPROVAL_MODES)}")
    if mode == "auto":
        return str(getattr(run_type, "value", run_type)) == "manual"
    return mode == "always"
