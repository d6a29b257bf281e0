"""The producer side of data-triggered training under ``dag.test()``: the announce and watch
DAGs check the data, emit the pipeline's raw-data Asset event with ``source_url``, and emit
nothing when there is nothing (new) to announce. (The consumer side, a training run that an
event triggers, needs the scheduler: tests/integration/test_live_retraining.py.)"""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.e2e]

RATINGS = "".join(f"{u}\t{i}\t{1 + (u * i) % 5}\t{880000000 + u * 100 + i}\n" for u in range(1, 21) for i in range(1, 9))


def _events(uri: str) -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        rows = session.scalars(
            select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id).where(AssetModel.uri == uri)
            .order_by(AssetEvent.id)
        ).all()
        return [dict(row.extra or {}) for row in rows]


def _states(run) -> dict[str, str]:
    return {t.task_id: str(t.state) for t in run.get_task_instances()}


def test_announce_emits_the_event_with_the_checked_source_and_refuses_a_missing_one(dagbag, tf_env, tmp_path):
    from airflow.utils.state import DagRunState

    drop = tmp_path / "drops" / "2026-12-01" / "u.data"
    drop.parent.mkdir(parents=True)
    drop.write_text(RATINGS)
    before = len(_events("trainflow://raw/recommendation"))
    dag = dagbag.dags["announce_raw_data"]
    run = dag.test(run_conf={"pipeline": "recommendation", "source_url": drop.as_uri(), "dataset_name": "ratings"})
    assert run.state == DagRunState.SUCCESS, _states(run)
    states = _states(run)
    assert states["announce_recommendation"] == "success" and states["announce_driving"] == "skipped"
    events = _events("trainflow://raw/recommendation")
    assert events[before:] == [{"source_url": drop.as_uri(), "dataset_name": "ratings"}]

    missing = (tmp_path / "drops" / "nothing-here").as_uri()
    run = dagbag.dags["announce_raw_data"].test(run_conf={"pipeline": "recommendation", "source_url": missing})
    assert run.state == DagRunState.FAILED
    ti = next(t for t in run.get_task_instances() if t.task_id == "announce_recommendation")
    assert ti.state == "failed" and ti.try_number == 1  # bad input: failed at once, not retried
    assert len(_events("trainflow://raw/recommendation")) == before + 1  # no event for it


def test_watcher_announces_each_complete_drop_once(dagbag, tf_env, tmp_path, monkeypatch):
    from airflow.utils.state import DagRunState

    prefix = tmp_path / "landing"
    (prefix / "2026-11-24").mkdir(parents=True)
    (prefix / "2026-11-24" / "u.data").write_text(RATINGS)
    (prefix / "2026-11-24" / "_SUCCESS").write_text("")
    (prefix / "2026-12-01").mkdir()
    (prefix / "2026-12-01" / "u.data").write_text(RATINGS)  # no marker yet: incomplete
    monkeypatch.setenv("TRAINFLOW_RECOMMENDATION_WATCH", prefix.as_uri())
    monkeypatch.delenv("TRAINFLOW_DRIVING_WATCH", raising=False)
    before = len(_events("trainflow://raw/recommendation"))

    def poll():
        from airflow.dag_processing.dagbag import DagBag

        from trainflow.tasks.settings import PROJECT_DIR

        dag = DagBag(dag_folder=str(PROJECT_DIR / "dags" / "watch_raw_data.py")).dags["watch_raw_data"]
        run = dag.test()
        assert run.state == DagRunState.SUCCESS, _states(run)
        return _states(run)

    states = poll()
    assert states["detect_recommendation"] == "success" and states["remember_recommendation"] == "success"
    assert states["detect_driving"] == "skipped"  # no prefix configured for driving: no event
    assert _events("trainflow://raw/recommendation")[before:] == [{"source_url": f"{prefix.as_uri()}/2026-11-24"}]
    state = json.loads((tf_env / "store" / "watch" / "recommendation" / "announced.json").read_text())
    assert state == {"announced": ["2026-11-24"]}

    assert poll()["detect_recommendation"] == "skipped"  # nothing new: no second event
    (prefix / "2026-12-01" / "_SUCCESS").write_text("")
    assert poll()["detect_recommendation"] == "success"
    assert _events("trainflow://raw/recommendation")[before:] == [
        {"source_url": f"{prefix.as_uri()}/2026-11-24"},
        {"source_url": f"{prefix.as_uri()}/2026-12-01"},
    ]
