"""The ``kubernetes`` launcher: the same training as a Kubeflow job on a cluster.

Two job kinds, chosen by the DAG param ``kubernetes_job_kind``:

* ``trainjob``: Kubeflow Trainer v2 ``TrainJob`` (``trainer.kubeflow.org/v1alpha1``) on the
  ``torch-distributed`` ClusterTrainingRuntime. The runtime starts ``numNodes`` pods and sets
  torchrun's ``PET_NNODES``, ``PET_NPROC_PER_NODE``, ``PET_NODE_RANK``, ``PET_MASTER_ADDR``,
  ``PET_MASTER_PORT`` in each.
* ``pytorchjob``: the Training Operator's ``PyTorchJob`` (``kubeflow.org/v1``) for clusters on
  the older operator: one ``Master`` and ``nnodes - 1`` ``Worker`` replicas, ``nprocPerNode``
  set so the operator sets the same ``PET_*`` variables.

Every pod runs ``python -m torch.distributed.run --max-restarts N -m trainflow.trainers.train ARGS``
(torchrun reads the rest from ``PET_*``) with the image, CPU/memory/``nvidia.com/gpu``
requests, and the settings of the object store and MLflow in its environment. Credentials
(the AWS keys, the MLflow URI, which may carry a password) go into a Secret created next to the
job and referenced with ``secretKeyRef``; they never appear in the job's manifest or in a log.

:func:`render_manifests` is pure (tested with golden files and schema checks);
:class:`KubernetesJobRunner` creates, watches, streams node 0's log and deletes on cancel
through an injected ``kubernetes.client.ApiClient`` (the DAG side builds it with the
cncf.kubernetes provider's ``KubernetesHook``). This module never imports Airflow.

A job that never starts does not wait for the task's execution timeout: until every pod runs,
the runner reads the pods' status and events at each poll (new warning events are logged). A
pod whose image cannot be pulled, or that no node can take (``Unschedulable``, unless the
cluster autoscaler says it is adding a node), fails the task at once with the reason, and so
does any job whose pods are not all running after ``kubernetes_start_timeout_s`` (default
:data:`DEFAULT_START_TIMEOUT_S`); the job is then deleted, so it cannot start later unattended.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# The one trainer entry every pipeline runs through (trainflow.tasks.pipeline uses the same).
TRAINER_MODULE = "trainflow.trainers.train"
TRAINJOB = {"group": "trainer.kubeflow.org", "version": "v1alpha1", "plural": "trainjobs", "kind": "TrainJob"}
PYTORCHJOB = {"group": "kubeflow.org", "version": "v1", "plural": "pytorchjobs", "kind": "PyTorchJob"}
JOB_KINDS = {"trainjob": TRAINJOB, "pytorchjob": PYTORCHJOB}
DEFAULT_RUNTIME = "torch-distributed"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_URI",
              "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


DEFAULT_START_TIMEOUT_S = 900.0
"""Seconds a job's pods may take to all be running (image pulls of CUDA images, a scale-up)."""
IMAGE_ERRORS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
CONTAINER_CONFIG_ERRORS = ("CreateContainerConfigError", "CreateContainerError")


class KubernetesJobFailed(RuntimeError):
    """The job ended in a failed state; the message carries the controller's reason."""


class KubernetesJobNotStarted(KubernetesJobFailed):
    """The job's pods did not start: unschedulable, a container that cannot be created, or
    not all running within the start timeout. The message names the pod and the reason."""


class KubernetesImagePullError(KubernetesJobNotStarted, ValueError):
    """A pod's image cannot be pulled: the ``kubernetes_image`` param (or the registry's
    credentials) is wrong, which no retry fixes: bad input."""


