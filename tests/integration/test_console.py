"""The console's pages and actions over real recorded runs on the emulators (console_stack):
what each page shows, promote/rollback through the deployer, replay, who may act, 404 and a
bucket that cannot be read."""

from __future__ import annotations

import datetime as dt
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from google.protobuf.message import Message

from mlpipe.messaging import events
from mlpipe.store import layout, run_cost
from mlpipe.store.approvals import APPROVED, Actor, Approvals, request_record
from mlpipe.store.registry import Registry
from mlpipe.store.storage import Storage, StoredObject
from mlpipe.v1 import events_pb2
from mlpipe_console import reading
from mlpipe_ops import cli, service_runtime
from mlpipe_ops.localstack import StackState, free_port
from tests.integration.conftest import Cloud
from tests.integration.console_stack import MODEL, ConsoleStack, console_stack

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The spans directory the console reads, as the local stack's state directory has."""
    return tmp_path_factory.mktemp("traces")


@pytest.fixture(scope="module")
def stack(emulators: object, traces: Path) -> Iterator[ConsoleStack]:
    # Sizes and prices as the local stack's console gets them (service_environment).
    costs = service_runtime.cost_environment("local")
    with console_stack(MLPIPE_TRACE_DIR=str(traces), **costs) as built:
        yield built


def get(stack: ConsoleStack, path: str, **headers: str) -> httpx.Response:
    return httpx.get(f"{stack.console_url}{path}", headers=headers, timeout=30)


def post(stack: ConsoleStack, path: str, **form: str) -> httpx.Response:
    return httpx.post(f"{stack.console_url}{path}", data=form, timeout=60)


def test_the_runs_page_lists_every_run_with_its_outcome(stack: ConsoleStack) -> None:
    page = get(stack, "/runs")

    assert page.status_code == 200
    rows = dict(re.findall(r'<tr data-run="([0-9a-f]{16})">(.*?)</tr>', page.text, re.S))
    assert set(rows) == set(stack.runs.values())
    assert "deployed" in rows[stack.runs["v1"]] and "v1</td>" in rows[stack.runs["v1"]]
    assert "v2</td>" in rows[stack.runs["v2"]]
    assert 'class="gates passed"' in rows[stack.runs["v1"]]
    assert "failed" in rows[stack.runs["failed"]]
    assert "trainer: missing_column" in rows[stack.runs["failed"]]
    assert "gs://" in rows[stack.runs["v1"]]  # the dataset


def test_the_runs_page_filters_and_pages(stack: ConsoleStack) -> None:
    failed = get(stack, "/runs?state=failed")
    by_model = get(stack, f"/runs?model={MODEL}&state=deployed")
    first = httpx.get(f"{stack.console_url}/runs", params={"page": 1}, timeout=30)

    assert re.findall(r'data-run="(\w+)"', failed.text) == [stack.runs["failed"]]
    assert set(re.findall(r'data-run="(\w+)"', by_model.text)) == {
        stack.runs["v1"],
        stack.runs["v2"],
    }
    assert "4 run(s)" in first.text


def test_a_run_shows_its_timeline_gates_metrics_lineage_and_artifacts(
    stack: ConsoleStack,
) -> None:
    run_id = stack.runs["v2"]
    lineage = stack.cloud.storage.read_json(layout.RunPaths(run_id).lineage)

    page = get(stack, f"/runs/{run_id}")

    assert page.status_code == 200
    text = page.text
    assert "model written" in text and "evaluated" in text and "deployed" in text
    assert "min_accuracy" in text
    assert "beside the champion (v1)" in text  # the champion scored on the same holdout
    assert lineage["dataset"]["sha256"] in text
    assert lineage["dataset"]["uri"] in text
    assert str(lineage["dataset"]["generation"]) in text
    assert lineage["config_sha256"] in text
    assert f'href="/objects/runs/{run_id}/report.html"' in text
    assert f'href="/objects/runs/{run_id}/model.joblib"' in text
    assert 'data-chart="chart-metrics"' in text and 'data-chart="chart-gates"' in text
    report = get(stack, f"/objects/runs/{run_id}/report.html")
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert report.headers["content-security-policy"] == "sandbox"


