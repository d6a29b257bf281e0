"""trainflow.trainers.checkpoint: DCP round trip on local and S3 storage, commit markers, keep-K."""

from __future__ import annotations

import json

import pytest
import torch

from trainflow.tasks.settings import get_settings
from trainflow.tasks.storage import Storage
from trainflow.trainers.checkpoint import COMMIT_MARKER, Checkpointer, run_dir_url
from trainflow.trainers.distributed import World


def _trained(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    for _ in range(3):
        model(torch.randn(16, 4)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def test_round_trip_restores_model_optimizer_scheduler_and_rng(storage_root):
    settings = get_settings()
    run = run_dir_url("recommendation_training", "manual__2026-01-01T00:00:00+00:00", settings)
    assert run == f"{storage_root}/runs/recommendation_training/manual__2026-01-01T00:00:00+00:00"
    ckpt = Checkpointer(run, World(), keep=2, settings=settings)
    assert ckpt.latest_committed() is None
    model, optimizer, scheduler = _trained(0)
    torch.manual_seed(1234)
    info = ckpt.save(7, model, optimizer, epoch=1, scheduler=scheduler,
                     train_state={"position": 5, "best": {"value": 0.5}})
    expected_draw = torch.rand(3)
    assert info.step == 7 and info.url.endswith("checkpoints/step-7")

    fresh, fresh_opt, fresh_sched = _trained(99)
    latest = ckpt.latest_committed()
    assert latest is not None and latest.step == 7 and latest.epoch == 1
    assert latest.marker["world_size"] == 1
    state = ckpt.load(latest, fresh, fresh_opt, scheduler=fresh_sched)
    assert state["position"] == 5 and state["best"] == {"value": 0.5}
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"], fresh_opt.state_dict()["state"][0]["exp_avg"])
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr()
    assert torch.equal(torch.rand(3), expected_draw)  # RNG restored to the saved point


def test_keeps_the_last_k_and_ignores_uncommitted(tf_env):
    settings = get_settings()
    run = run_dir_url("dag", "run1", settings)
    ckpt = Checkpointer(run, World(), keep=2, settings=settings)
    model, optimizer, _ = _trained(0)
    for step in (10, 20, 30):
        ckpt.save(step, model, optimizer, epoch=0)
    assert [c.step for c in ckpt.committed()] == [20, 30]
    store = Storage(run, settings).child("checkpoints")
    assert store.list() == ["step-20", "step-30"]

    # A save that died before its marker: a newer step directory without _COMMITTED.
    store.write_bytes("step-40/.metadata", b"garbage from a crashed save")
    latest = ckpt.latest_committed()
    assert latest is not None and latest.step == 30
    fresh, fresh_opt, _ = _trained(5)
    ckpt.load(latest, fresh, fresh_opt)
    assert torch.equal(fresh[0].weight, model[0].weight)

    # Saving step 40 for real replaces the leftovers; an abandoned older dir is pruned.
    store.write_bytes("step-25/partial.distcp", b"x")
    ckpt.save(40, model, optimizer, epoch=1)
    assert store.list() == ["step-30", "step-40"]
    marker = json.loads(store.read_bytes(f"step-40/{COMMIT_MARKER}"))
    assert marker["step"] == 40 and marker["epoch"] == 1 and "time" in marker


@pytest.mark.parametrize("bad", ["../escape", "a/b", ""])
def test_run_dir_rejects_unsafe_ids(tf_env, bad):
    with pytest.raises(ValueError, match="run_id"):
        run_dir_url("dag", bad)