@dataclasses.dataclass(frozen=True)
class KubernetesJobSpec:
    """One training job on a cluster.

    Attributes:
        name: Job name (DNS-1035 label, at most 50 characters so derived pod names fit).
        namespace: Namespace of the job and its Secret.
        job_kind: ``trainjob`` or ``pytorchjob``.
        image: Container image with trainflow installed.
        module: Trainer module each rank runs (``trainflow.trainers.train``).
        args: The trainer's arguments.
        nnodes: Pods (torchrun nodes).
        nproc_per_node: Processes per pod.
        gpus_per_node: ``nvidia.com/gpu`` per pod (requests = limits).
        cpu_per_node: CPU quantity per pod, or ``None``.
        memory_per_node: Memory quantity per pod, or ``None``.
        env: Plain environment of the trainer container.
        secret_env: Environment that goes through the job's Secret (values never rendered).
        max_restarts: torchrun ``--max-restarts`` inside the pods.
        labels: Extra labels (DAG id, run id hash) on the job and its Secret.
        runtime: TrainJob: the ClusterTrainingRuntime to use.
        service_account: Pods' service account, or ``None`` for the namespace default.
    """

    name: str
    namespace: str
    job_kind: str
    image: str
    module: str
    args: tuple[str, ...]
    nnodes: int
    nproc_per_node: int
    gpus_per_node: int = 0
    cpu_per_node: str | None = None
    memory_per_node: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    secret_env: tuple[tuple[str, str], ...] = ()
    max_restarts: int = 0
    labels: tuple[tuple[str, str], ...] = ()
    runtime: str = DEFAULT_RUNTIME
    service_account: str | None = None

    def __post_init__(self) -> None:
        if not _NAME.match(self.name) or len(self.name) > 50:
            raise ValueError(f"name must be a DNS-1035 label of at most 50 characters, got {self.name!r}")
        if not _NAME.match(self.namespace) or len(self.namespace) > 63:
            raise ValueError(f"namespace must be a DNS-1123 label, got {self.namespace!r}")
        if self.job_kind not in JOB_KINDS:
            raise ValueError(f"job_kind must be one of {sorted(JOB_KINDS)}, got {self.job_kind!r}")
        if not self.image or any(c.isspace() for c in self.image):
            raise ValueError(f"image must be a non-empty image reference, got {self.image!r}")
        if self.nnodes < 1 or self.nproc_per_node < 1 or self.gpus_per_node < 0 or self.max_restarts < 0:
            raise ValueError("nnodes and nproc_per_node must be at least 1, gpus_per_node and max_restarts not negative")

    @property
    def secret_name(self) -> str:
        return f"{self.name}-env"

    @property
    def resource(self) -> dict[str, str]:
        return JOB_KINDS[self.job_kind]


def job_name(kind: str, dag_id: str, run_id: str, try_number: int) -> str:
    """``tf-<kind>-<hash of dag/run>-t<try>``: unique per DAG run and try, a valid DNS label."""
    digest = hashlib.sha256(f"{dag_id}/{run_id}".encode()).hexdigest()[:10]
    return f"tf-{kind[:5]}-{digest}-t{try_number}"


def run_labels(dag_id: str, run_id: str) -> dict[str, str]:
    """Labels that find every job of one DAG run (label values cannot hold a run id as is)."""
    return {
        MANAGED_BY_LABEL: "trainflow",
        "trainflow.io/dag-id": re.sub(r"[^A-Za-z0-9_.-]", "-", dag_id)[:63].strip("-_.") or "dag",
        "trainflow.io/run": hashlib.sha256(f"{dag_id}/{run_id}".encode()).hexdigest()[:16],
    }


def _env_list(spec: KubernetesJobSpec) -> list[dict[str, Any]]:
    env = [{"name": k, "value": v} for k, v in spec.env]
    env += [
        {"name": k, "valueFrom": {"secretKeyRef": {"name": spec.secret_name, "key": k}}} for k, _ in spec.secret_env
    ]
    return env


def _resources(spec: KubernetesJobSpec) -> dict[str, dict[str, str]]:
    amounts: dict[str, str] = {}
    if spec.cpu_per_node:
        amounts["cpu"] = spec.cpu_per_node
    if spec.memory_per_node:
        amounts["memory"] = spec.memory_per_node
    if spec.gpus_per_node:
        amounts["nvidia.com/gpu"] = str(spec.gpus_per_node)
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _command(spec: KubernetesJobSpec) -> list[str]:
    # nnodes, nproc-per-node, node rank and the master address come from the PET_* variables.
    return ["python", "-m", "torch.distributed.run", "--max-restarts", str(spec.max_restarts), "-m", spec.module]