def test_a_run_draws_its_evaluation_plots_beside_their_numbers(stack: ConsoleStack) -> None:
    run_id = stack.runs["v1"]
    recorded = stack.cloud.storage.read_json(layout.RunPaths(run_id).plots)

    page = get(stack, f"/runs/{run_id}")
    failed = get(stack, f"/runs/{stack.runs['failed']}")

    assert page.status_code == 200
    found = re.search(r'<section id="plots">(.*?)</section>', page.text, re.S)
    assert found is not None, page.text
    section = found.group(1)
    kinds = [p["kind"] for p in recorded["plots"]]
    assert kinds == [
        "confusion_matrix",
        "roc",
        "precision_recall",
        "calibration",
        "permutation_importance",
    ]
    assert re.findall(r'data-kind="(\w+)"', section) == kinds
    for chart in ("chart-confusion", "chart-roc", "chart-calibration", "chart-importance"):
        assert f'<div class="chart" id="{chart}"></div>' in section
        assert f'data-chart="{chart}"' in page.text
    # Each chart's numbers are in its table too: the page reads without JavaScript.
    confusion = recorded["plots"][0]
    first = confusion["labels"][0]
    row = "".join(f"<td>{count}</td>" for count in confusion["matrix"][0])
    assert f"<tr><th>{first}</th>{row}</tr>" in section
    roc = recorded["plots"][1]["curves"][0]
    assert f"<tr><td>{roc['class']}</td><td>{roc['auc']:.4g}</td>" in section
    spec = re.search(r'data-chart="chart-roc">(.*?)</script>', page.text, re.S)
    assert spec is not None
    drawn = json.loads(spec.group(1))
    assert f"{roc['class']} (AUC {roc['auc']:.3f})" in {v["class"] for v in drawn["data"]["values"]}
    assert f'href="/objects/runs/{run_id}/report.html"' in section
    assert failed.status_code == 200
    assert "No plots recorded for this run" in failed.text
    assert 'data-chart="chart-confusion"' not in failed.text


