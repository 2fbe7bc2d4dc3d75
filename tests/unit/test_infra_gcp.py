"""The GCP-only parts of `mlpipe infra plan/apply` (IAM, the GCS notification, Cloud Scheduler)
at their client boundary: the real client libraries talk to an HTTP stand-in on 127.0.0.1 that
answers from a table the test sets and records what they send."""

from __future__ import annotations

import base64
import json
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import pubsub_v1, run_v2, scheduler_v1, storage
from google.iam.v1 import policy_pb2
from google.protobuf import json_format

from mlpipe import infra

REPO = Path(__file__).resolve().parents[2]
PROJECT = "acme-ml-dev"
NUMBER = 123456789012
BUCKET = "acme-ml-dev-mlpipe"
PUBSUB_AGENT = f"serviceAccount:service-{NUMBER}@gcp-sa-pubsub.iam.gserviceaccount.com"


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any


@dataclass
class StandIn:
    url: str
    replies: dict[tuple[str, str], tuple[int, Any]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)

    def reply(self, method: str, path: str, body: Any, status: int = 200) -> None:
        self.replies[(method, path)] = (status, body)

    def sent(self, method: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method]


def _handler(stand_in: StandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            url = urllib.parse.urlsplit(self.path)
            stand_in.seen.append(
                Seen(
                    self.command,
                    url.path,
                    urllib.parse.parse_qs(url.query),
                    json.loads(raw) if raw else None,
                )
            )
            status, body = stand_in.replies.get(
                (self.command, url.path),
                (404, {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}}),
            )
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_DELETE = _answer

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def google(monkeypatch: pytest.MonkeyPatch) -> Iterator[StandIn]:
    # The client libraries would otherwise go to the emulators instead of the stand-in.
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    stand_in = StandIn("")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(stand_in))
    stand_in.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield stand_in
    server.shutdown()
    server.server_close()


@pytest.fixture
def clients(google: StandIn) -> infra.Clients:
    rest: dict[str, Any] = {
        "transport": "rest",
        "credentials": AnonymousCredentials(),
        "client_options": {"api_endpoint": google.url},
    }
    return infra.Clients(
        PROJECT,
        publisher=pubsub_v1.PublisherClient(**rest),
        subscriber=pubsub_v1.SubscriberClient(**rest),
        scheduler=scheduler_v1.CloudSchedulerClient(**rest),
        run=run_v2.ServicesClient(**rest),
        storage_client=storage.Client(
            project=PROJECT,
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": google.url},
        ),
    )


@pytest.fixture
def dev() -> infra.Target:
    env = infra.load_environment("dev", REPO / "infra" / "environments")
    return infra.resolve(env, "dev", project=PROJECT, project_number=NUMBER)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_iam_plan_binds_what_is_missing_and_waits_for_undeployed_services(
    google: StandIn, clients: infra.Clients, dev: infra.Target
) -> None:
    etag = b64(b"BwYz")
    for binding in infra.iam_bindings(dev):
        if binding.kind != "run service":
            google.reply("GET", f"/v1/{binding.resource}:getIamPolicy", {"etag": etag})
    dead_letters = f"projects/{PROJECT}/topics/dead-letters"
    google.reply(
        "GET",
        f"/v1/{dead_letters}:getIamPolicy",
        {"etag": etag, "bindings": [{"role": "roles/pubsub.publisher", "members": [PUBSUB_AGENT]}]},
    )
    ingest = f"projects/{PROJECT}/locations/us-central1/services/mlpipe-ingest"
    ingest_invoker = f"serviceAccount:mlpipe-push-ingest@{PROJECT}.iam.gserviceaccount.com"
    google.reply(
        "GET",
        f"/v2/{ingest}:getIamPolicy",
        {"etag": etag, "bindings": [{"role": "roles/run.invoker", "members": [ingest_invoker]}]},
    )

    changes = infra.iam_changes(dev, clients)

    binds = [c for c in changes if c.action == "bind"]
    blocked = [c for c in changes if c.action == "blocked"]
    assert len(binds) == len(infra.iam_bindings(dev)) - 1 - 5
    assert sorted(c.name.rsplit("/", 1)[-1] for c in blocked) == [
        "mlpipe-deployer",
        "mlpipe-evaluator",
        "mlpipe-predictor",
        "mlpipe-trainer",
    ]
    assert all("not deployed yet" in c.detail for c in blocked)
    assert not google.sent("POST")  # a plan only reads


def test_iam_apply_sends_the_built_policy_with_its_etag(
    google: StandIn, clients: infra.Clients, dev: infra.Target
) -> None:
    subscription = f"projects/{PROJECT}/subscriptions/trainer-push"
    google.reply("GET", f"/v1/{subscription}:getIamPolicy", {"etag": b64(b"BwYz")})
    google.reply("POST", f"/v1/{subscription}:setIamPolicy", {"etag": b64(b"BwZ0")})
    binding = next(b for b in infra.iam_bindings(dev) if b.resource == subscription)
    (change,) = [c for c in infra.iam_changes(dev, clients) if c.name.endswith(subscription)]

    assert change.run is not None
    change.run()

    (sent,) = google.sent("POST")
    assert sent.path == f"/v1/{subscription}:setIamPolicy"
    expected = infra.set_iam_policy_request(binding, policy_pb2.Policy(etag=b"BwYz"))
    assert expected is not None
    assert sent.body == {"policy": json_format.MessageToDict(expected.policy)}
    assert sent.body["policy"] == {
        "etag": b64(b"BwYz"),
        "bindings": [{"role": "roles/pubsub.subscriber", "members": [PUBSUB_AGENT]}],
    }


