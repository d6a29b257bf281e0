"""A torchrun entry point for the launcher tests: ``launch_worker.py MODE [PID_DIR]``.

MODE ``ok`` prints a line per rank; ``fail`` makes rank 1 raise under ``@record``; ``sleep``
writes each rank's pid (and a grandchild's) into PID_DIR and sleeps for ever.
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
    if mode == "sleep":
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        pid_dir = sys.argv[2]
        with open(os.path.join(pid_dir, f"rank-{rank}.tmp"), "w") as handle:
            handle.write(f"{os.getpid()} {child.pid}")
        os.replace(os.path.join(pid_dir, f"rank-{rank}.tmp"), os.path.join(pid_dir, f"rank-{rank}"))
        time.sleep(600)


if __name__ == "__main__":
    if sys.argv[1] == "fail":
        from torch.distributed.elastic.multiprocessing.errors import record

        record(main)()
    else:
        main()
