"""Helpers shared by the benchmark cases: one JSON line per case, machine description."""

from __future__ import annotations

import json
import os
import platform
import sys
from typing import Any


def machine() -> dict[str, Any]:
    import psutil

    return {
        "cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def emit(name: str, value: float, unit: str, baseline: float | None, params: dict[str, Any]) -> dict[str, Any]:
    """Print (and return) one result line: name, value, unit, baseline, ratio, params."""
    ratio = None if not baseline else round(value / baseline, 4)
    line = {"name": name, "value": value, "unit": unit, "baseline": baseline, "ratio": ratio, "params": params}
    print(json.dumps(line), flush=True)
    return line


def python() -> str:
    return sys.executable
