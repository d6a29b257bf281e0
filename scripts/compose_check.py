"""The REST half of scripts/compose-check.sh (standard library only, runs on the host).

``pipeline``: waits until ``recommendation_training`` is parsed, unpauses it, triggers it through
Airflow's REST API with a small synthetic conf, waits for the run, checks every task's state and
queue, then the registered version, its aliases and lineage through MLflow's REST API; triggers a
``device=cuda`` run and checks that trainflow's cluster policy put its tasks on the GPU queue (no GPU
worker runs here, so it is then marked failed). Writes what the bucket check needs to ``--out``.

``screenshots``: both UIs served from the containers, in headless Chromium (needs the project's
.venv: selenium and tests/integration/browser.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DAG_ID = "recommendation_training"
MODEL_NAME = "compose-check-recommendation"
CONF: dict[str, Any] = {
    "source_url": "synthetic://recommendation?num_interactions=4000&num_users=50&num_items=200&seed=7",
    "model": "neumf",
    "model_size": 8,
    "epochs": 2,
    "batch_size": 256,
    "nproc_per_node": 2,
    "parallelism": "ddp",
    "registered_model_name": MODEL_NAME,
    # Triggered through the API (a manual run): no reviewer here, the gate decides alone.
    "require_approval": "never",
}
EXPECTED_STATES = {
    **dict.fromkeys(("shard", "plan_nodes", "train", "evaluate", "register"), "success"),
    **dict.fromkeys(("train_node", "approve", "promote"), "skipped"),
}


def log(message: str) -> None:
    print(f"[compose-check] {message}", flush=True)


class CheckFailed(Exception):
    pass


class Fatal(CheckFailed):
    """A failure that waiting longer cannot fix."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            values[key.strip()] = value
    return values


class Http:
    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base.rstrip("/")
        self.token = token

    def request(self, method: str, path: str, body: Any = None, params: dict[str, Any] | None = None) -> Any:
        url = f"{self.base}/{path.lstrip('/')}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        # Idempotent calls get a few tries on a server error: Airflow's API answers 500 ("Database
        # error") now and then when a run's state is patched while the scheduler updates it.
        attempts = 4 if method in ("GET", "PATCH", "DELETE") else 1
        for attempt in range(1, attempts + 1):
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    text = response.read().decode()
                break
            except urllib.error.HTTPError as error:
                detail = error.read().decode()[:500]
                if error.code >= 500 and attempt < attempts:
                    print(f"[compose-check] {method} {path}: HTTP {error.code}, trying again ({attempt}/{attempts})", flush=True)
                    time.sleep(2.0 * attempt)
                    continue
                raise CheckFailed(f"{method} {url}: HTTP {error.code}: {detail}") from error
        return json.loads(text) if text.strip().startswith(("{", "[")) else text


def airflow_api(url: str, username: str, password: str) -> Http:
    token = Http(url).request("POST", "/auth/token", {"username": username, "password": password})["access_token"]
    return Http(f"{url}/api/v2", token)


def wait_for(what: str, probe, timeout: float, interval: float = 5.0):
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = probe()
            if result:
                return result
        except Fatal:
            raise
        except CheckFailed as error:
            last = error
        time.sleep(interval)
    raise CheckFailed(f"timed out after {timeout:.0f}s waiting for {what}" + (f": {last}" if last else ""))


def task_logs(api: Http, run_id: str, ti: dict[str, Any]) -> str:
    try:
        content = api.request(
            "GET", f"dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id, safe='')}/taskInstances/{ti['task_id']}"
            f"/logs/{max(ti.get('try_number') or 1, 1)}", params={"full_content": "true"})
    except CheckFailed as error:
        return f"(no log: {error})"
    lines = content.get("content", []) if isinstance(content, dict) else [content]
    return "\n".join(str(line.get("event", line)) if isinstance(line, dict) else str(line) for line in lines)[-6000:]


def task_instances(api: Http, run_id: str) -> list[dict[str, Any]]:
    quoted = urllib.parse.quote(run_id, safe="")
    return api.request("GET", f"dags/{DAG_ID}/dagRuns/{quoted}/taskInstances", params={"limit": 100})["task_instances"]


def xcom(api: Http, run_id: str, task_id: str) -> Any:
    quoted = urllib.parse.quote(run_id, safe="")
    entry = api.request("GET", f"dags/{DAG_ID}/dagRuns/{quoted}/taskInstances/{task_id}/xcomEntries/return_value")
    value = entry["value"]
    return json.loads(value) if isinstance(value, str) and value[:1] in "{[" else value


