"""The GCP-only parts of `mlpipe infra plan/apply` (IAM, the GCS notification, Cloud Scheduler,
the Cloud Run services' runtime settings)
at their client boundary: the real client libraries talk to an HTTP stand-in on 127.0.0.1 that
answers from a table the test sets and records what they send."""

from __future__ import annotations

import base64
import dataclasses
import json
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import pubsub_v1, run_v2, scheduler_v1, storage
from google.iam.v1 import policy_pb2
from google.protobuf import json_format

from mlpipe_ops import infra, service_runtime

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
    # Eight bindings on Cloud Run services: six push invokers, the console's on the deployer
    # and the deployer's run.developer on the predictor (dev deploys to cloud_run); ingest's
    # invoker is there already.
    assert len(binds) == len(infra.iam_bindings(dev)) - 1 - 8
    assert sorted(c.name.rsplit("/", 1)[-1] for c in blocked) == [
        "mlpipe-deployer",
        "mlpipe-deployer",
        "mlpipe-evaluator",
        "mlpipe-notifier",
        "mlpipe-predictor",
        "mlpipe-predictor",
        "mlpipe-trainer",
    ]
    roles = {c.name.split(" on ")[0] for c in blocked}
    assert roles == {"roles/run.invoker", "roles/run.developer"}
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
    expected = infra.create_job_request(dev, infra.scheduler_job(dev, dev.schedules[0]))
    google.reply(
        "POST", f"/v1/{expected.parent}/jobs", json.loads(scheduler_v1.Job.to_json(expected.job))
    )

    change = by_name(infra.schedule_changes(dev, clients), "mlpipe-iris-smoke")
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

    change = by_name(infra.schedule_changes(dev, clients), "mlpipe-iris-smoke")
    assert change.run is not None
    change.run()

    assert str(change) == "update schedule mlpipe-iris-smoke: schedule 0 5 * * * → 0 6 * * *"
    (sent,) = google.sent("PATCH")
    assert sent.query["updateMask"] == ["schedule"]
    assert sent.body["schedule"] == "0 6 * * *"


def test_a_schedule_as_configured_is_left_alone(
    google: StandIn, clients: infra.Clients, dev: infra.Target
) -> None:
    dev = dataclasses.replace(dev, schedules=dev.schedules[:1])
    live = scheduler_v1.Job(infra.scheduler_job(dev, dev.schedules[0]))
    live.state = scheduler_v1.Job.State.ENABLED
    google.reply("GET", f"/v1/{JOB}", json.loads(scheduler_v1.Job.to_json(live)))

    assert [c.name for c in infra.schedule_changes(dev, clients)] == [
        c.name for c in infra.SERVICE_CHECKS
    ]


def by_name(changes: list[infra.Change], name: str) -> infra.Change:
    (found,) = [c for c in changes if c.name == name]
    return found


CHECK_JOB = f"projects/{PROJECT}/locations/us-central1/jobs/mlpipe-deployer-rollouts-check"


def test_the_deployers_rollout_check_is_scheduled_with_the_push_identitys_token(
    google: StandIn, clients: infra.Clients, dev: infra.Target
) -> None:
    # https://cloud.google.com/scheduler/docs/http-target-auth: an OIDC token of an account of
    # the project that holds run.invoker on the service; the audience, the service's URL.
    audience, account = dev.push_receiver("deployer")
    google.reply("POST", f"/v1/{dev.location}/jobs", {"name": CHECK_JOB})

    change = by_name(infra.schedule_changes(dev, clients), "mlpipe-deployer-rollouts-check")
    assert change.run is not None
    change.run()

    assert change.action == "create"
    (sent,) = [s for s in google.sent("POST") if s.path == f"/v1/{dev.location}/jobs"]
    job = scheduler_v1.Job.from_json(json.dumps(sent.body))
    assert job.name == CHECK_JOB and job.schedule == "* * * * *"
    assert job.http_target == scheduler_v1.HttpTarget(
        uri=audience + "/v1/rollouts:check",
        http_method=scheduler_v1.HttpMethod.POST,
        oidc_token=scheduler_v1.OidcToken(service_account_email=account, audience=audience),
    )
    assert sent.body["httpTarget"]["oidcToken"] == {
        "serviceAccountEmail": account,
        "audience": audience,
    }
    # The token's identity may call the service: the push identity's run.invoker binding.
    assert any(
        b.role == "roles/run.invoker" and b.member == f"serviceAccount:{account}"
        for b in infra.iam_bindings(dev)
    )


