"""The kubernetes launcher: rendered manifests (golden files + schema checks) and submit / watch /
stream / cancel through the real ``kubernetes`` client against a FAKE API server on 127.0.0.1
(tests/tasks/kube_fake.py). No cluster runs in these tests.

Regenerate the golden files after an intended change with
``TRAINFLOW_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/tasks/test_kubernetes.py`` and review the diff.
"""

from __future__ import annotations

import _thread
import json
import os
import threading
import time
from pathlib import Path

import jsonschema
import pytest

from tests.tasks.kube_fake import LOG_LINES, FakeKubernetes
from trainflow.tasks.kubernetes import (
    KubernetesJobFailed,
    KubernetesJobRunner,
    KubernetesJobSpec,
    job_spec_from_params,
    job_state,
    render_job,
    render_manifests,
    run_kubernetes_training,
)
from trainflow.tasks.params import validate_params
from trainflow.tasks.settings import Settings

HERE = Path(__file__).parent / "kubernetes"
SCHEMAS = json.loads((HERE / "kubeflow_job_schemas.json").read_text())
ARGS = ["--train.manifest_uri=s3://bucket/trainflow/datasets/ml/abc/_manifest.json",
        "--train.run_dir=s3://bucket/trainflow/runs/recommendation_training/manual__1",
        "--train.epochs=2", "--train.mlflow_tracking_uri=http://user:pw@mlflow:5000", "--family.model=\"gmf\""]
RUN_ID = "manual__2026-12-01T12:00:00+00:00"


def _settings() -> Settings:
    return Settings.from_env({
        "TRAINFLOW_DATA_DIR": "/tmp/unused",
        "TRAINFLOW_STORAGE_ROOT": "s3://bucket/trainflow",
        "MLFLOW_TRACKING_URI": "http://user:pw@mlflow:5000",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "very-secret",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL_S3": "http://minio:9000",
    })


def _spec(job_kind: str, **params) -> KubernetesJobSpec:
    values = validate_params({"launcher": "kubernetes", "kubernetes_image": "registry.example/trainflow-trainer:1.0",
                              "kubernetes_job_kind": job_kind, "nnodes": 2, "nproc_per_node": 4, "device": "cuda",
                              "kubernetes_cpu_per_node": "16", "kubernetes_memory_per_node": "64Gi",
                              "kubernetes_namespace": "ml", **params}, "recommendation", cpu_count=2)
    return job_spec_from_params(kind="recommendation", values=values, args=ARGS, dag_id="recommendation_training",
                                run_id=RUN_ID, try_number=1, settings=_settings())


# --- schema checks ---------------------------------------------------------------------------
def _check_model(value, type_name: str, path: str) -> list[str]:
    """Strict check of ``value`` against a kubernetes client model: unknown fields, wrong types,
    missing required fields (the client's own validation) are errors."""
    from kubernetes import client

    if type_name.startswith("list["):
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [e for i, item in enumerate(value) for e in _check_model(item, type_name[5:-1], f"{path}[{i}]")]
    if type_name.startswith("dict["):
        if not isinstance(value, dict):
            return [f"{path}: expected an object"]
        inner = type_name[5:-1].split(", ", 1)[1]
        return [e for k, item in value.items() for e in _check_model(item, inner, f"{path}.{k}")]
    simple = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object, "datetime": str}
    if type_name in simple:
        ok = isinstance(value, simple[type_name]) and not (type_name == "int" and isinstance(value, bool))
        return [] if ok else [f"{path}: expected {type_name}, got {value!r}"]
    cls = getattr(client.models, type_name)
    if not isinstance(value, dict):
        return [f"{path}: expected a {type_name} object"]
    by_json = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    errors = [f"{path}.{key}: not a field of {type_name}" for key in value if key not in by_json]
    for key, item in value.items():
        if key in by_json:
            errors += _check_model(item, cls.openapi_types[by_json[key]], f"{path}.{key}")
    if not errors:
        class Response:
            data = json.dumps(value)
        try:
            client.ApiClient().deserialize(Response(), type_name)
        except ValueError as exc:
            errors.append(f"{path}: {exc}")
    return errors


