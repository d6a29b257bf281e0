"""Pipeline parameters: one definition for the Airflow trigger form and the first task's checks.

:func:`param_specs` returns, per parameter, its default and a JSON-schema fragment (type,
range, enum, description) that the DAG files turn into ``airflow.sdk.Param``; the UI renders
a typed form from it and the REST API rejects a ``conf`` that violates it. What a schema
cannot say (checks across fields, what this machine can run, whether the data URL exists) is
checked by :func:`validate_params` in the first task, before any work, with the field named.
"""

from __future__ import annotations

import os
import re
from typing import Any

PARALLELISM = ("ddp", "fsdp", "none")
# Row-sharded embedding tables: only the recommendation models have tables to shard.
RECOMMENDATION_PARALLELISM = ("ddp", "fsdp", "sharded_embeddings", "none")
APPROVAL_MODES = ("auto", "always", "never")
DEVICES = ("cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
LAUNCHERS = ("local", "kubernetes")
KUBERNETES_JOB_KINDS = ("trainjob", "pytorchjob")
ENDPOINT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9.\-]*:[0-9]{1,5}$"

RECOMMENDATION_MODELS = ("neumf", "gmf", "mlp", "sasrec")
DRIVING_MODELS = ("mlp", "context")


class ParamError(ValueError):
    """A parameter value is invalid; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"param {field!r}: {message}")
        self.field = field


def _spec(default: Any, schema: dict[str, Any], description: str, title: str | None = None) -> dict[str, Any]:
    return {"default": default, "schema": schema, "description": description, "title": title}


def param_specs(kind: str) -> dict[str, dict[str, Any]]:
    """Parameters of the ``kind`` pipeline (``recommendation`` or ``driving``), in form order."""
    if kind == "recommendation":
        source = "synthetic://recommendation?num_interactions=100000"
        source_help = (
            "Raw interactions: a MovieLens release name (movielens-100k, movielens-1m, movielens-20m, "
            "movielens-25m, movielens-32m), an fsspec URL of a ratings file / folder / NCF split "
            "(file://, s3://), or synthetic://recommendation?num_interactions=N."
        )
        models, model_default = RECOMMENDATION_MODELS, "sasrec"
        model_help = (
            "sasrec: self-attention over each user's history in time order (the best here); "
            "neumf, gmf, mlp: the NCF family of He et al. 2017 (tuned with batch_size 512, learning_rate 0.001)."
        )
        epochs, batch, lr = 60, 256, 0.002
        registered, metric = "trainflow-recommendation", "ndcg_at_10"
        metrics = ["ndcg_at_10", "hr_at_10"]
        parallelisms = RECOMMENDATION_PARALLELISM
        parallelism_help = (
            "ddp: the model replicated on every rank; fsdp: every parameter sharded (FSDP2), each table "
            "gathered for its forward; sharded_embeddings: the user/item embedding tables split row-wise "
            "across ranks and never gathered (each rank holds 1/world of their rows and optimizer state; "
            "for tables too large for one rank), the rest replicated with DDP; none: a single process."
        )
    elif kind == "driving":
        source = "synthetic://driving?num_sequences=2000"
        source_help = (
            "Raw scenarios: an fsspec URL of a folder of Argoverse-1 forecasting CSV files (file://, s3://) "
            "or synthetic://driving?num_sequences=N."
        )
        models, model_default = DRIVING_MODELS, "context"
        model_help = "Forecaster: mlp (history only) or context (history + surrounding vehicles)."
        epochs, batch, lr = 30, 128, 0.001
        registered, metric = "trainflow-driving", "ade"
        metrics = ["ade", "fde", "miss_rate"]
        parallelisms = PARALLELISM
        parallelism_help = "ddp: replicated model; fsdp: sharded parameters (FSDP2); none: a single process."
    else:
        raise ValueError(f"kind must be 'recommendation' or 'driving', got {kind!r}")
    size = 64 if kind == "recommendation" else 256
    return {
        "source_url": _spec(
            source,
            {"type": "string", "minLength": 1},
            source_help
            + f" Manual runs only: a scheduled run trains on the production configuration (Airflow Variable "
            f"trainflow_{kind}_production or TRAINFLOW_{kind.upper()}_PRODUCTION) and fails if there is none; an "
            "Asset-triggered run on the triggering event's source_url.",
            "Data source",
        ),
        "dataset_name": _spec(
            None,
            {"type": ["null", "string"], "pattern": r"^[A-Za-z0-9_][A-Za-z0-9._+=@,-]*$", "maxLength": 128},
            "Name of the dataset under {root}/datasets/; empty: derived from the source.",
            "Dataset name",
        ),
        "model": _spec(model_default, {"type": "string", "enum": list(models)}, model_help, "Model"),
        "model_size": _spec(
            size,
            {"type": "integer", "minimum": 4, "maximum": 4096},
            "Embedding / hidden size of the model (NCF: GMF factors, MLP tower 2×size...; SASRec: hidden size; "
            "driving: decoder width).",
            "Model size",
        ),
        "model_options": _spec(
            {},
            {"type": "object"},
            "Further settings of the model family as JSON, e.g. {\"dropout\": 0.1, \"max_seq_len\": 100} "
            "(fields of RecommendationConfig / DrivingConfig; see docs/trainer.md).",
            "Model options",
        ),
        "epochs": _spec(epochs, {"type": "integer", "minimum": 1, "maximum": 1000}, "Training epochs.", "Epochs"),
        "batch_size": _spec(
            batch, {"type": "integer", "minimum": 1, "maximum": 1_048_576}, "Global batch size (all ranks).", "Batch size"
        ),
        "learning_rate": _spec(
            lr, {"type": "number", "exclusiveMinimum": 0, "maximum": 10}, "Adam learning rate.", "Learning rate"
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
        "parallelism": _spec(
            "ddp",
            {"type": "string", "enum": list(parallelisms)},
            parallelism_help,
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
        "registered_model_name": _spec(
            registered,
            {"type": "string", "minLength": 1, "maxLength": 256},
            "MLflow registered model to add the new version to.",
            "Registered model",
        ),
        "promotion_metric": _spec(
            metric, {"type": "string", "enum": metrics}, "Metric the champion/challenger gate compares.", "Promotion metric"
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


def unknown_params(params: dict[str, Any], kind: str) -> list[str]:
    """The keys of ``params`` (a DAG run's conf) that are no param of the ``kind`` pipeline, sorted."""
    return sorted(set(params) - set(param_specs(kind)))


def unknown_param_message(key: str, kind: str) -> str:
    """Why ``key`` is refused, with the closest known name when there is one."""
    import difflib

    known = list(param_specs(kind))
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown parameter ({hint}known: {', '.join(known)})"


def validate_params(params: dict[str, Any], kind: str, cpu_count: int | None = None, cuda_devices: int | None = None) -> dict[str, Any]:
    """Check the values and the combinations a JSON schema cannot express.

    Args:
        params: The DAG run's params (defaults filled in by Airflow).
        kind: ``recommendation`` or ``driving``.
        cpu_count: CPUs usable here (default: this machine's).
        cuda_devices: CUDA devices here (default: none unless torch says otherwise; pass it in
            to avoid importing torch).

    Returns:
        The params with every known key, defaults filled in.

    Raises:
        ParamError: naming the first bad field.
    """
    specs = param_specs(kind)
    unknown = unknown_params(params, kind)
    if unknown:
        raise ParamError(unknown[0], unknown_param_message(unknown[0], kind))
    values = {key: params.get(key, spec["default"]) for key, spec in specs.items()}
    for key, spec in specs.items():
        _check_schema(key, values[key], spec["schema"])
    if cpu_count is None:
        cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = values["launcher"] == "local"
    if local:
        _check_local_machine(values, cpu_count, cuda_devices)
    else:
        _check_kubernetes(values)
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
    if values["batch_size"] < world:
        raise ParamError("batch_size", f"{values['batch_size']} is smaller than the world size {world}")
    source = values["source_url"].strip()
    if not source:
        raise ParamError("source_url", "must not be empty")
    values["source_url"] = source
    return values


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


def _check_schema(key: str, value: Any, schema: dict[str, Any]) -> None:
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