def render_secret(spec: KubernetesJobSpec, *, redact: bool = False) -> dict[str, Any]:
    """The Secret with the credentials of the job (``redact``: values replaced, for display)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": spec.secret_name, "namespace": spec.namespace, "labels": dict(spec.labels)},
        "type": "Opaque",
        "stringData": {k: ("<redacted>" if redact else v) for k, v in spec.secret_env},
    }


def render_job(spec: KubernetesJobSpec) -> dict[str, Any]:
    """The TrainJob or PyTorchJob manifest of ``spec`` (no secret values in it)."""
    metadata = {"name": spec.name, "namespace": spec.namespace, "labels": dict(spec.labels)}
    if spec.job_kind == "trainjob":
        trainer: dict[str, Any] = {
            "image": spec.image,
            "command": _command(spec),
            "args": list(spec.args),
            "env": _env_list(spec),
            "numNodes": spec.nnodes,
            "numProcPerNode": spec.nproc_per_node,
        }
        resources = _resources(spec)
        if resources:
            trainer["resourcesPerNode"] = resources
        return {
            "apiVersion": f"{TRAINJOB['group']}/{TRAINJOB['version']}",
            "kind": TRAINJOB["kind"],
            "metadata": metadata,
            "spec": {
                "runtimeRef": {"name": spec.runtime, "apiGroup": TRAINJOB["group"], "kind": "ClusterTrainingRuntime"},
                "trainer": trainer,
            },
        }
    container: dict[str, Any] = {
        "name": "pytorch",  # the operator finds the training container by this name
        "image": spec.image,
        "command": _command(spec),
        "args": list(spec.args),
        "env": _env_list(spec),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    resources = _resources(spec)
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "containers": [container],
        # DataLoader workers and NCCL use shared memory; the container default (64 MiB) is too small.
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if spec.service_account:
        pod_spec["serviceAccountName"] = spec.service_account
    template = {"metadata": {"labels": dict(spec.labels)}, "spec": pod_spec}
    replicas: dict[str, Any] = {"Master": {"replicas": 1, "restartPolicy": "Never", "template": template}}
    if spec.nnodes > 1:
        replicas["Worker"] = {"replicas": spec.nnodes - 1, "restartPolicy": "Never", "template": template}
    return {
        "apiVersion": f"{PYTORCHJOB['group']}/{PYTORCHJOB['version']}",
        "kind": PYTORCHJOB["kind"],
        "metadata": metadata,
        "spec": {
            "nprocPerNode": str(spec.nproc_per_node),
            # Airflow's retry (resuming from the last checkpoint) is the restart beyond torchrun's.
            "runPolicy": {"backoffLimit": 0, "cleanPodPolicy": "None"},
            "pytorchReplicaSpecs": replicas,
        },
    }


def render_manifests(spec: KubernetesJobSpec, *, redact: bool = False) -> list[dict[str, Any]]:
    """Secret (credentials) then the job: what ``kubectl apply`` would get, in order."""
    return [render_secret(spec, redact=redact), render_job(spec)]


def node0_pod_selector(spec: KubernetesJobSpec) -> str:
    """Label selector of node 0's pod (global rank 0 runs there: the progress lines)."""
    if spec.job_kind == "trainjob":
        # TrainJob pods belong to a JobSet named after the TrainJob; node 0 is completion index 0.
        return f"jobset.sigs.k8s.io/jobset-name={spec.name},batch.kubernetes.io/job-completion-index=0"
    return f"training.kubeflow.org/job-name={spec.name},training.kubeflow.org/replica-type=master"


def job_pods_selector(spec: KubernetesJobSpec) -> str:
    """Label selector of every pod of the job."""
    if spec.job_kind == "trainjob":
        return f"jobset.sigs.k8s.io/jobset-name={spec.name}"
    return f"training.kubeflow.org/job-name={spec.name}"


def job_state(job: dict[str, Any], job_kind: str) -> tuple[str, str]:
    """``("running" | "succeeded" | "failed" | "suspended", reason)`` from the job's conditions."""
    conditions = (job.get("status") or {}).get("conditions") or []
    true = [c for c in conditions if str(c.get("status")) == "True"]
    by_type = {c.get("type"): c for c in true}
    done, failed = ("Complete", "Failed") if job_kind == "trainjob" else ("Succeeded", "Failed")
    if failed in by_type:
        c = by_type[failed]
        return "failed", f"{c.get('reason', '')}: {c.get('message', '')}".strip(": ")
    if done in by_type:
        return "succeeded", by_type[done].get("message", "")
    if "Suspended" in by_type:
        return "suspended", by_type["Suspended"].get("message", "")
    return "running", ""


