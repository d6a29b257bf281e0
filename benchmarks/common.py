"""Helpers shared by the benchmark cases: one JSON line per case, machine, A/B timing, peers.

Conventions every case module follows (``benchmarks/<case>.py``):

- ``main(argv) -> list[dict]`` parses ``--quick`` (a small smoke run for CI, peers optional)
  and prints one JSON line per result with :func:`emit` (or :func:`skip`).
- Ratios are measured in the same run: the variants are timed interleaved (A, B, A, B, ...)
  and the medians compared, because the machines are shared and absolute times are noisy.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
THREADS = 1
"""torch intra-op threads in every benchmark process (the default 2 made ``torch.stack`` take
50-500 ms under load on the 2-core development machine)."""

PEER_ENVS = {
    "webdataset": BENCH_DIR / ".venv-peers",
    "streaming": BENCH_DIR / ".venv-peers",
    "pyarrow": BENCH_DIR / ".venv-peers",
    "datasets": BENCH_DIR / ".venv-peers-hf",
}


def machine() -> dict[str, Any]:
    import psutil

    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_1m": round(os.getloadavg()[0], 2),
        "torch_threads": THREADS,
    }


def emit(name: str, value: float | None, unit: str, baseline: float | None, params: dict[str, Any]) -> dict[str, Any]:
    """Print (and return) one result line: name, value, unit, baseline, ratio, params."""
    ratio = None if not baseline or value is None else round(value / baseline, 4)
    line = {"name": name, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio, "params": params}
    print(json.dumps(line), flush=True)
    return line


def skip(name: str, unit: str, reason: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """A result that could not be measured here (a peer not installed...): says why."""
    return emit(name, None, unit, None, {**(params or {}), "skipped": reason})


def python() -> str:
    return sys.executable


def pin_threads(threads: int = THREADS) -> None:
    """One intra-op and inter-op thread in this process (set before any torch work)."""
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set (inter-op threads can be set once per process)
        pass


def child_env(**extra: str) -> dict[str, str]:
    """Environment of a benchmark subprocess: the repository importable, threads pinned."""
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, str(THREADS))
    return env


def run_json(cmd: list[str], env: dict[str, str] | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Run a child that prints a JSON object as its last stdout line; return it."""
    out = subprocess.run(cmd, env=env or child_env(), capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({out.returncode}):\n{out.stderr[-3000:]}")
    lines = [line for line in out.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{' '.join(cmd[:4])}... printed no JSON:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return json.loads(lines[-1])


def peer_python(library: str) -> tuple[str | None, str]:
    """The interpreter of ``library``'s benchmark virtualenv, or ``(None, why not)``."""
    if os.environ.get("TRAINFLOW_BENCH_PEERS", "1") == "0":
        return None, "peers disabled (TRAINFLOW_BENCH_PEERS=0)"
    env = PEER_ENVS[library]
    py = env / "bin" / "python"
    if not (env / ".stamp").exists():  # written by setup_peers.sh once the install succeeded
        return None, f"{library} not installed: run benchmarks/setup_peers.sh (creates {env.relative_to(ROOT)})"
    return str(py), ""


def interleave(
    variants: dict[str, Callable[[], float]], repeats: int, before: Callable[[], None] | None = None
) -> dict[str, list[float]]:
    """Call every variant ``repeats`` times, round-robin (A, B, A, B, ...); their values.
    ``before`` runs before each call, outside what the call measures."""
    values: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            if before is not None:
                before()
            values[name].append(fn())
    return values


def flush_dirty_pages() -> None:
    """``sync``: write every dirty page to disk, so a writer does not start while the kernel
    is still writing back the previous writer's hundreds of MB (which slowed whoever came
    next by up to 3x in interleaved runs here)."""
    import os

    os.sync()


def guarded(fn: Callable[[], float], errors: dict[str, str], name: str) -> Callable[[], float]:
    """``fn``, but a failure is recorded in ``errors[name]`` (and gives NaN) instead of raised."""

    def call() -> float:
        if name in errors:
            return float("nan")
        try:
            return fn()
        except Exception as exc:  # a peer that breaks is reported as skipped, with its error
            errors[name] = f"{type(exc).__name__}: {str(exc)[-400:]}"
            return float("nan")

    return call


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> list[float]:
    """``[min, max]`` rounded, for the params of a line."""
    return [round(min(values), 3), round(max(values), 3)]


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
