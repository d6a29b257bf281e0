"""Multi-node training at the task level: node 0 publishes the plan, the other nodes join one
c10d rendezvous on 127.0.0.1 (real torchrun, real trainer); waiting, timeouts and the messages
that name a missing node. The same node-never-joins path under Airflow is in
tests/e2e/test_multinode.py, the 2-node run through the scheduler in
tests/integration/test_live_multinode.py."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest

from trainflow.tasks.rendezvous import (
    NodeChannel,
    NodeFailed,
    RendezvousTimeout,
    make_plan,
    missing_nodes_error,
    rendezvous_id,
    wait_for_plan,
)

SMALL_REC = {
    "source_url": "synthetic://recommendation?num_interactions=3000&num_users=40&num_items=200&seed=2",
    "model": "gmf",
    "model_size": 8,
    "epochs": 2,
    "batch_size": 64,
    "nproc_per_node": 1,
}


class MemoryChannel:
    """The orchestrator's part, in memory: what XCom and the task states do under Airflow."""

    def __init__(self, nnodes: int) -> None:
        self.plan: dict | None = None
        self.states: dict[int, str | None] = {rank: None for rank in range(nnodes)}
        self.lock = threading.Lock()

    def channel(self) -> NodeChannel:
        def publish(plan):
            with self.lock:
                self.plan = json.loads(json.dumps(plan))  # what XCom would store

        return NodeChannel(publish=publish, fetch=lambda: self.plan, node_states=lambda: dict(self.states),
                           describe=lambda rank: "task train" if rank == 0 else f"task train_node[{rank - 1}]")


def _plan(**overrides):
    base = dict(nnodes=2, nproc_per_node=1, endpoint="127.0.0.1:1234", rdzv_id="r", join_timeout_s=5, max_restarts=0,
                args=["--train.epochs=1"], threads=1, node0_host_is_auto=True, try_number=1)
    return make_plan(**{**base, **overrides})


def test_rendezvous_id_is_stable_per_run_and_try_and_valid_for_torchrun():
    a = rendezvous_id("recommendation_training", "manual__2026-01-01T00:00:00+00:00", 1)
    assert a == rendezvous_id("recommendation_training", "manual__2026-01-01T00:00:00+00:00", 1)
    assert a != rendezvous_id("recommendation_training", "manual__2026-01-01T00:00:00+00:00", 2)
    from trainflow.tasks.launch import LaunchConfig

    LaunchConfig(nnodes=2, rdzv_endpoint="h:1", rdzv_id=a)  # accepted by torchrun's id check


def test_a_node_waits_for_node_0_to_run_then_gets_its_plan():
    mem = MemoryChannel(2)
    mem.plan = _plan()  # a plan left over from an earlier try: not used while node 0 is not running
    mem.states[0] = "up_for_retry"

    def start_node0():
        time.sleep(0.5)
        mem.plan = _plan(endpoint="127.0.0.1:4321", try_number=2)
        mem.states[0] = "running"

    threading.Thread(target=start_node0).start()
    plan = wait_for_plan(mem.channel(), 1, timeout_s=30, poll_s=0.05)
    assert plan["rdzv_endpoint"] == "127.0.0.1:4321" and plan["node0_try"] == 2


def test_waiting_node_gives_up_after_the_timeout_naming_node_0():
    mem = MemoryChannel(3)
    mem.states[0] = "queued"
    started = time.monotonic()
    with pytest.raises(RendezvousTimeout) as info:
        wait_for_plan(mem.channel(), 2, timeout_s=1, poll_s=0.1)
    assert 1 <= time.monotonic() - started < 10
    message = str(info.value)
    assert "node 0 (task train) did not start within rdzv_join_timeout_s=1 s (its task is queued)" in message
    assert "'training' pool needs at least 3 free slots" in message
    assert info.value.missing == [0]


def test_a_retried_node_after_the_training_finished_joins_nothing(tf_env):
    from trainflow.tasks.pipeline import train_node_step

    mem = MemoryChannel(2)
    mem.plan = {**_plan(), "state": "finished"}
    mem.states[0] = "success"  # node 0 done, exporting or already finished
    result = train_node_step({**SMALL_REC, "nnodes": 2}, 1, pipeline="recommendation", nodes=mem.channel())
    assert result["already_finished"] is True and result["rdzv_id"] == "r"


def test_waiting_node_stops_at_once_when_node_0_failed():
    mem = MemoryChannel(2)
    mem.states[0] = "failed"
    with pytest.raises(NodeFailed, match=r"node 0 \(task train\) is failed"):
        wait_for_plan(mem.channel(), 1, timeout_s=60, poll_s=0.1)


def test_missing_nodes_are_named_with_their_task_states():
    mem = MemoryChannel(3)
    mem.states.update({0: "running", 1: "running", 2: "scheduled"})
    error = missing_nodes_error(mem.channel(), 3, 0, "10.0.0.1:29400", 120)
    assert error.missing == [2]
    assert str(error).startswith(
        "1 of 3 nodes never joined the rendezvous at 10.0.0.1:29400 within rdzv_join_timeout_s=120 s: "
        "node 2 (task train_node[1]: scheduled)."
    )
    mem.states[2] = "running"
    assert "reachable from every worker" in str(missing_nodes_error(mem.channel(), 3, 0, "h:1", 5))


@pytest.mark.slow
def test_two_nodes_train_one_model_through_the_task_functions(tf_env, caplog):
    """node 0 = train_step, node 1 = train_node_step, on two threads like two Airflow tasks."""
    from trainflow.tasks.pipeline import shard_step, train_node_step, train_step

    caplog.set_level(logging.INFO)
    params = {**SMALL_REC, "nnodes": 2, "rdzv_join_timeout_s": 120}
    dataset = shard_step(params, "recommendation")
    mem = MemoryChannel(2)
    results: dict[int, dict] = {}
    errors: list[BaseException] = []

    def node(rank: int) -> None:
        mem.states[rank] = "running"
        try:
            if rank == 0:
                results[0] = train_step(params, dataset, pipeline="recommendation", dag_id="recommendation_training",
                                        run_id="two_nodes", try_number=1, nodes=mem.channel())
            else:
                results[rank] = train_node_step(params, rank, pipeline="recommendation", nodes=mem.channel())
            mem.states[rank] = "success"
        except BaseException as exc:
            mem.states[rank] = "failed"
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(rank,)) for rank in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors
    train = results[0]
    assert train["world_size"] == 2 and train["num_nodes"] == 2 and train["parallelism"] == "ddp"
    assert results[1]["node_rank"] == 1 and results[1]["rdzv_endpoint"] == mem.plan["rdzv_endpoint"]
    assert results[1]["already_finished"] is False and mem.plan["state"] == "finished"
    # One training: one run directory, one committed final checkpoint, one exported model in MLflow.
    run_dir = Path(tf_env / "store" / "runs" / "recommendation_training" / "two_nodes")
    committed = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step-*/_COMMITTED"))
    assert committed and committed[-1] == f"step-{train['steps']}"
    assert train["model_uri"].startswith("models:/") or train["model_uri"].startswith("runs:/")
