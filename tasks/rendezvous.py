"""Multi-node training from Airflow: one task per node, one c10d rendezvous, clear failures.

With ``nnodes > 1`` and ``launcher=local`` the DAG runs ``nnodes`` tasks at the same time: the
``train`` task is node 0 and ``train_node`` (mapped over node ranks ``1..nnodes-1``) the others.
Each runs ``torchrun --nnodes N --rdzv-backend c10d`` on its own worker. They agree on:

* the **rendezvous endpoint**: the ``rdzv_endpoint`` param, or, when it is empty, node 0's own
  address (``TRAINFLOW_NODE_ADDRESS``, else the address its host name resolves to) and a free
  port it picks there. Node 0 hosts the c10d store (``is_host=1``);
* the **training plan**: endpoint, rendezvous id, the trainer's arguments (run directory,
  MLflow run, dataset) and the process count. Node 0 publishes it (the DAG side puts it in
  XCom) just before it starts torchrun; the other nodes wait for it, then join. Once torchrun
  succeeded node 0 marks the plan ``finished``, so a node task retried after that (it failed
  after its part was done) succeeds without joining a rendezvous that no longer exists.

What can go wrong is reported by name instead of hanging: a node whose task never starts
makes torchrun's join timeout (``rdzv_join_timeout_s``) fire on the nodes that did start, and
:class:`RendezvousTimeout` says which node(s) did not join, the state of their Airflow tasks
(``scheduled``/``queued`` usually means the ``training`` pool or the executor has fewer free
slots than ``nnodes``) and the timeout. A node waiting for node 0's plan gives up after the
same timeout with the same kind of message.

The Airflow side passes the three things that need Airflow in :class:`NodeChannel`, so this
module stays free of it (and testable from a shell).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger(__name__)

PLAN_FORMAT = "trainflow.rendezvous/1"
# Task states in which a node's task can still join (it runs, or is about to).
WAITING_STATES = ("scheduled", "queued", "up_for_retry", "up_for_reschedule", "deferred", None)
DEAD_STATES = ("failed", "upstream_failed", "skipped", "removed")


class RendezvousTimeout(RuntimeError):
    """Not every node joined within the timeout; the message names the missing ones.

    Attributes:
        missing: Node ranks that did not join (best knowledge: the Airflow task states).
        timeout_s: The join timeout that expired.
    """

    def __init__(self, message: str, missing: list[int], timeout_s: int) -> None:
        super().__init__(message)
        self.missing = missing
        self.timeout_s = timeout_s


class NodeFailed(RuntimeError):
    """Node 0 failed before publishing its plan: the other nodes stop at once."""


@dataclasses.dataclass
class NodeChannel:
    """What the node tasks need from the orchestrator, injected by the DAG side.

    Attributes:
        publish: Node 0 stores its plan (a JSON-able dict) where the other nodes can read it.
        fetch: Returns node 0's current plan, or ``None`` while there is none.
        node_states: Returns the state of each node's task, ``{node_rank: state}`` (``None``
            for a task not scheduled yet); used to name the nodes that are missing and why.
        describe: A node's task as a user finds it in the UI (``"train_node[0]"``).
    """

    publish: Callable[[dict[str, Any]], None]
    fetch: Callable[[], dict[str, Any] | None]
    node_states: Callable[[], Mapping[int, str | None]]
    describe: Callable[[int], str] = lambda rank: f"node {rank}"


def node_address() -> str:
    """The address the other nodes reach this worker at.

    ``TRAINFLOW_NODE_ADDRESS`` when set (set it on workers whose host name does not resolve
    to a reachable address, e.g. ``status.podIP`` on Kubernetes); otherwise what this host's
    name resolves to, or the name itself.
    """
    from trainflow.tasks.settings import get_settings

    configured = get_settings().node_address
    if configured:
        return configured
    name = socket.gethostname()
    try:
        return socket.gethostbyname(name)
    except OSError:
        return name


def free_port(host: str = "") -> int:
    """A TCP port free on this machine right now (the store binds it a moment later)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def rendezvous_id(dag_id: str, run_id: str, try_number: int) -> str:
    """A rendezvous id unique per DAG run and node-0 try, in torchrun's alphabet."""
    digest = hashlib.sha256(f"{dag_id}/{run_id}".encode()).hexdigest()[:12]
    stem = re.sub(r"[^\w.\-]", "-", dag_id)[:40]
    return f"{stem}-{digest}-t{try_number}"


