"""Run under torchrun by tests/trainers/test_row_sparse.py: RowSparseAdamW under DDP (the table
left out of DDP), each rank with its own ids; rank 0 saves the weights after 3 steps.

    torchrun --nproc-per-node 2 row_sparse_worker.py OUT_FILE
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

STEPS = [[[3, 7, 7, 9], [7, 11]], [[1, 2], [2, 40, 41]], [[3, 3], [9, 1]]]  # per step, per rank


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.table = torch.nn.Embedding(50, 4)
        self.head = torch.nn.Linear(4, 1)

    def forward(self, ids):
        return self.head(self.table(ids)).pow(2).mean()


def main(out: str) -> None:
    from trainflow.trainers.parallel import RowSparseAdamW, mark_row_sparse

    rank = dist.get_rank()
    model = Tiny()
    mark_row_sparse([model.table])
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ["table.weight"])
    ddp = DistributedDataParallel(model)
    opt = RowSparseAdamW(model.parameters(), lr=0.05)
    for ids in STEPS:
        ddp(torch.tensor(ids[rank])).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if rank == 0:
        torch.save(model.state_dict(), out)


if __name__ == "__main__":
    from worker_group import run_in_group  # a sibling file: these workers run as scripts

    run_in_group(main, sys.argv[1])