def _k8s_model(validator, model, instance, schema):
    for error in _check_model(instance, model, "$"):
        yield jsonschema.ValidationError(error)


Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"x-k8s-model": _k8s_model})


def schema_errors(manifest: dict) -> list[str]:
    return [e.message for e in Validator(SCHEMAS[manifest["kind"]]).iter_errors(manifest)]


@pytest.mark.parametrize("job_kind", ["trainjob", "pytorchjob"])
def test_manifests_match_the_golden_files_and_the_schemas(job_kind):
    manifests = render_manifests(_spec(job_kind), redact=True)
    for manifest in manifests:
        assert schema_errors(manifest) == [], manifest["kind"]
    golden = HERE / f"golden_{job_kind}.json"
    text = json.dumps(manifests, indent=2, sort_keys=True) + "\n"
    if os.environ.get("TRAINFLOW_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text(), f"{golden.name} differs: rerun with TRAINFLOW_UPDATE_GOLDEN=1 if intended"


def test_schema_check_catches_what_a_cluster_would_reject():
    job = render_job(_spec("trainjob"))
    job["spec"]["trainer"]["numProcsPerNode"] = 4  # misspelt
    job["spec"]["trainer"]["env"].append({"name": "X", "valueFrom": {"secretKeyRef": {"name": "s"}}})  # no key
    errors = schema_errors(job)
    assert any("numProcsPerNode" in e for e in errors), errors
    assert any("key" in e for e in errors), errors
    pytorch = render_job(_spec("pytorchjob"))
    pytorch["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
    pytorch["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["resource"] = {}
    errors = schema_errors(pytorch)
    assert any("1 was expected" in e for e in errors), errors
    assert any("resource: not a field of V1Container" in e for e in errors), errors


def test_what_the_job_carries():
    spec = _spec("pytorchjob")
    job, secret = render_job(spec), render_manifests(spec)[0]
    text = json.dumps(job)
    # Credentials only in the Secret, referenced by key; the tracking URI left the command line.
    assert "very-secret" not in text and "AKIAEXAMPLE" not in text and "user:pw" not in text
    assert secret["stringData"]["AWS_SECRET_ACCESS_KEY"] == "very-secret"
    assert secret["stringData"]["MLFLOW_TRACKING_URI"] == "http://user:pw@mlflow:5000"
    master = job["spec"]["pytorchReplicaSpecs"]["Master"]
    worker = job["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert master["replicas"] == 1 and worker["replicas"] == 1 and job["spec"]["nprocPerNode"] == "4"
    container = master["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["image"] == "registry.example/trainflow-trainer:1.0"
    assert container["resources"]["limits"] == {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "4"}
    assert container["command"][-2:] == ["-m", "trainflow.trainers.train"]
    env = {e["name"]: e for e in container["env"]}
    assert env["TRAINFLOW_STORAGE_ROOT"]["value"] == "s3://bucket/trainflow"
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "http://minio:9000" and env["OMP_NUM_THREADS"]["value"] == "4"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": spec.secret_name, "key": "AWS_ACCESS_KEY_ID"}
    one_node = render_job(_spec("pytorchjob", nnodes=1))
    assert "Worker" not in one_node["spec"]["pytorchReplicaSpecs"]
    trainjob = render_job(_spec("trainjob", device="cpu", nproc_per_node=2))
    assert "nvidia.com/gpu" not in trainjob["spec"]["trainer"]["resourcesPerNode"]["limits"]
    assert trainjob["spec"]["trainer"]["numNodes"] == 2 and trainjob["spec"]["trainer"]["numProcPerNode"] == 2


def test_local_store_or_mlflow_cannot_reach_the_pods():
    values = validate_params({"launcher": "kubernetes", "kubernetes_image": "img:1"}, "recommendation", cpu_count=2)
    local = Settings.from_env({"TRAINFLOW_DATA_DIR": "/tmp/x", "MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    with pytest.raises(ValueError, match="TRAINFLOW_STORAGE_ROOT=.*local folder"):
        job_spec_from_params(kind="recommendation", values=values, args=[], dag_id="d", run_id="r", try_number=1,
                             settings=local)
    sqlite = Settings.from_env({"TRAINFLOW_DATA_DIR": "/tmp/x", "TRAINFLOW_STORAGE_ROOT": "s3://b/p"})
    with pytest.raises(ValueError, match="MLflow tracking server"):
        job_spec_from_params(kind="recommendation", values=values, args=[], dag_id="d", run_id="r", try_number=1,
                             settings=sqlite)


def test_bad_spec_names_the_field():
    with pytest.raises(ValueError, match="name"):
        KubernetesJobSpec(name="Bad_Name", namespace="ml", job_kind="trainjob", image="i", module="m", args=(),
                          nnodes=1, nproc_per_node=1)
    with pytest.raises(ValueError, match="job_kind"):
        KubernetesJobSpec(name="ok", namespace="ml", job_kind="mpijob", image="i", module="m", args=(),
                          nnodes=1, nproc_per_node=1)


def test_job_state_reads_both_kinds_of_conditions():
    assert job_state({}, "trainjob") == ("running", "")
    assert job_state({"status": {"conditions": [{"type": "Complete", "status": "True"}]}}, "trainjob")[0] == "succeeded"
    assert job_state({"status": {"conditions": [{"type": "Succeeded", "status": "True"}]}}, "pytorchjob")[0] == "succeeded"
    assert job_state({"status": {"conditions": [{"type": "Complete", "status": "False"}]}}, "trainjob")[0] == "running"
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "R", "message": "M"}]}}
    assert job_state(failed, "pytorchjob") == ("failed", "R: M")


# --- submit / watch / cancel against the fake API ---------------------------------------------
def _client(url: str):
    from kubernetes import client

    configuration = client.Configuration()
    configuration.host = url
    return client.ApiClient(configuration)


@pytest.mark.parametrize("job_kind", ["trainjob", "pytorchjob"])
def test_submit_watch_and_stream_until_the_job_succeeds(job_kind):
    spec = _spec(job_kind)
    lines: list[str] = []
    with FakeKubernetes("succeed", polls_before_end=3) as fake:
        job = KubernetesJobRunner(_client(fake.url), on_line=lines.append, poll_s=0.05).run(spec)
    plural = "trainjobs" if job_kind == "trainjob" else "pytorchjobs"
    group = "trainer.kubeflow.org/v1alpha1" if job_kind == "trainjob" else "kubeflow.org/v1"
    assert fake.paths("POST") == ["/api/v1/namespaces/ml/secrets", f"/apis/{group}/namespaces/ml/{plural}"]
    created = next(body for method, path, _, body in fake.requests if method == "POST" and plural in path)
    assert created == render_job(spec)
    assert job_state(job, job_kind)[0] == "succeeded"
    assert lines == LOG_LINES  # node 0's log, streamed while it ran
    selector = next(q["labelSelector"][0] for m, p, q, _ in fake.requests if p.endswith("/pods"))
    assert spec.name in selector
    # The Secret is removed once the job is done; the job stays for inspection (TTL of the operator).
    assert fake.paths("DELETE") == [f"/api/v1/namespaces/ml/secrets/{spec.secret_name}"]


def test_failed_job_raises_with_the_controller_reason():
    spec = _spec("trainjob")
    with FakeKubernetes("fail", polls_before_end=1) as fake:
        with pytest.raises(KubernetesJobFailed, match=r"TrainJob ml/tf-recom-\w+-t1 failed: BackoffLimitExceeded: "
                                                      r"node 1 exited with code 1: ValueError: bad shard"):
            KubernetesJobRunner(_client(fake.url), on_line=lambda line: None, poll_s=0.05).run(spec)
    assert fake.paths("DELETE") == [f"/api/v1/namespaces/ml/secrets/{spec.secret_name}"]


def test_cancel_deletes_the_job_and_its_secret():
    """An interrupted task (Airflow's SIGTERM arrives as an exception in the task) deletes the job."""
    import signal

    # interrupt_main() does nothing if an earlier test in this process (Airflow code run in
    # process) left SIGINT ignored or handled elsewhere: make it raise KeyboardInterrupt here.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    spec = _spec("pytorchjob")
    with FakeKubernetes("hang") as fake:
        def interrupt():
            fake.job_created.wait(30)
            threading.Event().wait(0.3)
            _thread.interrupt_main()

        threading.Thread(target=interrupt, daemon=True).start()
        try:
            with pytest.raises(KeyboardInterrupt):  # (a timeout instead of a hang if it never comes)
                KubernetesJobRunner(_client(fake.url), on_line=lambda line: None, poll_s=0.05, timeout_s=60).run(spec)
        finally:
            signal.signal(signal.SIGINT, previous)
        deletes = [(p, query, body) for m, p, query, body in fake.requests if m == "DELETE"]
        assert fake.objects == {}
    query, body = next((q, b) for p, q, b in deletes if p.endswith(f"/pytorchjobs/{spec.name}"))
    assert "Foreground" in (query.get("propagationPolicy", []) + [(body or {}).get("propagationPolicy")])
    assert any(p.endswith(f"/secrets/{spec.secret_name}") for p, _, _ in deletes)


def test_missing_crd_is_explained():
    spec = _spec("trainjob")
    with FakeKubernetes("no_crd") as fake:
        runner = KubernetesJobRunner(_client(fake.url), poll_s=0.05)
        with pytest.raises(RuntimeError, match=r"creating TrainJob ml/tf-recom-\w+-t1 failed with HTTP 404: the server "
                                               r"could not find the requested resource \(is the TrainJob CRD installed\? "
                                               r"kubernetes_job_kind=trainjob\)"):
            runner.run(spec)
    assert fake.objects == {}  # the Secret created first was removed again


def test_run_through_the_provider_hook_and_a_connection(monkeypatch, tmp_path):
    """The DAG side's client: the cncf.kubernetes KubernetesHook from an Airflow connection
    (a kube config pointing at the fake API), then the launcher's whole run."""
    from trainflow.airflow.dag_support import kubernetes_client

    with FakeKubernetes("succeed", polls_before_end=1) as fake:
        kube_config = tmp_path / "kubeconfig"
        kube_config.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "u", "namespace": "ml"}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
        }))
        monkeypatch.setenv("AIRFLOW_CONN_TRAINFLOW_K8S_TEST", json.dumps(
            {"conn_type": "kubernetes", "extra": {"kube_config_path": str(kube_config)}}))
        monkeypatch.setenv("TRAINFLOW_KUBERNETES_CONN_ID", "trainflow_k8s_test")
        values = validate_params({"launcher": "kubernetes", "kubernetes_image": "img:1", "kubernetes_namespace": "ml"},
                                 "driving", cpu_count=2)
        lines: list[str] = []

        class Capture:
            def info(self, fmt, *args):
                lines.append(fmt % args)

        job = run_kubernetes_training(kubernetes_client(), kind="driving", values=values, args=ARGS,
                                      dag_id="driving_training", run_id=RUN_ID, try_number=2, settings=_settings(),
                                      logger=Capture(), poll_s=0.05)
    assert job["metadata"]["name"].endswith("-t2") and job["kind"] == "TrainJob"
    assert any(line.startswith("kubernetes job manifest:") for line in lines)
    assert f"[node 0] {LOG_LINES[1]}" in lines
    # Requests carried the connection's bearer token: the hook's client, not a default one.
    assert fake.paths("POST")


