"""Run every benchmark case, or some: ``python -m benchmarks [--quick] [case ...]``.

Each ``benchmarks/<case>.py`` with a ``main(argv)`` is a case (found automatically, so a new
module joins without touching this file). Every case runs in its own process with
``--quick`` passed on; its JSON lines are echoed and collected into
``benchmarks/results/<time>.json`` (or ``--out``). The exit status is 1 when a case failed;
a case that skips a peer which is not installed is not a failure.

    python -m benchmarks                       # full run (the numbers in docs/benchmarks.md)
    python -m benchmarks --quick               # smoke run of every case (CI), peers optional
    python -m benchmarks loading --quick       # one case
    python -m benchmarks.loading               # the same, straight
"""

from __future__ import annotations

import argparse
import ast
import datetime as dt
import json
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import BENCH_DIR, child_env, machine

NOT_CASES = {"__init__", "__main__", "common"}


def discover() -> list[str]:
    """Case modules: ``benchmarks/*.py`` defining a top-level ``main``, in name order."""
    cases = []
    for path in sorted(BENCH_DIR.glob("*.py")):
        if path.stem in NOT_CASES or path.stem.startswith("_"):
            continue
        tree = ast.parse(path.read_text(), str(path))
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            cases.append(path.stem)
    return cases


def run_case(case: str, quick: bool, timeout: float) -> tuple[list[dict], str | None, float]:
    cmd = [sys.executable, "-m", f"benchmarks.{case}"] + (["--quick"] if quick else [])
    started = time.monotonic()
    lines: list[dict] = []
    proc = subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            raw = raw.strip()
            if raw.startswith("{"):
                try:
                    line = json.loads(raw)
                except json.JSONDecodeError:
                    continue
                if "name" in line and "value" in line:
                    line.setdefault("params", {})["case"] = case
                    lines.append(line)
                    print(json.dumps(line), flush=True)
        proc.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return lines, f"timed out after {timeout:.0f} s", time.monotonic() - started
    err = proc.stderr.read() if proc.stderr else ""
    if proc.returncode != 0:
        return lines, f"exit {proc.returncode}: {err.strip()[-2000:]}", time.monotonic() - started
    if not lines:
        return lines, f"printed no result line: {err.strip()[-2000:]}", time.monotonic() - started
    return lines, None, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    cases = discover()
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="*", help=f"cases to run (default: all of {', '.join(cases)})")
    parser.add_argument("--quick", action="store_true", help="small smoke run of each case (CI)")
    parser.add_argument("--out", help="where to write the collected results (JSON)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per case")
    args = parser.parse_args(argv)
    unknown = [c for c in args.cases if c not in cases]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; the cases are: {', '.join(cases)}")
    selected = args.cases or cases
    results, failures, seconds = [], {}, {}
    for case in selected:
        print(f"# {case}{' (quick)' if args.quick else ''}", file=sys.stderr, flush=True)
        lines, error, took = run_case(case, args.quick, args.timeout)
        results.extend(lines)
        seconds[case] = round(took, 1)
        if error:
            failures[case] = error
            print(f"# {case} FAILED: {error}", file=sys.stderr, flush=True)
    out = Path(args.out) if args.out else BENCH_DIR / "results" / f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": args.quick, "machine": machine(), "case_seconds": seconds,
                               "failures": failures, "results": results}, indent=1) + "\n")
    print(f"# {len(results)} results from {len(selected)} cases in {sum(seconds.values()):.0f} s -> {out}"
          + (f"; FAILED: {', '.join(failures)}" if failures else ""), file=sys.stderr, flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
