"""trainflow.trainers.loop: one process, torchrun DDP/FSDP, grad accumulation, resume, restarts, MLflow."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainflow.tasks.launch import LaunchConfig, run_torchrun
from trainflow.tasks.storage import Storage
from trainflow.trainers.config import TrainConfig
from trainflow.trainers.loop import load_exported_model, parse_args, run_training

sys.path.insert(0, str(Path(__file__).parent))
from toy_family import ToyConfig, ToyFamily, ToyModel  # noqa: E402

TOY_SCRIPT = str(Path(__file__).with_name("toy_family.py"))
BASE = {"epochs": 1, "batch_size": 64, "learning_rate": 0.05, "log_every_steps": 1, "log_to_mlflow": False}


pytestmark = pytest.mark.usefixtures("single_process_one_thread")


def _config(manifest, run_dir: Path, **overrides) -> TrainConfig:
    return TrainConfig(manifest_uri=manifest.uri, run_dir=run_dir.as_uri(), **{**BASE, **overrides})


def _launch(manifest, run_dir: Path, nproc: int, family: dict | None = None, max_restarts: int = 0,
            lines: list[str] | None = None, **train) -> dict:
    cfg = {"train": {"manifest_uri": manifest.uri, "run_dir": run_dir.as_uri(), **BASE, **train},
           "family": family or {}}
    path = run_dir.parent / f"{run_dir.name}.json"
    path.write_text(json.dumps(cfg))
    sink = lines if lines is not None else []
    run_torchrun(LaunchConfig(nproc_per_node=nproc, max_restarts=max_restarts), script=TOY_SCRIPT,
                 args=["--config", str(path)], env={"OMP_NUM_THREADS": "1"}, on_line=sink.append)
    return json.loads((run_dir / "result.json").read_text())


def _losses(result: dict) -> np.ndarray:
    return np.array([loss for _, loss in result["losses"]])


def test_config_validation_names_the_field(toy_manifest):
    for kwargs, field in [({"epochs": 0}, "epochs"), ({"parallelism": "tp"}, "parallelism"),
                          ({"learning_rate": 0}, "learning_rate"), ({"device": "tpu"}, "device"),
                          ({"run_id": "../x"}, "run_id"), ({"warmup_steps": -1}, "warmup_steps"),
                          ({"adam_beta2": 1.0}, "adam_beta2"), ({"adam_beta1": -0.1}, "adam_beta1")]:
        with pytest.raises(ValueError, match=field):
            TrainConfig(manifest_uri="file:///m", **kwargs)
    with pytest.raises(ValueError, match="multiple of world_size"):
        TrainConfig(manifest_uri="file:///m", batch_size=10, grad_accum_steps=3).micro_batch_size(1)
    with pytest.raises(ValueError, match="unknown TrainConfig fields: nope"):
        TrainConfig.from_dict({"manifest_uri": "x", "nope": 1})


def test_parse_args_reads_file_and_overrides(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train": {"manifest_uri": "file:///m", "epochs": 3}, "family": {"embedding_dim": 8}}))
    family, train = parse_args(["--config", str(path), "--train.epochs=5", "--family.num_workers=2",
                                "--train.parallelism=fsdp"], ToyConfig)
    assert (train.epochs, train.parallelism, train.manifest_uri) == (5, "fsdp", "file:///m")
    assert (family.embedding_dim, family.num_workers) == (8, 2)


def test_single_process_trains_exports_and_resumes(toy_manifest, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    run_dir = tmp_path / "run"
    config = _config(toy_manifest, run_dir, epochs=2, checkpoint_every_steps=10, keep_checkpoints=2)
    result = run_training(ToyFamily, ToyConfig(), config)
    steps_per_epoch = toy_manifest.num_rows("train") // 64
    assert result["steps"] == 2 * steps_per_epoch
    assert result["world_size"] == 1 and result["parallelism"] == "none"
    assert len(result["losses"]) == result["steps"]
    losses = _losses(result)
    assert losses[-10:].mean() < losses[:3].mean()  # it learns
    assert [h["epoch"] for h in result["history"]] == [0, 1]
    best = min(result["history"], key=lambda h: h["valid"]["mse"])
    assert result["best_epoch"] == best["epoch"]
    assert result["metrics"]["valid_best"] == best["valid"]
    assert result["checkpoint_uri"].endswith(f"checkpoints/step-{2 * steps_per_epoch}")
    assert json.loads((run_dir / "result.json").read_text())["steps"] == result["steps"]
    assert any("samples/s" in r.getMessage() and "eta" in r.getMessage() for r in caplog.records)
    assert sorted(os.listdir(run_dir / "checkpoints")) == [f"step-{2 * steps_per_epoch - 8}", f"step-{2 * steps_per_epoch}"]

    # The exported model loads with plain torch and reproduces the eval metric.
    state, exported = load_exported_model(run_dir.as_uri())
    assert exported["family"] == "toy" and exported["export_config"]["embedding_dim"] == 4
    assert exported["train_config"]["epochs"] == 2
    model = ToyModel(exported["export_config"]["num_users"], exported["export_config"]["num_items"], 4)
    model.load_state_dict(torch.load(io.BytesIO((run_dir / "model" / "model.pt").read_bytes()), weights_only=True))
    family = ToyFamily(ToyConfig(), toy_manifest, None)
    with torch.no_grad():
        assert family.evaluate(model, "eval")["mse"] == pytest.approx(result["metrics"]["eval"]["mse"], rel=1e-6)
    assert set(state) == set(model.state_dict())

    # Running the same run again resumes from its last committed step and does no more work;
    # a newer step directory without a commit marker is never loaded.
    Storage(run_dir.as_uri()).write_bytes("checkpoints/step-999/.metadata", b"not a checkpoint")
    caplog.clear()
    again = run_training(ToyFamily, ToyConfig(), config)
    assert any(f"resuming from step {2 * steps_per_epoch} " in r.getMessage() for r in caplog.records)
    assert again["resumed_from_step"] == 2 * steps_per_epoch
    assert again["metrics"] == result["metrics"]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_keep_best_exports_the_best_epoch_not_the_last(toy_manifest, tmp_path, mode):
    run_dir = tmp_path / "run"
    result = run_training(ToyFamily, ToyConfig(selection_mode=mode), _config(toy_manifest, run_dir, epochs=3))
    assert [h["epoch"] for h in result["history"]] == [0, 1, 2]
    valid = [h["valid"]["mse"] for h in result["history"]]
    assert len(set(valid)) == 3
    pick = min if mode == "min" else max
    best_epoch = valid.index(pick(valid))
    assert result["best_epoch"] == result["kept_epoch"] == best_epoch
    # The last epoch cannot be both the lowest and the highest: in one mode at least the best
    # epoch is an earlier one, and the export must be that epoch's weights.
    best = torch.load(io.BytesIO((run_dir / "best" / "model.pt").read_bytes()), weights_only=True)
    exported, _ = load_exported_model(run_dir.as_uri())
    for key, value in best.items():
        assert torch.equal(exported[key], value)
    model = ToyModel(toy_manifest.stats["num_users"], toy_manifest.stats["num_items"], 4)
    model.load_state_dict(exported)
    with torch.no_grad():
        family = ToyFamily(ToyConfig(), toy_manifest, None)
        assert family.evaluate(model, "valid")["mse"] == pytest.approx(valid[best_epoch], rel=1e-6)
        assert family.evaluate(model, "eval")["mse"] == pytest.approx(result["metrics"]["eval"]["mse"], rel=1e-6)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_a_family_that_trains_on_valid_keeps_the_last_epoch(toy_manifest, tmp_path, mode, caplog):
    """A refit on train + valid: an epoch chosen on valid would be a leaked choice, so the loop
    exports the last epoch although keep_best is on (its default)."""
    run_dir = tmp_path / "run"
    caplog.set_level(logging.WARNING, logger="trainflow.trainers.loop")
    config = ToyConfig(selection_mode=mode, declare_trains_on_valid=True)
    result = run_training(ToyFamily, config, _config(toy_manifest, run_dir, epochs=3))
    valid = [h["valid"]["mse"] for h in result["history"]]
    assert len(set(valid)) == 3
    assert result["kept_epoch"] == 2
    assert result["best_epoch"] == valid.index((min if mode == "min" else max)(valid))
    assert any("keeping the last epoch" in r.getMessage() for r in caplog.records)
    exported, _ = load_exported_model(run_dir.as_uri())
    model = ToyModel(toy_manifest.stats["num_users"], toy_manifest.stats["num_items"], 4)
    model.load_state_dict(exported)
    with torch.no_grad():
        assert ToyFamily(ToyConfig(), toy_manifest, None).evaluate(model, "valid")["mse"] == pytest.approx(valid[2], rel=1e-6)


def test_adam_betas_reach_the_optimizer(toy_manifest, tmp_path):
    """Adam's first step is lr x sign(g) whatever the betas (bias correction), so the first two
    losses agree; from the second update on, beta2 = 0.98 must train differently from 0.999."""
    default = _losses(run_training(ToyFamily, ToyConfig(), _config(toy_manifest, tmp_path / "a", max_steps=6)))
    fast = _losses(run_training(ToyFamily, ToyConfig(), _config(toy_manifest, tmp_path / "b", max_steps=6,
                                                                  adam_beta2=0.98)))
    np.testing.assert_allclose(fast[:2], default[:2], rtol=1e-6)
    assert not np.allclose(fast[2:], default[2:], rtol=1e-6, atol=0)


def test_gradient_accumulation_matches_one_big_batch(toy_manifest, tmp_path):
    one = run_training(ToyFamily, ToyConfig(), _config(toy_manifest, tmp_path / "a", max_steps=8))
    accum = run_training(ToyFamily, ToyConfig(), _config(toy_manifest, tmp_path / "b", max_steps=8, grad_accum_steps=4))
    assert accum["steps"] == one["steps"] == 8
    np.testing.assert_allclose(_losses(accum), _losses(one), rtol=1e-4, atol=1e-5)


def test_logs_params_and_metrics_to_mlflow(toy_manifest, tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = _config(toy_manifest, tmp_path / "run", max_steps=4, log_every_steps=2, log_to_mlflow=True,
                     mlflow_tracking_uri=uri, mlflow_experiment="toy-tests", system_metrics=False)
    result = run_training(ToyFamily, ToyConfig(), config)
    run = mlflow.MlflowClient(uri).get_run(result["mlflow_run_id"])
    assert run.data.params["train.batch_size"] == "64"
    assert run.data.params["family.embedding_dim"] == "4"
    assert run.data.metrics["mse"] == pytest.approx(result["metrics"]["eval"]["mse"])
    history = mlflow.MlflowClient(uri).get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [2, 4]
    assert (tmp_path / "run" / "mlflow_run_id").read_text() == run.info.run_id


@pytest.fixture(scope="module")
def ddp_reference(toy_manifest, tmp_path_factory):
    """One epoch on 2 ranks (DDP, real torchrun processes), checkpoints every 5 steps."""
    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    return _launch(toy_manifest, run_dir, 2, parallelism="ddp", checkpoint_every_steps=5)


def test_two_processes_match_one(toy_manifest, tmp_path, ddp_reference):
    single = run_training(ToyFamily, ToyConfig(), _config(toy_manifest, tmp_path / "one"))
    assert ddp_reference["world_size"] == 2 and ddp_reference["parallelism"] == "ddp"
    assert ddp_reference["steps"] == single["steps"] == toy_manifest.num_rows("train") // 64
    np.testing.assert_allclose(_losses(ddp_reference), _losses(single), rtol=1e-3, atol=1e-4)
    assert ddp_reference["metrics"]["eval"]["mse"] == pytest.approx(single["metrics"]["eval"]["mse"], rel=1e-3)


@pytest.mark.slow  # ~50 s: two FSDP torchrun launches
def test_fsdp_matches_ddp_and_resumes_from_its_sharded_checkpoint(toy_manifest, tmp_path, ddp_reference):
    run_dir = tmp_path / "fsdp"
    first = _launch(toy_manifest, run_dir, 2, parallelism="fsdp", family={"num_workers": 1}, max_steps=15)
    assert first["steps"] == 15 and first["parallelism"] == "fsdp"
    lines: list[str] = []
    fsdp = _launch(toy_manifest, run_dir, 2, parallelism="fsdp", family={"num_workers": 1}, lines=lines)
    assert any("resuming from step 15 " in line for line in lines)
    assert fsdp["resumed_from_step"] == 15 and fsdp["steps"] == ddp_reference["steps"]
    np.testing.assert_allclose(_losses(fsdp), _losses(ddp_reference), rtol=1e-3, atol=1e-4)
    assert fsdp["metrics"]["eval"]["mse"] == pytest.approx(ddp_reference["metrics"]["eval"]["mse"], rel=1e-3)
    state, _ = load_exported_model(run_dir.as_uri())
    assert state["user.weight"].shape == (toy_manifest.stats["num_users"], 4)  # gathered, not a shard


@pytest.mark.slow  # ~30 s: a SIGKILL, torchrun's restart and a second rendezvous
def test_killed_rank_restarts_and_resumes_from_last_commit(toy_manifest, tmp_path, ddp_reference):
    lines: list[str] = []
    record = tmp_path / "batches"
    record.mkdir()
    family = {"die_at_batch": 12, "die_rank": 1, "die_marker_dir": str(tmp_path), "record_dir": str(record)}
    result = _launch(toy_manifest, tmp_path / "killed", 2, family=family, max_restarts=1, lines=lines,
                     parallelism="ddp", checkpoint_every_steps=5)
    assert (tmp_path / "died").exists()  # rank 1 really was SIGKILLed once
    assert any("resuming from step 10 " in line for line in lines)
    assert result["resumed_from_step"] == 10
    # Sample accounting: what the first attempt trained up to the resume point plus what the
    # restarted attempt trained from it covers every row of the epoch exactly once (the rows of
    # batches 10-11, handed out after the commit and before the kill, are trained again, and
    # only those); each rank resumes at exactly the resume point.
    entries = [json.loads(line) for path in record.glob("rank*.jsonl") for line in path.read_text().splitlines()]
    first = [e for e in entries if e["restart"] == 0]
    second = [e for e in entries if e["restart"] == 1]
    assert {e["restart"] for e in entries} == {0, 1}
    for rank_file in record.glob("rank*.jsonl"):
        rank_entries = [json.loads(line) for line in rank_file.read_text().splitlines()]
        assert min(e["position"] for e in rank_entries if e["restart"] == 1) == 10
    replayed = {e["position"] for e in first if e["position"] >= 10}
    assert replayed <= {10, 11, 12}
    trained = [r for e in first if e["position"] < 10 for r in e["rows"]] + [r for e in second for r in e["rows"]]
    steps = toy_manifest.num_rows("train") // 64
    assert len(trained) == len(set(trained)) == steps * 64
    assert set(trained) <= set(range(toy_manifest.num_rows("train")))
    assert result["steps"] == ddp_reference["steps"]
    assert result["metrics"]["eval"]["mse"] == pytest.approx(ddp_reference["metrics"]["eval"]["mse"], rel=1e-4)
    np.testing.assert_allclose(_losses(result), _losses(ddp_reference), rtol=1e-4, atol=1e-5)


def test_a_failed_run_frees_its_model_before_leaving_the_group(toy_manifest, tmp_path):
    """Every rank raises mid-epoch: the error reaches the launcher, and no DDP model is alive when
    the ranks leave the process group (the failed run's traceback held it; a DDP freed after the
    group is gone can hang its rank at exit, so torchrun, and the Airflow task, would wait)."""
    from trainflow.tasks.launch import LaunchError

    run_dir, reports = tmp_path / "failed", tmp_path / "reports"
    reports.mkdir()
    cfg = {"train": {"manifest_uri": toy_manifest.uri, "run_dir": run_dir.as_uri(), **BASE, "parallelism": "ddp"},
           "family": {"raise_at_batch": 3}}
    path = tmp_path / "failed.json"
    path.write_text(json.dumps(cfg))
    lines: list[str] = []
    with pytest.raises(LaunchError):
        run_torchrun(LaunchConfig(nproc_per_node=2), script=TOY_SCRIPT, args=["--config", str(path)],
                     env={"OMP_NUM_THREADS": "1", "TOY_DESTROY_REPORT_DIR": str(reports)}, on_line=lines.append)
    assert any("toy failure at batch 3" in line for line in lines)  # the traceback still says where
    assert [json.loads((reports / f"rank{r}-destroy.json").read_text()) for r in range(2)] == [{"ddp_alive": 0}] * 2
    assert not (run_dir / "result.json").exists()


def test_checkpoint_clock_alone_and_its_config():
    from trainflow.trainers.distributed import World
    from trainflow.trainers.loop import CheckpointClock

    now = [100.0]
    world = World()
    clock = CheckpointClock(2.0, world, torch.device("cpu"), clock=lambda: now[0])
    assert not clock.due(1)
    now[0] += 119.0
    assert not clock.due(2)
    now[0] += 1.0
    assert clock.due(3) and clock.minutes_since() == pytest.approx(2.0)
    clock.reset()
    assert not clock.due(4)
    off = CheckpointClock(0, world, torch.device("cpu"), clock=lambda: now[0])
    now[0] += 1e6
    assert not off.due(5)
    assert TrainConfig(manifest_uri="file:///m").checkpoint_every_minutes == 10.0
    for bad in (-1, float("nan"), "10", True):
        with pytest.raises(ValueError, match="checkpoint_every_minutes"):
            TrainConfig(manifest_uri="file:///m", checkpoint_every_minutes=bad)


def _marker_states(run_dir: Path) -> dict[int, dict]:
    out = {}
    for marker in (run_dir / "checkpoints").glob("step-*/_COMMITTED"):
        data = json.loads(marker.read_text())
        out[data["step"]] = data
    return out


def test_time_based_checkpoints_commit_mid_epoch_alone(toy_manifest, tmp_path, caplog):
    """Alone, the clock is read after every step: an interval shorter than a step checkpoints
    after every step, each commit carrying the loader position of that step."""
    caplog.set_level(logging.INFO)
    run_dir = tmp_path / "run"
    result = run_training(ToyFamily, ToyConfig(), _config(toy_manifest, run_dir, max_steps=6, keep_checkpoints=10,
                                                          checkpoint_every_minutes=1e-9))
    markers = _marker_states(run_dir)
    # Saved before the next batch: steps 1-5 mid-epoch, step 6 by the final (max_steps) save.
    assert sorted(markers) == [1, 2, 3, 4, 5, 6]
    for step in range(1, 6):
        assert markers[step]["epoch"] == 0 and markers[step]["train_state"]["position"] == step
    assert sum("checkpointing mid-epoch after step" in r.getMessage() for r in caplog.records) == 6
    assert result["steps"] == 6
    # A long interval (the default 10 min) adds nothing: only the epoch-end commit.
    run_dir = tmp_path / "quiet"
    run_training(ToyFamily, ToyConfig(), _config(toy_manifest, run_dir, keep_checkpoints=10))
    assert sorted(_marker_states(run_dir)) == [toy_manifest.num_rows("train") // 64]


@pytest.mark.slow  # ~30 s: two ranks, a fault after a commit, torchrun's restart
def test_killed_after_a_time_based_mid_epoch_commit_resumes_exactly(toy_manifest, tmp_path, ddp_reference):
    """2 ranks checkpoint by the clock only (no step interval); every rank exits right after the
    first mid-epoch commit at step >= 10 (the checkpoint after step 10: the ranks compare
    clocks every 10 steps); torchrun restarts them; the run resumes there and every train row
    of the epoch is trained exactly once."""
    from trainflow.trainers.loop import CLOCK_CHECK_STEPS, FAULT_MARKER_ENV, FAULT_STEP_ENV

    lines: list[str] = []
    record = tmp_path / "batches"
    record.mkdir()
    run_dir = tmp_path / "killed"
    cfg = {"train": {"manifest_uri": toy_manifest.uri, "run_dir": run_dir.as_uri(), **BASE, "parallelism": "ddp",
                     "checkpoint_every_minutes": 1e-9, "checkpoint_every_steps": 0, "keep_checkpoints": 10},
           "family": {"record_dir": str(record)}}
    path = tmp_path / "killed.json"
    path.write_text(json.dumps(cfg))
    fault = tmp_path / "fault"
    run_torchrun(LaunchConfig(nproc_per_node=2, max_restarts=1), script=TOY_SCRIPT, args=["--config", str(path)],
                 env={"OMP_NUM_THREADS": "1", FAULT_STEP_ENV: "10", FAULT_MARKER_ENV: str(fault)},
                 on_line=lines.append)
    result = json.loads((run_dir / "result.json").read_text())
    resume = CLOCK_CHECK_STEPS
    assert fault.read_text() == str(resume)  # the ranks really exited after that commit
    assert any("checkpointing mid-epoch after step 10" in line for line in lines)
    assert any(f"resuming from step {resume} " in line for line in lines)
    assert result["resumed_from_step"] == resume
    markers = _marker_states(run_dir)
    steps = toy_manifest.num_rows("train") // 64
    assert markers[resume]["epoch"] == 0 and markers[resume]["train_state"]["position"] == resume
    assert sorted(markers) == [s for s in range(CLOCK_CHECK_STEPS, steps, CLOCK_CHECK_STEPS)] + [steps]
    entries = [json.loads(line) for p in record.glob("rank*.jsonl") for line in p.read_text().splitlines()]
    first = [e for e in entries if e["restart"] == 0]
    second = [e for e in entries if e["restart"] == 1]
    assert first and second
    # The first attempt handed out batch 10 (fetched before the save) but never trained it.
    assert {e["position"] for e in first} == set(range(resume + 1))
    assert min(e["position"] for e in second) == resume
    trained = [r for e in first if e["position"] < resume for r in e["rows"]] + [r for e in second for r in e["rows"]]
    assert len(trained) == len(set(trained)) == steps * 64
    assert result["steps"] == ddp_reference["steps"]
    np.testing.assert_allclose(_losses(result), _losses(ddp_reference), rtol=1e-4, atol=1e-5)
    assert result["metrics"]["eval"]["mse"] == pytest.approx(ddp_reference["metrics"]["eval"]["mse"], rel=1e-4)
