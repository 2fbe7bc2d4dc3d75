"""ingest's http source against a real HTTP server on 127.0.0.1 and the emulators: merged
provider responses land once; slow, failing, oversized and malformed responses are reported."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from mlpipe.messaging import events
from mlpipe.messaging.push import make_envelope
from mlpipe.ml.config import PipelineConfig
from mlpipe.store.storage import sha256_hex
from mlpipe.v1 import events_pb2
from mlpipe_ingest.main import app
from tests.integration.conftest import Cloud

pytestmark = pytest.mark.integration

HEADER = "sepal_length,sepal_width,petal_length,petal_width,species"


def iris_rows(n: int, offset: int = 0) -> list[dict]:
    return [
        {
            "sepal_length": 5.0 + (i + offset) / 100,
            "sepal_width": 3.0,
            "petal_length": 1.5,
            "petal_width": 0.2,
            "species": "setosa" if i % 2 else "virginica",
        }
        for i in range(n)
    ]


Reply = tuple[int, str, bytes]


class Provider:
    """A local HTTP server whose routes the test sets; it counts requests per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[], Reply]] = {}
        self.hits: dict[str, int] = {}
        self.headers: dict[str, dict[str, str]] = {}
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?")[0]
                provider.hits[path] = provider.hits.get(path, 0) + 1
                provider.headers[path] = dict(self.headers)
                route = provider.routes.get(path)
                status, content_type, body = route() if route else (404, "text/plain", b"no")
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                if path != "/stream":
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for start in range(0, len(body), 65536):
                        self.wfile.write(body[start : start + 65536])
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"


@pytest.fixture
def provider() -> Iterator[Provider]:
    server = Provider()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.fixture
