"""GPU-path options of the train loop: precision (bf16 autocast), pinned-memory batches,
``torch.compile``, device placement and nccl.

On CPU: the options are validated with the field named, bf16 autocast and ``torch.compile``
train a tiny model, and ``device='cuda'`` without CUDA fails naming ``device``. The ``gpu``
tests run only with CUDA (they are skipped here: this development machine has no GPU).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from trainflow.tasks.launch import LaunchConfig, run_torchrun
from trainflow.trainers.config import TrainConfig
from trainflow.trainers.loop import load_exported_model, run_training
from trainflow.trainers.recommendation import RecommendationConfig, RecommendationFamily

sys.path.insert(0, str(Path(__file__).parent))
from toy_family import ToyConfig, ToyFamily  # noqa: E402

BASE = {"epochs": 1, "batch_size": 64, "learning_rate": 0.05, "log_every_steps": 1, "log_to_mlflow": False}
FAMILY = {"model": "neumf", "gmf_factors": 8, "mlp_layers": [16, 8], "dropout": 0.0, "num_negatives": 2,
          "eval_batch_size": 64}
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (none on this machine)")
needs_two_gpus = pytest.mark.skipif(not CUDA or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


pytestmark = pytest.mark.usefixtures("single_process_one_thread")


def _losses(result: dict) -> np.ndarray:
    return np.array([loss for _, loss in result["losses"]])


@pytest.mark.parametrize("overrides,field,text", [
    ({"precision": "fp16"}, "precision", "one of"),
    ({"pin_memory": True}, "pin_memory", "device='cuda'"),
    ({"pin_memory": "yes", "device": "cuda"}, "pin_memory", "true or false"),
    ({"compile": 1}, "compile", "true or false"),
    ({"parallelism": "tensor"}, "parallelism", "sharded_embeddings"),
])
def test_options_are_validated_naming_the_field(overrides, field, text):
    with pytest.raises(ValueError, match=field) as err:
        TrainConfig(manifest_uri="file:///m", **overrides)
    assert text in str(err.value)


def test_options_are_accepted():
    config = TrainConfig(manifest_uri="file:///m", device="cuda", precision="auto", pin_memory=True, compile=True,
                         parallelism="sharded_embeddings")
    assert config.autocast_dtype == torch.bfloat16  # auto on cuda
    assert TrainConfig(manifest_uri="file:///m").autocast_dtype is None  # auto on cpu: fp32
    assert TrainConfig(manifest_uri="file:///m", precision="bf16").autocast_dtype == torch.bfloat16
    assert TrainConfig(manifest_uri="file:///m", device="cuda", precision="fp32").autocast_dtype is None


@pytest.mark.skipif(CUDA, reason="checks the error without CUDA")
def test_cuda_without_a_gpu_fails_naming_the_device_field(toy_manifest, tmp_path):
    config = TrainConfig(manifest_uri=toy_manifest.uri, run_dir=(tmp_path / "r").as_uri(), device="cuda", **BASE)
    with pytest.raises(ValueError, match=r"device='cuda'.*no CUDA device"):
        run_training(ToyFamily, ToyConfig(), config)
    assert not (tmp_path / "r").exists()  # failed before any work


def test_bf16_autocast_on_cpu_trains_close_to_fp32(toy_manifest, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        config = TrainConfig(manifest_uri=toy_manifest.uri, run_dir=(tmp_path / precision).as_uri(),
                             precision=precision, max_steps=8, **BASE)
        runs[precision] = run_training(ToyFamily, ToyConfig(), config)
    assert runs["bf16"]["precision"] == "bf16" and runs["fp32"]["precision"] == "fp32"
    bf16, fp32 = _losses(runs["bf16"]), _losses(runs["fp32"])
    assert np.isfinite(bf16).all() and not np.array_equal(bf16, fp32)  # autocast really changed the math
    np.testing.assert_allclose(bf16, fp32, rtol=5e-2)  # bf16 has an 8-bit mantissa
    state, _ = load_exported_model((tmp_path / "bf16").as_uri())
    assert all(v.dtype == torch.float32 for v in state.values())  # weights stay fp32


@pytest.mark.slow  # ~20-100 s: inductor compiles forward, backward and eval with the C++ compiler (cold cache: ~100 s)
def test_compile_on_cpu_matches_eager(toy_manifest, tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", 1)  # no compile worker pool for a tiny model
    runs = {}
    for compiled in (False, True):
        config = TrainConfig(manifest_uri=toy_manifest.uri, run_dir=(tmp_path / str(compiled)).as_uri(),
                             compile=compiled, max_steps=4, **BASE)
        runs[compiled] = run_training(ToyFamily, ToyConfig(), config)
    np.testing.assert_allclose(_losses(runs[True]), _losses(runs[False]), rtol=1e-4, atol=1e-5)
    assert runs[True]["metrics"]["eval"]["mse"] == pytest.approx(runs[False]["metrics"]["eval"]["mse"], rel=1e-4)
    state, _ = load_exported_model((tmp_path / "True").as_uri())
    assert not any(k.startswith("_orig_mod") for k in state)  # exported keys are the plain model's


# --- with CUDA ---------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
def test_cuda_bf16_pinned_single_process(toy_manifest, tmp_path):
    config = TrainConfig(manifest_uri=toy_manifest.uri, run_dir=(tmp_path / "gpu").as_uri(), device="cuda",
                         pin_memory=True, **BASE)
    result = run_training(RecommendationFamily, RecommendationConfig(**FAMILY), config)
    assert result["device"] == "cuda:0" and result["precision"] == "bf16"
    losses = _losses(result)
    assert np.isfinite(losses).all() and losses[-5:].mean() < losses[:3].mean()
    cpu = run_training(RecommendationFamily, RecommendationConfig(**FAMILY),
                       TrainConfig(manifest_uri=toy_manifest.uri, run_dir=(tmp_path / "cpu").as_uri(), **BASE))
    for key in ("hr_at_10", "ndcg_at_10"):
        assert result["metrics"]["eval"][key] == pytest.approx(cpu["metrics"]["eval"][key], abs=0.1), key
    state, _ = load_exported_model((tmp_path / "gpu").as_uri())
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in state.values())


@pytest.mark.gpu
@needs_two_gpus
def test_nccl_ddp_and_sharded_embeddings_on_two_gpus(toy_manifest, tmp_path):
    results, lines = {}, []
    for parallelism in ("ddp", "sharded_embeddings"):
        run_dir = tmp_path / parallelism
        cfg = {"train": {"manifest_uri": toy_manifest.uri, "run_dir": run_dir.as_uri(), **BASE, "device": "cuda",
                         "precision": "fp32", "pin_memory": True, "parallelism": parallelism}, "family": FAMILY}
        path = tmp_path / f"{parallelism}.json"
        path.write_text(json.dumps(cfg))
        run_torchrun(LaunchConfig(nproc_per_node=2), module="trainflow.trainers.recommendation", args=["--config", str(path)],
                     on_line=lines.append)
        results[parallelism] = json.loads((run_dir / "result.json").read_text())
    assert any("joined (nccl on cuda:1)" in line for line in lines)
    ddp, sharded = results["ddp"], results["sharded_embeddings"]
    assert ddp["device"] == "cuda:0" and sharded["parallelism"] == "sharded_embeddings"
    np.testing.assert_allclose(_losses(sharded), _losses(ddp), rtol=1e-3, atol=1e-4)
    assert max(sharded["memory"]["embedding_param_bytes_per_rank"]) <= ddp["memory"]["embedding_param_bytes"] / 2 + 1024


def test_pinned_batches_keep_order_stop_early_and_raise(monkeypatch):
    """The pin-memory thread (CPU torch cannot pin: pin_memory is replaced by a marked copy)."""
    from trainflow.trainers.loop import _pinned

    pinned = []

    def fake_pin(self):
        out = self.clone()
        pinned.append(int(out[0]))
        return out

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    batches = [{"x": torch.tensor([i]), "name": f"b{i}"} for i in range(6)]
    got = list(_pinned(iter(batches)))
    assert [int(b["x"][0]) for b in got] == list(range(6)) and [b["name"] for b in got] == [f"b{i}" for i in range(6)]

    pinned.clear()
    stream = _pinned(iter(batches), depth=1)
    assert int(next(stream)["x"][0]) == 0
    stream.close()  # the loop stops early (max_steps): the thread ends instead of blocking on a full queue
    import threading

    threads = [t for t in threading.enumerate() if t.name == "pin-memory"]
    for thread in threads:
        thread.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert len(pinned) <= 3  # depth 1: the one handed out, one queued, one waiting

    def failing():
        yield {"x": torch.tensor([0])}
        raise OSError("shard gone")

    stream = _pinned(failing())
    assert int(next(stream)["x"][0]) == 0
    with pytest.raises(OSError, match="shard gone"):
        next(stream)
