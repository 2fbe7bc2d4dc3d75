"""The report after the verdict, on the emulators: plots.json and report.html written once the
EvaluationCompleted is recorded and published and the push answered, written again by a
redelivery that finds them missing (the same bytes) or by the next instance to start after a
crash, the champion's recorded importances beside this run's, and a report that cannot be
written leaving the verdict as it is."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from mlpipe.messaging import events
from mlpipe.ml.config import parse_config
from mlpipe.runtime.steps import Outcome
from mlpipe.store import layout, run_cost
from mlpipe.store.registry import Registry
from mlpipe.v1 import events_pb2
from mlpipe_evaluator.drawing import Drawer
from mlpipe_evaluator.evaluation import Evaluator, evaluate
from mlpipe_ops import service_runtime
from tests.conftest import REPO
from tests.integration.conftest import Cloud
from tests.integration.test_training_quality import _train_in

pytestmark = pytest.mark.integration

IRIS = (REPO / "examples/iris/pipeline.yaml").read_text()
IRIS_CSV = (REPO / "examples/iris/iris.csv").read_bytes()


def test_the_report_follows_the_verdict_and_a_redelivery_rewrites_it(cloud: Cloud) -> None:
    cloud.watch(events.EVALUATION_COMPLETED)
    trained = _train_in(cloud.storage, parse_config(IRIS), IRIS_CSV)
    paths = layout.RunPaths(trained.context.run_id)
    evaluator = Evaluator(cloud.storage, cloud.publisher, "test")

    first = evaluate(trained, evaluator)
    marked = cloud.storage.exists(layout.pending_report_path(trained.context.run_id))
    published = cloud.pulled(events.EVALUATION_COMPLETED)
    evaluator.reports.drain()
    page = cloud.storage.read(paths.report)
    data = cloud.storage.read_json(paths.plots)
    # The report lost: the next delivery draws it again.
    cloud.storage.delete(paths.report)
    cloud.storage.delete(paths.plots)
    again = evaluate(trained, evaluator)
    evaluator.reports.drain()
    # The plot data kept, the page lost: drawn from plots.json.
    cloud.storage.delete(paths.report)
    third = evaluate(trained, evaluator)
    evaluator.reports.drain()

    assert first.status == "passed" and first.detail["report"] == "queued"
    assert marked
    assert not cloud.storage.exists(layout.pending_report_path(trained.context.run_id))
    assert published[0].report_uri == cloud.storage.uri(paths.report)
    assert page is not None and data is not None
    assert [p["kind"] for p in data["plots"]] == [
        "confusion_matrix",
        "roc",
        "precision_recall",
        "calibration",
        "permutation_importance",
    ]
    assert len(re.findall(r"<svg\b", page.data.decode())) == len(data["plots"])
    assert again.status == "duplicate" and again.detail["report"] == "queued"
    assert third.status == "duplicate" and third.detail["report"] == "queued"
    rewritten = cloud.storage.read(paths.report)
    assert rewritten is not None and rewritten.data == page.data
    assert cloud.storage.read_json(paths.plots) == data
    assert evaluate(trained, evaluator).detail["report"] == "exists"


def test_the_champions_recorded_importances_are_shown_beside_this_runs(cloud: Cloud) -> None:
    config = parse_config(IRIS)
    evaluator = Evaluator(cloud.storage, cloud.publisher, "test")
    champion_run = _train_in(cloud.storage, config, IRIS_CSV)
    evaluate(champion_run, evaluator)
    evaluator.reports.drain()
    registry = Registry(cloud.storage)
    model_bytes = cloud.storage.read(cloud.storage.path_of(champion_run.model_uri))
    assert model_bytes is not None
    version, _ = registry.register(
        "iris-classifier", champion_run.context.run_id, model_bytes.data, {}
    )
    registry.move_alias("iris-classifier", version.version)
    challenger = parse_config(IRIS.replace("n_estimators: 100", "n_estimators: 20"))

    trained = _train_in(cloud.storage, challenger, IRIS_CSV)
    evaluate(trained, evaluator)
    evaluator.reports.drain()

    champion_plots = cloud.storage.read_json(layout.RunPaths(champion_run.context.run_id).plots)
    data = cloud.storage.read_json(layout.RunPaths(trained.context.run_id).plots)
    importance = data["plots"][-1]
    recorded = champion_plots["plots"][-1]
    assert importance["kind"] == "permutation_importance"
    assert importance["holdout_of_run"] == trained.context.run_id
    assert importance["champion"]["version"] == version.version
    assert importance["champion"]["holdout_of_run"] == champion_run.context.run_id
    assert importance["champion"]["features"] == recorded["features"]
    assert recorded["champion"] is None  # the first run had no champion
    page = cloud.storage.read(layout.RunPaths(trained.context.run_id).report)
    assert page is not None and f"champion v{version.version}" in page.data.decode()


def test_an_instance_starting_draws_the_reports_a_stopped_one_left(cloud: Cloud) -> None:
    trained = _train_in(cloud.storage, parse_config(IRIS), IRIS_CSV)
    run_id = trained.context.run_id
    paths = layout.RunPaths(run_id)
    cloud.storage.write(paths.training, events.to_json(trained).encode())  # as the job does
    stopped = Evaluator(cloud.storage, cloud.publisher, "test")
    # Stopped after answering the push, before drawing: its queue is never run.
    stopped.reports.submit = lambda *_: None  # type: ignore[method-assign]
    evaluate(trained, stopped)
    left = cloud.storage.exists(layout.pending_report_path(run_id))
    drawn_before = cloud.storage.exists(paths.report)

    started = Evaluator(cloud.storage, cloud.publisher, "test")
    swept = started.reports.sweep()
    started.reports.drain()

    assert left and not drawn_before
    assert swept == [run_id]
    page = cloud.storage.read(paths.report)
    assert page is not None and page.data.count(b"<svg") == 5
    assert not cloud.storage.exists(layout.pending_report_path(run_id))


def test_a_report_that_cannot_be_written_leaves_the_verdict_standing(cloud: Cloud) -> None:
    trained = _train_in(cloud.storage, parse_config(IRIS), IRIS_CSV)
    paths = layout.RunPaths(trained.context.run_id)
    evaluator = Evaluator(cloud.storage, cloud.publisher, "test")
    evaluate(trained, evaluator)
    evaluator.reports.drain()
    cloud.storage.delete(paths.report)
    cloud.storage.delete(paths.plots)
    cloud.storage.delete(cloud.storage.path_of(trained.dataset.uri))

    result = evaluate(trained, evaluator)
    done = evaluator.reports.draw(trained.context.run_id, None, trained)

    assert result.outcome is Outcome.DONE and result.status == "duplicate"
    assert done.startswith("not written: ") and trained.dataset.uri in done
    assert cloud.storage.read(paths.evaluation) is not None
    assert not cloud.storage.exists(paths.report)
    evaluator.reports.drain()
    assert not cloud.storage.exists(layout.pending_report_path(trained.context.run_id))


class _KilledOnce(Drawer):
    """The first worker reads the page and dies without answering (killed mid-page)."""

    def __init__(self) -> None:
        super().__init__(timeout=60)
        self.started = 0

    def _worker(self) -> subprocess.Popen[str]:
        if self._proc is None or self._proc.poll() is not None:
            self.started += 1
            if self.started == 1:
                self._proc = subprocess.Popen(
                    [sys.executable, "-c", "import sys; sys.stdin.readline()"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                )
        return super()._worker()


def test_a_report_worker_killed_mid_page_is_replaced_and_the_page_drawn(cloud: Cloud) -> None:
    trained = _train_in(cloud.storage, parse_config(IRIS), IRIS_CSV)
    paths = layout.RunPaths(trained.context.run_id)
    drawer = _KilledOnce()
    evaluator = Evaluator(cloud.storage, cloud.publisher, "test", drawer=drawer)
    try:
        evaluate(trained, evaluator)
        evaluator.reports.drain()
    finally:
        drawer.close()

    assert drawer.started == 2
    page = cloud.storage.read(paths.report)
    assert page is not None and page.data.count(b"<svg") == 5
    assert not cloud.storage.exists(layout.pending_report_path(trained.context.run_id))


def test_the_report_shows_the_estimate_of_the_steps_so_far_without_the_deployment(
    cloud: Cloud,
) -> None:
    costs = service_runtime.cost_environment("local")
    trained = _train_in(cloud.storage, parse_config(IRIS), IRIS_CSV)
    run_id = trained.context.run_id
    # The job's records, as the trainer and the job write them: started 10 s before it ended.
    paths = layout.RunPaths(run_id)
    started = events_pb2.TrainingStarted(context=trained.context, dataset=trained.dataset)
    started.context.event_time.seconds -= 10
    cloud.storage.write(paths.started, events.to_json(started).encode())
    cloud.storage.write(paths.training, events.to_json(trained).encode())
    evaluator = Evaluator(
        cloud.storage,
        cloud.publisher,
        "test",
        cost_sizes=costs["MLPIPE_COST_SIZES"],
        prices=costs["MLPIPE_PRICES"],
    )

    evaluate(trained, evaluator)
    evaluator.reports.drain()

    found = cloud.storage.read(layout.RunPaths(run_id).report)
    assert found is not None
    page = found.data.decode()
    section = re.search(r"<h2>Cost so far \(estimate\)</h2>(.*?)<h2>Lineage", page, re.S)
    assert section is not None, page
    text = section.group(1)
    # What the records held when the report was drawn: the steps up to the evaluation.
    expected = run_cost.estimate_in_bucket(
        cloud.storage,
        run_id,
        costs["MLPIPE_COST_SIZES"],
        costs["MLPIPE_PRICES"],
        steps_of=("ingest", "trainer", "training job", "evaluator"),
    )
    rows = re.findall(r"<tr><td>([a-z ]+)</td><td>[0-9.]*</td>", text)
    assert rows == [s.step for s in expected.steps] + ["storage"]
    assert "deployer" not in rows and "evaluator" in rows
    for step in expected.steps:
        assert f"<td>{step.cost:.6f}</td>" in text
    assert "Deployment is not included" in text
    assert f"At list prices of {expected.as_of} in {expected.region}" in text


def test_a_report_without_sizes_or_prices_says_why_it_has_no_estimate(cloud: Cloud) -> None:
    trained = _train_in(cloud.storage, parse_config(IRIS), IRIS_CSV)
    evaluator = Evaluator(cloud.storage, cloud.publisher, "test")

    evaluate(trained, evaluator)
    evaluator.reports.drain()

    found = cloud.storage.read(layout.RunPaths(trained.context.run_id).report)
    assert found is not None
    assert (
        "<p id='cost-none'>No estimate: no sizes or prices given (MLPIPE_COST_SIZES is not "
        "set).</p>" in found.data.decode()
    )
