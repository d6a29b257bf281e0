"""trainflow.tasks.launch: the torchrun command, streamed output, failing ranks, and no orphans."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from trainflow.tasks.launch import LaunchConfig, LaunchError, build_torchrun_command, run_torchrun

WORKER = str(Path(__file__).with_name("launch_worker.py"))


def test_standalone_command_for_one_node():
    cmd = build_torchrun_command(LaunchConfig(nproc_per_node=2, max_restarts=1), module="trainers.x", args=["--a=1"])
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--standalone" in cmd
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2"
    assert cmd[cmd.index("--max-restarts") + 1] == "1"
    assert cmd[-3:] == ["-m", "trainers.x", "--a=1"]


def test_multi_node_command_uses_c10d_rendezvous():
    config = LaunchConfig(nnodes=2, nproc_per_node=4, node_rank=1, rdzv_endpoint="10.0.0.5:29400",
                          rdzv_id="dag-run-7", rdzv_join_timeout_s=60)
    cmd = build_torchrun_command(config, script="train.py")
    assert "--standalone" not in cmd
    assert cmd[cmd.index("--nnodes") + 1] == "2"
    assert cmd[cmd.index("--rdzv-backend") + 1] == "c10d"
    assert cmd[cmd.index("--rdzv-endpoint") + 1] == "10.0.0.5:29400"
    assert cmd[cmd.index("--rdzv-id") + 1] == "dag-run-7"
    assert "join_timeout=60" in cmd[cmd.index("--rdzv-conf") + 1]
    assert "is_host" not in cmd[cmd.index("--rdzv-conf") + 1]  # torchrun guesses from the host name
    import dataclasses

    hosting = build_torchrun_command(dataclasses.replace(config, rdzv_is_host=True), script="train.py")
    assert hosting[hosting.index("--rdzv-conf") + 1].endswith(",is_host=1")
    joining = build_torchrun_command(dataclasses.replace(config, rdzv_is_host=False), script="train.py")
    assert joining[joining.index("--rdzv-conf") + 1].endswith(",is_host=0")
    assert cmd[-1] == "train.py"
    assert config.world_size == 8


def test_static_rendezvous_passes_node_rank():
    config = LaunchConfig(nnodes=2, node_rank=1, rdzv_endpoint="127.0.0.1:29555", rdzv_backend="static")
    cmd = build_torchrun_command(config, module="m")
    assert cmd[cmd.index("--node-rank") + 1] == "1"
    assert cmd[cmd.index("--master-port") + 1] == "29555"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"nnodes": 0}, "nnodes"),
        ({"nproc_per_node": 0}, "nproc_per_node"),
        ({"nnodes": 2}, "rdzv_endpoint"),
        ({"nnodes": 2, "rdzv_endpoint": "nohost"}, "rdzv_endpoint"),
        ({"node_rank": 3}, "node_rank"),
        ({"rdzv_backend": "etcd"}, "rdzv_backend"),
        ({"max_restarts": -1}, "max_restarts"),
    ],
)
def test_bad_launch_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        LaunchConfig(**kwargs)


def test_one_process_runs_and_streams_lines():
    lines: list[str] = []
    run_torchrun(LaunchConfig(nproc_per_node=1), script=WORKER, args=["ok"], on_line=lines.append)
    assert "hello from rank 0 of 1" in lines


def test_error_names_the_failing_rank_and_its_exception():
    lines: list[str] = []
    with pytest.raises(LaunchError) as info:
        run_torchrun(LaunchConfig(nproc_per_node=2), script=WORKER, args=["fail"], on_line=lines.append)
    error = info.value
    assert error.returncode != 0
    assert error.failed_ranks[0] == 1
    root = error.failures[0]
    assert root.exitcode == 1
    assert "ValueError: rank one fails on purpose" in root.message
    assert "launch_worker.py" in root.traceback
    assert "rank 1 (local rank 1)" in str(error)
    # Output was streamed while it ran, from both ranks.
    assert any("hello from rank 0 of 2" in line for line in lines)
    assert any("hello from rank 1 of 2" in line for line in lines)


LAUNCHER = textwrap.dedent(
    """
    import sys
    from trainflow.tasks.launch import LaunchConfig, run_torchrun
    run_torchrun(LaunchConfig(nproc_per_node=2), script=sys.argv[1], args=["sleep", sys.argv[2]],
                 on_line=lambda line: None, kill_grace_s=3)
    """
)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killing_the_launcher_leaves_no_orphans(tmp_path, how):
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WORKER, str(pid_dir)], cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 90
        while len(list(pid_dir.glob("rank-?"))) < 2:
            assert launcher.poll() is None, "launcher exited before the ranks started"
            assert time.monotonic() < deadline, "ranks did not start"
            time.sleep(0.2)
        tree = psutil.Process(launcher.pid).children(recursive=True)
        pids = {p.pid for p in tree}
        for path in pid_dir.glob("rank-?"):
            pids.update(int(x) for x in path.read_text().split())
        assert len(pids) >= 5  # torchrun, 2 ranks, 2 grandchildren
        os.kill(launcher.pid, how)
        launcher.wait(timeout=30)
        deadline = time.monotonic() + 30
        alive = pids
        while time.monotonic() < deadline:
            alive = {pid for pid in pids if _alive(pid)}
            if not alive:
                break
            time.sleep(0.2)
        assert not alive, f"orphans left: {sorted(alive)}"
    finally:
        if launcher.poll() is None:
            launcher.kill()


class _Interrupted(Exception):
    """What a wall-clock limit raises in the waiting thread (pytest-timeout, Airflow's execution_timeout)."""


def test_an_interrupted_launch_stops_the_ranks_and_logs_what_they_printed_last(tmp_path, caplog):
    """A hang ended by a time limit must say where the ranks were, even when the caller's
    callback dropped their output (the tests' ``on_line=lambda line: None``)."""
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()

    def interrupt_once_ranks_sleep() -> None:
        deadline = time.monotonic() + 90
        while len(list(pid_dir.glob("rank-?"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGUSR2)

    def on_signal(signum, frame):
        raise _Interrupted()

    previous = signal.signal(signal.SIGUSR2, on_signal)
    trigger = threading.Thread(target=interrupt_once_ranks_sleep, daemon=True)
    try:
        trigger.start()
        with caplog.at_level(logging.WARNING, logger="trainflow.tasks.launch"), pytest.raises(_Interrupted):
            run_torchrun(LaunchConfig(nproc_per_node=2), script=WORKER, args=["sleep", str(pid_dir)],
                         on_line=lambda line: None, kill_grace_s=3)
    finally:
        trigger.join(timeout=100)
        signal.signal(signal.SIGUSR2, previous)
    pids = {int(x) for path in pid_dir.glob("rank-?") for x in path.read_text().split()}
    assert len(pids) == 4  # 2 ranks and their children
    deadline = time.monotonic() + 30
    while {pid for pid in pids if _alive(pid)} and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not {pid for pid in pids if _alive(pid)}
    [message] = [r.getMessage() for r in caplog.records if "launcher interrupted" in r.getMessage()]
    assert "hello from rank 0 of 2" in message and "hello from rank 1 of 2" in message


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_run_dir_and_result_for_the_airflow_task(tf_env):
    from trainflow.tasks.launch import read_result, run_dir_url
    from trainflow.tasks.storage import Storage

    run_dir = run_dir_url("recommendation_training", "scheduled__2026-01-01T00:00:00+00:00")
    assert run_dir == (tf_env / "store").resolve().as_uri() + "/runs/recommendation_training/scheduled__2026-01-01T00:00:00+00:00"
    with pytest.raises(FileNotFoundError, match="result.json"):
        read_result(run_dir)
    Storage(run_dir).write_bytes("result.json", b'{"steps": 3}')
    assert read_result(run_dir) == {"steps": 3}
    with pytest.raises(ValueError, match="dag_id"):
        run_dir_url("../etc", "x")


def test_two_nodes_join_one_c10d_rendezvous_on_localhost():
    import socket
    import threading

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outputs: dict[int, list[str]] = {0: [], 1: []}
    errors: list[BaseException] = []

    def node(rank: int) -> None:
        config = LaunchConfig(nnodes=2, nproc_per_node=1, node_rank=rank, rdzv_endpoint=f"127.0.0.1:{port}",
                              rdzv_id="two-node-test", rdzv_join_timeout_s=60)
        try:
            run_torchrun(config, script=WORKER, args=["ok"], on_line=outputs[rank].append)
        except BaseException as exc:  # re-raised below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=node, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    lines = outputs[0] + outputs[1]
    assert sorted(line for line in lines if line.startswith("hello")) == ["hello from rank 0 of 2", "hello from rank 1 of 2"]


def test_secrets_in_the_ranks_output_and_the_launch_line_are_masked(caplog):
    """A rank's library may print a URL with its password (MLflow's "View run at"), or a key:
    the launcher masks the secrets it hands the ranks in every line it logs."""
    import logging

    lines: list[str] = []
    env = {"MLFLOW_TRACKING_PASSWORD": "mlflow-pw-Zq81", "AWS_SECRET_ACCESS_KEY": "aws-secret-Kd02",
           "SOME_URL": "http://u:url-pw-Hh55@example"}
    with caplog.at_level(logging.INFO, logger="trainflow.tasks.launch"):
        run_torchrun(LaunchConfig(nproc_per_node=1), script=WORKER, args=["print-secret", "--token=aws-secret-Kd02"],
                     env=env, on_line=lines.append)
    text = "\n".join(lines) + caplog.text
    assert "View run at: http://user:***@127.0.0.1:5000/#/experiments/1" in lines
    assert "token *** in a library message" in lines
    for secret in env.values():
        assert secret.split("@")[0].rsplit(":", 1)[-1] not in text
    assert "launching:" in caplog.text and "--token=***" in caplog.text