def test_a_run_whose_plots_cannot_be_read_names_the_file(
    emulators: object, cloud: Cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = "00000000000000fe"
    context = events.context(producer="t", code_version="t", run_id=run_id, pipeline="iris")
    record(cloud, run_id, "started.json", events_pb2.TrainingStarted(context=context))
    cloud.storage.write(
        layout.RunPaths(run_id).plots, b'{"plots": [', content_type="application/json"
    )
    monkeypatch.setenv("MLPIPE_PROJECT", cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
    monkeypatch.setenv("MLPIPE_CONSOLE_AUTH", "local")
    from mlpipe_console.main import create_console

    with TestClient(create_console()) as client:
        page = client.get(f"/runs/{run_id}")

    assert page.status_code == 200
    assert f"runs/{run_id}/plots.json is not valid JSON" in page.text
    assert "Traceback" not in page.text
    assert f'href="/objects/runs/{run_id}/started.json"' in page.text  # the rest is shown


def expected_cost(stack: ConsoleStack, run_id: str) -> run_cost.RunCost:
    """The estimate from the bucket, at the local stack's sizes and infra/prices.yaml."""
    records, config, objects = run_cost.run_cost_inputs(stack.cloud.storage, run_id)
    sizes = service_runtime.cost_sizes(service_runtime.load_runtimes("local"))
    prices = service_runtime.load_prices()
    return run_cost.estimate(run_id, records, config, sizes, objects, prices)


def recorded_cost(stack: ConsoleStack, run_id: str) -> run_cost.CostRecord:
    """The estimate the deployer recorded when the run ended (runs/<id>/cost.json)."""
    found = run_cost.read_record(stack.cloud.storage, run_id)
    assert found is not None and found.cost is not None, found
    return found


def test_a_run_shows_its_cost_estimate_per_step_with_the_prices_date(stack: ConsoleStack) -> None:
    run_id = stack.runs["v2"]
    recorded = recorded_cost(stack, run_id)
    expected = recorded.cost
    assert expected is not None

    page = get(stack, f"/runs/{run_id}")

    found = re.search(r'<section id="cost">(.*?)</section>', page.text, re.S)
    assert found is not None, page.text
    section = found.group(1)
    assert "<h2>Cost (estimate)</h2>" in section
    assert f"Estimate recorded by the deployer at {recorded.estimated_at}." in section
    assert f"list prices of {expected.as_of} in {expected.region} (USD)" in section
    # The chain records no request nor landing time: the steps from the job on are priced.
    steps = re.findall(r"<tr><td>([a-z ]+)</td><td", section)
    assert steps == ["training job", "evaluator", "deployer", "storage"]
    assert "ingest: not recorded" in section and "trainer: not recorded" in section
    assert f'<th id="cost-total">{expected.total:.6f} USD</th>' in section
    assert expected.total > 0
    # Recorded at the decision, with the records as they were then: the same steps as now.
    now = expected_cost(stack, run_id)
    assert [(s.step, s.cost) for s in expected.steps] == [(s.step, s.cost) for s in now.steps]


def test_a_run_without_a_recorded_estimate_is_estimated_on_read_and_says_so(
    stack: ConsoleStack,
) -> None:
    run_id = stack.runs["failed"]  # the trainer failed it: no service ended it with a decision

    page = get(stack, f"/runs/{run_id}")

    assert run_cost.read_record(stack.cloud.storage, run_id) is None
    found = re.search(r'<section id="cost">(.*?)</section>', page.text, re.S)
    assert found is not None, page.text
    assert "Estimate computed now: none is recorded for this run" in found.group(1)


def test_mlpipe_status_prints_a_runs_cost_estimate(
    stack: ConsoleStack, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = stack.runs["v1"]
    recorded = recorded_cost(stack, run_id)
    expected = recorded.cost
    assert expected is not None

    cli.echo_run_cost(stack.cloud.storage, run_id)

    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"cost: recorded by the deployer at {recorded.estimated_at}"
    assert lines[1] == f"cost (estimate, prices of {expected.as_of}, {expected.region}):"
    assert [line.split()[0] for line in lines[2:5]] == ["training", "evaluator", "deployer"]
    assert f"  total         {expected.total:.6f} USD" in lines
    assert "  missing: ingest: not recorded (needs started.json or training.json)" in lines


def test_mlpipe_status_computes_the_estimate_of_a_run_that_has_none_recorded(
    stack: ConsoleStack, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id = stack.runs["failed"]
    expected = expected_cost(stack, run_id)

    cli.echo_run_cost(stack.cloud.storage, run_id)

    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("cost: none recorded")
    assert f"  total         {expected.total:.6f} USD" in lines


def test_a_run_shows_its_trace_as_a_waterfall(stack: ConsoleStack, traces: Path) -> None:
    # The spans as the services' exporter writes them (mlpipe.tracing.span_record).
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor

    from mlpipe import tracing

    run_id = stack.runs["v2"]
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(tracing.JsonLinesExporter(traces, "trainer")))
    tracer = provider.get_tracer("test")
    with (
        tracer.start_as_current_span("trainer ObjectFinalize", attributes={tracing.RUN_ID: run_id}),
        tracer.start_as_current_span("fit"),
    ):
        pass
    with tracer.start_as_current_span("unrelated delivery"):
        pass
    provider.shutdown()

    page = get(stack, f"/runs/{run_id}")
    other = get(stack, f"/runs/{stack.runs['v1']}")

    assert page.status_code == 200
    spans = re.findall(
        r"<tr[^>]*><td>(\w+)</td><td style=\"padding-left: ([\d.]+)em\">([^<]+)</td>",
        page.text.split('id="trace-spans"')[1].split("</table>")[0],
    )
    assert [(service, name) for service, _, name in spans] == [
        ("trainer", "trainer ObjectFinalize"),
        ("trainer", "fit"),
    ]
    assert float(spans[1][1]) > float(spans[0][1])  # under its parent
    assert 'data-chart="chart-trace"' in page.text
    assert "unrelated delivery" not in page.text
    assert "No trace recorded for this run" in other.text


def test_the_models_page_shows_versions_traffic_and_the_canary(stack: ConsoleStack) -> None:
    page = get(stack, "/models")

    assert page.status_code == 200
    assert "v1 80% champion" in page.text and "v2 20% canary" in page.text
    assert 'data-version="1"' in page.text and 'data-version="2"' in page.text
    assert "Canary v2 at 20%" in page.text
    # The one predictor instance that served the canary counted its 2 predictions.
    section = page.text.split(f'<section class="model" id="{MODEL}">', 1)[1]
    instances = re.search(r'<p class="instances">(.*?)</p>', section, re.S)
    assert instances is not None
    assert "serves canary v2 beside champion v1 (2 ok, 0 failed" in instances.group(1)
    # The predictor instance's own record: what it served, and that it stopped since.
    serving = re.search(
        rf'<table class="serving" id="serving-{MODEL}">(.*?)</table>', page.text, re.S
    )
    assert serving is not None
    rows = re.findall(r'<tr data-instance="(\w+)" class="(\w+)">(.*?)</tr>', serving.group(1), re.S)
    assert [state for _, state, _ in rows] == ["stopped"]
    assert "v1 80% champion, v2 20% canary" in rows[0][2]
    assert "2 successful, 0 failed prediction(s)" in page.text
    assert f'action="/models/{MODEL}/promote"' in page.text


def test_the_failures_page_shows_the_kept_input_with_its_reason(stack: ConsoleStack) -> None:
    page = get(stack, "/failures")

    assert page.status_code == 200
    assert stack.quarantined in page.text
    assert "missing_run_config" in page.text and "missing_column" in page.text
    # The kept push message shown as its event, decoded; the kept upload as its text.
    assert '"model_uri": "gs://elsewhere/model.joblib"' in page.text.replace("&#34;", '"')
    assert "sepal_length,sepal_width,petal_length,petal_width" in page.text
    rows = dict(re.findall(r'<tr data-failure="([^"]+)">(.*?)</tr>', page.text, re.S))
    assert "Replay" in rows[stack.quarantined]
    upload = next(path for path in rows if "missing_column" in path)
    assert "Replay" not in rows[upload] and "fix the input and send it again" in rows[upload]
    assert "Unavailable" not in page.text
    kept = get(stack, f"/objects/{stack.quarantined}")
    assert kept.headers["content-type"].startswith("text/plain")


def test_the_drift_page_shows_each_features_psi_and_ks_and_what_it_triggered(
    stack: ConsoleStack,
) -> None:
    report = stack.cloud.storage.read_json(
        f"monitoring/{MODEL}/reports/{stack.check_id}/drift.json"
    )

    page = get(stack, "/drift")

    assert page.status_code == 200
    section = page.text.split(f'id="check-{stack.check_id}"', 1)[1]
    assert report["status"] == "drift" and "petal_length" in report["drifted"]
    for feature in report["features"]:
        row = re.search(rf"<tr><td>{feature['name']}</td>(.*?)</tr>", section, re.S)
        assert row is not None, feature["name"]
        assert f"{feature['psi']:.4g}" in row.group(1)
        assert ("yes" if feature["drifted"] else "no") in row.group(1)
    assert "Triggered:" in section
    assert report["retrain_note"] in section  # why no retraining was asked for
    assert f"/objects/monitoring/{MODEL}/reports/{stack.check_id}/drift.html" in section
    assert 'data-chart="chart-drift-1"' in page.text
    # Each feature's histogram, drawn from the bins the check compared.
    for j, feature in enumerate(report["features"], start=1):
        assert f'data-chart="chart-histogram-1-{j}"' in page.text, feature["name"]
        shares = f"{feature['bins'][0]} {round(100 * feature['reference'][0], 1)}% → "
        assert shares in section, feature["name"]


def test_the_batches_page_shows_outputs_row_counts_and_durations(stack: ConsoleStack) -> None:
    metrics = stack.cloud.storage.read_json(layout.batch_metrics_path(MODEL, stack.batch_id))

    page = get(stack, "/batches")

    row = re.search(r"<tr><td><a [^>]*>b1</a>(.*?)</tr>", page.text, re.S)
    assert row is not None, page.text
    assert f"<td>{metrics['rows']}</td>" in row.group(1) and metrics["rows"] == 150
    assert metrics["output_uri"] in row.group(1)
    assert f"{MODEL} v{metrics['model_version']}" in row.group(1)
    # Scored in the predictor: its estimate is the predictor's Cloud Run time.
    cost = stack.cloud.storage.read_json(layout.batch_cost_path(MODEL, stack.batch_id))
    assert cost is not None and cost["estimate"]["runner"] == "predictor", cost
    assert cost["estimate"]["seconds"] == metrics["duration_seconds"]
    shown = f"{cost['estimate']['cost']:.6f} USD</span> ({cost['estimate']['basis']})"
    assert shown in row.group(1)


def test_the_actions_page_lists_recorded_actions(stack: ConsoleStack) -> None:
    assert get(stack, "/actions").status_code == 200


def test_unknown_pages_runs_and_objects_are_404_pages(stack: ConsoleStack) -> None:
    for path in ("/nowhere", "/runs/0123456789abcdef", "/runs/not-a-run", "/objects/registry/x"):
        page = get(stack, path)
        assert page.status_code == 404, path
        assert '<h1 id="error-title">Not found</h1>' in page.text
        assert "Traceback" not in page.text


def test_a_promotion_asks_first_then_moves_the_traffic_and_is_recorded(
    stack: ConsoleStack,
) -> None:
    registry = Registry(stack.cloud.storage)
    asked = get(stack, f"/models/{MODEL}/promote")
    unconfirmed = post(stack, f"/models/{MODEL}/promote")
    assert registry.traffic(MODEL).canary == 2  # neither the question nor a bare post acts

    done = post(stack, f"/models/{MODEL}/promote", confirm="yes")

    assert 'id="confirm"' in asked.text and 'id="confirm"' in unconfirmed.text
    assert done.status_code == 200, done.text
    assert "traffic now v2 100% champion" in done.text
    assert registry.traffic(MODEL).shares() == [(2, 100, "champion")]
    recorded = [stack.cloud.storage.read_json(p) for p in stack.cloud.storage.list("audit/")]
    assert [(r["who"], r["action"], r["target"], r["ok"]) for r in recorded] == [
        ("local", "promote", MODEL, True)
    ]
    deployment = stack.cloud.storage.read_json(layout.RunPaths(stack.runs["v2"]).deployment)
    assert deployment is not None  # the deployer's own record of v2 stays
    # ... and the rollback moves the champion back to v1, through the same route.
    back = post(stack, f"/models/{MODEL}/rollback", confirm="yes")
    assert back.status_code == 200, back.text
    assert registry.traffic(MODEL).shares() == [(1, 100, "champion")]
    again = post(stack, f"/models/{MODEL}/promote", confirm="yes")
    assert again.status_code == 409 and "no canary to promote" in again.text


def test_a_replay_publishes_the_kept_message_again_and_marks_it(stack: ConsoleStack) -> None:
    stack.cloud.watch(events.TRAINING_COMPLETED)

    done = post(stack, "/failures/replay", id=stack.quarantined, confirm="yes")

    assert done.status_code == 200, done.text
    landed = stack.cloud.pulled(events.TRAINING_COMPLETED)
    assert [e.model_uri for e in landed] == ["gs://elsewhere/model.joblib"]
    blob = stack.cloud.storage.bucket.get_blob(stack.quarantined)
    assert blob.metadata["replayed_as"].startswith(f"{events.TRAINING_COMPLETED}/")
    assert "replayed as" in get(stack, "/failures").text
    twice = post(stack, "/failures/replay", id=stack.quarantined, confirm="yes")
    assert twice.status_code == 409 and "replayed already" in twice.text


def test_a_viewer_reads_but_may_not_act_and_the_refusal_is_recorded(
    emulators: object, stack: ConsoleStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLPIPE_PROJECT", stack.cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", stack.cloud.storage.bucket_name)
    monkeypatch.setenv("MLPIPE_CONSOLE_AUTH", "iap")
    monkeypatch.setenv("MLPIPE_CONSOLE_ACTORS", "ops@example.com,domain:sre.example.com")
    monkeypatch.setenv("MLPIPE_DEPLOYER_URL", stack.deployer_url)
    from mlpipe_console.main import create_console

    app = create_console()  # its own instance: settings are read when it starts

    registry = Registry(stack.cloud.storage)
    before = registry.traffic(MODEL)
    viewer = {"X-Goog-Authenticated-User-Email": "accounts.google.com:viewer@example.com"}
    with TestClient(app) as client:
        anonymous = client.get("/runs")
        reads = client.get("/models", headers=viewer)
        refused = client.post(f"/models/{MODEL}/rollback", data={"confirm": "yes"}, headers=viewer)
        replay = client.post(
            "/failures/replay", data={"id": stack.quarantined, "confirm": "yes"}, headers=viewer
        )
        sre = client.get(
            "/runs",
            headers={"X-Goog-Authenticated-User-Email": "accounts.google.com:a@sre.example.com"},
        )

    assert anonymous.status_code == 401
    assert reads.status_code == 200 and "viewer@example.com (read-only)" in reads.text
    assert refused.status_code == 403 and "may not rollback" in refused.text
    assert replay.status_code == 403
    assert registry.traffic(MODEL) == before
    assert "(read-only)" not in sre.text
    recorded = [stack.cloud.storage.read_json(p) for p in stack.cloud.storage.list("audit/")]
    refusals = [(r["who"], r["action"], r["allowed"]) for r in recorded if not r["allowed"]]
    assert sorted(refusals) == [
        ("viewer@example.com", "replay", False),
        ("viewer@example.com", "rollback", False),
    ]


def test_a_console_that_cannot_read_the_bucket_says_what_is_unavailable(
    emulators: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLPIPE_PROJECT", "nowhere")
    monkeypatch.setenv("MLPIPE_BUCKET", "no-such-bucket-for-the-console")
    monkeypatch.setenv("MLPIPE_CONSOLE_AUTH", "local")
    from mlpipe_console.main import create_console

    app = create_console()  # its own instance: settings are read when it starts

    with TestClient(app) as client:
        pages = {path: client.get(path) for path in ("/runs", "/models", "/failures")}

    for path in ("/runs", "/models"):
        assert pages[path].status_code == 503, path
        assert "Unavailable:" in pages[path].text
        assert "gs://no-such-bucket-for-the-console" in pages[path].text
        assert "Traceback" not in pages[path].text
    # The failures page shows what it could read and names both sources it could not.
    failures = pages["/failures"]
    assert failures.status_code == 200
    assert "Pub/Sub (dead-letters-archive in nowhere)" in failures.text
    assert "Unavailable:</strong> the bucket gs://no-such-bucket-for-the-console" in failures.text


def test_mlpipe_console_serves_the_local_stack_and_stops_with_its_process(
    emulators: StackState,
) -> None:
    command = [
        sys.executable,
        "-m",
        "mlpipe_ops.cli",
        "console",
        "--state-dir",
        emulators.state_dir,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        # Its own line among the console's JSON logs (both on stdout).
        said = iter(process.stdout.readline, "") if process.stdout else iter(())
        line = next((ln for ln in said if ln.startswith("console: ")), "")
        url = line.split()[1] if line else ""
        assert url.startswith("http://127.0.0.1:"), line
        page = httpx.get(f"{url}/runs", timeout=30)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(20)

    assert page.status_code == 200
    assert 'id="who">local<' in page.text  # the local identity, who may act
    assert code == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/healthz", timeout=2)  # the console process went with it


def test_a_bucket_that_does_not_answer_is_named_at_once(
    emulators: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{free_port()}")  # nobody
    monkeypatch.setenv("MLPIPE_PROJECT", "nowhere")
    monkeypatch.setenv("MLPIPE_BUCKET", "unreachable")
    monkeypatch.setenv("MLPIPE_CONSOLE_AUTH", "local")
    from mlpipe_console.main import create_console

    app = create_console()  # its own instance: settings are read when it starts

    with TestClient(app) as client:
        began = time.monotonic()
        page = client.get("/runs")
        took = time.monotonic() - began

    assert page.status_code == 503
    assert "Unavailable:" in page.text and "gs://unreachable" in page.text
    assert "ConnectionError" in page.text
    assert took < 10  # not the client library's two minutes of retries


class CountingStorage(Storage):
    """The bucket, counting the objects read (to see what the run index reads again)."""

    reads: list[str]

    def read(self, path: str, *args: Any, **kwargs: Any) -> StoredObject | None:
        self.reads.append(path)
        return super().read(path, *args, **kwargs)


def test_the_models_page_lists_the_environments_pending_approvals(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = dt.datetime.now(dt.UTC)
    approvals = Approvals(cloud.storage)

    def ask(approval_id: str, version: int, who: str, asked: dt.datetime) -> None:
        approvals.create(
            request_record(
                approval_id=approval_id,
                model=MODEL,
                version=version,
                from_env="staging",
                to_env="prod",
                source={"env": "staging"},
                requested_by=Actor(who, "gcloud"),
                requested_at=asked,
                expires_hours=72,
            )
        )

    ask("aaaaaaaaaaaa", 4, "alice@example.com", now - dt.timedelta(hours=2))
    ask("bbbbbbbbbbbb", 3, "bob@example.com", now - dt.timedelta(hours=80))  # expired
    ask("cccccccccccc", 2, "carol@example.com", now - dt.timedelta(hours=1))
    decided = approvals.get("cccccccccccc")
    assert decided is not None
    approvals.decide(decided, APPROVED, Actor("dave@example.com", "--as"), now)
    monkeypatch.setenv("MLPIPE_PROJECT", cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
    monkeypatch.setenv("MLPIPE_CONSOLE_AUTH", "local")
    monkeypatch.setenv("MLPIPE_ENV", "prod")
    from mlpipe_console.main import create_console

    with TestClient(create_console()) as client:
        page = client.get("/models")

    assert page.status_code == 200, page.text
    section = re.search(
        r'<section class="approvals" id="approvals">(.*?)</section>', page.text, re.S
    )
    assert section is not None, page.text
    assert "Pending approvals: 1" in section.group(1)
    rows = re.findall(r'<tr data-approval="(\w+)">(.*?)</tr>', section.group(1), re.S)
    assert [approval_id for approval_id, _ in rows] == ["aaaaaaaaaaaa"]
    cells = re.findall(r"<td>(.*?)</td>", rows[0][1])
    expires = (now - dt.timedelta(hours=2) + dt.timedelta(hours=72)).strftime("%Y-%m-%d %H:%M:%S")
    assert cells[:5] == ["aaaaaaaaaaaa", MODEL, "v4", "staging", "alice@example.com"]
    assert cells[-1] == expires
    assert "mlpipe approve ID --env prod" in section.group(1)
    assert "<form" not in section.group(1)  # read-only: decided with the CLI


def record(cloud: Cloud, run_id: str, name: str, event: Message) -> None:
    cloud.storage.write(
        f"runs/{run_id}/{name}", events.to_json(event).encode(), content_type="application/json"
    )


def test_the_run_index_reads_a_run_again_only_when_its_records_change(cloud: Cloud) -> None:
    ids = [f"{i:016x}" for i in range(5)]
    for n, run_id in enumerate(ids):
        context = events.context(producer="t", code_version="t", run_id=run_id, pipeline="iris")
        context.event_time.FromSeconds(1_800_000_000 + n)
        record(cloud, run_id, "started.json", events_pb2.TrainingStarted(context=context))
    storage = CountingStorage(cloud.storage.client, cloud.storage.bucket_name)
    storage.reads = []
    index = reading.RunIndex(storage, workers=2)

    first = index.page(page_size=2)
    read_first = len(storage.reads)
    storage.reads.clear()
    again = index.page(page_size=2, page=3)
    read_again = list(storage.reads)
    done = events_pb2.DeploymentCompleted(
        context=events.context(producer="t", code_version="t", run_id=ids[0]),
        model_name=MODEL,
        deployed=True,
        version=1,
    )
    record(cloud, ids[0], "deployment.json", done)
    after = index.page(state="deployed")

    assert read_first == 5  # one record of each run
    assert [r.run_id for r in first.runs] == [ids[4], ids[3]]  # newest first
    assert (first.total, first.pages) == (5, 3)
    assert read_again == [] and [r.run_id for r in again.runs] == [ids[0]]
    assert [(r.run_id, r.model, r.version) for r in after.runs] == [(ids[0], MODEL, 1)]
    assert sorted(set(storage.reads)) == [
        f"runs/{ids[0]}/{n}" for n in ("deployment.json", "started.json")
    ]


def test_an_unexpected_error_is_a_500_page_naming_it_without_a_traceback(
    stack: ConsoleStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlpipe_console import reading

    def broken(*_: object) -> list[dict[str, object]]:
        raise ZeroDivisionError("a batch record divided by zero")

    monkeypatch.setenv("MLPIPE_PROJECT", stack.cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", stack.cloud.storage.bucket_name)
    monkeypatch.setenv("MLPIPE_CONSOLE_AUTH", "local")
    # A defect in the page's own code: here, the batch reader's.
    monkeypatch.setattr(reading, "batch_runs", broken)
    from mlpipe_console.main import create_console

    with TestClient(create_console(), raise_server_exceptions=False) as client:
        page = client.get("/batches")
        other = client.get("/runs")

    assert page.status_code == 500
    assert "Something went wrong" in page.text
    assert "ZeroDivisionError: a batch record divided by zero" in page.text
    assert "Traceback" not in page.text and 'File "' not in page.text
    assert other.status_code == 200  # the rest of the console still answers


def test_a_regression_runs_page_draws_its_regression_plots(stack: ConsoleStack) -> None:
    run_id = stack.runs["regression"]
    plots = stack.cloud.storage.read_json(layout.RunPaths(run_id).plots)

    page = get(stack, f"/runs/{run_id}")

    assert page.status_code == 200
    kinds = {p["kind"] for p in plots["plots"]}
    assert {"predicted_vs_actual", "residuals"} <= kinds, kinds
    for chart in ("chart-predicted-vs-actual", "chart-residuals", "chart-importance"):
        assert f'data-chart="{chart}"' in page.text, chart
    # bikeshare declares two categorical columns: an error-by-segment chart for each.
    assert 'data-chart="chart-segment"' in page.text
    assert 'data-chart="chart-segment-2"' in page.text
    assert "chart-confusion" not in page.text