def test_a_check_calling_another_url_is_updated(
    google: StandIn, clients: infra.Clients, dev: infra.Target
) -> None:
    check = infra.SERVICE_CHECKS[0]
    live = scheduler_v1.Job(infra.check_job(dev, check))
    live.http_target.uri = "https://old.example/v1/rollouts:check"
    google.reply("GET", f"/v1/{CHECK_JOB}", json.loads(scheduler_v1.Job.to_json(live)))
    google.reply("PATCH", f"/v1/{CHECK_JOB}", json.loads(scheduler_v1.Job.to_json(live)))

    change = by_name(infra.schedule_changes(dev, clients), check.name)
    assert change.run is not None
    change.run()

    assert change.action == "update" and "uri https://old.example" in change.detail
    (sent,) = google.sent("PATCH")
    assert sent.query["updateMask"] == ["httpTarget"]
    assert sent.body["httpTarget"]["uri"].endswith(".run.app/v1/rollouts:check")


# --- Cloud Run services against infra/runtime.yaml ----------------------------------------------
LOCATION = f"projects/{PROJECT}/locations/us-central1"


@pytest.fixture
def dev_runtimes() -> infra.Target:
    env = infra.load_environment("dev", REPO / "infra" / "environments")
    runtimes = service_runtime.load_runtimes("dev", REPO / "infra" / "runtime.yaml")
    return infra.resolve(env, "dev", project=PROJECT, project_number=NUMBER, runtimes=runtimes)


def deployed(service: str, **template: Any) -> run_v2.Service:
    """A service as `gcloud run deploy` with Cloud Run's defaults leaves it, then `template`."""
    live = run_v2.Service(
        name=f"{LOCATION}/services/mlpipe-{service}",
        uri=f"https://mlpipe-{service}-{NUMBER}.us-central1.run.app",
        etag='"AY2x"',
        generation=3,
        template=run_v2.RevisionTemplate(
            revision=f"mlpipe-{service}-00003-xyz",
            service_account=f"mlpipe-{service}@{PROJECT}.iam.gserviceaccount.com",
            max_instance_request_concurrency=80,
            timeout=timedelta(seconds=300),
            scaling=run_v2.RevisionScaling(min_instance_count=0, max_instance_count=100),
            execution_environment=run_v2.ExecutionEnvironment.EXECUTION_ENVIRONMENT_GEN2,
            containers=[
                run_v2.Container(
                    image=f"us-central1-docker.pkg.dev/{PROJECT}/mlpipe/{service}:abc1234",
                    env=[run_v2.EnvVar(name="MLPIPE_ENV", value="dev")],
                    resources=run_v2.ResourceRequirements(
                        limits={"cpu": "1000m", "memory": "512Mi"}, cpu_idle=True
                    ),
                )
            ],
        ),
    )
    for key, value in template.items():
        setattr(live.template, key, value)
    return live


def as_json(message: Any) -> Any:
    return json.loads(type(message).to_json(message))


