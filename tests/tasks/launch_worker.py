"""A torchrun entry point for the launcher tests: ``launch_worker.py MODE [PID_DIR]``.

MODE ``ok`` prints a line per rank; ``fail`` makes rank 1 raise under ``@record``; ``sleep``
writes each rank's pid (and a grandchild's) into PID_DIR and sleeps for ever. ``bad-input`` and
``infra`` end as the trainer does (:func:`trainflow.trainers.train.main`: a marked restart fails at once,
the exception is classified by :func:`trainflow.tasks.errors.report_bad_input`): rank 1 raises a
:class:`trainflow.tasks.manifest.ShardVerificationError` (bad input) or a ``ConnectionError`` (a fault of
the infrastructure), rank 0 waits as if in a collective.
"""

import os
import subprocess
import sys
import time


def main() -> None:
    rank = int(os.environ["RANK"])
    mode = sys.argv[1]
    print(f"hello from rank {rank} of {os.environ['WORLD_SIZE']}", flush=True)
    if mode == "fail" and rank == 1:
        raise ValueError("rank one fails on purpose")
    if mode == "print-secret":  # as MLflow does: "View run at" with the URI it was given
        password = os.environ["MLFLOW_TRACKING_PASSWORD"]
        print(f"View run at: http://user:{password}@127.0.0.1:5000/#/experiments/1", flush=True)
        print(f"token {os.environ['AWS_SECRET_ACCESS_KEY']} in a library message", flush=True)
    if mode in ("bad-input", "infra"):
        from trainflow.tasks.errors import raise_if_marked, report_bad_input
        from trainflow.tasks.manifest import ShardVerificationError

        try:
            raise_if_marked()
            if rank == 1:
                if mode == "bad-input":
                    raise ShardVerificationError("file:///store/part-00001.parquet", "checksum mismatch")
                raise ConnectionError("the store went away")
            time.sleep(60)
        except Exception as exc:
            report_bad_input(exc, rank=rank)
            raise
    if mode == "sleep":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        pid_dir = sys.argv[2]
        with open(os.path.join(pid_dir, f"rank-{rank}.tmp"), "w") as handle:
            handle.write(f"{os.getpid()} {child.pid}")
        os.replace(os.path.join(pid_dir, f"rank-{rank}.tmp"), os.path.join(pid_dir, f"rank-{rank}"))
        time.sleep(600)


if __name__ == "__main__":
    if sys.argv[1] in ("fail", "bad-input", "infra"):
        from torch.distributed.elastic.multiprocessing.errors import record

        record(main)()
    else:
        main()