def stop_scheduled_runs(api: Http, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = api.request("GET", f"dags/{DAG_ID}/dagRuns", params={"run_type": "scheduled"})["dag_runs"]
        for run in runs:
            if run["run_type"] == "scheduled" and run["state"] in ("queued", "running"):
                api.request("PATCH", f"dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run['dag_run_id'], safe='')}",
                            {"state": "failed"})
                log(f"stopped the scheduled run {run['dag_run_id']} that unpausing started (full size, not this check's)")
                return
        time.sleep(2)


def run_pipeline(env: dict[str, str], out: Path) -> None:
    airflow = f"http://127.0.0.1:{env['AIRFLOW_PORT']}"
    mlflow = Http(f"http://127.0.0.1:{env['MLFLOW_PORT']}/api/2.0/mlflow")
    api = airflow_api(airflow, env["AIRFLOW_ADMIN_USERNAME"], env["AIRFLOW_ADMIN_PASSWORD"])
    def parsed():
        errors = api.request("GET", "importErrors")["import_errors"]
        for error in errors:
            if error["filename"].endswith(f"{DAG_ID}.py"):
                raise Fatal(f"{error['filename']} did not load:\n{error['stack_trace'][-4000:]}")
        return api.request("GET", f"dags/{DAG_ID}")

    wait_for(f"{DAG_ID} parsed", parsed, timeout=300)
    started = time.monotonic()
    run_id = api.request("POST", f"dags/{DAG_ID}/dagRuns", {"logical_date": None, "conf": CONF})["dag_run_id"]
    log(f"triggered {DAG_ID} run {run_id} through the REST API: {json.dumps(CONF)}")
    quoted = urllib.parse.quote(run_id, safe="")
    api.request("PATCH", f"dags/{DAG_ID}", {"is_paused": False})
    # Unpausing makes the scheduler start the latest weekly interval (a full-size run with the
    # defaults): not part of this check, stopped as soon as it appears.
    stop_scheduled_runs(api, timeout=30)

    def finished():
        state = api.request("GET", f"dags/{DAG_ID}/dagRuns/{quoted}")["state"]
        return state if state in ("success", "failed") else None

    state = wait_for(f"run {run_id}", finished, timeout=1500, interval=10)
    instances = task_instances(api, run_id)
    states = {ti["task_id"]: ti["state"] for ti in instances}
    if state != "success" or states != EXPECTED_STATES:
        for ti in instances:
            if ti["state"] not in ("success", "skipped"):
                print(f"----- task {ti['task_id']} ({ti['state']}), log -----\n{task_logs(api, run_id, ti)}", file=sys.stderr)
        raise CheckFailed(f"run {run_id} ended {state}: {states}")
    log(f"run {run_id} succeeded in {time.monotonic() - started:.0f}s: {states}")
    queues = {ti["queue"] for ti in instances}
    check(queues == {"default"}, f"a cpu run's tasks should use the default queue, got {queues}")
    check(next(ti for ti in instances if ti["task_id"] == "train")["pool"] == "training", "train not in the training pool")

    shard, train = xcom(api, run_id, "shard"), xcom(api, run_id, "train")
    check((train["world_size"], train["epochs"]) == (2, CONF["epochs"]), f"train result {train}")
    bucket_root = f"s3://{env['TRAINFLOW_BUCKET']}/trainflow/"
    check(shard["manifest_uri"].startswith(bucket_root + "datasets/"), f"manifest at {shard['manifest_uri']}")
    check(train["checkpoint_uri"].startswith(bucket_root + f"runs/{DAG_ID}/"), f"checkpoint at {train['checkpoint_uri']}")

    # The registered version, its aliases and lineage, through MLflow's REST API.
    versions = mlflow.request("GET", "model-versions/search", params={"filter": f"name='{MODEL_NAME}'"})["model_versions"]
    check([v["version"] for v in versions] == ["1"], f"versions of {MODEL_NAME}: {versions}")
    version = mlflow.request("GET", "model-versions/get", params={"name": MODEL_NAME, "version": "1"})["model_version"]
    tags = {tag["key"]: tag["value"] for tag in version.get("tags", [])}
    check(tags.get("trainflow.run_id") == run_id and tags.get("trainflow.dag_id") == DAG_ID, f"lineage tags {tags}")
    check(tags.get("trainflow.manifest_uri") == shard["manifest_uri"], "manifest_uri tag")
    check(version["status"] == "READY", f"version status {version['status']}")
    metrics = {m["key"]: m["value"] for m in mlflow.request("GET", "runs/get", params={"run_id": version["run_id"]})["run"]["data"]["metrics"]}
    promoted = metrics["ndcg_at_10"] > metrics["baseline_ndcg_at_10"]
    expected = {"challenger", "champion"} if promoted else {"challenger"}
    check(tags.get("trainflow.decision.outcome") == ("promoted" if promoted else "rejected"), f"decision {tags}")
    check(set(version.get("aliases", [])) == expected, f"aliases {version.get('aliases')} != {sorted(expected)}")
    for alias in expected:
        by_alias = mlflow.request("GET", "registered-models/alias", params={"name": MODEL_NAME, "alias": alias})
        check(by_alias["model_version"]["version"] == "1", f"alias {alias}")
    log(f"MLflow: {MODEL_NAME} version 1 READY, aliases {sorted(expected)}, ndcg_at_10 {metrics['ndcg_at_10']:.4f} "
        f"vs baseline {metrics['baseline_ndcg_at_10']:.4f}, lineage tags point at run {run_id}")

    # GPU routing: the same DAG with device=cuda; its task instances are created on the GPU queue.
    gpu_queue = env.get("TRAINFLOW_GPU_QUEUE") or "gpu"
    gpu_run = api.request("POST", f"dags/{DAG_ID}/dagRuns",
                          {"logical_date": None, "conf": {**CONF, "device": "cuda", "registered_model_name": MODEL_NAME + "-gpu"}})
    gpu_run_id = gpu_run["dag_run_id"]
    gpu_instances = wait_for("the cuda run's task instances", lambda: task_instances(api, gpu_run_id), timeout=120, interval=2)
    gpu_queues = {ti["task_id"]: ti["queue"] for ti in gpu_instances}
    api.request("PATCH", f"dags/{DAG_ID}/dagRuns/{urllib.parse.quote(gpu_run_id, safe='')}", {"state": "failed"})
    check(set(gpu_queues.values()) == {gpu_queue}, f"device=cuda run not routed to queue {gpu_queue}: {gpu_queues}")
    log(f"routing: the device=cuda run's {len(gpu_queues)} tasks (train included) are on queue '{gpu_queue}' "
        "(only GPU workers listen there; none runs here, so the run was then marked failed)")

    out.write_text(json.dumps({
        "run_id": run_id, "manifest_uri": shard["manifest_uri"], "checkpoint_uri": train["checkpoint_uri"],
        "model": MODEL_NAME, "version": "1", "aliases": sorted(expected), "gpu_run_id": gpu_run_id,
    }))


def take_screenshots(env: dict[str, str], found: dict[str, Any], folder: Path) -> None:
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from tests.integration import browser

    folder.mkdir(parents=True, exist_ok=True)
    airflow = f"http://localhost:{env['AIRFLOW_PORT']}"
    mlflow = f"http://localhost:{env['MLFLOW_PORT']}"
    driver = browser.start_chromium()
    try:
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        # The compose stack's auth manager is FAB: its login form, submitted with Enter.
        driver.get(f"{airflow}/auth/login/")
        browser.wait_visible(driver, By.CSS_SELECTOR, "input[name='username']").send_keys(env["AIRFLOW_ADMIN_USERNAME"])
        password = driver.find_element(By.CSS_SELECTOR, "input[name='password']")
        password.send_keys(env["AIRFLOW_ADMIN_PASSWORD"])
        password.send_keys(Keys.RETURN)
        browser.wait(driver).until(lambda d: "/auth/login" not in d.current_url, "still on the login page")
        run = urllib.parse.quote(found["run_id"], safe=":")
        driver.get(f"{airflow}/dags/{DAG_ID}/runs/{run}")
        time.sleep(8)
        driver.save_screenshot(str(folder / "compose-airflow-run.png"))
        driver.get(f"{mlflow}/#/models/{found['model']}/versions/{found['version']}")
        time.sleep(8)
        driver.save_screenshot(str(folder / "compose-mlflow-model-version.png"))
    finally:
        driver.quit()
    log(f"screenshots in {folder}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("command", choices=("pipeline", "screenshots"))
    parser.add_argument("--env-file", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--screenshots", type=Path)
    args = parser.parse_args()
    env = read_env_file(args.env_file)
    try:
        if args.command == "pipeline":
            run_pipeline(env, args.out)
        else:
            take_screenshots(env, json.loads(args.out.read_text()), args.screenshots)
    except CheckFailed as error:
        print(f"[compose-check] FAILED: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
