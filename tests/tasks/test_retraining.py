"""Which data an unattended run trains on, and the raw-data watcher's drop detection."""

from __future__ import annotations

import json

import pytest

from trainflow.tasks.retraining import (
    ORIGIN_ASSET_EVENT,
    ORIGIN_FORM,
    ORIGIN_PRODUCTION,
    RunSourceError,
    event_source,
    find_new_drop,
    parse_production_config,
    resolve_run_params,
)

FORM = {"source_url": "synthetic://recommendation?num_interactions=100000", "epochs": 60, "dataset_name": None}


def test_manual_runs_keep_the_form_whatever_is_configured():
    params, origin = resolve_run_params(FORM, "manual", "recommendation", production={"source_url": "s3://b/prod"})
    assert params == FORM and origin == ORIGIN_FORM


@pytest.mark.parametrize("run_type", ["scheduled", "backfill"])
def test_scheduled_runs_use_the_production_configuration(run_type):
    production = parse_production_config('{"source_url": " s3://b/ratings/ ", "dataset_name": "ratings", "epochs": 5}', "recommendation")
    params, origin = resolve_run_params(FORM, run_type, "recommendation", production=production)
    assert origin == ORIGIN_PRODUCTION
    assert params["source_url"] == "s3://b/ratings/" and params["dataset_name"] == "ratings" and params["epochs"] == 5


def test_a_scheduled_run_without_production_source_fails_saying_how_to_configure_it():
    with pytest.raises(RunSourceError) as info:
        resolve_run_params(FORM, "scheduled", "driving", production=None)
    message = str(info.value)
    assert "trainflow_driving_production" in message and "TRAINFLOW_DRIVING_PRODUCTION" in message
    assert "never falls back" in message
    assert isinstance(info.value, ValueError)  # bad input: the task fails without retries


def test_asset_triggered_runs_shard_the_newest_event_source_over_the_production_one():
    events = [{"source_url": "s3://b/raw/drop-1/"}, {"note": "no url"}, {"source_url": "s3://b/raw/drop-2/", "dataset_name": "raw"}]
    production = {"source_url": "s3://b/raw/old/", "epochs": 3, "dataset_name": "prod"}
    params, origin = resolve_run_params(FORM, "asset_triggered", "recommendation", production=production, events=events)
    assert origin == ORIGIN_ASSET_EVENT
    assert params["source_url"] == "s3://b/raw/drop-2/" and params["dataset_name"] == "raw" and params["epochs"] == 3
    params, _ = resolve_run_params(FORM, "asset_triggered", "recommendation", production=None, events=events[:1])
    assert params["source_url"] == "s3://b/raw/drop-1/" and params["epochs"] == 60  # the form's other params


def test_an_event_without_source_url_is_refused_not_replaced_by_defaults():
    with pytest.raises(RunSourceError, match="source_url"):
        resolve_run_params(FORM, "asset_triggered", "recommendation", production={"source_url": "s3://b/p"}, events=[{}])
    assert event_source([{"source_url": "  "}]) is None


@pytest.mark.parametrize(
    "raw,expected",
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("s3://bucket/ratings.csv", {"source_url": "s3://bucket/ratings.csv"}),
        ('"file:///data/u.data"', {"source_url": "file:///data/u.data"}),
        ({"source_url": "s3://b/x", "epochs": 2}, {"source_url": "s3://b/x", "epochs": 2}),
    ],
)
def test_production_configuration_forms(raw, expected):
    assert parse_production_config(raw, "recommendation") == expected


@pytest.mark.parametrize("raw", ['{"epochs": 2}', "{not json", "[1, 2]", '{"source_url": ""}'])
def test_bad_production_configuration_is_named(raw):
    with pytest.raises(RunSourceError, match="production configuration of 'recommendation'"):
        parse_production_config(raw, "recommendation")


def test_find_new_drop_takes_the_newest_complete_drop(tmp_path, tf_env):
    prefix = tmp_path / "raw"
    (prefix / "2026-11-01").mkdir(parents=True)
    (prefix / "2026-11-01" / "u.data").write_text("1\t2\t5\t1\n")
    (prefix / "2026-11-01" / "_SUCCESS").write_text("")
    (prefix / "2026-12-01").mkdir()  # still being written: no marker
    (prefix / "2026-12-01" / "u.data").write_text("1\t2\t5\t1\n")
    (prefix / "_tmp").mkdir()
    url = prefix.as_uri()
    assert find_new_drop(url, []) == f"{url}/2026-11-01"
    assert find_new_drop(url, ["2026-11-01"]) is None
    (prefix / "2026-12-01" / "_SUCCESS").write_text("")
    (prefix / "2026-11-15.csv").write_text("user,item\n")  # a file drop is complete on sight
    assert find_new_drop(url, ["2026-11-01"]) == f"{url}/2026-12-01"
    assert find_new_drop(url, ["2026-11-01", "2026-12-01"]) == f"{url}/2026-11-15.csv"
    assert find_new_drop((tmp_path / "missing").as_uri(), []) is None
    json.dumps(find_new_drop(url, []))  # a plain string, for the event's extra
