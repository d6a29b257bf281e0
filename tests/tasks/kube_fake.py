"""A fake Kubernetes API server on 127.0.0.1 for the kubernetes launcher's tests.

No cluster runs here: this speaks just enough of the API (Secrets, the TrainJob / PyTorchJob
custom resources, pod lists and a followed pod log) over real HTTP for the real ``kubernetes``
client to talk to it. Job status follows a scripted ``scenario``:

* ``succeed``: the job reports its completion condition after ``polls_before_end`` status reads;
* ``fail``: it reports ``Failed`` with a reason and message instead;
* ``hang``: it runs for ever (for the cancel test);
* ``no_crd``: the job's API group is not served (the operator is not installed): 404.

Scenarios of a job whose pods never start (the job itself stays "Created" for ever):

* ``image_pull``: node 0's pod waits in ``ImagePullBackOff``, with the kubelet's events;
* ``unschedulable``: the pod is ``Pending``, ``PodScheduled=False/Unschedulable`` (not enough GPUs);
* ``scale_up``: the same, but the cluster autoscaler reports ``TriggeredScaleUp`` (a node is coming);
* ``no_pods``: no pod is ever created; the job has a ``FailedCreate`` warning event.

Pods and events are listed at ``/api/v1/namespaces/{ns}/pods`` and ``.../events``.

Every request is recorded in ``requests`` as ``(method, path, query, body)``.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

LOG_LINES = [
    "2026-12-01 12:00:00 [rank 0] INFO trainflow.trainers.distributed: rank 0/4 joined (nccl on cuda:0)",
    "2026-12-01 12:00:05 [rank 0] INFO trainflow.trainers.loop: epoch 1/2 step 10/20 (50%) loss 0.41230 lr 1.00e-03",
    "2026-12-01 12:00:09 [rank 0] INFO trainflow.trainers.loop: result written to s3://bucket/runs/x/y/result.json",
]


class FakeKubernetes:
    def __init__(self, scenario: str = "succeed", polls_before_end: int = 2) -> None:
        self.scenario = scenario
        self.polls_before_end = polls_before_end
        self.requests: list[tuple[str, str, dict, object]] = []
        self.objects: dict[str, dict] = {}
        self.gets = 0
        self.job_created = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeKubernetes:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def paths(self, method: str) -> list[str]:
        return [path for m, path, _, _ in self.requests if m == method]

    NEVER_START = ("image_pull", "unschedulable", "scale_up", "no_pods")

    def _pod(self, name: str, namespace: str, image: str) -> dict:
        metadata = {"name": name, "namespace": namespace}
        if self.scenario == "image_pull":
            return {"metadata": metadata, "status": {
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [{"name": "node", "image": image, "imageID": "", "ready": False, "restartCount": 0,
                                       "state": {"waiting": {"reason": "ImagePullBackOff",
                                                             "message": f'Back-off pulling image "{image}"'}}}]}}
        if self.scenario in ("unschedulable", "scale_up"):
            return {"metadata": metadata, "status": {"phase": "Pending", "conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available"}]}}
        return {"metadata": metadata, "status": {"phase": "Running"}}

    def _events(self, name: str, namespace: str) -> list[dict]:
        def event(n, reason, message, kind="Pod", type_="Warning"):
            return {"metadata": {"name": f"{name}.{n}", "namespace": namespace}, "reason": reason, "message": message,
                    "type": type_, "count": 1, "involvedObject": {"kind": kind, "name": name, "namespace": namespace}}

        if name.endswith("-node-0-0"):
            if self.scenario == "image_pull":
                return [event(1, "Pulling", "Pulling image", type_="Normal"),
                        event(2, "Failed", 'Failed to pull image: rpc error: code = NotFound desc = manifest unknown'),
                        event(3, "BackOff", "Back-off pulling image")]
            if self.scenario in ("unschedulable", "scale_up"):
                events = [event(1, "FailedScheduling", "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")]
                if self.scenario == "scale_up":
                    events.append(event(2, "TriggeredScaleUp", "pod triggered scale-up: [{gpu-pool 0->1 (max: 4)}]",
                                        type_="Normal"))
                return events
        elif self.scenario == "no_pods":
            return [event(1, "FailedCreate", 'pods "x" is forbidden: exceeded quota: gpu-quota', kind="JobSet")]
        return []

    def _status(self, job: dict) -> dict:
        kind = job["kind"]
        self.gets += 1
        if self.scenario in ("hang", *self.NEVER_START) or self.gets <= self.polls_before_end:
            return {"conditions": [{"type": "Created" if kind == "PyTorchJob" else "Created", "status": "True"}]}
        if self.scenario == "fail":
            return {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
                                    "message": "node 1 exited with code 1: ValueError: bad shard"}]}
        done = "Complete" if kind == "TrainJob" else "Succeeded"
        return {"conditions": [{"type": done, "status": "True", "reason": "JobSucceeded", "message": "all nodes done"}]}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _send(self, code: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self):
                length = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(length)) if length else None

            def _route(self, method: str) -> None:
                url = urlparse(self.path)
                query = parse_qs(url.query)
                body = self._body() if method in ("POST", "PUT", "DELETE") else None
                fake.requests.append((method, url.path, query, body))
                path = url.path
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/secrets(?:/([^/]+))?", path)
                if m:
                    return self._object(method, f"secret/{m[1]}/{m[2] or (body or {}).get('metadata', {}).get('name')}", body)
                m = re.fullmatch(r"/apis/([^/]+)/([^/]+)/namespaces/([^/]+)/([^/]+)(?:/([^/]+))?", path)
                if m and fake.scenario == "no_crd":
                    return self._send(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
                                            "message": "the server could not find the requested resource"})
                if m:
                    name = m[5] or (body or {}).get("metadata", {}).get("name")
                    return self._object(method, f"{m[4]}/{m[3]}/{name}", body, job=True)
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", path)
                if m and method == "GET":
                    selector = query.get("labelSelector", [""])[0]
                    jobs = [o for k, o in fake.objects.items() if not k.startswith("secret/")]
                    items = []
                    if jobs and jobs[0]["metadata"]["name"] in selector and fake.scenario != "no_pods":
                        job = jobs[0]
                        image = json.dumps(job["spec"]).split('"image": "', 1)[1].split('"', 1)[0]
                        items.append(fake._pod(f"{job['metadata']['name']}-node-0-0", m[1], image))
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items})
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/events", path)
                if m and method == "GET":
                    field = query.get("fieldSelector", [""])[0]
                    name = field.split("involvedObject.name=", 1)[1] if "involvedObject.name=" in field else ""
                    return self._send(200, {"kind": "EventList", "apiVersion": "v1", "metadata": {},
                                            "items": fake._events(name, m[1])})
                m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", path)
                if m and method == "GET":
                    data = ("\n".join(LOG_LINES) + "\n").encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return None
                return self._send(404, {"kind": "Status", "status": "Failure", "message": f"no route {path}", "code": 404})

            def _object(self, method: str, key: str, body, job: bool = False) -> None:
                store = fake.objects
                if method == "POST":
                    if key in store:
                        return self._send(409, {"kind": "Status", "status": "Failure", "reason": "AlreadyExists", "code": 409})
                    store[key] = body
                    if job:
                        fake.job_created.set()
                    return self._send(201, body)
                if key not in store:
                    return self._send(404, {"kind": "Status", "status": "Failure", "reason": "NotFound", "code": 404,
                                            "message": f"{key} not found"})
                if method == "GET":
                    obj = dict(store[key])
                    if job:
                        obj["status"] = fake._status(obj)
                    return self._send(200, obj)
                if method == "PUT":
                    store[key] = body
                    return self._send(200, body)
                if method == "DELETE":
                    del store[key]
                    return self._send(200, {"kind": "Status", "status": "Success"})
                return self._send(405, {})

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_PUT(self):
                self._route("PUT")

            def do_DELETE(self):
                self._route("DELETE")

        return Handler
