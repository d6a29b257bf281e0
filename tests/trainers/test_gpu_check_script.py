"""scripts/gpu-check.sh and scripts/gpu_check.py on a machine without a GPU: the clear failure,
the argument handling, and the loader-vs-memory measurement on the CPU path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from trainflow.tasks.settings import PROJECT_DIR

SCRIPT = PROJECT_DIR / "scripts" / "gpu-check.sh"
HELPER = PROJECT_DIR / "scripts" / "gpu_check.py"


def _run(args, env=None, timeout=120):
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=PROJECT_DIR, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has nvidia-smi")
def test_without_an_nvidia_driver_it_fails_clearly_and_runs_nothing():
    proc = _run([])
    assert proc.returncode == 2
    assert "no NVIDIA GPU here" in proc.stderr and "nothing was run" in proc.stderr


def test_a_driver_without_a_cuda_torch_fails_naming_the_wheel(tmp_path):
    """A fake nvidia-smi that lists a GPU: torch (the CPU wheel here) sees none, and says so."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here")
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho '0, Fake GPU, 80 GiB, 999'\n")
    (fake / "nvidia-smi").chmod(0o755)
    proc = _run([], env={"PATH": f"{fake}:{os.environ['PATH']}"})
    assert proc.returncode == 2, proc.stderr
    assert "Fake GPU" in proc.stdout and '"devices": 0' in proc.stdout
    assert "torch does not" in proc.stderr and "CPU-only torch wheel" in proc.stderr


@pytest.mark.parametrize("args", [["--steps", "0"], ["--steps"], ["--keep"], ["--frobnicate"]])
def test_bad_arguments_are_refused(args):
    proc = _run(args)
    assert proc.returncode == 64 and "[gpu-check]" in proc.stderr


def test_help_lists_the_parts():
    proc = _run(["--help"])
    assert proc.returncode == 0 and "gpu`-marked tests" in proc.stdout and "1.05" in proc.stdout


def test_loader_check_measures_both_paths_on_the_cpu(toy_manifest):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(HELPER), "loader", "--device", "cpu", "--manifest-uri", toy_manifest.uri,
                           "--batch", "64", "--steps", "12", "--block", "4", "--workers", "0"],
                          cwd=PROJECT_DIR, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["device"] == "cpu" and out["steps"] == 12 and out["batch"] == 64 and out["precision"] == "fp32"
    assert out["memory_samples_per_s"] > 0 and out["loader_samples_per_s"] > 0
    assert out["ratio"] == pytest.approx(out["loader_step_ms"] / out["memory_step_ms"], rel=1e-2)
    assert out["ok"] == (out["ratio"] <= out["target"] == 1.05)
    probe = json.loads(subprocess.run([sys.executable, str(HELPER), "probe"], capture_output=True, text=True,
                                      timeout=120).stdout)
    assert probe["devices"] == (0 if not probe["cuda_available"] else probe["devices"])
    if not probe["cuda_available"]:
        proc = subprocess.run([sys.executable, str(HELPER), "loader", "--device", "cuda", "--manifest-uri",
                               toy_manifest.uri], capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "torch sees no CUDA device" in proc.stderr
    proc = subprocess.run([sys.executable, str(HELPER), "loader", "--device", "cpu", "--manifest-uri",
                           toy_manifest.uri, "--steps", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--steps must be at least 1" in proc.stderr
