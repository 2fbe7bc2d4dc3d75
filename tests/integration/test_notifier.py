"""The notifier on the emulators, posting to a real local HTTP receiver: each notice once per
channel under a storm of redeliveries, retries that post only where it failed, a refusal kept
without a PipelineFailed, and a channel that never answers holding the push no longer than
the bound."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient
from google.protobuf.message import Message

from mlpipe.messaging import events
from mlpipe.messaging.push import make_envelope
from mlpipe.store import layout
from mlpipe_notifier.main import app
from tests import notifier_samples as sample
from tests.integration.conftest import Cloud

SECRET_ENV = "MLPIPE_TEST_AUDIT_SECRET"
SECRET = "hook-secret-123"
CONSOLE = "http://console.example.test"
SUBSCRIPTIONS = {
    "mlpipe.v1.PipelineFailed": "notifier-failures-push",
    "mlpipe.v1.EvaluationCompleted": "notifier-evaluations-push",
    "mlpipe.v1.DriftDetected": "notifier-drift-push",
    "mlpipe.v1.DeploymentCompleted": "notifier-deployments-push",
    "mlpipe.v1.ApprovalRequested": "notifier-approvals-push",
    "mlpipe.v1.ApprovalDecided": "notifier-approvals-push",
}


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A local HTTP server that records every request and answers the statuses it is told to
    (per path, in turn; 200 after them), the way Slack answers: `ok`, or a reason."""

    received: list[Received] = field(default_factory=list)
    scripts: dict[str, list[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    server: http.server.ThreadingHTTPServer | None = None

    def start(self) -> None:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver.lock:
                    receiver.received.append(
                        Received("POST", self.path, dict(self.headers.items()), body)
                    )
                    script = receiver.scripts.get(self.path) or []
                    status = script.pop(0) if script else 200
                answer = b"ok" if status == 200 else b"no_service" if status == 404 else b"error"
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def answer(self, path: str, *statuses: int) -> None:
        self.scripts[path] = list(statuses)

    def at(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.received if r.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.start()
    yield server
    assert server.server is not None
    server.server.shutdown()
    server.server.server_close()


def slack(receiver: Receiver, name: str = "team", path: str = "/slack") -> dict[str, Any]:
    return {"name": name, "kind": "slack", "url": receiver.url(path)}


def webhook(receiver: Receiver, name: str = "audit", path: str = "/hook") -> dict[str, Any]:
    return {"name": name, "kind": "webhook", "url": receiver.url(path), "secret_env": SECRET_ENV}


Start = Callable[..., contextlib.AbstractContextManager[TestClient]]


@pytest.fixture
def notifier(cloud: Cloud, monkeypatch: pytest.MonkeyPatch) -> Start:
    """Start the notifier app with these channels (and the console URL)."""
    monkeypatch.setenv("MLPIPE_PROJECT", cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
    monkeypatch.setenv("MLPIPE_CONSOLE_URL", CONSOLE)
    monkeypatch.setenv(SECRET_ENV, SECRET)
    cloud.watch(events.PIPELINE_FAILURES)

    @contextlib.contextmanager
    def start(*channels: dict[str, Any]) -> Iterator[TestClient]:
        monkeypatch.setenv("MLPIPE_NOTIFY_CHANNELS", json.dumps(list(channels)))
        with TestClient(app) as client:
            yield client

    return start


def envelope(cloud: Cloud, event: Message, message_id: str) -> bytes:
    """The push body Pub/Sub sends for `event` on the notifier's subscription of its type."""
    kind = event.DESCRIPTOR.full_name
    return make_envelope(
        events.encode(event),
        attributes={events.EVENT_TYPE_ATTR: kind, "encoding": "BINARY"},
        message_id=message_id,
        subscription=f"projects/{cloud.project}/subscriptions/{SUBSCRIPTIONS[kind]}",
    )


def push(client: TestClient, body: bytes) -> Any:
    return client.post("/pubsub/push", content=body)


def until_acknowledged(client: TestClient, body: bytes, attempts: int = 100) -> list[int]:
    """Push `body` as Pub/Sub does: again after each 503, until it is acknowledged."""
    statuses: list[int] = []
    for _ in range(attempts):
        statuses.append(push(client, body).status_code)
        if statuses[-1] != 503:
            return statuses
        time.sleep(0.05)
    raise AssertionError(f"still refused after {attempts} deliveries: {statuses[-5:]}")


def records(cloud: Cloud, channel: str) -> list[dict[str, Any]]:
    return [cloud.storage.read_json(p) for p in cloud.storage.list(f"notifications/{channel}/")]


EVENTS = {
    "failure": sample.failed,
    "gate_blocked": lambda: sample.evaluated(passed=False),
    "drift": sample.drifted,
    "canary": lambda: sample.deployed("canary"),
    "approval": sample.approval_requested,
}


@pytest.mark.parametrize("kind", EVENTS)
def test_a_duplicate_storm_posts_each_notice_once_to_each_channel(
    cloud: Cloud, notifier: Start, receiver: Receiver, kind: str
) -> None:
    event = EVENTS[kind]()
    body = envelope(cloud, event, "1001")

    with notifier(slack(receiver), webhook(receiver)) as client:
        # The same push 20 times, ten of them at once, each pushed again while refused ...
        with ThreadPoolExecutor(10) as pool:
            at_once = list(pool.map(lambda _: until_acknowledged(client, body), range(10)))
        one_by_one = [until_acknowledged(client, body) for _ in range(10)]
        # ... and the same event published again under other message ids.
        republished = [
            until_acknowledged(client, envelope(cloud, event, f"20{i}")) for i in range(3)
        ]

    assert all(s[-1] == 200 for s in at_once + one_by_one + republished)
    assert [len(receiver.at("/slack")), len(receiver.at("/hook"))] == [1, 1]
    (posted,) = receiver.at("/hook")
    assert json.loads(posted.body)["kind"] == kind
    assert posted.headers["Idempotency-Key"] == json.loads(posted.body)["idempotency_key"]
    assert receiver.at("/slack")[0].headers["Idempotency-Key"] == posted.headers["Idempotency-Key"]
    assert [r["state"] for r in records(cloud, "team") + records(cloud, "audit")] == ["sent"] * 2


def test_the_posts_say_what_happened_and_the_webhook_is_signed(
    cloud: Cloud, notifier: Start, receiver: Receiver
) -> None:
    with notifier(slack(receiver), webhook(receiver)) as client:
        reply = push(client, envelope(cloud, sample.failed(), "1"))

    assert reply.status_code == 200, reply.text
    assert reply.json()["status"] == "notified"
    assert reply.json()["channels"] == {"team": "sent", "audit": "sent"}
    (to_slack,) = receiver.at("/slack")
    assert json.loads(to_slack.body)["text"].splitlines() == [
        f":x: iris run {sample.RUN} failed in trainer: missing_column",
        "column 'species' is missing from datasets/iris/dt=2026-11-23/upload-1.csv",
        "input kept at gs://b/quarantine/missing_column/trainer-4242",
        f"<{CONSOLE}/runs/{sample.RUN}|run {sample.RUN}>",
    ]
    (to_hook,) = receiver.at("/hook")
    assert to_hook.headers["Content-Type"] == "application/json"
    verify = sample.documented_verify()  # the receiver's check, as docs/notifications.md says
    assert verify(SECRET, to_hook.headers, to_hook.body)
    assert not verify(SECRET, to_hook.headers, to_hook.body + b" ")
    assert not verify("another secret", to_hook.headers, to_hook.body)
    sent = json.loads(to_hook.body)
    assert (sent["run_id"], sent["stage"], sent["link"]) == (
        sample.RUN,
        "trainer",
        f"{CONSOLE}/runs/{sample.RUN}",
    )


def test_a_passing_evaluation_posts_nothing(
    cloud: Cloud, notifier: Start, receiver: Receiver
) -> None:
    with notifier(slack(receiver), webhook(receiver)) as client:
        reply = push(client, envelope(cloud, sample.evaluated(passed=True), "1"))

    assert reply.status_code == 200 and reply.json()["status"] == "ignored"
    assert receiver.received == []
    assert cloud.storage.list(layout.NOTIFICATIONS) == []


def test_a_channel_failing_twice_is_posted_once_it_answers(
    cloud: Cloud, notifier: Start, receiver: Receiver
) -> None:
    receiver.answer("/slack", 500, 500)
    body = envelope(cloud, sample.drifted(), "1")

    with notifier(slack(receiver)) as client:
        statuses = [push(client, body).status_code for _ in range(3)]
        again = push(client, body)

    assert statuses == [503, 503, 200]
    assert [len(receiver.at("/slack")), again.status_code] == [3, 200]  # 500, 500, then 200
    assert again.json()["channels"] == {"team": "already sent"}
    (record,) = records(cloud, "team")
    assert (record["state"], record["attempt"], record["status"]) == ("sent", 3, 200)


def test_a_redelivery_posts_only_to_the_channel_that_failed(
    cloud: Cloud, notifier: Start, receiver: Receiver
) -> None:
    receiver.answer("/hook", 503)
    body = envelope(cloud, sample.deployed("promote", requested_by="cli"), "1")

    with notifier(slack(receiver), webhook(receiver)) as client:
        first = push(client, body)
        second = push(client, body)

    assert first.status_code == 503
    assert first.json()["channels"] == {"team": "sent", "audit": "failed"}
    assert "audit: answered 503: error" in first.json()["detail"]
    assert second.status_code == 200
    assert second.json()["channels"] == {"team": "already sent", "audit": "sent"}
    assert [len(receiver.at("/slack")), len(receiver.at("/hook"))] == [1, 2]


def test_a_refusing_channel_is_permanent_recorded_kept_and_publishes_nothing(
    cloud: Cloud, notifier: Start, receiver: Receiver
) -> None:
    receiver.answer("/gone", 404, 404, 404)
    body = envelope(cloud, sample.evaluated(passed=False), "77")

    with notifier(slack(receiver, "gone", "/gone"), webhook(receiver)) as client:
        reply = push(client, body)
        again = push(client, body)  # the same message once more: refused already

    assert reply.status_code == 200, reply.text
    assert reply.json()["status"] == "rejected"
    assert reply.json()["reason"] == "channel_rejected"
    assert "gone: answered 404: no_service" in reply.json()["detail"]
    assert again.status_code == 200 and again.json()["status"] == "rejected"
    assert [len(receiver.at("/gone")), len(receiver.at("/hook"))] == [1, 1]
    (record,) = records(cloud, "gone")
    assert (record["state"], record["status"], record["message_id"]) == ("rejected", 404, "77")
    kept = cloud.storage.read("quarantine/channel_rejected/notifier-77", with_metadata=True)
    assert kept is not None and kept.data == body
    assert kept.metadata["subscription"].endswith("/notifier-evaluations-push")  # replayable
    # The notifier reads pipeline-failures: it never publishes there.
    assert cloud.pulled(events.PIPELINE_FAILURES, expect=1, timeout=3) == []


def test_a_replay_after_a_refusal_posts_to_that_channel_only(
    cloud: Cloud, notifier: Start, receiver: Receiver
) -> None:
    receiver.answer("/gone", 410)
    event = sample.evaluated(passed=False)

    with notifier(slack(receiver, "gone", "/gone"), webhook(receiver)) as client:
        refused = push(client, envelope(cloud, event, "1"))
        replayed = push(client, envelope(cloud, event, "2"))  # a new message of the same event

    assert refused.json()["status"] == "rejected"
    assert replayed.json()["channels"] == {"gone": "sent", "audit": "already sent"}
    assert [len(receiver.at("/gone")), len(receiver.at("/hook"))] == [2, 1]


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that takes connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def test_a_channel_that_never_answers_holds_the_push_no_longer_than_the_bound(
    cloud: Cloud, notifier: Start, receiver: Receiver, silent_port: int
) -> None:
    silent = {"name": "silent", "kind": "slack", "url": f"http://127.0.0.1:{silent_port}/x"}
    body = envelope(cloud, sample.failed(), "1")

    with notifier(silent, slack(receiver)) as client:
        started = time.monotonic()
        reply = push(client, body)
        took = time.monotonic() - started
        again = push(client, body)

    # MLPIPE_NOTIFY_TIMEOUT_SECONDS (5) bounds the post; the rest is the emulator's GCS.
    assert reply.status_code == 503 and took < 8, (reply.status_code, took)
    assert reply.json()["channels"] == {"silent": "failed", "team": "sent"}
    assert "silent: no answer within 5s" in reply.json()["detail"]
    # Posted at once meanwhile, and not again.
    assert len(receiver.at("/slack")) == 1
    assert again.json()["channels"]["team"] == "already sent"


def test_a_refused_connection_is_transient(cloud: Cloud, notifier: Start, silent_port: int) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    closed = {"name": "closed", "kind": "slack", "url": f"http://127.0.0.1:{port}/x"}

    with notifier(closed) as client:
        reply = push(client, envelope(cloud, sample.drifted(), "1"))

    assert reply.status_code == 503
    assert "closed: cannot post: ConnectError" in reply.json()["detail"]
    (record,) = records(cloud, "closed")
    assert record["state"] == "failed"


def test_a_live_claim_holds_and_a_stale_one_is_taken_over(
    cloud: Cloud, notifier: Start, receiver: Receiver
) -> None:
    event = sample.drifted()
    key = "drift-iris-classifier-daily-2026-11-23"
    path = layout.notification_path("team", key)
    claim = {"state": "claimed", "message_id": "0", "lease_seconds": 30, "attempt": 1}
    cloud.storage.write_json(path, {**claim, "claimed_at": time.time()})

    with notifier(slack(receiver)) as client:
        held = push(client, envelope(cloud, event, "1"))
        cloud.storage.write_json(path, {**claim, "claimed_at": time.time() - 31})
        taken = push(client, envelope(cloud, event, "1"))

    assert held.status_code == 503 and held.json()["status"] == "held"
    assert taken.status_code == 200 and taken.json()["channels"] == {"team": "sent"}
    assert len(receiver.at("/slack")) == 1
    record = cloud.storage.read_json(path)
    assert (record["state"], record["attempt"], record["previous"]["state"]) == (
        "sent",
        2,
        "claimed",
    )


def test_without_channels_each_notice_is_one_log_line(
    cloud: Cloud, notifier: Start, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO"), notifier() as client:
        reply = push(client, envelope(cloud, sample.deployed("canary"), "1"))

    assert reply.status_code == 200 and reply.json()["status"] == "logged"
    said = [r for r in caplog.records if r.getMessage().startswith("notice (no channel")]
    (line,) = said
    assert line.notice["kind"] == "canary"  # type: ignore[attr-defined]
    assert any("no channel configured" in r.getMessage() for r in caplog.records)
    assert cloud.storage.list(layout.NOTIFICATIONS) == []


def test_bad_input_is_kept_and_publishes_nothing_either(
    cloud: Cloud, notifier: Start, receiver: Receiver
) -> None:
    """The push adapter's own rejections go through the notifier's failure reporter too."""
    not_an_event = make_envelope(
        b"\xff\x00 not a PipelineFailed",
        attributes={events.EVENT_TYPE_ATTR: "mlpipe.v1.PipelineFailed", "encoding": "BINARY"},
        message_id="88",
        subscription=f"projects/{cloud.project}/subscriptions/notifier-failures-push",
    )

    with notifier(slack(receiver)) as client:
        garbage = client.post("/pubsub/push", content=b"not an envelope")
        undecodable = push(client, not_an_event)

    assert garbage.status_code == 400 and garbage.json()["quarantine_uri"]
    assert undecodable.status_code == 200 and undecodable.json()["reason"] == "invalid_message"
    assert cloud.storage.exists("quarantine/invalid_message/notifier-88")
    assert receiver.received == []
    assert cloud.pulled(events.PIPELINE_FAILURES, expect=1, timeout=3) == []