# --- jobs that never start -------------------------------------------------------------------------
def _run_never_starting(scenario: str, caplog, **runner):
    spec = _spec("trainjob")
    caplog.set_level("INFO", logger="trainflow.tasks.kubernetes")
    with FakeKubernetes(scenario) as fake:
        started = time.monotonic()
        with pytest.raises(KubernetesJobFailed) as caught:
            # timeout_s: without the start checks the test fails in 30 s instead of hanging
            KubernetesJobRunner(_client(fake.url), on_line=lambda line: None, poll_s=0.05, timeout_s=30, **runner).run(spec)
        elapsed = time.monotonic() - started
        assert fake.objects == {}  # the job (and its Secret) deleted: it cannot start later, unattended
    return spec, caught.value, elapsed


def test_image_pull_error_fails_at_once_naming_the_image(caplog):
    from trainflow.tasks.kubernetes import KubernetesImagePullError

    spec, error, elapsed = _run_never_starting("image_pull", caplog)  # default start timeout: 900 s
    assert isinstance(error, KubernetesImagePullError) and isinstance(error, ValueError)  # bad input: not retried
    assert elapsed < 10
    assert (f"TrainJob ml/{spec.name} cannot start: pod {spec.name}-node-0-0 cannot pull its image "
            "registry.example/trainflow-trainer:1.0: ImagePullBackOff") in str(error)
    assert "kubernetes_image" in str(error)
    # The pod's events were read while waiting and logged.
    assert "Failed: Failed to pull image: rpc error: code = NotFound desc = manifest unknown" in caplog.text


