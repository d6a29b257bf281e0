"""Checkpoints through ``torch.distributed.checkpoint`` (DCP) on any fsspec store.

Layout under a run directory (``{root}/runs/{dag_id}/{run_id}``)::

    checkpoints/step-120/
        .metadata, __0_0.distcp, ...      model + optimizer (DCP; sharded under FSDP)
        trainer/rank-0.pt, rank-1.pt ...  per-rank RNG states, scheduler, loop/loader state
        _COMMITTED                        JSON written last, by rank 0, after a barrier

A step directory counts only once ``_COMMITTED`` is there: a crash in the middle of a save
leaves a directory that :meth:`Checkpointer.latest_committed` ignores and the next save of
that step (or a prune) removes. The newest ``keep`` committed steps are kept.

Model and optimizer states go through ``torch.distributed.checkpoint.state_dict``
(``get_state_dict`` / ``set_state_dict``), so the same code saves and loads a plain module, a
DDP-wrapped one, or one sharded with FSDP2 (``fully_shard``); a checkpoint written by N ranks
loads on M ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import json
import logging
import random
import re
import time
import warnings
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from trainflow.tasks.layout import CHECKPOINT_STEP_PREFIX, CHECKPOINTS_DIR, checkpoint_dir
from trainflow.tasks.settings import Settings, get_settings, redact_url
from trainflow.tasks.storage import Storage
from trainflow.trainers.distributed import World, barrier

log = logging.getLogger(__name__)

COMMIT_MARKER = "_COMMITTED"
CHECKPOINT_FORMAT = "trainflow.checkpoint/1"
_STEP_DIR = re.compile(rf"^{re.escape(CHECKPOINT_STEP_PREFIX)}(\d+)$")


def run_dir_url(dag_id: str, run_id: str, settings: Settings | None = None) -> str:
    """``{root}/runs/{dag_id}/{run_id}``: the run directory of one DAG run (not one try).

    Raises:
        ValueError: ``dag_id`` or ``run_id`` is not a safe path component.
    """
    from trainflow.tasks.launch import run_dir_url as _run_dir_url

    return _run_dir_url(dag_id, run_id, settings or get_settings())


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint.

    Attributes:
        step: Optimizer steps done when it was written.
        url: URL of its ``step-N`` directory.
        marker: The parsed ``_COMMITTED`` JSON (step, epoch, time, world size, train state).
    """

    step: int
    url: str
    marker: dict[str, Any]

    @property
    def epoch(self) -> int:
        return int(self.marker.get("epoch", 0))

    @property
    def train_state(self) -> dict[str, Any]:
        return self.marker.get("train_state", {})


