"""The process group of the torchrun test workers (``*_worker.py``, run as scripts), bounded in time.

A collective that never completes raises after ``COLLECTIVE_TIMEOUT_S`` (gloo's own default is
30 minutes), and a worker stuck anywhere else prints every thread's stack and exits after
``WATCHDOG_S``: a hang fails its test in minutes and says where, never holds the suite.

A worker's body runs through :func:`run_in_group`, which leaves the group only once everything
the body built is gone: a DDP that outlived ``destroy_process_group`` (it holds the gloo group)
hung a rank at exit when freed there, 4 runs in 49 of the row-sparse worker; device meshes hold
the group the same way. trainflow's own loop frees its model before leaving the group.
"""

from __future__ import annotations

import datetime as dt
import faulthandler
import gc
from collections.abc import Callable

COLLECTIVE_TIMEOUT_S = 120
WATCHDOG_S = 300


def init_group() -> None:
    import torch.distributed as dist

    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    dist.init_process_group("gloo", timeout=dt.timedelta(seconds=COLLECTIVE_TIMEOUT_S))


def run_in_group(body: Callable[[str], None], arg: str) -> None:
    """Join the group, run ``body(arg)``, then leave it once the body's objects are freed."""
    import torch.distributed as dist

    init_group()
    body(arg)
    gc.collect()  # the body's DDP, meshes and tensors, before the group they hold
    dist.barrier()
    dist.destroy_process_group()


def launch_worker(script: str, nproc: int, arg: str) -> None:
    """Run ``script arg`` on ``nproc`` torchrun ranks (gloo, 1 thread each); a failure fails the
    calling test with the ranks' last output (their stacks, when the watchdog fired)."""
    import pytest

    from trainflow.tasks.launch import LaunchConfig, LaunchError, run_torchrun

    try:
        run_torchrun(LaunchConfig(nproc_per_node=nproc), script=script, args=[arg], env={"OMP_NUM_THREADS": "1"},
                     on_line=lambda line: None)
    except LaunchError as err:
        pytest.fail(f"{err}\nthe ranks' last output:\n" + "\n".join(err.output_tail), pytrace=False)
