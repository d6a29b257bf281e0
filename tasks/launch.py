"""Build and run ``torchrun``: the ``local`` and multi-node launchers of the train step.

:func:`run_torchrun` starts ``python -m torch.distributed.run`` as a child process in its own
process group, streams its output line by line into a logger (or a callback) while it runs,
and on a non-zero exit raises :class:`LaunchError` naming the failing rank(s) and why, read
from the per-rank ``error.json`` files that ``torch.distributed.elastic`` writes for entry
points decorated with ``@record`` (and from torchrun's failure summary for ranks killed by a
signal, which leave no error file).

If the caller is interrupted (``KeyboardInterrupt``, ``SIGTERM`` as Airflow sends on a task
kill, or any exception while waiting) the whole tree is stopped: torchrun first gets
``SIGTERM`` (it forwards it to its workers), then, after a grace period, every process that
was below it gets ``SIGKILL``. torchrun starts each worker in a session of its own, so a
``killpg`` of torchrun's group alone would leave them running; the tree is collected with
psutil instead. On Linux torchrun also gets ``SIGTERM`` if the caller dies outright
(``PR_SET_PDEATHSIG``), so even a ``SIGKILL`` of the caller leaves no orphan ranks.

This module imports neither torch nor airflow: it runs inside the Airflow task process.

Example::

    run_torchrun(LaunchConfig(nproc_per_node=2), module="trainflow.trainers.train",
                 args=["--pipeline=NAME", "--config=/tmp/cfg.json"])
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import json
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from trainflow.tasks.errors import BAD_INPUT_FILE_ENV, BadInputError, read_marker
from trainflow.tasks.settings import redact_text, url_secrets

log = logging.getLogger(__name__)

_RDZV_BACKENDS = ("c10d", "static")

INTERRUPT_TAIL_LINES = 30  # lines of torchrun's output logged when the launcher is interrupted


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How torchrun places the processes of one job.

    Attributes:
        nnodes: Nodes in the job (torchrun ``--nnodes``); each node runs this launcher once.
        nproc_per_node: Processes (ranks) per node.
        node_rank: This node's index; used by the ``static`` rendezvous (c10d assigns ranks).
        rdzv_endpoint: ``host:port`` of the rendezvous; ``None`` with one node means
            ``--standalone`` (a private rendezvous on a free local port).
        rdzv_backend: ``c10d`` (elastic, the default) or ``static``.
        rdzv_id: Job id shared by all nodes of one job (e.g. the Airflow run id).
        rdzv_join_timeout_s: Seconds a node waits for the others to join the rendezvous.
        rdzv_last_call_timeout_s: Extra seconds to wait for late nodes once the minimum joined.
        max_restarts: Times torchrun restarts the worker group after a failure.
        monitor_interval_s: How often torchrun checks its workers.
        local_ranks_filter: Only these local ranks' output is shown (``"0"``, ``"0,1"``);
            ``None`` shows every rank.
        master_port: Port of the static rendezvous (``--master-port``) when ``rdzv_endpoint``
            is not given with more than one node.
        rdzv_is_host: c10d: whether this node hosts the rendezvous store (``is_host`` in
            ``--rdzv-conf``); ``None`` lets torchrun guess from the endpoint's host name (wrong
            when several nodes share one machine or the name resolves oddly).
    """

    nnodes: int = 1
    nproc_per_node: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    rdzv_backend: str = "c10d"
    rdzv_id: str = "trainflow"
    rdzv_join_timeout_s: int = 900
    rdzv_last_call_timeout_s: int = 30
    max_restarts: int = 0
    monitor_interval_s: float = 1.0
    local_ranks_filter: str | None = None
    master_port: int | None = None
    rdzv_is_host: bool | None = None

    def __post_init__(self) -> None:
        if self.nnodes < 1:
            raise ValueError(f"nnodes must be at least 1, got {self.nnodes}")
        if self.nproc_per_node < 1:
            raise ValueError(f"nproc_per_node must be at least 1, got {self.nproc_per_node}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"node_rank must be in [0, {self.nnodes}), got {self.node_rank}")
        if self.rdzv_backend not in _RDZV_BACKENDS:
            raise ValueError(f"rdzv_backend must be one of {_RDZV_BACKENDS}, got {self.rdzv_backend!r}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("rdzv_endpoint (host:port) is required with more than one node")
        if self.rdzv_endpoint is not None and not re.match(r"^[\w.\-\[\]:]+:\d+$", self.rdzv_endpoint):
            raise ValueError(f"rdzv_endpoint must be host:port, got {self.rdzv_endpoint!r}")
        if not re.match(r"^[\w.\-]+$", self.rdzv_id):
            raise ValueError(f"rdzv_id must be letters, digits, '._-', got {self.rdzv_id!r}")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be at least 0, got {self.max_restarts}")
        if self.rdzv_join_timeout_s <= 0 or self.rdzv_last_call_timeout_s < 0:
            raise ValueError("rdzv_join_timeout_s must be positive and rdzv_last_call_timeout_s not negative")

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node


@dataclasses.dataclass(frozen=True)
class RankFailure:
    """One failed rank as torchrun reported it.

    Attributes:
        rank: Global rank (``-1`` when unknown).
        local_rank: Rank on its node (``-1`` when unknown).
        exitcode: Exit code; negative for a signal (``-9`` is SIGKILL).
        message: The exception message from the rank's error file, or the signal.
        traceback: The rank's Python traceback when it wrote an error file.
        error_file: Path of the ``error.json`` it came from, if any.
    """

    rank: int
    local_rank: int
    exitcode: int
    message: str
    traceback: str = ""
    error_file: str | None = None

    def describe(self) -> str:
        return f"rank {self.rank} (local rank {self.local_rank}) exited with {self.exitcode}: {self.message}"


class LaunchError(RuntimeError):
    """torchrun exited non-zero; ``failures`` says which ranks failed and why.

    Attributes:
        returncode: torchrun's exit status.
        failures: The failed ranks, root cause first (may be empty if torchrun itself failed,
            e.g. a rendezvous timeout; then ``output_tail`` holds the reason).
        output_tail: The last lines torchrun printed.
    """

    def __init__(self, returncode: int, failures: list[RankFailure], output_tail: list[str]) -> None:
        self.returncode = returncode
        self.failures = failures
        self.output_tail = output_tail
        if failures:
            what = "; ".join(f.describe() for f in failures)
        else:
            last = next((line for line in reversed(output_tail) if line.strip()), "no output")
            what = f"no rank reported a failure; last output: {last}"
        super().__init__(f"torchrun exited with {returncode}: {what}")

    @property
    def failed_ranks(self) -> list[int]:
        return [f.rank for f in self.failures]


class BadInputLaunchError(LaunchError, BadInputError):
    """A rank found bad input (a corrupt shard, a setting of the wrong type...): the launcher
    stopped torchrun at once (no restart of the ranks) and nothing should retry the launch.

    Attributes:
        marker: What the rank recorded: ``{"type", "message", "rank"}`` (see :mod:`trainflow.tasks.errors`).
    """

    def __init__(self, returncode: int, failures: list[RankFailure], output_tail: list[str], marker: dict) -> None:
        LaunchError.__init__(self, returncode, failures, output_tail)
        self.marker = marker
        self.what_next = None
        rank = marker.get("rank")
        who = f"rank {rank}" if rank is not None else "a rank"
        self.args = (f"{who} found bad input; torchrun stopped, not restarted, not worth retrying: {marker['message']}",)


def build_torchrun_command(
    config: LaunchConfig,
    *,
    module: str | None = None,
    script: str | None = None,
    args: Iterable[str] = (),
    log_dir: str | None = None,
    python: str | None = None,
) -> list[str]:
    """The torchrun command line for ``config`` running ``module`` (``-m``) or ``script``.

    Args:
        config: Placement and rendezvous.
        module: Python module to run in each rank (``trainflow.trainers.train``).
        script: Or a script path.
        args: Arguments passed to the module or script.
        log_dir: torchrun ``--log-dir``: where per-rank ``error.json`` files go.
        python: Interpreter (default: this one, so the same environment runs the ranks).

    Returns:
        The argv list.

    Raises:
        ValueError: not exactly one of ``module`` and ``script``.
    """
    if (module is None) == (script is None):
        raise ValueError("give exactly one of module and script")
    cmd = [python or sys.executable, "-m", "torch.distributed.run"]
    if config.nnodes == 1 and config.rdzv_endpoint is None:
        cmd += ["--standalone", "--nnodes", "1"]
    else:
        cmd += ["--nnodes", str(config.nnodes)]
        if config.rdzv_backend == "static":
            host, _, port = (config.rdzv_endpoint or f"127.0.0.1:{config.master_port or 29500}").rpartition(":")
            cmd += ["--node-rank", str(config.node_rank), "--master-addr", host, "--master-port", port]
        else:
            conf = f"join_timeout={config.rdzv_join_timeout_s},last_call_timeout={config.rdzv_last_call_timeout_s}"
            if config.rdzv_is_host is not None:
                conf += f",is_host={int(config.rdzv_is_host)}"
            cmd += [
                "--rdzv-backend", "c10d",
                "--rdzv-endpoint", str(config.rdzv_endpoint),
                "--rdzv-id", config.rdzv_id,
                "--rdzv-conf", conf,
            ]
    cmd += [
        "--nproc-per-node", str(config.nproc_per_node),
        "--max-restarts", str(config.max_restarts),
        "--monitor-interval", str(config.monitor_interval_s),
    ]
    if config.local_ranks_filter:
        cmd += ["--local-ranks-filter", config.local_ranks_filter]
    if log_dir:
        cmd += ["--log-dir", log_dir]
    if module is not None:
        cmd += ["-m", module]
    else:
        cmd += [str(script)]
    cmd += [str(a) for a in args]
    return cmd


LineCallback = Callable[[str], None]


def run_torchrun(
    config: LaunchConfig,
    *,
    module: str | None = None,
    script: str | None = None,
    args: Iterable[str] = (),
    env: Mapping[str, str] | None = None,
    on_line: LineCallback | None = None,
    logger: logging.Logger | None = None,
    kill_grace_s: float = 10.0,
    cwd: str | None = None,
) -> None:
    """Run torchrun to completion, streaming its output; stop the whole tree on interruption.

    Args:
        config: Placement and rendezvous.
        module: Module each rank runs (``python -m`` style); or ``script``.
        script: Script path each rank runs.
        args: Arguments for the module or script.
        env: Extra environment variables for the ranks (added to this process's own).
        on_line: Called with each output line (stdout and stderr merged), as it comes.
        logger: Where lines go when ``on_line`` is not given (default: this module's logger).
        kill_grace_s: Seconds between SIGTERM and SIGKILL when stopping the tree.
        cwd: Working directory of torchrun (default: this process's).

    Output lines are masked (:func:`trainflow.tasks.settings.redact_text`) for the secrets ``env`` and
    this process's environment hand the ranks. A rank that ends on bad input records it
    (:func:`trainflow.tasks.errors.report_bad_input`); the launcher then stops torchrun at once.

    Raises:
        BadInputLaunchError: a rank found bad input (a ``ValueError``: not worth retrying);
            torchrun was stopped before it could restart the ranks.
        LaunchError: torchrun exited non-zero; says which rank failed and why.
    """
    out_log = logger or log
    emit: LineCallback = on_line or (lambda line: out_log.info("%s", line))
    tail: collections.deque[str] = collections.deque(maxlen=400)
    with tempfile.TemporaryDirectory(prefix="trainflow-torchrun-") as log_dir:
        cmd = build_torchrun_command(config, module=module, script=script, args=args, log_dir=log_dir)
        child_env = dict(os.environ)
        child_env.update(env or {})
        child_env.setdefault("PYTHONUNBUFFERED", "1")
        marker_path = os.path.join(log_dir, "bad-input.json")
        child_env[BAD_INPUT_FILE_ENV] = marker_path
        secrets = environment_secrets(child_env, env)
        out_log.info("launching: %s", redact_text(" ".join(cmd), secrets))
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
            cwd=cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

        def pump() -> None:
            assert proc.stdout is not None
            for raw in iter(proc.stdout.readline, b""):
                # A library may print a URL with its password (MLflow's "View run at"): masked.
                line = redact_text(raw.decode("utf-8", "replace").rstrip("\n"), secrets)
                tail.append(line)
                try:
                    emit(line)
                except Exception:  # a broken callback must not stall the pipe
                    log.exception("output callback failed")

        reader = threading.Thread(target=pump, name="torchrun-output", daemon=True)
        reader.start()
        restore = _install_sigterm(proc, kill_grace_s)
        marker = None
        try:
            while True:
                try:
                    returncode = proc.wait(timeout=0.1)
                    break
                except subprocess.TimeoutExpired:
                    marker = read_marker(marker_path)
                    if marker is not None:
                        # Bad input fails the same way on every attempt: stop torchrun before
                        # it restarts the ranks (a restarted rank also sees the marker first).
                        out_log.error("rank %s reported bad input; stopping torchrun (no restart): %s",
                                      marker.get("rank"), marker["message"])
                        stop_process_tree(proc, kill_grace_s)
                        returncode = proc.returncode if proc.returncode is not None else 1
                        break
        except BaseException:
            # What the ranks printed last says where they were (a hang, a slow step); the
            # caller's callback may have dropped it, so it goes into the launcher's log here.
            last = list(tail)[-INTERRUPT_TAIL_LINES:]
            out_log.warning("launcher interrupted: stopping torchrun (pid %d) and all its ranks; its last %d "
                            "line(s) of output:\n%s", proc.pid, len(last), "\n".join(last) or "(none)")
            stop_process_tree(proc, kill_grace_s)
            raise
        finally:
            restore()
        reader.join(timeout=5)
        marker = marker or read_marker(marker_path)
        if marker is not None:
            failures = _read_failures(log_dir, list(tail))
            raise BadInputLaunchError(returncode or 1, failures, list(tail)[-50:], marker)
        if returncode != 0:
            failures = _read_failures(log_dir, list(tail))
            raise LaunchError(returncode, failures, list(tail)[-50:])
        out_log.info("torchrun finished")


_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


_URL_VARIABLES = ("MLFLOW_TRACKING_URI", "TRAINFLOW_STORAGE_ROOT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")


def environment_secrets(env: Mapping[str, str], given: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The secrets a child process gets through ``env`` (keys, passwords, the passwords of the
    URLs trainflow hands on, and of every URL in ``given``, the variables the caller added), to
    mask in whatever it prints."""
    found: list[str] = [env[name] for name in _SECRET_VARIABLES if env.get(name)]
    urls = [env.get(name) or "" for name in _URL_VARIABLES] + list((given or {}).values())
    for value in urls:
        if "://" in value:
            found.extend(url_secrets(value))
    return tuple(found)


def run_dir_url(dag_id: str, run_id: str, settings=None) -> str:
    """``{root}/runs/{dag_id}/{run_id}``: where a DAG run's checkpoints, model and result go.

    Raises:
        ValueError: ``dag_id`` or ``run_id`` is not a safe path component.
    """
    from trainflow.tasks.layout import run_dir_url as layout_run_dir_url

    return layout_run_dir_url(dag_id, run_id, settings)


def read_result(run_dir: str, settings=None) -> dict:
    """The ``result.json`` the trainer's rank 0 wrote into ``run_dir`` (what the task returns).

    Raises:
        FileNotFoundError: naming the URL, when training did not finish.
    """
    from trainflow.tasks.layout import RESULT_NAME
    from trainflow.tasks.storage import Storage

    return json.loads(Storage(run_dir, settings).read_bytes(RESULT_NAME))


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # best effort: not every libc has it
        pass


def _install_sigterm(proc: subprocess.Popen, grace_s: float) -> Callable[[], None]:
    """Make SIGTERM stop the tree, then behave as before (Airflow's own handler, or exit)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        log.warning("SIGTERM: stopping torchrun (pid %d) and all its ranks", proc.pid)
        stop_process_tree(proc, grace_s)
        if callable(previous):
            previous(signum, frame)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def stop_process_tree(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM ``proc`` (torchrun forwards it to its ranks), then SIGKILL whatever remains below it.

    torchrun puts every worker in a new session, so the tree is collected by parent links
    (psutil) before anything is signalled, and each collected process's group is killed too
    (that catches a rank's DataLoader workers).
    """
    import psutil

    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    groups = set()
    for p in tree:
        try:
            groups.add(os.getpgid(p.pid))
        except ProcessLookupError:
            pass
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        alive = [p for p in tree if _alive(p)]
        if not alive:
            break
        time.sleep(0.1)
    # Late children (a restart in progress) are picked up on a second look.
    for p in list(tree):
        try:
            tree.extend(p.children(recursive=True))
        except psutil.Error:
            pass
    own = os.getpgrp()
    for group in groups:
        if group != own:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    for p in tree:
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log.error("torchrun (pid %d) survived SIGKILL", proc.pid)


def _alive(p) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


_SUMMARY = re.compile(
    r"rank\s*:\s*(?P<rank>-?\d+) \(local_rank: (?P<local>-?\d+)\)\s*\n"
    r"\s*exitcode\s*:\s*(?P<code>-?\d+) \(pid: [^)]*\)[^\n]*\n"
    r"\s*error_file\s*:\s*(?P<file>[^\n]*)\n"
    r"\s*traceback\s*:\s*(?P<msg>[^\n]*)"
)


def _read_failures(log_dir: str, output: list[str]) -> list[RankFailure]:
    """Failures from torchrun's summary, completed with the per-rank ``error.json`` files."""
    text = "\n".join(output)
    # torchrun prints the summary once per failed attempt; the last one is the final failure.
    blocks = text.split("Root Cause (first observed failure):")
    failures: dict[int, RankFailure] = {}
    if len(blocks) > 1:
        last = blocks[-1]
        head = blocks[-2].rsplit("Failures:", 1)[-1]
        for chunk in (last, head):
            for m in _SUMMARY.finditer(chunk):
                rank = int(m["rank"])
                if rank in failures:
                    continue
                error_file = m["file"].strip()
                error_file = None if error_file in ("", "<N/A>") else error_file
                failures[rank] = RankFailure(rank, int(m["local"]), int(m["code"]), m["msg"].strip(), "", error_file)
    # Error files hold the full message and traceback of ranks that raised under @record.
    for path in sorted(glob.glob(os.path.join(log_dir, "**", "error.json"), recursive=True)):
        message, trace = _parse_error_file(path)
        local = _local_rank_of(path)
        match = next((f for f in failures.values() if f.error_file == path), None)
        if match is None:
            match = next((f for f in failures.values() if f.local_rank == local and not f.traceback), None)
        if match is not None:
            failures[match.rank] = dataclasses.replace(match, message=message or match.message, traceback=trace, error_file=path)
        elif not failures or all(f.local_rank != local for f in failures.values()):
            failures[-1 - len(failures)] = RankFailure(-1, local, 1, message, trace, path)
    ordered = list(failures.values())
    return ordered


def _parse_error_file(path: str) -> tuple[str, str]:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, json.JSONDecodeError):
        return "", ""
    message = data.get("message", "")
    if isinstance(message, dict):
        trace = message.get("extraInfo", {}).get("py_callstack", "")
        text = message.get("message", "")
        return text, trace
    return str(message), ""


def _local_rank_of(path: str) -> int:
    parent = os.path.basename(os.path.dirname(path))
    return int(parent) if parent.isdigit() else -1