class KubernetesJobRunner:
    """Create the job, wait for it while streaming node 0's log, delete it if interrupted.

    Args:
        api_client: A ``kubernetes.client.ApiClient`` (from ``KubernetesHook().get_conn()``).
        on_line: Called with each log line of node 0's trainer container.
        poll_s: Seconds between status reads.
        timeout_s: Give up (and delete the job) after this long; ``None``: wait for ever.
        start_timeout_s: Give up (and delete the job) if its pods are not all running after
            this long; ``None``: no limit (an image-pull error or an unschedulable pod still
            fails at once).
    """

    def __init__(self, api_client: Any, on_line: Callable[[str], None] | None = None, poll_s: float = 5.0,
                 timeout_s: float | None = None, start_timeout_s: float | None = DEFAULT_START_TIMEOUT_S) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.on_line = on_line or (lambda line: log.info("%s", line))
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s

    def submit(self, spec: KubernetesJobSpec) -> dict[str, Any]:
        """Create the Secret and the job; a job of the same name left by a crashed try is replaced."""
        from kubernetes.client.exceptions import ApiException

        secret, job = render_manifests(spec)
        r = spec.resource
        try:
            self.core.create_namespaced_secret(spec.namespace, secret)
        except ApiException as exc:
            if exc.status != 409:
                raise _api_error("creating Secret", spec, exc) from exc
            self.core.replace_namespaced_secret(spec.secret_name, spec.namespace, secret)
        try:
            created = self.custom.create_namespaced_custom_object(r["group"], r["version"], spec.namespace, r["plural"], job)
        except ApiException as exc:
            if exc.status != 409:
                self._delete_secret(spec)
                raise _api_error(f"creating {r['kind']}", spec, exc) from exc
            log.warning("%s %s/%s exists already (an earlier attempt of this try): watching it", r["kind"],
                        spec.namespace, spec.name)
            created = self.custom.get_namespaced_custom_object(r["group"], r["version"], spec.namespace, r["plural"], spec.name)
        log.info("submitted %s %s/%s: %d node(s) x %d process(es), image %s", r["kind"], spec.namespace, spec.name,
                 spec.nnodes, spec.nproc_per_node, spec.image)
        return created

    def wait(self, spec: KubernetesJobSpec) -> dict[str, Any]:
        """Block until the job succeeds; stream node 0's log meanwhile.

        Raises:
            KubernetesJobFailed: the job failed (the controller's reason) or was deleted, or the timeout passed.
            KubernetesJobNotStarted: a pod cannot start (unschedulable, its container cannot be
                created), or not all pods run after ``start_timeout_s``.
            KubernetesImagePullError: a pod's image cannot be pulled.
        """
        from kubernetes.client.exceptions import ApiException

        r = spec.resource
        started = time.monotonic()
        streamer = _LogStreamer(self.core, spec, self.on_line)
        starting = _StartWatch(self.core, spec)
        try:
            while True:
                try:
                    job = self.custom.get_namespaced_custom_object(r["group"], r["version"], spec.namespace, r["plural"], spec.name)
                except ApiException as exc:
                    if exc.status == 404:
                        raise KubernetesJobFailed(f"{r['kind']} {spec.namespace}/{spec.name} was deleted while it ran") from exc
                    raise
                state, reason = job_state(job, spec.job_kind)
                if state == "succeeded":
                    streamer.finish()
                    log.info("%s %s/%s succeeded", r["kind"], spec.namespace, spec.name)
                    return job
                if state == "failed":
                    streamer.finish()
                    raise KubernetesJobFailed(f"{r['kind']} {spec.namespace}/{spec.name} failed: {reason or 'no reason given'}")
                if not starting.started:
                    starting.check()  # raises at once on a pod that cannot start
                    waited = time.monotonic() - started
                    if not starting.started and self.start_timeout_s is not None and waited > self.start_timeout_s:
                        raise KubernetesJobNotStarted(
                            f"{r['kind']} {spec.namespace}/{spec.name} did not start within {self.start_timeout_s:.0f} s "
                            f"(kubernetes_start_timeout_s): {starting.describe()}"
                        )
                streamer.poll()
                if self.timeout_s is not None and time.monotonic() - started > self.timeout_s:
                    raise KubernetesJobFailed(
                        f"{r['kind']} {spec.namespace}/{spec.name} did not finish within {self.timeout_s:.0f} s (state {state})"
                    )
                time.sleep(self.poll_s)
        finally:
            streamer.stop()

    def cancel(self, spec: KubernetesJobSpec) -> None:
        """Delete the job (its pods go with it) and its Secret; missing objects are fine."""
        from kubernetes.client.exceptions import ApiException

        r = spec.resource
        try:
            self.custom.delete_namespaced_custom_object(
                r["group"], r["version"], spec.namespace, r["plural"], spec.name, propagation_policy="Foreground"
            )
            log.warning("deleted %s %s/%s", r["kind"], spec.namespace, spec.name)
        except ApiException as exc:
            if exc.status != 404:
                log.error("could not delete %s %s/%s: %s", r["kind"], spec.namespace, spec.name, exc.reason)
        self._delete_secret(spec)

    def run(self, spec: KubernetesJobSpec) -> dict[str, Any]:
        """Submit, wait, and clean up: the Secret always, the job when interrupted or timed out."""
        self.submit(spec)
        try:
            job = self.wait(spec)
        except KubernetesJobFailed as exc:
            if "did not finish" in str(exc) or isinstance(exc, KubernetesJobNotStarted):
                self.cancel(spec)  # never let a job that could not start start later, unattended
            else:
                self._delete_secret(spec)  # a failed job stays for `kubectl describe`; its pods hold no secrets
            raise
        except BaseException:
            log.warning("interrupted: deleting %s %s/%s", spec.resource["kind"], spec.namespace, spec.name)
            self.cancel(spec)
            raise
        self._delete_secret(spec)
        return job

    def _delete_secret(self, spec: KubernetesJobSpec) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_namespaced_secret(spec.secret_name, spec.namespace)
        except ApiException as exc:
            if exc.status != 404:
                log.error("could not delete Secret %s/%s: %s", spec.namespace, spec.secret_name, exc.reason)