def ingest(
    cloud: Cloud, iris_config: PipelineConfig, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TestClient]:
    monkeypatch.setenv("MLPIPE_PROJECT", cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
    monkeypatch.setenv("MLPIPE_SOURCE_MAX_BYTES", "200000")
    monkeypatch.setenv("MLPIPE_HTTP_READ_TIMEOUT_SECONDS", "0.5")
    monkeypatch.setenv("MLPIPE_HTTP_BACKOFF_SECONDS", "0.01")
    cloud.apply_config(iris_config)
    cloud.watch(events.DATASETS_LANDED, events.PIPELINE_FAILURES)
    with TestClient(app) as client:
        yield client


def http_request(urls: list[str], fmt: str = "json", records_path: str = "") -> bytes:
    request = events_pb2.IngestRequest(request_id="http-1", dataset="iris")
    request.http.urls.extend(urls)
    request.http.format = fmt
    request.http.records_path = records_path
    request.http.headers["X-Api-Key"] = "k1"
    return events.encode(request)


def push(client: TestClient, data: bytes, attempt: int = 0, message_id: str = "m1") -> dict:
    envelope = json.loads(make_envelope(data, message_id=message_id))
    if attempt:
        envelope["deliveryAttempt"] = attempt
    reply = client.post("/pubsub/push", content=json.dumps(envelope).encode())
    return {"status_code": reply.status_code, **reply.json()}


def json_reply(document: object) -> Callable[[], Reply]:
    return lambda: (200, "application/json", json.dumps(document).encode())


def test_two_provider_responses_are_merged_into_one_dataset(
    ingest: TestClient, cloud: Cloud, provider: Provider
) -> None:
    provider.routes["/a"] = json_reply({"data": {"rows": iris_rows(20)}})
    provider.routes["/b"] = json_reply({"data": {"rows": iris_rows(25, offset=20)}})

    reply = push(
        ingest, http_request([provider.url("/a"), provider.url("/b")], "json", "data.rows")
    )

    assert reply["status"] == "landed", reply
    landed = cloud.pulled(events.DATASETS_LANDED)
    assert landed[0].dataset.row_count == 45
    stored = cloud.storage.read(cloud.storage.path_of(landed[0].dataset.uri), with_metadata=True)
    assert stored is not None
    assert stored.data.decode().splitlines()[0] == HEADER
    assert len(stored.data.decode().splitlines()) == 46
    assert stored.metadata["row_count"] == "45"
    assert stored.metadata["sha256"] == sha256_hex(stored.data)
    assert stored.metadata["source"] == f"http:{provider.url('/a')},{provider.url('/b')}"
    assert "species:numeric" not in stored.metadata["schema"]
    assert stored.metadata["schema"].startswith("sepal_length:numeric,")
    assert provider.headers["/a"].get("X-Api-Key") == "k1"


def test_a_csv_response_lands_and_a_flaky_one_is_retried(
    ingest: TestClient, cloud: Cloud, provider: Provider
) -> None:
    body = (HEADER + "\n" + "\n".join(f"5.{i},3,1.4,0.2,setosa" for i in range(40))).encode()
    calls = {"n": 0}

    def flaky() -> Reply:
        calls["n"] += 1
        return (503, "text/plain", b"busy") if calls["n"] == 1 else (200, "text/csv", body)

    provider.routes["/flaky.csv"] = flaky

    reply = push(ingest, http_request([provider.url("/flaky.csv")], "csv"))

    assert reply["status"] == "landed", reply
    assert provider.hits["/flaky.csv"] == 2
    assert cloud.pulled(events.DATASETS_LANDED)[0].dataset.row_count == 40


def slow() -> Reply:
    time.sleep(2)
    return (200, "application/json", b"[]")


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone"


BAD = {
    "/missing": (lambda: (404, "text/plain", b"nope"), "json", "", "http_status", "404"),
    "/down": (lambda: (500, "text/plain", b"oops"), "json", "", "http_status", "3 attempts"),
    "/slow": (slow, "json", "", "timeout", "0.5s"),
    "/big": (
        lambda: (200, "application/json", b"[" + b" " * 300_000 + b"]"),
        "json",
        "",
        "too_large",
        "200000 bytes",
    ),
    "/stream": (
        lambda: (200, "application/json", b"[" + b" " * 300_000 + b"]"),
        "json",
        "",
        "too_large",
        "200000 bytes",
    ),
    "/latin1.csv": (
        lambda: (200, "text/csv", (HEADER + "\n5,3,1,0.2,s\xe9tosa\n").encode("latin-1")),
        "csv",
        "",
        "not_utf8",
        "UTF-8",
    ),
    "/ragged.csv": (
        lambda: (200, "text/csv", (HEADER + "\n5,3,1,0.2,setosa\n5,3\n").encode()),
        "csv",
        "",
        "malformed_csv",
        "line 3",
    ),
    "/header.csv": (
        lambda: (200, "text/csv", HEADER.encode()),
        "csv",
        "",
        "header_only",
        "no rows",
    ),
    "/empty": (lambda: (200, "application/json", b""), "json", "", "empty_dataset", "empty"),
    "/object": (
        lambda: (200, "application/json", b'{"data": {"rows": 3}}'),
        "json",
        "data.rows",
        "not_records",
        "list of objects",
    ),
    "/page.html": (
        lambda: (200, "text/html", b"<html></html>"),
        "json",
        "",
        "content_type",
        "text/html",
    ),
}


@pytest.mark.parametrize("path", sorted(BAD))
def test_bad_responses_are_reported_with_the_url_and_kept(
    ingest: TestClient, cloud: Cloud, provider: Provider, path: str
) -> None:
    route, fmt, records_path, reason, in_message = BAD[path]
    provider.routes[path] = route
    url = provider.url(path)

    reply = push(ingest, http_request([url], fmt, records_path), message_id=f"bad{path}")

    assert reply["status_code"] == 200 and reply["status"] == "rejected", reply
    assert reply["reason"] == reason
    failed = cloud.pulled(events.PIPELINE_FAILURES)
    assert [f.reason for f in failed] == [reason]
    assert url in failed[0].message and in_message in failed[0].message
    assert cloud.storage.read(cloud.storage.path_of(failed[0].quarantine_uri)) is not None
    assert cloud.storage.list("datasets/") == []


def test_an_unreachable_host_is_retried_by_pubsub_then_failed(
    ingest: TestClient, cloud: Cloud
) -> None:
    data = http_request([closed_port_url()])

    early = push(ingest, data, attempt=1, message_id="u1")
    last = push(ingest, data, attempt=5, message_id="u5")

    # Early deliveries answer 503 so Pub/Sub redelivers; the fifth is failed for good.
    assert early["status_code"] == 503
    assert last["status_code"] == 200 and last["reason"] == "unreachable"
    assert [f.reason for f in cloud.pulled(events.PIPELINE_FAILURES)] == ["unreachable"]


def test_one_bad_url_fails_the_whole_request(
    ingest: TestClient, cloud: Cloud, provider: Provider
) -> None:
    provider.routes["/a"] = json_reply(iris_rows(20))
    provider.routes["/b"] = lambda: (404, "text/plain", b"")

    reply = push(ingest, http_request([provider.url("/a"), provider.url("/b")]))

    assert reply["reason"] == "http_status"
    assert cloud.storage.list("datasets/") == []
