"""The process group of the torchrun test workers (``*_worker.py``, run as scripts), bounded in time.

A collective that never completes raises after ``COLLECTIVE_TIMEOUT_S`` (gloo's own default is
30 minutes), and a worker stuck anywhere else prints every thread's stack and exits after
``WATCHDOG_S``: a hang fails its test in minutes and says where, never holds the suite.
"""

from __future__ import annotations

import datetime as dt
import faulthandler

COLLECTIVE_TIMEOUT_S = 120
WATCHDOG_S = 300


def init_group() -> None:
    import torch.distributed as dist

    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    dist.init_process_group("gloo", timeout=dt.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
