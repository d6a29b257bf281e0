"""Multi-node training through the real scheduler (the ``live_stack`` fixture: api-server,
scheduler, dag-processor, triggerer, CeleryExecutor on PostgreSQL, MLflow server, S3): two
nodes x one process on 127.0.0.1 as two Airflow tasks running at the same time, and a node
that never starts because the ``training`` pool has one slot."""

from __future__ import annotations

import re
import time

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAG_ID = "recommendation_training"
CONF = {
    "require_approval": "never",  # a manual run would wait for a reviewer
    "source_url": "synthetic://recommendation?num_interactions=3000&num_users=40&num_items=200&seed=11",
    "model": "gmf",
    "model_size": 8,
    "epochs": 2,
    "batch_size": 64,
    "nproc_per_node": 1,
    "nnodes": 2,
    "rdzv_join_timeout_s": 300,
    "registered_model_name": "live-multinode",
}


def _instances(api, run_id):
    return {(ti["task_id"], ti.get("map_index", -1)): ti for ti in api.task_instances(DAG_ID, run_id)}


def _ranks_in(log: str) -> set[int]:
    """Global ranks whose trainer lines (``[rank R]`` prefix) are in a task's log."""
    return {int(r) for r in re.findall(r"\[rank (\d+)\]", log)}


def test_two_nodes_train_one_model_through_the_scheduler(live_stack):
    api = live_stack.api
    run_id = api.trigger(DAG_ID, CONF)
    api.wait_for_run(DAG_ID, run_id, timeout=1500)
    tis = _instances(api, run_id)
    for key in [("shard", -1), ("plan_nodes", -1), ("train", -1), ("train_node", 0), ("evaluate", -1), ("register", -1)]:
        assert tis[key]["state"] == "success", (key, tis[key]["state"])
    assert ("train_node", 1) not in tis  # nnodes - 1 mapped node tasks
    # The two node tasks ran at the same time (one rendezvous), in the training pool.
    train, node = tis[("train", -1)], tis[("train_node", 0)]
    assert train["pool"] == node["pool"] == "training"
    assert node["start_date"] < train["end_date"] and train["start_date"] < node["end_date"]
    assert train["try_number"] == 1 and node["try_number"] == 1, (train["try_number"], node["try_number"])
    assert node["rendered_map_index"] == "node 1"
    result = api.xcom(DAG_ID, run_id, "train")
    assert result["world_size"] == 2 and result["num_nodes"] == 2 and result["parallelism"] == "ddp"

    # Each node task ran its own global rank(s): node-rank-aware placement of one world of 2.
    log0 = api.task_log(DAG_ID, run_id, "train", train["try_number"])
    log1 = api.task_log(DAG_ID, run_id, "train_node", node["try_number"], map_index=0)
    ranks0, ranks1 = _ranks_in(log0), _ranks_in(log1)
    assert ranks0 and ranks1 and not ranks0 & ranks1 and ranks0 | ranks1 == {0, 1}, (ranks0, ranks1)
    assert "node 0 of 2: rendezvous 127.0.0.1:" in log0
    assert re.search(r"node 1 of 2: joining rendezvous 127\.0\.0\.1:\d+", log1)

    # The data: each epoch's samples are dealt to the global ranks by the loader's rank_rows (disjoint
    # and complete: tests/trainers/test_recommendation.py), so with the two ranks on two node tasks
    # one epoch is one pass over the split in global batches (both ranks step together): about
    # N / batch_size steps. Had each node read the whole split it would be twice that.
    shard = api.xcom(DAG_ID, run_id, "shard")
    num_train = shard["splits"]["train"]
    covered = result["steps"] // CONF["epochs"] * CONF["batch_size"]
    assert 0.9 * num_train <= covered < num_train + CONF["batch_size"], (result["steps"], num_train)

    # One training: one run directory with one committed final checkpoint holding both ranks'
    # state, written once by rank 0; one MLflow run and one registered version.
    prefix = f"trainflow/runs/{DAG_ID}/{run_id}/"
    keys = live_stack.s3_keys(prefix)
    final = f"{prefix}checkpoints/step-{result['steps']}/"
    assert f"{final}_COMMITTED" in keys, [k for k in keys if k.endswith("_COMMITTED")]
    assert {f"{final}trainer/rank-0.pt", f"{final}trainer/rank-1.pt"} <= set(keys)
    assert f"{prefix}result.json" in keys and f"{prefix}model/model.pt" in keys
    register = api.xcom(DAG_ID, run_id, "register")
    assert register["name"] == "live-multinode" and register["version"] >= 1
    version = live_stack.mlflow_get("registered-models/get", name="live-multinode")
    assert version  # the registry answers for the model the run registered


def _set_pool_slots(api, slots: int) -> int:
    """Set the ``training`` pool's slots through the REST API; returns the previous number."""
    before = api.json("GET", "pools/training")
    body = {"pool": "training", "slots": slots, "include_deferred": before["include_deferred"],
            "description": before.get("description")}
    api.json("PATCH", "pools/training", json=body)
    assert api.json("GET", "pools/training")["slots"] == slots
    return before["slots"]


def test_node_that_never_starts_fails_within_the_timeout(live_stack):
    """One pool slot for two node tasks: the one that starts fails after rdzv_join_timeout_s with
    a message naming the node that never joined, instead of waiting for ever."""
    api = live_stack.api
    timeout_s = 20
    conf = {**CONF, "epochs": 1, "rdzv_join_timeout_s": timeout_s, "registered_model_name": "live-never-joins"}
    slots = _set_pool_slots(api, 1)
    run_id = None
    try:
        run_id = api.trigger(DAG_ID, conf)
        deadline = time.monotonic() + 900
        failed = None
        while failed is None:
            assert time.monotonic() < deadline, api.describe_run(DAG_ID, run_id)
            tis = _instances(api, run_id)
            failed = next((ti for key, ti in tis.items() if key[0] in ("train", "train_node")
                           and ti["state"] in ("up_for_retry", "failed")), None)
            if failed is None:
                time.sleep(2)
        other = tis[("train_node", 0)] if failed["task_id"] == "train" else tis[("train", -1)]
        # The other node did not start while this one waited (the pool's one slot was taken).
        assert other["start_date"] is None or other["start_date"] >= failed["end_date"], (other, failed)
        log = api.task_log(DAG_ID, run_id, failed["task_id"], failed["try_number"], failed.get("map_index", -1))
        never_joined = re.search(
            rf"1 of 2 nodes never joined the rendezvous at 127\.0\.0\.1:\d+ within "
            rf"rdzv_join_timeout_s={timeout_s} s: node 1 \(task train_node\[0\]: (scheduled|queued)\)", log)
        node0_missing = re.search(
            rf"node 0 \(task train\) did not start within rdzv_join_timeout_s={timeout_s} s "
            rf"\(its task is (scheduled|queued)\); node 1 gives up", log)
        assert never_joined or node0_missing, log[-4000:]
        assert '"exc_type":"RendezvousTimeout"' in log.replace(" ", "")  # the task log is JSON lines
        assert "the 'training' pool needs at least 2 free slots" in log
        from datetime import datetime

        took = (datetime.fromisoformat(failed["end_date"]) - datetime.fromisoformat(failed["start_date"])).total_seconds()
        assert timeout_s <= took < timeout_s + 180, took  # the timeout plus start-up, not a hang
    finally:
        if run_id is not None:
            api.json("PATCH", f"dags/{DAG_ID}/dagRuns/{run_id}", json={"state": "failed"})
        _set_pool_slots(api, slots)
