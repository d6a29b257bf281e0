"""Airflow cluster policy: a run that trains on CUDA goes to GPU workers.

Airflow takes a task instance's Celery queue from the serialized task, which is the same for every
run; whether a run trains on GPUs is a param of that run (``device``). Airflow's supported hook for a
per-run choice is ``task_instance_mutation_hook``: it runs scheduler-side (and where the API server
creates a triggered run's task instances) with the run at hand, before anything is queued. trainflow
registers it through the ``airflow.policy`` entry point of its package, so every component of an
environment where trainflow is installed applies it, with no ``airflow_local_settings.py``.

A run with ``device=cuda`` and ``launcher=local`` sends *all* its tasks to the GPU queue: each step
validates the run's params against the machine it runs on (``trainflow.tasks.params.validate_params``), and
the torchrun ranks of ``train`` / ``train_node`` need the GPUs. ``launcher=kubernetes`` runs keep
the default queue (their pods ask the cluster for GPUs). The queue name is Airflow's option
``[trainflow] gpu_queue`` (``AIRFLOW__TRAINFLOW__GPU_QUEUE``), ``gpu`` by default; GPU workers
listen on it (``airflow celery worker --queues gpu``), CPU workers on Airflow's default queue only.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import pluggy

log = logging.getLogger(__name__)

# Airflow's marker for policy hooks (airflow.policies.hookimpl), made here: importing airflow from a
# module that Airflow itself loads while it initialises would be circular.
hookimpl = pluggy.HookimplMarker("airflow.policy")

DEFAULT_GPU_QUEUE = "gpu"
_ROUTING_PARAMS = ("device", "launcher")


def gpu_queue() -> str:
    """The Celery queue of GPU workers: ``[trainflow] gpu_queue``, ``gpu`` by default."""
    from airflow.configuration import conf

    return conf.get("trainflow", "gpu_queue", fallback=DEFAULT_GPU_QUEUE) or DEFAULT_GPU_QUEUE


def run_routing_params(task_instance: Any, dag_run: Any) -> dict[str, Any]:
    """``device`` and ``launcher`` of the run: the DAG's defaults, overridden by the run's conf."""
    values: dict[str, Any] = {}
    params = getattr(getattr(task_instance, "task", None), "params", None)
    for key in _ROUTING_PARAMS:
        try:
            if params is not None and key in params:
                values[key] = params[key]
        except Exception:  # a params object that cannot resolve a value: the conf decides alone
            log.debug("param %s of %s not readable", key, getattr(task_instance, "task_id", "?"))
    conf = getattr(dag_run, "conf", None)
    if isinstance(conf, dict):
        values.update({key: conf[key] for key in _ROUTING_PARAMS if key in conf})
    return values


def needs_gpu_worker(values: dict[str, Any]) -> bool:
    """True when the run trains with torchrun on the workers themselves, on CUDA."""
    return values.get("device") == "cuda" and values.get("launcher", "local") == "local"


@hookimpl
def task_instance_mutation_hook(task_instance: Any, dag_run: Any) -> None:
    """Route every task of a ``device=cuda`` run to the GPU workers' queue (idempotent).

    ``dag_run`` is ``None`` while a task instance is being constructed; Airflow calls the hook again
    with the run before the instance is stored, and that call decides.
    """
    if dag_run is None:
        return
    if needs_gpu_worker(run_routing_params(task_instance, dag_run)):
        task_instance.queue = gpu_queue()


def _mark_hook_active() -> None:
    """Tell Airflow that a task instance mutation hook is registered.

    Airflow 3.3 sets ``airflow.settings.task_instance_mutation_hook.is_noop = False`` only when the
    hook comes from an ``airflow_local_settings`` module; for one from an ``airflow.policy`` entry
    point it stays ``True``, and ``DagRun.verify_integrity`` then creates a run's task instances
    without calling the hook. Airflow loads this module (the entry point) from
    ``airflow.settings.initialize``, so the flag is there to set.
    """
    hook = getattr(sys.modules.get("airflow.settings"), "task_instance_mutation_hook", None)
    if hook is not None:
        hook.is_noop = False


_mark_hook_active()
