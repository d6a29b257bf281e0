"""One error class for bad input, across the torchrun boundary: a rank that finds bad input
stops the launch at once (no restart of the ranks) and the task fails without retries; a
fault of the infrastructure keeps torchrun's restarts and Airflow's retries."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from trainflow.tasks.errors import BadInputError, describe, is_bad_input
from trainflow.tasks.launch import BadInputLaunchError, LaunchConfig, LaunchError, run_torchrun
from trainflow.tasks.manifest import ManifestIntegrityError, ShardVerificationError
from trainflow.tasks.storage import StorageCredentialsError, StorageUnavailableError

WORKER = str(Path(__file__).with_name("launch_worker.py"))


def test_bad_input_is_one_class_and_faults_are_not():
    for exc in (
        ShardVerificationError("file:///s/part-0.parquet", "checksum mismatch"),
        BadInputError("x"),
        TypeError("GMFConfig.__init__() got an unexpected keyword argument 'dimm'"),
        ManifestIntegrityError("splits.train.num_rows changed", ["splits.train.num_rows"]),
        StorageCredentialsError("no credentials for s3://b"),
    ):
        assert is_bad_input(exc), exc
    assert isinstance(ShardVerificationError("u", "r"), BadInputError)
    assert isinstance(ShardVerificationError("u", "r"), RuntimeError)  # what callers caught before
    for exc in (ConnectionError("refused"), StorageUnavailableError("s3 unreachable"), RuntimeError("NCCL timeout"),
                OSError("disk")):
        assert not is_bad_input(exc), exc
    # Every message says what to do next.
    assert "trigger a new run" in describe(TypeError("bad type"))
    assert "re-run the DAG's shard task" in describe(ShardVerificationError("u", "size 3, expected 4"))


def test_a_rank_with_bad_input_stops_torchrun_without_restarting_the_ranks():
    lines: list[str] = []
    with pytest.raises(BadInputLaunchError) as info:
        run_torchrun(LaunchConfig(nproc_per_node=2, max_restarts=3), script=WORKER, args=["bad-input"],
                     on_line=lines.append, kill_grace_s=5)
    error = info.value
    assert isinstance(error, ValueError) and isinstance(error, BadInputError) and isinstance(error, LaunchError)
    assert error.marker["rank"] == 1 and error.marker["type"] == "ShardVerificationError"
    assert "rank 1 found bad input" in str(error)
    assert "file:///store/part-00001.parquet: checksum mismatch" in str(error)
    assert "re-run the DAG's shard task" in str(error)  # what to do next
    # One start per rank: no restart of the worker group although max_restarts is 3, and rank 0
    # (waiting 60 s as if in a collective) was stopped instead of waited for.
    # (rank 0 may be stopped before it printed its line; lines of two ranks may be joined)
    assert "".join(lines).count("hello from rank 1 of 2") == 1, lines
    assert "".join(lines).count("hello from rank") <= 2, lines


def test_a_restarted_rank_sees_the_marker_and_fails_at_once(tmp_path, monkeypatch):
    from trainflow.tasks.errors import BAD_INPUT_FILE_ENV, report_bad_input

    marker = tmp_path / "bad-input.json"
    monkeypatch.setenv(BAD_INPUT_FILE_ENV, str(marker))
    assert report_bad_input(TypeError("GMFConfig got an unexpected keyword argument 'dimm'"), rank=0)
    assert not report_bad_input(ConnectionError("refused"), rank=1)  # a fault: no marker change
    from trainflow.trainers.train import main

    with pytest.raises(BadInputError, match="another rank found bad input: TypeError: GMFConfig got an unexpected"):
        main(["--pipeline=recommendation", "--config=/nonexistent/run_config.json"])


def test_an_infrastructure_fault_keeps_torchrun_restarts_and_is_not_bad_input():
    lines: list[str] = []
    with pytest.raises(LaunchError) as info:
        run_torchrun(LaunchConfig(nproc_per_node=2, max_restarts=1), script=WORKER, args=["infra"],
                     on_line=lines.append, kill_grace_s=5)
    assert not isinstance(info.value, ValueError)  # Airflow retries it
    assert "ConnectionError: the store went away" in str(info.value)
    assert "".join(lines).count("hello from rank 1 of 2") == 2, lines  # started, then restarted


def test_the_trainer_reports_an_unknown_pipeline_as_bad_input_through_torchrun():
    """The real trainer entry point under torchrun: its bad input crosses the boundary."""
    lines: list[str] = []
    with pytest.raises(BadInputLaunchError) as info:
        run_torchrun(LaunchConfig(nproc_per_node=2, max_restarts=2), module="trainflow.trainers.train",
                     args=["--pipeline=no-such-pipeline"], on_line=lines.append, kill_grace_s=5)
    assert "no-such-pipeline" in str(info.value) and "recommendation" in str(info.value)
    # A restarted rank would fail on the marker with "another rank found bad input".
    assert not any("another rank found bad input" in line for line in lines)


def test_the_task_boundary_fails_bad_input_once_and_lets_faults_retry():
    from airflow.sdk.exceptions import AirflowFailException

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "plugins"))
    from trainflow.airflow.dag_support import fail_fast_on_bad_input

    bad = BadInputLaunchError(1, [], [], {"type": "ShardVerificationError", "message": "shard x: bad. Re-run shard",
                                         "rank": 0})
    with pytest.raises(AirflowFailException, match="rank 0 found bad input.*Re-run shard"):
        with fail_fast_on_bad_input():
            raise bad
    with pytest.raises(LaunchError) as info:  # not AirflowFailException: Airflow retries it
        with fail_fast_on_bad_input():
            raise LaunchError(-9, [], ["rank 0 killed"])
    assert not isinstance(info.value, AirflowFailException)


def test_an_unknown_model_setting_reaching_the_trainer_is_bad_input_through_torchrun(tmp_path):
    """A family setting the config class does not have (a ``TypeError`` in the trainer), should
    one ever get past the params check: one start, not retried, the setting named."""
    import json

    config = tmp_path / "run_config.json"
    config.write_text(json.dumps({"pipeline": "recommendation", "train": {}, "family": {"no_such_setting": 1}}))
    lines: list[str] = []
    with pytest.raises(BadInputLaunchError) as info:
        run_torchrun(LaunchConfig(nproc_per_node=1, max_restarts=2), module="trainflow.trainers.train",
                     args=[f"--config={config}"], on_line=lines.append, kill_grace_s=5)
    assert info.value.marker["type"] == "TypeError"
    assert "no_such_setting" in str(info.value) and "trigger a new run" in str(info.value)
    assert not any("another rank found bad input" in line for line in lines)


def test_a_rank_writes_bad_input_into_an_existing_termination_log_first_writer_wins(tmp_path, monkeypatch):
    """In a Kubernetes pod the marker is ``/dev/termination-log``: a file the kubelet made (empty,
    a bind mount that cannot be replaced). The first rank's report goes into it; a second rank's
    does not overwrite it; a restarted rank fails at once on it."""
    from trainflow.tasks.errors import marker_from_text, raise_if_marked, read_marker, report_bad_input

    log = tmp_path / "termination-log"
    log.write_text("")
    monkeypatch.setenv("TRAINFLOW_BAD_INPUT_FILE", str(log))
    assert read_marker(str(log)) is None  # empty: nothing reported yet
    raise_if_marked()
    assert report_bad_input(ShardVerificationError("s3://b/train/part-1.parquet", "checksum mismatch"), rank=1)
    assert report_bad_input(TypeError("second"), rank=0)
    marker = read_marker(str(log))
    assert marker["type"] == "ShardVerificationError" and marker["rank"] == 1
    assert "part-1.parquet" in marker["message"] and "second" not in log.read_text()
    assert marker_from_text(log.read_text()) == marker
    assert marker_from_text("Error: OOMKilled") is None and marker_from_text('{"no": "marker"}') is None
    with pytest.raises(BadInputError, match="another rank found bad input: ShardVerificationError"):
        raise_if_marked()
    assert not report_bad_input(ConnectionError("refused"))  # a fault is never written
