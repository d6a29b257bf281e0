"""Bad input found inside a torchrun rank, in a whole DAG run: one try of the train task, one
torchrun launch, no restart of the ranks, and the message says what to do next (before: a
generic launch error; torchrun restarted the ranks and Airflow retried the task, the same
error up to six times, minutes apart)."""

from __future__ import annotations

import pytest

from trainflow.tasks.manifest import load_manifest
from trainflow.tasks.pipeline import shard_step

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONF = {
    "source_url": "synthetic://recommendation?num_interactions=3000&num_users=40&num_items=300&seed=5",
    "model": "gmf",
    "model_size": 8,
    "epochs": 1,
    "batch_size": 128,
    "max_restarts": 2,  # torchrun may restart the ranks twice: bad input must not use them
    "require_approval": "never",
}


def test_a_corrupt_shard_fails_the_train_task_once_without_restarting_the_ranks(dagbag, tf_env, capfd, caplog, monkeypatch):
    import logging

    from airflow.utils.state import DagRunState

    # The dataset version the DAG run will find; one of its train shards then damaged in place
    # (same size). With TRAINFLOW_SHARD_VERIFY=sizes the shard task's check of the committed
    # version does not see it (it would repair it otherwise): the damage reaches the ranks.
    manifest = load_manifest(shard_step(CONF, "recommendation")["manifest_uri"])
    shard = manifest.shards("train")[0]
    data = bytearray(manifest.storage.read_bytes(shard.path))
    data[len(data) // 2] ^= 0xFF
    manifest.storage.write_bytes(shard.path, bytes(data))
    monkeypatch.setenv("TRAINFLOW_SHARD_VERIFY", "sizes")
    capfd.readouterr()

    with caplog.at_level(logging.INFO, logger="tasks"):
        run = dagbag.dags["recommendation_training"].test(run_conf=CONF)
    out, err = capfd.readouterr()
    text = out + err + caplog.text
    tis = {t.task_id: t for t in run.get_task_instances()}
    assert run.state == DagRunState.FAILED
    assert tis["shard"].state == "success"
    assert tis["train"].state == "failed" and tis["train"].try_number == 1, text[-3000:]  # not up_for_retry
    launches = [r for r in caplog.records if r.getMessage().startswith("launching: ")]
    assert len(launches) == 1 and "torch.distributed.run" in launches[0].getMessage()  # one torchrun launch
    assert "found bad input; torchrun stopped, not restarted" in text
    assert f"ShardVerificationError: shard {manifest.storage.url(shard.path)}" in text
    assert "To repair the dataset version, re-run the DAG run's shard task" in text  # what to do next
    assert "python -m trainflow.tasks.cli shard 'synthetic://recommendation?" in text
    assert "another rank found bad input" not in text  # no rank was restarted
