"""The ``train`` task SIGKILLed on a live Airflow stack (Celery worker) and retried by the
scheduler: try 2 resumes from the run's last committed checkpoint on S3, not from step 0.

The process killed is the Airflow task process (``airflow worker -- <ti id>``, the parent of
torchrun), found among the Celery worker's descendants by the run id in torchrun's command line.
Its supervisor (the worker's fork) sees the child die by a signal and reports the try failed;
torchrun dies with its parent (``PR_SET_PDEATHSIG``) and takes its ranks with it; the scheduler
schedules try 2 after ``retry_delay`` (30 s)."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid

import psutil
import pytest

from tests.integration.live_stack import FAST_RECOMMENDATION_CONF

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

DAG_ID = "recommendation_training"
# Long enough that an epoch (one checkpoint each) takes seconds: the kill lands mid-training.
CONF = {
    **FAST_RECOMMENDATION_CONF,
    "source_url": "synthetic://recommendation?num_interactions=120000&num_users=1500&num_items=1500&seed=5",
    "model": "gmf",
    "epochs": 6,
    "registered_model_name": "live-kill-recommendation",
}


def _torchrun_of(run_id: str, worker_pid: int) -> psutil.Process | None:
    for proc in psutil.Process(worker_pid).children(recursive=True):
        try:
            cmdline = proc.cmdline()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        # The trainer's one argument that names the run: its run configuration file, which
        # lives in the run directory ({root}/runs/<dag_id>/<run_id>/run_config.json).
        if "torch.distributed.run" in cmdline and any(f"/{run_id}/" in arg for arg in cmdline):
            return proc
    return None


def _committed_steps(live_stack, run_id: str) -> list[int]:
    keys = live_stack.s3_keys(f"trainflow/runs/{DAG_ID}/{run_id}/checkpoints/")
    return sorted(int(m.group(1)) for k in keys if (m := re.search(r"/step-(\d+)/_COMMITTED$", k)))


def test_killed_train_task_is_retried_by_airflow_and_resumes_from_the_committed_checkpoint(live_stack):
    run_id = f"reliability_kill__{uuid.uuid4().hex[:8]}"
    live_stack.api.trigger(DAG_ID, CONF, run_id=run_id)
    worker_pid = live_stack.services["worker"].proc.pid

    # Wait for try 1's first committed checkpoint while its torchrun still runs.
    deadline = time.monotonic() + 600
    committed: list[int] = []
    torchrun = None
    while time.monotonic() < deadline:
        torchrun = _torchrun_of(run_id, worker_pid) or torchrun
        committed = _committed_steps(live_stack, run_id)
        if committed and torchrun is not None and torchrun.is_running():
            break
        state = live_stack.api.dag_run(DAG_ID, run_id)["state"]
        assert state in ("queued", "running"), live_stack.api.describe_run(DAG_ID, run_id)
        time.sleep(0.5)
    else:
        pytest.fail(f"no committed checkpoint while training ran: {live_stack.api.describe_run(DAG_ID, run_id)}")
    task_process = torchrun.parent()
    title = " ".join(task_process.cmdline())  # setproctitle: "airflow worker -- <ti id>"
    assert title.startswith("airflow worker --"), title
    supervisor = task_process.parent()
    ranks = torchrun.children(recursive=True)
    train_ti = next(ti for ti in live_stack.api.task_instances(DAG_ID, run_id) if ti["task_id"] == "train")
    assert train_ti["try_number"] == 1 and train_ti["state"] == "running"
    assert train_ti["id"] in title

    os.kill(task_process.pid, signal.SIGKILL)
    killed_after = committed[-1]
    # torchrun and its ranks die with the task process; the supervisor stays to report it.
    gone, alive = psutil.wait_procs([torchrun, *ranks], timeout=60)
    assert not alive, f"left running after the task process was killed: {alive}"
    assert supervisor.is_running()

    assert live_stack.api.wait_for_run(DAG_ID, run_id, timeout=900) == "success"
    train_ti = next(ti for ti in live_stack.api.task_instances(DAG_ID, run_id) if ti["task_id"] == "train")
    assert train_ti["try_number"] == 2 and train_ti["state"] == "success"
    result = live_stack.api.xcom(DAG_ID, run_id, "train")
    resumed = result["resumed_from_step"]
    assert resumed is not None and resumed >= killed_after > 0
    assert result["try_number"] == 2
    # Every epoch has the same number of steps and ends with a commit: the first commit seen is
    # one epoch; the resume point is a whole number of epochs and the total is all epochs.
    first_epoch = min(committed)
    assert resumed % first_epoch == 0 and resumed < result["steps"]
    assert result["steps"] == first_epoch * CONF["epochs"]

    log2 = live_stack.api.task_log(DAG_ID, run_id, "train", 2)
    assert f"training resumed from the committed checkpoint at step {resumed}" in log2 and "(try 2)" in log2, log2[-3000:]
    assert f"resuming from step {resumed}" in log2, log2[-3000:]
    log1 = live_stack.api.task_log(DAG_ID, run_id, "train", 1)
    assert "training resumed" not in log1
