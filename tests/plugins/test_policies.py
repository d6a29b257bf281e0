"""trainflow's cluster policy: a device=cuda run goes to the GPU workers' Celery queue."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from trainflow.airflow import policies


def make_ti(task_id: str = "train", queue: str = "default", params: dict | None = None) -> SimpleNamespace:
    return SimpleNamespace(task_id=task_id, queue=queue, task=SimpleNamespace(params=params or {}))


@pytest.mark.parametrize(
    ("conf", "defaults", "queue"),
    [
        ({"device": "cuda"}, {"device": "cpu", "launcher": "local"}, "gpu"),
        ({"device": "cuda", "launcher": "local"}, {}, "gpu"),
        ({}, {"device": "cuda", "launcher": "local"}, "gpu"),  # a scheduled run: the DAG's default
        ({"device": "cpu"}, {"device": "cuda"}, "default"),  # the run's conf wins over the default
        ({}, {"device": "cpu", "launcher": "local"}, "default"),
        ({"device": "cuda", "launcher": "kubernetes"}, {}, "default"),  # the pods ask for GPUs
        ({}, {}, "default"),  # a DAG without trainflow's params
    ],
)
def test_the_run_decides_the_queue(conf, defaults, queue) -> None:
    for task_id in ("shard", "train", "train_node", "evaluate", "register"):
        ti = make_ti(task_id, params=defaults)
        policies.task_instance_mutation_hook(task_instance=ti, dag_run=SimpleNamespace(conf=conf))
        assert ti.queue == queue, task_id


def test_no_run_yet_leaves_the_task_queue() -> None:
    ti = make_ti(params={"device": "cuda"})
    policies.task_instance_mutation_hook(task_instance=ti, dag_run=None)
    assert ti.queue == "default"


def test_the_queue_name_is_airflow_config(monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW__TRAINFLOW__GPU_QUEUE", "a100")
    ti = make_ti()
    policies.task_instance_mutation_hook(task_instance=ti, dag_run=SimpleNamespace(conf={"device": "cuda"}))
    assert ti.queue == "a100"


def test_airflow_loads_the_policy_from_the_package_entry_point() -> None:
    """In a fresh process, Airflow's own start loads the policy through the installed package's
    ``airflow.policy`` entry point (no airflow_local_settings.py), marks the hook active so that a
    run's task instances are created through it, and applies it."""
    code = textwrap.dedent(
        """
        from types import SimpleNamespace
        from airflow import settings
        import trainflow.airflow.policies as policies
        assert policies in settings.get_policy_plugin_manager().get_plugins()
        assert settings.task_instance_mutation_hook.is_noop is False
        ti = SimpleNamespace(task_id="train", queue="default", task=SimpleNamespace(params={}))
        settings.task_instance_mutation_hook(ti, dag_run=SimpleNamespace(conf={"device": "cuda"}))
        print(ti.queue)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "gpu"