NOTIFICATIONS = f"/storage/v1/b/{BUCKET}/notificationConfigs"
TOPIC_REF = f"//pubsub.googleapis.com/projects/{PROJECT}/topics/gcs-objects"
WANTED = {
    "topic": TOPIC_REF,
    "event_types": ["OBJECT_FINALIZE"],
    "object_name_prefix": "datasets/",
    "payload_format": "JSON_API_V1",
}


def test_the_notification_is_created_when_missing(
    google: StandIn, clients: infra.Clients, dev: infra.Target
) -> None:
    google.reply("GET", f"/storage/v1/b/{BUCKET}", {"name": BUCKET})
    google.reply("GET", NOTIFICATIONS, {"items": []})
    google.reply("POST", NOTIFICATIONS, {"id": "9", **WANTED})

    (change,) = infra.notification_changes(dev, clients)
    assert change.run is not None
    change.run()

    assert (change.action, change.kind) == ("create", "bucket notification")
    (sent,) = google.sent("POST")
    assert (sent.path, sent.body) == (NOTIFICATIONS, WANTED)


def test_a_notification_with_other_settings_is_replaced(
    google: StandIn, clients: infra.Clients, dev: infra.Target
) -> None:
    google.reply("GET", f"/storage/v1/b/{BUCKET}", {"name": BUCKET})
    stale = {"id": "3", "topic": TOPIC_REF, "payload_format": "NONE"}
    google.reply("GET", NOTIFICATIONS, {"items": [stale]})
    google.reply("DELETE", f"{NOTIFICATIONS}/3", None, status=204)
    google.reply("POST", NOTIFICATIONS, {"id": "9", **WANTED})

    (change,) = infra.notification_changes(dev, clients)
    assert change.run is not None
    change.run()

    assert change.action == "replace" and "(was 3)" in change.detail
    assert [(s.method, s.path) for s in google.seen[-2:]] == [
        ("DELETE", f"{NOTIFICATIONS}/3"),
        ("POST", NOTIFICATIONS),
    ]


def test_a_matching_notification_is_left_alone(
    google: StandIn, clients: infra.Clients, dev: infra.Target
) -> None:
    google.reply("GET", f"/storage/v1/b/{BUCKET}", {"name": BUCKET})
    google.reply("GET", NOTIFICATIONS, {"items": [{"id": "9", **WANTED}]})

    assert infra.notification_changes(dev, clients) == []


def test_without_the_bucket_the_notification_waits(
    google: StandIn, clients: infra.Clients, dev: infra.Target
) -> None:
    (change,) = infra.notification_changes(dev, clients)

    assert change.action == "blocked" and change.run is None
    assert f"bucket gs://{BUCKET} does not exist" in change.detail


JOB = f"projects/{PROJECT}/locations/us-central1/jobs/mlpipe-iris-smoke"


def test_a_missing_schedule_is_created_with_the_built_job(
    google: StandIn, clients: infra.Clients, dev: infra.Target
) -> None:
    expected = infra.create_job_request(dev, dev.schedules[0])
    google.reply(
        "POST", f"/v1/{expected.parent}/jobs", json.loads(scheduler_v1.Job.to_json(expected.job))
    )

    (change,) = infra.schedule_changes(dev, clients)
    assert change.run is not None
    change.run()

    assert str(change) == (
        "create schedule mlpipe-iris-smoke: '0 6 * * *' America/Chicago → ingest-requests"
    )
    (sent,) = google.sent("POST")
    assert sent.path == f"/v1/projects/{PROJECT}/locations/us-central1/jobs"
    assert scheduler_v1.Job.from_json(json.dumps(sent.body)) == expected.job


def test_a_changed_schedule_is_patched_with_its_mask(
    google: StandIn, clients: infra.Clients, dev: infra.Target
) -> None:
    live = scheduler_v1.Job(infra.scheduler_job(dev, dev.schedules[0]))
    live.schedule = "0 5 * * *"
    live.state = scheduler_v1.Job.State.ENABLED
    google.reply("GET", f"/v1/{JOB}", json.loads(scheduler_v1.Job.to_json(live)))
    google.reply("PATCH", f"/v1/{JOB}", json.loads(scheduler_v1.Job.to_json(live)))

    (change,) = infra.schedule_changes(dev, clients)
    assert change.run is not None
    change.run()

    assert str(change) == "update schedule mlpipe-iris-smoke: schedule 0 5 * * * → 0 6 * * *"
    (sent,) = google.sent("PATCH")
    assert sent.query["updateMask"] == ["schedule"]
    assert sent.body["schedule"] == "0 6 * * *"


def test_a_schedule_as_configured_is_left_alone(
    google: StandIn, clients: infra.Clients, dev: infra.Target
) -> None:
    live = scheduler_v1.Job(infra.scheduler_job(dev, dev.schedules[0]))
    live.state = scheduler_v1.Job.State.ENABLED
    google.reply("GET", f"/v1/{JOB}", json.loads(scheduler_v1.Job.to_json(live)))

    assert infra.schedule_changes(dev, clients) == []
