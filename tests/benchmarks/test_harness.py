"""The benchmark harness works: every case runs in quick mode and prints well-formed lines.

Speed targets are not asserted here (they live in docs/benchmarks.md); this proves that
``python -m benchmarks --quick`` runs each case to the end on a fresh checkout, without the
peer libraries (their lines are reported as skipped, with the reason).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from benchmarks.__main__ import discover
from trainflow.tasks.settings import PROJECT_DIR

KEYS = {"name", "value", "unit", "baseline", "ratio", "params"}


def _check_line(line: dict) -> None:
    assert set(line) == KEYS, line
    assert isinstance(line["name"], str) and line["name"]
    assert isinstance(line["unit"], str) and line["unit"]
    assert isinstance(line["params"], dict)
    if line["value"] is None:
        assert isinstance(line["params"].get("skipped"), str) and line["params"]["skipped"], line
        return
    assert isinstance(line["value"], int | float) and math.isfinite(line["value"]) and line["value"] >= 0, line
    if line["baseline"]:
        assert line["ratio"] == pytest.approx(line["value"] / line["baseline"], rel=1e-3, abs=1e-4), line
    else:
        assert line["ratio"] is None, line


def _run(cases: list[str], tmp_path) -> dict:
    out = tmp_path / "results.json"
    env = {**os.environ, "TRAINFLOW_BENCH_PEERS": "0", "TRAINFLOW_BENCH_DIR": str(tmp_path / "bench")}
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out), *cases], cwd=PROJECT_DIR,
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(out.read_text())
    assert results["failures"] == {} and results["quick"] is True
    printed = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert printed == results["results"]
    return results


def test_discover_finds_the_case_modules_only():
    cases = discover()
    assert {"loading", "sharding_write", "sharding_memory", "training_overhead", "scaling", "end_to_end",
            "sasrec_race", "ml25m"} <= set(cases)
    assert not {"common", "__main__", "_data", "_project_io", "_train_io"} & set(cases)


def test_unknown_case_is_named(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "no_such_case"], cwd=PROJECT_DIR,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no_such_case" in proc.stderr


@pytest.mark.slow
def test_quick_mode_of_every_case_prints_well_formed_lines(tmp_path):
    cases = [c for c in discover() if c not in ("end_to_end", "ml25m")]  # DAG runs: their own (e2e) tests
    results = _run(cases, tmp_path)
    lines = results["results"]
    for line in lines:
        _check_line(line)
    by_case = {c: [x for x in lines if x["params"]["case"] == c] for c in cases}
    assert all(by_case[c] for c in cases), {c: len(v) for c, v in by_case.items()}
    names = {x["name"] for x in lines}
    # The measured (not peer) lines are there, with values: the project is always measured.
    for name in ("loading_images_trainflow_nw0", "loading_images_memory", "sharding_write_images_trainflow",
                 "sharding_write_interactions_copy", "training_trainer_vs_hand_loop", "scaling_trainer_2_procs"):
        assert name in names
        assert next(x for x in lines if x["name"] == name)["value"] > 0
    skipped = [x for x in lines if x["value"] is None]
    # Skipped: the peers (disabled here), or a case on ../shared data where that folder is absent.
    assert skipped and all("TRAINFLOW_BENCH_PEERS=0" in x["params"]["skipped"] or "../shared absent" in x["params"]["skipped"]
                           for x in skipped)


@pytest.mark.slow
@pytest.mark.e2e
def test_quick_end_to_end_splits_orchestration_and_compute(tmp_path):
    lines = {x["name"]: x for x in _run(["end_to_end"], tmp_path)["results"]}
    for line in lines.values():
        _check_line(line)
    total = lines["end_to_end_total"]["value"]
    parts = lines["end_to_end_orchestration"]["value"] + lines["end_to_end_compute"]["value"]
    assert total > 0 and parts == pytest.approx(total, abs=0.3)


@pytest.mark.slow
@pytest.mark.e2e
def test_quick_ml25m_runs_the_dag_and_reports_each_phase(tmp_path):
    """The ML-25M case at 20k interactions: shard, 2 ranks, evaluate, register, all measured."""
    lines = {x["name"]: x for x in _run(["ml25m"], tmp_path)["results"]}
    for line in lines.values():
        _check_line(line)
        assert line["value"] is not None, line
    tasks = lines["ml25m_dag_wall"]["params"]["task_seconds"]
    assert {"shard", "train", "evaluate", "register"} <= set(tasks)
    assert 0 < lines["ml25m_shard"]["value"] == tasks["shard"] < lines["ml25m_dag_wall"]["value"]
    assert lines["ml25m_train_samples_per_s"]["params"]["world_size"] == 2
    assert len(lines["ml25m_peak_rss_largest_rank"]["params"]["peak_rss_mb_per_rank"]) == 2
    assert lines["ml25m_peak_rss_largest_rank"]["params"]["sharder_peak_rss_mb"] > 0
    assert lines["ml25m_disk"]["params"]["by_folder_mib"]["store"] > 0
    assert 0 < lines["ml25m_eval_hr_at_10"]["value"] <= 1
    assert lines["ml25m_eval_hr_at_10"]["params"]["register"]["version"] == 1


def test_driving_subset_keeps_valid_and_eval_and_a_share_of_train(tmp_path):
    """The learning curve's folders (docs/quality.md): the splits are the whole folder's, only
    ``train`` shrinks, and the files are links to the source's."""
    from benchmarks._driving_subset import subset_folder
    from trainflow.tasks.sharding import ShardingConfig, hash_split

    source = tmp_path / "source" / "data"
    source.mkdir(parents=True)
    for i in range(400):
        (source / f"{i}.csv").write_text(f"{i}\n")
    whole = {}
    for i in range(400):
        split = hash_split(str(i), ShardingConfig())
        whole[split] = whole.get(split, 0) + 1
    half = subset_folder(str(tmp_path / "source"), str(tmp_path / "half"), 0.5)
    assert half["valid"] == whole["valid"] and half["eval"] == whole["eval"]
    assert 0.4 * whole["train"] < half["train"] < 0.6 * whole["train"]
    quarter = subset_folder(str(tmp_path / "source"), str(tmp_path / "quarter"), 0.25)
    kept = {p.name for p in (tmp_path / "quarter" / "data").iterdir()}
    assert kept < {p.name for p in (tmp_path / "half" / "data").iterdir()}  # nested: the same draw
    assert quarter["train"] < half["train"] and sum(quarter.values()) == len(kept)
    link = next((tmp_path / "quarter" / "data").iterdir())
    assert link.is_symlink() and link.read_text() == (source / link.name).read_text()
    with pytest.raises(ValueError, match="fraction"):
        subset_folder(str(tmp_path / "source"), str(tmp_path / "none"), 0.0)
