"""scripts/main.sh's own bookkeeping: one log per run, named by its run id; the success check and
the report are this run's. Airflow and the report are stubbed (a real pipeline run takes minutes:
the main job itself is what runs it for real); the script, its shell and its files are real."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

from trainflow.tasks.settings import PROJECT_DIR

FAKE_AIRFLOW = r"""#!/usr/bin/env bash
# A stand-in for `airflow`: `dags test` runs for FAKE_SECONDS and prints Airflow's own last line
# with a run id of its own choosing (as the real one does), state from FAKE_STATE.
case "$1 $2" in
  "dags test")
    run_id="manual__$(date -u +%Y-%m-%dT%H:%M:%S.%N)+00:00"
    echo "task shard of $run_id: starting"
    sleep "${FAKE_SECONDS:-1}"
    echo "[2026-12-02T03:00:00] {dagrun.py:1310} INFO - DagRun Finished: dag_id=$3, logical_date=None, run_id=$run_id, run_start_date=x, run_end_date=y, run_duration=1, state=${FAKE_STATE:-success}, run_type=manual"
    [ "${FAKE_STATE:-success}" = success ] ;;
  *) exit 0 ;;
esac
"""

FAKE_PYTHON = r"""#!/usr/bin/env bash
# `-m trainflow.tasks.cli report DAG --run-id ID` prints which report it was asked for; anything else is Python.
if [ "$1 $2 $3" = "-m trainflow.tasks.cli report" ]; then echo "REPORT $4 $5 $6"; exit 0; fi
exec "REAL_PYTHON" "$@"
"""


def _fake_checkout(tmp_path: Path) -> Path:
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    (root / "dags").mkdir()
    shutil.copy(PROJECT_DIR / "scripts" / "main.sh", root / "scripts" / "main.sh")
    shutil.copy(PROJECT_DIR / "scripts" / "airflow-env.sh", root / "scripts" / "airflow-env.sh")
    (root / "scripts" / "bootstrap.sh").write_text('VENV="$ROOT/.venv"\n')
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for name, text in (("airflow", FAKE_AIRFLOW), ("python", FAKE_PYTHON.replace("REAL_PYTHON", os.path.realpath(
            shutil.which("python3") or "/usr/bin/python3")))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    return root


def _main(root: Path, data: Path, **env) -> subprocess.Popen:
    environ = {**os.environ, "TRAINFLOW_DATA_DIR": str(data), "TRAINFLOW_SHARED_DATA": str(data / "none"), **env}
    environ.pop("AIRFLOW_HOME", None)
    return subprocess.Popen(["bash", str(root / "scripts" / "main.sh")], env=environ, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_two_main_jobs_in_one_data_folder_keep_their_own_log_and_report(tmp_path):
    root, data = _fake_checkout(tmp_path), tmp_path / "data"
    slow = _main(root, data, FAKE_SECONDS="3")  # starts first, finishes last
    fast = _main(root, data, FAKE_SECONDS="1")
    outputs = {"slow": slow.communicate(timeout=60)[0], "fast": fast.communicate(timeout=60)[0]}
    assert slow.returncode == 0 and fast.returncode == 0, outputs
    logs = sorted((data / "logs" / "main").iterdir())
    assert len(logs) == 2  # one log per run: neither lost
    run_ids = {}
    for job, output in outputs.items():
        run_id = output.split("[main] run ", 1)[1].split(" ", 1)[0]
        run_ids[job] = run_id
        log = data / "logs" / "main" / f"recommendation-{run_id}.log"
        assert log in logs and log.read_text().count("DagRun Finished") == 1 and run_id in log.read_text()
        assert f"REPORT recommendation_training --run-id {run_id}" in output  # this run's report
    assert run_ids["slow"] != run_ids["fast"]
    assert run_ids["fast"] not in outputs["slow"] and run_ids["slow"] not in outputs["fast"]
    # The convenience link points at the log of the run that finished last.
    assert os.path.realpath(data / "last-recommendation-run.log") == str(
        data / "logs" / "main" / f"recommendation-{run_ids['slow']}.log")


def test_a_failed_run_is_reported_as_this_runs_failure(tmp_path):
    root, data = _fake_checkout(tmp_path), tmp_path / "data"
    failed = _main(root, data, FAKE_SECONDS="0", FAKE_STATE="failed")
    output = failed.communicate(timeout=60)[0]
    assert failed.returncode == 1
    run_id = output.split("[main] the DAG run ", 1)[1].split(" ", 1)[0]
    assert run_id.startswith("manual__") and "REPORT" not in output
    assert (data / "logs" / "main" / f"recommendation-{run_id}.log").exists()


def test_report_of_one_run_not_the_latest(tf_env):
    """`trainflow.tasks.cli report --run-id` (what main.sh prints) reads that run's report.json."""
    import json

    from trainflow.tasks.cli import run_report
    from trainflow.tasks.pipeline import latest_run_report, write_run_report

    for run_id, finished in (("manual__a", "2026-12-02T03:00:00"), ("manual__b", "2026-12-02T04:00:00")):
        write_run_report({"run": run_id, "finished_at": finished}, "recommendation_training", run_id)
    assert latest_run_report("recommendation_training")["run"] == "manual__b"
    assert run_report("recommendation_training", "manual__a")["run"] == "manual__a"
    assert run_report("recommendation_training", "manual__c") is None
    assert json.dumps(run_report("recommendation_training", "manual__b"))