class _StartWatch:
    """Until every pod of the job runs: reads pod status and events at each poll, logs new
    warning events, and raises on a pod that cannot start (see the module docstring)."""

    def __init__(self, core: Any, spec: KubernetesJobSpec) -> None:
        self.core, self.spec = core, spec
        self.started = False
        self.pods: list[Any] = []
        self.seen_events: set[tuple[str, str, str]] = set()
        self.last_event: str | None = None
        self.events_readable = True

    def _events(self, name: str) -> list[Any]:
        from kubernetes.client.exceptions import ApiException

        if not self.events_readable:
            return []
        try:
            return self.core.list_namespaced_event(
                self.spec.namespace, field_selector=f"involvedObject.name={name}"
            ).items or []
        except ApiException as exc:  # events are a help, not a requirement (RBAC may forbid them)
            log.info("cannot read events in namespace %s (HTTP %s): pod status only", self.spec.namespace, exc.status)
            self.events_readable = False
            return []

    def check(self) -> None:
        spec = self.spec
        where = f"{spec.resource['kind']} {spec.namespace}/{spec.name}"
        self.pods = self.core.list_namespaced_pod(spec.namespace, label_selector=job_pods_selector(spec)).items or []
        running = [p for p in self.pods if p.status is not None and p.status.phase in ("Running", "Succeeded", "Failed")]
        if len(running) >= spec.nnodes:
            self.started = True
            log.info("%s: all %d pod(s) started", where, len(running))
            return
        events_by_object: dict[str, list[Any]] = {}
        for name in [spec.name] + [p.metadata.name for p in self.pods]:
            events = self._events(name)
            events_by_object[name] = events
            for event in events:
                key = (name, event.reason or "", event.message or "")
                text = f"{event.involved_object.kind or 'object'} {name}: {event.reason}: {event.message}"
                if event.type == "Warning":
                    self.last_event = text
                if key not in self.seen_events:
                    self.seen_events.add(key)
                    (log.warning if event.type == "Warning" else log.info)("%s: event %s", where, text)
        for pod in self.pods:
            name, status = pod.metadata.name, pod.status
            if status is None:
                continue
            for container in (status.init_container_statuses or []) + (status.container_statuses or []):
                waiting = container.state.waiting if container.state is not None else None
                if waiting is None:
                    continue
                if waiting.reason in IMAGE_ERRORS:
                    raise KubernetesImagePullError(
                        f"{where} cannot start: pod {name} cannot pull its image {container.image}: {waiting.reason}: "
                        f"{waiting.message or 'no message'}. Check the kubernetes_image param and the registry's "
                        "credentials (imagePullSecrets of the pods' service account)"
                    )
                if waiting.reason in CONTAINER_CONFIG_ERRORS:
                    raise KubernetesJobNotStarted(
                        f"{where} cannot start: pod {name}, container {container.name}: {waiting.reason}: "
                        f"{waiting.message or 'no message'}"
                    )
            for condition in status.conditions or []:
                if condition.type == "PodScheduled" and condition.status == "False" and condition.reason == "Unschedulable":
                    if any(e.reason == "TriggeredScaleUp" for e in events_by_object.get(name, [])):
                        continue  # the cluster autoscaler is adding a node: the start timeout bounds the wait
                    raise KubernetesJobNotStarted(
                        f"{where} cannot start: pod {name} is unschedulable: {condition.message or 'no message'}. "
                        "Ask for less per node (kubernetes_gpus_per_node, kubernetes_cpu_per_node, "
                        "kubernetes_memory_per_node) or fewer nodes, or add capacity"
                    )

    def describe(self) -> str:
        if not self.pods:
            state = "no pod was created (is the training operator running? quota?)"
        else:
            phases = ", ".join(f"{p.metadata.name} {p.status.phase if p.status else 'unknown'}" for p in self.pods)
            state = f"{len(self.pods)} of {self.spec.nnodes} pod(s): {phases}"
        return state + (f"; last warning: {self.last_event}" if self.last_event else "")


