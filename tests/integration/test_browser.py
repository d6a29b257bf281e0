"""The UIs in a real browser (Debian's Chromium under Selenium) against the ``live_stack``: the
Airflow trigger form of ``recommendation_training`` and MLflow's page of the registered model
version. Screenshots go to the test artifacts folder (``test-artifacts/``)."""

from __future__ import annotations

import re
import time
import uuid

import pytest

from tests.integration.browser import login_airflow, save_screenshot, wait, wait_text, wait_visible
from trainflow.tasks.params import param_specs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAG_ID = "recommendation_training"


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _by():
    from selenium.webdriver.common.by import By

    return By


def test_trigger_form_renders_the_params_and_triggers_with_the_changed_one(live_stack, browser, artifacts_dir):
    by = _by()
    login_airflow(browser, live_stack, f"/dags/{DAG_ID}")
    wait_visible(browser, by.CSS_SELECTOR, "button[aria-label='Trigger Dag']").click()
    wait_text(browser, "Run Parameters")
    dialog = next(d for d in browser.find_elements(by.CSS_SELECTOR, "[role='dialog']") if "Trigger Dag" in d.text)
    wait(browser).until(lambda _: "Data source" in dialog.text, "the params did not render in the trigger form")

    # Every param is in the form with its title, its description and its default.
    text = _normalized(dialog.text)
    specs = param_specs("recommendation")
    for key, spec in specs.items():
        assert spec["title"] in text, f"title of {key!r} not shown"
        assert _normalized(spec["description"]) in text, f"description of {key!r} not shown"
    epochs = dialog.find_element(by.CSS_SELECTOR, "input[name='element_epochs']")
    assert epochs.get_attribute("value") == str(specs["epochs"]["default"])
    assert dialog.find_element(by.CSS_SELECTOR, "input[name='element_model']").get_attribute("value") == \
        specs["model"]["default"]
    save_screenshot(browser, "airflow-trigger-form", artifacts_dir)

    # Change one param as a user would, name the run (Advanced Options), trigger.
    from selenium.webdriver.common.keys import Keys

    epochs.send_keys(Keys.CONTROL, "a")
    epochs.send_keys("3")
    wait(browser, 10).until(lambda _: epochs.get_attribute("value") == "3", "epochs did not take the new value")
    dialog.find_element(by.XPATH, ".//button[normalize-space()='Advanced Options']").click()
    run_id = f"ui_trigger_{uuid.uuid4().hex[:8]}"
    run_id_input = wait_visible(browser, by.CSS_SELECTOR, "input[name='dagRunId']", timeout=20)
    run_id_input.send_keys(run_id)
    trigger = dialog.find_element(by.XPATH, ".//button[normalize-space()='Trigger']")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", trigger)
    save_screenshot(browser, "airflow-trigger-form-advanced", artifacts_dir)
    trigger.click()

    try:
        deadline = time.monotonic() + 60
        while (response := live_stack.api.get(f"dags/{DAG_ID}/dagRuns/{run_id}")).status_code == 404:
            assert time.monotonic() < deadline, f"the UI created no run {run_id}"
            time.sleep(1)
        run = response.json()
    finally:
        # A full-size run (the form's defaults): it only had to exist with the right conf. Marked
        # failed at once, its tasks never start (Airflow skips them) and the DAG is free again.
        live_stack.api.patch(f"dags/{DAG_ID}/dagRuns/{run_id}", json={"state": "failed"})
        live_stack.api.wait_for_run(DAG_ID, run_id, timeout=300, raise_on_failure=False)
    # The run carries the changed value and the form's defaults for everything else.
    expected = {key: spec["default"] for key, spec in specs.items()}
    expected["epochs"] = 3
    assert run["conf"] == expected
    assert run["triggered_by"] == "ui" and run["triggering_user_name"] == live_stack.username
    # The UI shows that conf on the run's details page.
    browser.get(f"{live_stack.airflow_url}/dags/{DAG_ID}/runs/{run_id}/details")
    wait_text(browser, "Triggering User")
    wait(browser).until(lambda d: '"epochs": 3' in d.find_element(by.TAG_NAME, "body").text,
                        "the run's details page does not show epochs 3 in its conf")
    for label in browser.find_elements(by.XPATH, "//*[normalize-space(text())='Conf']")[:1]:
        browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", label)  # for the screenshot
    save_screenshot(browser, "airflow-run-triggered-from-the-form", artifacts_dir)


def test_the_run_page_shows_every_task_succeeded(live_stack, recommendation_run, browser, artifacts_dir):
    by = _by()
    run_id = recommendation_run["run_id"]
    expected = {ti["task_id"]: ti["state"] for ti in live_stack.api.task_instances(DAG_ID, run_id)}
    login_airflow(browser, live_stack, f"/dags/{DAG_ID}/runs/{run_id}")
    wait_text(browser, f"{len(expected)} Task Instances")
    rows = {}
    for row in browser.find_elements(by.CSS_SELECTOR, "tbody tr"):
        cells = row.text.split("\n")
        rows[cells[0]] = row.text
    assert set(rows) == set(expected), rows
    assert {"shard", "train", "evaluate", "register"} <= {t for t, state in expected.items() if state == "success"}
    for task_id, text in rows.items():
        assert expected[task_id].capitalize() in text, f"{task_id} ({expected[task_id]}): {text}"
    save_screenshot(browser, "airflow-run", artifacts_dir)


def test_mlflow_model_version_page_shows_alias_and_metrics(live_stack, recommendation_run, browser, artifacts_dir):
    by = _by()
    name = recommendation_run["conf"]["registered_model_name"]
    version = live_stack.mlflow_get("model-versions/get", name=name, version="1")["model_version"]
    tags = {tag["key"]: tag["value"] for tag in version.get("tags", [])}
    aliases = sorted(version["aliases"])
    assert "challenger" in aliases

    browser.get(f"{live_stack.mlflow_url}/#/models/{name}/versions/1")
    wait_text(browser, "Version 1", timeout=90)
    for alias in aliases:
        wait_text(browser, f"@ {alias}", timeout=30)
    # The evaluation metrics are shown on the version (as the gate's metric tags).
    body = browser.find_element(by.TAG_NAME, "body")
    for key in ("trainflow.metric.ndcg_at_10", "trainflow.metric.hr_at_10", "trainflow.metric.baseline_ndcg_at_10"):
        wait_text(browser, key, timeout=30)
        assert tags[key] in body.text, f"{key}={tags[key]} not shown"
    # The assistant side panel hides half the page: close it if it is there.
    close = [button for button in browser.find_elements(
        by.XPATH, "//button[@aria-label='New Chat']/following::button[@aria-label='Close'][1]") if button.is_displayed()]
    if close:
        close[0].click()
        from selenium.webdriver.support import expected_conditions as ec

        # Gone from the page or hidden: both count (a removed element is stale, not hidden).
        wait(browser, 10).until(ec.invisibility_of_element(close[0]), "the assistant panel did not close")
    save_screenshot(browser, "mlflow-model-version", artifacts_dir)