def make_plan(
    *,
    nnodes: int,
    nproc_per_node: int,
    endpoint: str,
    rdzv_id: str,
    join_timeout_s: int,
    max_restarts: int,
    args: list[str],
    threads: int,
    node0_host_is_auto: bool,
    try_number: int,
) -> dict[str, Any]:
    """The plan node 0 publishes (small JSON: no data, no credentials)."""
    return {
        "format": PLAN_FORMAT,
        "nnodes": nnodes,
        "nproc_per_node": nproc_per_node,
        "rdzv_endpoint": endpoint,
        "rdzv_id": rdzv_id,
        "rdzv_join_timeout_s": join_timeout_s,
        "max_restarts": max_restarts,
        "args": list(args),
        "threads": threads,
        "auto_endpoint": node0_host_is_auto,
        "node0_try": try_number,
        "published_at": time.time(),
        "state": "open",
    }


def wait_for_plan(channel: NodeChannel, node_rank: int, timeout_s: int, poll_s: float = 2.0) -> dict[str, Any]:
    """Wait until node 0 has published its plan and is running; return the plan.

    Raises:
        NodeFailed: node 0's task failed (or was skipped) first.
        RendezvousTimeout: no plan within ``timeout_s``; names node 0 and its task state.
    """
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        states = dict(channel.node_states())
        state0 = states.get(0)
        plan = channel.fetch()
        if plan and plan.get("format") == PLAN_FORMAT and plan.get("state") == "finished":
            log.info("node %d: node 0 reports rendezvous %s finished", node_rank, plan["rdzv_id"])
            return plan
        # A plan left from node 0's previous try is not used: node 0 must be running now.
        if plan and plan.get("format") == PLAN_FORMAT and state0 == "running":
            log.info("node %d: node 0 published rendezvous %s (id %s)", node_rank, plan["rdzv_endpoint"], plan["rdzv_id"])
            return plan
        if state0 in DEAD_STATES:
            raise NodeFailed(f"node 0 ({channel.describe(0)}) is {state0}: node {node_rank} does not start training")
        if not announced:
            log.info("node %d: waiting up to %d s for node 0 (%s, %s) to publish the rendezvous",
                     node_rank, timeout_s, channel.describe(0), state0 or "not scheduled yet")
            announced = True
        if time.monotonic() >= deadline:
            raise RendezvousTimeout(
                f"node 0 ({channel.describe(0)}) did not start within rdzv_join_timeout_s={timeout_s} s "
                f"(its task is {state0 or 'not scheduled yet'}); node {node_rank} gives up. {_co_scheduling_hint(len(states) or 2)}",
                [0],
                timeout_s,
            )
        time.sleep(poll_s)


def is_rendezvous_timeout(output: list[str]) -> bool:
    """Whether torchrun's output ends in a rendezvous join timeout."""
    return any("RendezvousTimeoutError" in line for line in output[-80:])


def is_rendezvous_unreachable(output: list[str]) -> bool:
    """Whether torchrun could not reach the rendezvous store at all."""
    return any("RendezvousConnectionError" in line for line in output[-80:])


def missing_nodes_error(channel: NodeChannel, nnodes: int, node_rank: int, endpoint: str, timeout_s: int) -> RendezvousTimeout:
    """The error of a node whose rendezvous timed out: which nodes never joined, and why."""
    try:
        states = dict(channel.node_states())
    except Exception as exc:  # the message matters more than the detail
        log.warning("could not read the node tasks' states: %s", exc)
        states = {}
    missing = [r for r in range(nnodes) if r != node_rank and states.get(r) != "running"]
    if not missing:  # every task runs, yet the rendezvous did not close: a network problem
        return RendezvousTimeout(
            f"rendezvous at {endpoint} timed out after rdzv_join_timeout_s={timeout_s} s although every node's task "
            f"is running: check that {endpoint} is reachable from every worker (TRAINFLOW_NODE_ADDRESS, firewalls)",
            [],
            timeout_s,
        )
    described = ", ".join(f"node {r} ({channel.describe(r)}: {states.get(r) or 'not scheduled yet'})" for r in missing)
    return RendezvousTimeout(
        f"{len(missing)} of {nnodes} nodes never joined the rendezvous at {endpoint} within "
        f"rdzv_join_timeout_s={timeout_s} s: {described}. {_co_scheduling_hint(nnodes)}",
        missing,
        timeout_s,
    )


def _co_scheduling_hint(nnodes: int) -> str:
    return (
        f"All {nnodes} node tasks must run at the same time: the 'training' pool needs at least {nnodes} free "
        f"slots and the executor at least {nnodes} parallel task slots (see docs/pipelines.md, Multi-node)."
    )