class Checkpointer:
    """Saves, finds and loads the checkpoints of one run directory.

    Every rank builds one and calls :meth:`save` and :meth:`load` together (they are
    collective); only rank 0 writes the commit marker and prunes.

    Args:
        run_url: The run directory URL (see :func:`run_dir_url`).
        world: This process's rank information.
        keep: Committed checkpoints to keep (the newest).
        settings: Storage credentials (default: from the environment).
    """

    def __init__(self, run_url: str, world: World, keep: int = 3, settings: Settings | None = None) -> None:
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.settings = settings or get_settings()
        self.world = world
        self.keep = keep
        self.storage = Storage(run_url, self.settings).child(CHECKPOINTS_DIR)

    @property
    def url(self) -> str:
        return self.storage.url()

    # discovery ----------------------------------------------------------------------------
    def _step_dirs(self) -> list[tuple[int, str]]:
        out = []
        for name in self.storage.list():
            m = _STEP_DIR.match(name.rsplit("/", 1)[-1])
            if m:
                out.append((int(m.group(1)), name))
        return sorted(out)

    def committed(self) -> list[CheckpointInfo]:
        """Committed checkpoints, oldest first (uncommitted step directories are skipped)."""
        found = []
        for step, name in self._step_dirs():
            try:
                marker = json.loads(self.storage.read_bytes(f"{name}/{COMMIT_MARKER}"))
            except FileNotFoundError:
                continue
            except json.JSONDecodeError:
                log.warning("ignoring %s: unreadable commit marker", redact_url(self.storage.url(name)))
                continue
            found.append(CheckpointInfo(step, self.storage.url(name), marker))
        return found

    def latest_committed(self) -> CheckpointInfo | None:
        """The newest committed checkpoint, or ``None``."""
        committed = self.committed()
        return committed[-1] if committed else None

    # save ---------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        epoch: int,
        train_state: dict[str, Any] | None = None,
        scheduler: Any = None,
        extra: dict[str, Any] | None = None,
    ) -> CheckpointInfo:
        """Write ``step-{step}`` and commit it (collective: every rank calls it).

        Args:
            step: Optimizer steps done.
            model: The (possibly DDP/FSDP-wrapped) model.
            optimizer: Its optimizer.
            epoch: The epoch being trained.
            train_state: Small JSON-able loop state (loader position, best metric...); it goes
                into the marker, so resuming needs no tensor load to plan.
            scheduler: LR scheduler whose ``state_dict`` is saved.
            extra: Anything else picklable to save per rank.

        Returns:
            The committed checkpoint.
        """
        name = checkpoint_dir(step)
        if self.world.is_main:
            if self.storage.exists(f"{name}/{COMMIT_MARKER}"):
                log.info("checkpoint %s is already committed; not writing it again", name)
            elif self.storage.exists(name):
                log.warning("removing uncommitted leftovers of %s", redact_url(self.storage.url(name)))
                self.storage.delete(name, recursive=True)
        barrier(self.world)
        url = self.storage.url(name)
        started = time.monotonic()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with _quiet_single_process():
            dcp.save(
                {"model": model_sd, "optim": optim_sd},
                storage_writer=FsspecWriter(url, **self.settings.storage_options(url)),
                no_dist=not _joined(),
            )
        per_rank = {
            "rng": _rng_state(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "extra": extra or {},
        }
        buffer = io.BytesIO()
        torch.save(per_rank, buffer)
        self.storage.write_bytes(f"{name}/trainer/rank-{self.world.rank}.pt", buffer.getvalue())
        barrier(self.world)
        marker = {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "epoch": epoch,
            "time": dt.datetime.now(dt.UTC).isoformat(),
            "world_size": self.world.world_size,
            "train_state": train_state or {},
        }
        if self.world.is_main:
            self.storage.commit_bytes(f"{name}/{COMMIT_MARKER}", json.dumps(marker, indent=2).encode())
            log.info("checkpoint step %d committed at %s (%.1fs)", step, redact_url(url), time.monotonic() - started)
            self.prune()
        barrier(self.world)
        return CheckpointInfo(step, url, marker)

    def prune(self) -> list[str]:
        """Delete committed checkpoints beyond the newest ``keep``, and uncommitted step
        directories older than the newest committed one (rank 0 only). Returns what went."""
        if not self.world.is_main:
            return []
        committed = self.committed()
        if not committed:
            return []
        keep_steps = {c.step for c in committed[-self.keep :]}
        committed_steps = {c.step for c in committed}
        newest = committed[-1].step
        removed = []
        for step, name in self._step_dirs():
            stale = step in committed_steps and step not in keep_steps
            abandoned = step not in committed_steps and step < newest
            if stale or abandoned:
                self.storage.delete(name, recursive=True)
                removed.append(name)
        if removed:
            log.info("pruned checkpoints: %s", ", ".join(removed))
        return removed

    # load ---------------------------------------------------------------------------------
    def load(
        self,
        info: CheckpointInfo,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        scheduler: Any = None,
        restore_rng: bool = True,
    ) -> dict[str, Any]:
        """Load ``info`` into ``model`` (and ``optimizer``, ``scheduler``, RNG); collective.

        Returns:
            The marker's ``train_state`` with ``extra`` (this rank's, or rank 0's when the
            checkpoint had fewer ranks) added under ``"extra"``.
        """
        if optimizer is not None:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
        else:
            model_sd, _ = get_state_dict(model, [])
            state = {"model": model_sd}
        with _quiet_single_process():
            dcp.load(
                state,
                storage_reader=FsspecReader(info.url, **self.settings.storage_options(info.url)),
                no_dist=not _joined(),
            )
        if optimizer is not None:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        else:
            set_state_dict(model, [], model_state_dict=state["model"], optim_state_dict={})
        storage = Storage(info.url, self.settings)
        path = f"trainer/rank-{self.world.rank}.pt"
        if not storage.exists(path):
            log.warning("checkpoint step %d has no state for rank %d (written by %s ranks); using rank 0's",
                        info.step, self.world.rank, info.marker.get("world_size"))
            path = "trainer/rank-0.pt"
        per_rank = torch.load(io.BytesIO(storage.read_bytes(path)), weights_only=False)
        if scheduler is not None and per_rank.get("scheduler") is not None:
            scheduler.load_state_dict(per_rank["scheduler"])
        if restore_rng:
            _set_rng_state(per_rank["rng"])
        out = dict(info.train_state)
        out["extra"] = per_rank.get("extra", {})
        return out


@contextlib.contextmanager
def _quiet_single_process():
    # DCP warns on every call without a process group, which is our normal world of one.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _joined() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