def test_a_deployed_service_that_differs_from_its_runtime_definition_is_updated(
    google: StandIn, clients: infra.Clients, dev_runtimes: infra.Target
) -> None:
    live = deployed("trainer")
    name = live.name
    google.reply("GET", f"/v2/{name}", as_json(live))
    runtime = dev_runtimes.runtimes["trainer"]
    account = dev_runtimes.runtime_accounts["trainer"]
    wanted = infra.run_service_wanted(live, runtime, account)
    google.reply(
        "PATCH",
        f"/v2/{name}",
        {
            "name": f"{LOCATION}/operations/op-1",
            "done": True,
            "response": {"@type": "type.googleapis.com/google.cloud.run.v2.Service"}
            | as_json(wanted),
        },
    )

    changes, notes = infra.run_service_changes(dev_runtimes, clients)

    (change,) = changes
    assert str(change) == (
        "update cloud run service mlpipe-trainer: memory 512Mi → 2Gi; CPU 1000m → 2; "
        "concurrency 80 → 20; max instances 100 → 10; CPU allocation during requests → always"
    )
    assert len(notes) == 6 and all("not deployed yet" in n for n in notes)
    assert not google.sent("PATCH")  # a plan only reads
    assert change.run is not None

    change.run()

    (sent,) = google.sent("PATCH")
    # The REST transport carries the service's name in the path, the rest in the body.
    assert sent.path == f"/v2/{name}"
    assert run_v2.Service.from_json(json.dumps({**sent.body, "name": name})) == wanted
    assert "updateMask" not in sent.query  # the whole service, read-modified-written
    template = sent.body["template"]
    assert template["containers"][0]["resources"] == {
        "limits": {"cpu": "2", "memory": "2Gi"},
        # cpu_idle false (always allocated) is proto3's default: absent from the JSON.
    }
    assert template["maxInstanceRequestConcurrency"] == 20
    assert template["scaling"] == {"maxInstanceCount": 10}
    assert template["timeout"] == "300s"
    assert template["serviceAccount"] == account
    # The deploy's image and variables stay; the etag refuses a concurrent deploy; Cloud Run
    # names the new revision.
    assert template["containers"][0]["image"] == live.template.containers[0].image
    assert template["containers"][0]["env"] == [{"name": "MLPIPE_ENV", "value": "dev"}]
    assert sent.body["etag"] == '"AY2x"'
    assert "revision" not in template
    assert live.template.revision == "mlpipe-trainer-00003-xyz"  # the live copy is untouched


def test_a_service_as_defined_is_left_alone(
    google: StandIn, clients: infra.Clients, dev_runtimes: infra.Target
) -> None:
    for service, runtime in dev_runtimes.runtimes.items():
        live = infra.run_service_wanted(
            deployed(service), runtime, dev_runtimes.runtime_accounts[service]
        )
        # Cloud Run may spell quantities its own way.
        limits = live.template.containers[0].resources.limits
        limits["cpu"] = f"{int(runtime.cpu * 1000)}m"
        limits["memory"] = f"{service_runtime.memory_bytes(runtime.memory) // 2**20}Mi"
        google.reply("GET", f"/v2/{live.name}", as_json(live))

    changes, notes = infra.run_service_changes(dev_runtimes, clients)

    assert changes == [] and notes == []


def test_a_service_running_as_another_identity_on_gen1_is_corrected(
    google: StandIn, clients: infra.Clients, dev_runtimes: infra.Target
) -> None:
    runtime = dev_runtimes.runtimes["ingest"]
    live = infra.run_service_wanted(
        deployed("ingest"), runtime, dev_runtimes.runtime_accounts["ingest"]
    )
    live.template.service_account = f"{NUMBER}-compute@developer.gserviceaccount.com"
    live.template.execution_environment = run_v2.ExecutionEnvironment.EXECUTION_ENVIRONMENT_GEN1
    live.template.timeout = timedelta(seconds=60)
    google.reply("GET", f"/v2/{live.name}", as_json(live))

    (change,), _ = infra.run_service_changes(dev_runtimes, clients)

    assert change.detail == (
        "timeout 60s → 300s; execution environment EXECUTION_ENVIRONMENT_GEN1 → "
        f"EXECUTION_ENVIRONMENT_GEN2; service account {NUMBER}-compute@developer"
        f".gserviceaccount.com → mlpipe-ingest@{PROJECT}.iam.gserviceaccount.com"
    )


def test_the_gcp_plan_ends_with_the_cloud_run_services(
    google: StandIn, clients: infra.Clients, dev_runtimes: infra.Target
) -> None:
    live = deployed("predictor")
    google.reply("GET", f"/v2/{live.name}", as_json(live))

    planned = infra.plan(dev_runtimes, clients)

    assert str(planned.changes[-1]).startswith("update cloud run service mlpipe-predictor:")
    assert sum("not deployed yet" in n for n in planned.notes) == 6
