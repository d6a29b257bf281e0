"""All rank logic in one place: who am I, where do I compute, and who may write.

Works the same under ``torchrun`` (reads RANK, LOCAL_RANK, WORLD_SIZE, GROUP_RANK...) and as a
plain ``python -m`` process (a world of one). Rank-0-only side effects go behind
:attr:`World.is_main`; other ranks get :class:`NullLogger` where a logger is expected.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in the job.

    Attributes:
        rank: Global rank (0..world_size-1).
        local_rank: Rank on this node.
        node_rank: Index of this node.
        world_size: Number of processes in the job.
        local_world_size: Processes on this node.
        num_nodes: Nodes in the job.
        device: ``cpu`` or ``cuda:N``.
        backend: ``gloo`` on CPU, ``nccl`` on CUDA.
    """

    rank: int = 0
    local_rank: int = 0
    node_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    num_nodes: int = 1
    device: str = "cpu"
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        """The one process that writes results, logs to MLflow and commits checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def world_from_env(device: str = "cpu") -> World:
    """The World described by torchrun's environment (a world of one without it).

    Args:
        device: ``cpu`` or ``cuda``; with ``cuda`` each process takes ``cuda:LOCAL_RANK``.

    Raises:
        ValueError: ``device`` is not ``cpu``/``cuda``, or ``cuda`` without a GPU.
    """
    import torch

    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", 1)
    node_rank = _env_int("GROUP_RANK", _env_int("NODE_RANK", 0))
    num_nodes = max(1, world_size // max(local_world_size, 1))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device on this machine")
        return World(rank, local_rank, node_rank, world_size, local_world_size, num_nodes, f"cuda:{local_rank}", "nccl")
    return World(rank, local_rank, node_rank, world_size, local_world_size, num_nodes, "cpu", "gloo")


def init_distributed(world: World, timeout_s: float = 600.0) -> None:
    """Join the process group (no-op for a world of one or if already joined)."""
    import torch
    import torch.distributed as dist

    if not world.distributed or dist.is_initialized():
        return
    if world.device.startswith("cuda"):
        torch.cuda.set_device(world.device)
    timeout = dt.timedelta(seconds=timeout_s)
    device_id = torch.device(world.device) if world.device.startswith("cuda") else None
    store = _attempt_store(world, timeout)
    if store is None:
        dist.init_process_group(backend=world.backend, timeout=timeout, device_id=device_id)
    else:
        dist.init_process_group(
            backend=world.backend,
            store=store,
            rank=world.rank,
            world_size=world.world_size,
            timeout=timeout,
            device_id=device_id,
        )
    log.info("rank %d/%d joined (%s on %s)", world.rank, world.world_size, world.backend, world.device)


def _attempt_store(world: World, timeout: dt.timedelta):
    """The rendezvous store under a prefix unique to this torchrun attempt, or ``None``.

    After a torchrun restart (``--max-restarts``) the workers of the new attempt can reuse
    the agent's TCPStore; without a per-attempt prefix a rank may read the previous attempt's
    (dead) peer addresses and fail with "connection refused" while connecting the group.
    """
    import torch.distributed as dist

    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if restart is None or not host or not port:
        return None
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        host_name=host,
        port=int(port),
        world_size=world.world_size,
        is_master=not agent_store and world.rank == 0,
        timeout=timeout,
        multi_tenant=not agent_store,
    )
    return dist.PrefixStore(f"trainflow/attempt-{restart}/", store)


def shutdown_distributed() -> None:
    """Leave the process group if joined."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(world: World) -> None:
    import torch.distributed as dist

    if world.distributed and dist.is_initialized():
        dist.barrier()


class NullLogger:
    """Stands in for an MLflow logger on ranks that must not log: every call does nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