def test_unschedulable_pod_fails_at_once_with_the_schedulers_reason(caplog):
    from trainflow.tasks.kubernetes import KubernetesImagePullError, KubernetesJobNotStarted

    spec, error, elapsed = _run_never_starting("unschedulable", caplog)
    assert isinstance(error, KubernetesJobNotStarted) and not isinstance(error, KubernetesImagePullError)
    assert elapsed < 10
    assert f"pod {spec.name}-node-0-0 is unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu" in str(error)
    assert "FailedScheduling" in caplog.text


@pytest.mark.parametrize("scenario,detail", [
    ("scale_up", "1 of 2 pod(s): tf-recom-"),
    ("no_pods", "no pod was created (is the training operator running? quota?); last warning: JobSet "),
])
def test_a_job_that_does_not_start_in_time_fails_naming_its_state(scenario, detail, caplog):
    from trainflow.tasks.kubernetes import KubernetesJobNotStarted

    spec, error, elapsed = _run_never_starting(scenario, caplog, start_timeout_s=1.0)
    assert isinstance(error, KubernetesJobNotStarted)
    assert 1.0 <= elapsed < 10
    assert f"TrainJob ml/{spec.name} did not start within 1 s (kubernetes_start_timeout_s): " in str(error)
    assert detail in str(error)
    if scenario == "no_pods":
        assert "exceeded quota: gpu-quota" in str(error)
    else:
        assert "TriggeredScaleUp" in caplog.text  # the autoscaler's word kept it waiting, up to the start timeout


def test_start_timeout_comes_from_the_params_with_a_default(monkeypatch):
    import trainflow.tasks.kubernetes as kubernetes

    seen = {}

    class Runner(KubernetesJobRunner):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)

        def run(self, spec):
            return {}

    monkeypatch.setattr(kubernetes, "KubernetesJobRunner", Runner)
    values = validate_params({"launcher": "kubernetes", "kubernetes_image": "img:1", "kubernetes_namespace": "ml"},
                             "driving", cpu_count=2)
    common = dict(kind="driving", args=ARGS, dag_id="d", run_id=RUN_ID, try_number=1, settings=_settings())
    run_kubernetes_training(None, values=values, **common)
    assert seen["start_timeout_s"] == kubernetes.DEFAULT_START_TIMEOUT_S == 900
    run_kubernetes_training(None, values={**values, "kubernetes_start_timeout_s": 120}, **common)
    assert seen["start_timeout_s"] == 120