class _LogStreamer:
    """Follows node 0's trainer log on a thread once its pod runs (``kubectl logs -f``)."""

    def __init__(self, core: Any, spec: KubernetesJobSpec, on_line: Callable[[str], None]) -> None:
        self.core, self.spec, self.on_line = core, spec, on_line
        self.thread: threading.Thread | None = None
        self.response: Any = None
        self.pod: str | None = None
        self._stopped = threading.Event()

    def poll(self) -> None:
        if self.thread is not None:
            return
        pods = self.core.list_namespaced_pod(self.spec.namespace, label_selector=node0_pod_selector(self.spec)).items
        ready = [p for p in pods if p.status is not None and p.status.phase in ("Running", "Succeeded", "Failed")]
        if not ready:
            return
        self.pod = ready[0].metadata.name
        self.thread = threading.Thread(target=self._follow, name="k8s-log", daemon=True)
        self.thread.start()

    def _follow(self) -> None:
        container = "pytorch" if self.spec.job_kind == "pytorchjob" else "node"
        try:
            self.response = self.core.read_namespaced_pod_log(
                self.pod, self.spec.namespace, container=container, follow=True, _preload_content=False
            )
            pending = b""
            for chunk in self.response.stream(4096):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self.on_line(line.decode("utf-8", "replace"))
                if self._stopped.is_set():
                    break
            if pending:
                self.on_line(pending.decode("utf-8", "replace"))
        except Exception as exc:  # the log is a convenience; the job's status decides
            if not self._stopped.is_set():
                log.warning("log stream of pod %s ended: %s", self.pod, exc)

    def finish(self) -> None:
        """The job ended: let the stream drain (the pod's log is complete)."""
        if self.pod is None:
            self.poll()
        if self.thread is not None:
            self.thread.join(timeout=30)

    def stop(self) -> None:
        self._stopped.set()
        if self.response is not None:
            try:
                self.response.release_conn()
            except Exception:
                pass


def _api_error(what: str, spec: KubernetesJobSpec, exc: Any) -> RuntimeError:
    detail = exc.reason
    try:
        detail = json.loads(exc.body).get("message", detail)
    except Exception:
        pass
    hint = ""
    if exc.status == 404:
        hint = f" (is the {spec.resource['kind']} CRD installed? kubernetes_job_kind={spec.job_kind})"
    elif exc.status in (401, 403):
        hint = " (check the Kubernetes connection's credentials and RBAC in the namespace)"
    return RuntimeError(f"{what} {spec.namespace}/{spec.name} failed with HTTP {exc.status}: {detail}{hint}")


def job_spec_from_params(
    *,
    kind: str,
    values: dict[str, Any],
    args: list[str],
    dag_id: str,
    run_id: str,
    try_number: int,
    settings: Any,
) -> KubernetesJobSpec:
    """The job of one train task from the validated DAG params and trainflow's settings.

    Raises:
        ValueError: the store or MLflow is local to this machine (pods could not reach it).
    """
    root = settings.storage_root
    if root.startswith("file:") or "://" not in root:
        raise ValueError(
            f"TRAINFLOW_STORAGE_ROOT={root!r} is a local folder: launcher=kubernetes needs an object store the pods "
            "reach (s3://bucket/prefix)"
        )
    tracking = settings.mlflow_tracking_uri
    if not tracking.startswith(("http://", "https://", "databricks")):
        raise ValueError(
            "MLFLOW_TRACKING_URI is a local database or folder: launcher=kubernetes needs an MLflow tracking server "
            "(http(s)://...) the pods reach"
        )
    nproc = 1 if values["parallelism"] == "none" else values["nproc_per_node"]
    threads = values["kubernetes_cpu_per_node"]
    env = {"TRAINFLOW_STORAGE_ROOT": root, "PYTHONUNBUFFERED": "1"}
    if threads:
        cpus = float(threads[:-1]) / 1000 if threads.endswith("m") else float(threads)
        env["OMP_NUM_THREADS"] = str(max(1, int(cpus // nproc)))
    s3 = settings.s3.environment()
    secret = {k: v for k, v in s3.items() if k in SECRET_ENV}
    env.update({k: v for k, v in s3.items() if k not in SECRET_ENV})
    secret["MLFLOW_TRACKING_URI"] = tracking
    # The URI goes through the Secret (it may carry a password), not the command line.
    trainer_args = [a for a in args if not a.startswith("--train.mlflow_tracking_uri=")]
    return KubernetesJobSpec(
        name=job_name(kind, dag_id, run_id, try_number),
        namespace=values["kubernetes_namespace"],
        job_kind=values["kubernetes_job_kind"],
        image=values["kubernetes_image"],
        module=TRAINER_MODULE,
        args=tuple(trainer_args),
        nnodes=values["nnodes"],
        nproc_per_node=nproc,
        gpus_per_node=int(values["kubernetes_gpus_per_node"] or 0),
        cpu_per_node=values["kubernetes_cpu_per_node"],
        memory_per_node=values["kubernetes_memory_per_node"],
        env=tuple(sorted(env.items())),
        secret_env=tuple(sorted(secret.items())),
        max_restarts=values.get("max_restarts", 1),
        labels=tuple(sorted(run_labels(dag_id, run_id).items())),
    )


def run_kubernetes_training(
    api_client: Any,
    *,
    kind: str,
    values: dict[str, Any],
    args: list[str],
    dag_id: str,
    run_id: str,
    try_number: int,
    settings: Any,
    logger: logging.Logger | None = None,
    poll_s: float = 5.0,
) -> dict[str, Any]:
    """Run the training as a Kubeflow job and return the finished job object.

    The trainer writes ``result.json`` and the model to the shared store exactly as under the
    local launcher, so the caller reads the result the same way afterwards. The pods must all
    run within ``values["kubernetes_start_timeout_s"]`` (default :data:`DEFAULT_START_TIMEOUT_S`).
    """
    out = logger or log
    spec = job_spec_from_params(kind=kind, values=values, args=args, dag_id=dag_id, run_id=run_id,
                                try_number=try_number, settings=settings)
    out.info("kubernetes job manifest:\n%s", json.dumps(render_job(spec), indent=2))
    start_timeout = values.get("kubernetes_start_timeout_s") or DEFAULT_START_TIMEOUT_S
    runner = KubernetesJobRunner(api_client, on_line=lambda line: out.info("[node 0] %s", line), poll_s=poll_s,
                                 start_timeout_s=float(start_timeout))
    return runner.run(spec)
