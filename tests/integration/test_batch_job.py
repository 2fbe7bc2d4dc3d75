"""The batch job (mlpipe_batch, an Apache Beam pipeline) on the DirectRunner against the GCS
and Pub/Sub emulators: scoring, the outputs' layout, the metrics last, and each bad input."""

from __future__ import annotations

import datetime as dt
import io
import time
from concurrent.futures import ThreadPoolExecutor

import fastavro
import pandas as pd
import pytest

from mlpipe.errors import PermanentError
from mlpipe.messaging import events, topology
from mlpipe.messaging.batch_jobs import WRITE_REJECTED, JobSpec
from mlpipe.messaging.push import make_envelope
from mlpipe.ml.scoring import load_version
from mlpipe.store import layout
from mlpipe.store.registry import Registry
from mlpipe.v1 import events_pb2
from mlpipe_batch.pipeline import run
from tests.conftest import wait_until
from tests.integration.conftest import Cloud
from tests.integration.test_serving import deploy, predictor, trained

pytestmark = pytest.mark.integration

# One process, in memory: these tests are about what the pipeline does, not its runner.
DIRECT = ["--runner=DirectRunner", "--direct_running_mode=in_memory"]
DAY = dt.date(2026, 12, 2)


@pytest.fixture
def iris_model(cloud: Cloud, iris_config, iris_csv: str) -> events_pb2.DeploymentCompleted:
    return deploy(cloud, trained(cloud, iris_config, iris_csv))


def spec_for(cloud: Cloud, batch_id: str, input_path: str, **fields) -> JobSpec:
    return JobSpec(
        project=cloud.project,
        bucket=cloud.storage.bucket_name,
        batch_id=batch_id,
        model=fields.pop("model", "iris-classifier"),
        version=fields.pop("version", 1),
        input_uri=cloud.storage.uri(input_path),
        output_prefix=layout.batch_job_output_prefix("iris-classifier", DAY, batch_id),
        **fields,
    )


def iris_inputs(iris_csv: str) -> pd.DataFrame:
    frame = pd.read_csv(io.StringIO(iris_csv)).drop(columns=["species"])
    frame.insert(0, "id", [f"r{i}" for i in range(len(frame))])
    return frame


def avro_records(cloud: Cloud, uris: list[str]) -> list[dict]:
    out: list[dict] = []
    for uri in uris:
        found = cloud.storage.read(cloud.storage.path_of(uri))
        assert found is not None, uri
        out += list(fastavro.reader(io.BytesIO(found.data)))
    return out


def test_the_job_scores_like_the_model_itself_into_sharded_avro_then_the_metrics(
    cloud: Cloud, iris_model: events_pb2.DeploymentCompleted, iris_csv: str
) -> None:
    frame = iris_inputs(iris_csv)
    cloud.storage.write("inputs/iris.parquet", frame.to_parquet(row_group_size=64))
    spec = spec_for(
        cloud, "b1", "inputs/iris.parquet", key_column="id", chunk_rows=25, publish=False
    )

    metrics = run(spec, DIRECT)

    model = load_version(Registry(cloud.storage), "iris-classifier", 1)
    expected = dict(zip(frame["id"], map(str, model.predict_frame(frame)), strict=True))
    assert metrics is not None
    records = avro_records(cloud, metrics["output_uris"])
    assert {r["key"]: r["prediction"] for r in records} == expected
    assert len(records) == 150 and metrics["rows"] == 150 and metrics["rejected_rows"] == 0
    prefix = cloud.storage.uri(spec.output_prefix)
    assert all(u.startswith(f"{prefix}predictions-") for u in metrics["output_uris"])
    assert all(u.endswith(".avro") for u in metrics["output_uris"])
    # Nothing else is left under the output: Beam's temporary files are gone.
    listed = {cloud.storage.uri(p) for p in cloud.storage.list(spec.output_prefix)}
    assert listed == set(metrics["output_uris"])
    stored = cloud.storage.read_json(layout.batch_metrics_path("iris-classifier", "b1"))
    assert stored == metrics and stored["model_version"] == 1
    # Written last: after every shard.
    metrics_time = cloud.storage.bucket.get_blob(spec.metrics_path).updated
    shard_times = [cloud.storage.bucket.get_blob(cloud.storage.path_of(u)).updated for u in listed]
    assert max(shard_times) <= metrics_time


def test_an_avro_input_is_scored_like_the_model_itself(
    cloud: Cloud, iris_model: events_pb2.DeploymentCompleted, iris_csv: str
) -> None:
    frame = iris_inputs(iris_csv)
    buffer = io.BytesIO()
    schema = {
        "type": "record",
        "name": "Row",
        "fields": [{"name": "id", "type": "string"}]
        + [{"name": c, "type": "double"} for c in frame.columns[1:]],
    }
    fastavro.writer(buffer, fastavro.parse_schema(schema), frame.to_dict("records"))
    cloud.storage.write("inputs/iris.avro", buffer.getvalue())
    spec = spec_for(
        cloud, "avro", "inputs/iris.avro", key_column="id", chunk_rows=40, publish=False
    )

    metrics = run(spec, DIRECT)

    model = load_version(Registry(cloud.storage), "iris-classifier", 1)
    expected = dict(zip(frame["id"], map(str, model.predict_frame(frame)), strict=True))
    assert metrics is not None and metrics["rows"] == 150
    records = avro_records(cloud, metrics["output_uris"])
    assert {r["key"]: r["prediction"] for r in records} == expected


# --- bad inputs: each names the file and its first bad row; nothing is published --------------
def job(spec: JobSpec) -> int:
    from mlpipe_batch.__main__ import main

    return main(["--spec", spec.to_json(), *DIRECT])


def nothing_published(cloud: Cloud, spec: JobSpec) -> None:
    assert not cloud.storage.exists(spec.metrics_path)
    assert cloud.storage.list(spec.output_prefix) == []


def iris_csv_with(iris_csv: str, **cells: str) -> str:
    """The iris inputs as CSV with an id column; `cells` sets r<row>=<column>:<value>."""
    frame = iris_inputs(iris_csv).astype(object)
    for row, change in cells.items():
        column, value = change.split(":", 1)
        frame.loc[int(row.removeprefix("r")), column] = value
    return frame.to_csv(index=False)


def test_a_missing_feature_column_rejects_the_batch_naming_the_file(
    cloud: Cloud, iris_model: events_pb2.DeploymentCompleted, iris_csv: str
) -> None:
    frame = iris_inputs(iris_csv).drop(columns=["petal_width"])
    cloud.storage.write("inputs/narrow.csv", frame.to_csv(index=False).encode())
    spec = spec_for(cloud, "narrow", "inputs/narrow.csv", key_column="id", publish=False)

    status = job(spec)

    failure = cloud.storage.read_json(spec.failure_path)
    assert status == 2
    assert failure["reason"] == "missing_column"
    assert "inputs/narrow.csv" in failure["message"] and "petal_width" in failure["message"]
    nothing_published(cloud, spec)


def test_a_wrong_type_rejects_the_batch_naming_its_first_bad_row(
    cloud: Cloud, iris_model: events_pb2.DeploymentCompleted, iris_csv: str
) -> None:
    text = iris_csv_with(iris_csv, r120="sepal_width:wide", r7="petal_length:long")
    cloud.storage.write("inputs/typos.csv", text.encode())
    spec = spec_for(
        cloud, "typos", "inputs/typos.csv", key_column="id", chunk_rows=20, publish=False
    )

    status = job(spec)

    failure = cloud.storage.read_json(spec.failure_path)
    assert status == 2 and failure["reason"] == "invalid_rows"
    # Data row 8 (r7) is the first, though its chunk may be scored after row 121's.
    assert failure["row"] == 8 and failure["source"].endswith("inputs/typos.csv")
    assert "inputs/typos.csv row 8: petal_length is not a number" in failure["message"]
    assert "2 bad row(s) of 150" in failure["message"]
    nothing_published(cloud, spec)


def test_wrong_types_go_to_rejected_beside_the_output_with_their_reason(
    cloud: Cloud, iris_model: events_pb2.DeploymentCompleted, iris_csv: str
) -> None:
    text = iris_csv_with(iris_csv, r120="sepal_width:wide", r7="petal_length:long")
    cloud.storage.write("inputs/typos.csv", text.encode())
    spec = spec_for(
        cloud,
        "typos-kept",
        "inputs/typos.csv",
        key_column="id",
        chunk_rows=20,
        bad_rows=WRITE_REJECTED,
        publish=False,
    )

    assert job(spec) == 0

    metrics = cloud.storage.read_json(spec.metrics_path)
    assert metrics["rows"] == 150 and metrics["scored_rows"] == 148
    assert metrics["rejected_rows"] == 2
    assert metrics["first_rejected_row"]["row"] == 8
    assert all(
        u.startswith(cloud.storage.uri(f"{spec.output_prefix}rejected/"))
        for u in metrics["rejected_uris"]
    )
    rejected = sorted(avro_records(cloud, metrics["rejected_uris"]), key=lambda r: r["row"])
    assert [(r["key"], r["row"], r["reason"]) for r in rejected] == [
        ("r7", 8, "petal_length is not a number"),
        ("r120", 121, "sepal_width is not a number"),
    ]
    assert '"petal_length": "long"' in rejected[0]["values"]
    scored = avro_records(cloud, metrics["output_uris"])
    assert len(scored) == 148 and {"r7", "r120"}.isdisjoint(r["key"] for r in scored)


def test_an_unreadable_input_fails_the_batch_naming_the_file(
    cloud: Cloud, iris_model: events_pb2.DeploymentCompleted
) -> None:
    cloud.storage.write("inputs/broken.parquet", b"PAR1 this is not parquet")
    spec = spec_for(cloud, "broken", "inputs/broken.parquet", publish=False)

    status = job(spec)

    failure = cloud.storage.read_json(spec.failure_path)
    assert status != 0 and failure["reason"] == "unreadable_dataset"
    assert "inputs/broken.parquet is not valid parquet" in failure["message"]
    nothing_published(cloud, spec)


def test_a_model_version_that_does_not_exist_fails_before_anything_runs(
    cloud: Cloud, iris_model: events_pb2.DeploymentCompleted, iris_csv: str
) -> None:
    cloud.storage.write("inputs/iris.csv", iris_csv.encode())
    spec = spec_for(cloud, "v9", "inputs/iris.csv", version=9, publish=False)

    status = job(spec)

    failure = cloud.storage.read_json(spec.failure_path)
    assert status == 2 and failure["reason"] == "unknown_model_version"
    assert "iris-classifier version 9 is not in the registry" in failure["message"]
    nothing_published(cloud, spec)


def test_a_failure_partway_publishes_nothing_complete(
    cloud: Cloud, iris_model: events_pb2.DeploymentCompleted, iris_csv: str
) -> None:
    # Two inputs by a glob: the first is scored and its shards written; the second breaks.
    cloud.storage.write("inputs/many/a.csv", iris_csv_with(iris_csv).encode())
    cloud.storage.write("inputs/many/b.csv", b"id,sepal_length\n\xff\xfe,1\n")
    spec = spec_for(cloud, "partway", "inputs/many/*.csv", key_column="id", publish=False)

    status = job(spec)

    failure = cloud.storage.read_json(spec.failure_path)
    assert status != 0
    assert failure["reason"] in ("not_utf8", "missing_column")
    assert "inputs/many/b.csv" in failure["message"]
    nothing_published(cloud, spec)


# --- launching from the predictor's push step -------------------------------------------------
def push_request(served_url: str, cloud: Cloud, request: events_pb2.BatchPredictionRequest):
    import httpx

    subscription = f"projects/{cloud.project}/subscriptions/{topology.BATCH_PUSH}"
    return httpx.post(
        f"{served_url}/pubsub/push",
        content=make_envelope(events.encode(request), subscription=subscription),
        timeout=60,
    )


def test_one_job_per_batch_however_often_it_is_delivered_then_its_completion(
    cloud: Cloud,
    monkeypatch: pytest.MonkeyPatch,
    iris_model: events_pb2.DeploymentCompleted,
    iris_csv: str,
) -> None:
    cloud.storage.write("inputs/iris.csv", iris_csv_with(iris_csv).encode())
    request = events_pb2.BatchPredictionRequest(
        batch_id="launched",
        model_name="iris-classifier",
        input_uri=cloud.storage.uri("inputs/iris.csv"),
        key_column="id",
        context=events_pb2.RunContext(request_id="req-1"),
    )
    cloud.watch(events.BATCH_PREDICTIONS_COMPLETED)
    metrics_path = layout.batch_metrics_path("iris-classifier", "launched")
    job_path = layout.batch_job_path("iris-classifier", "launched")

    # Every input goes to a job (none is small enough for the in-process path).
    with predictor(cloud, monkeypatch, MLPIPE_BATCH_INLINE_MAX_BYTES="0") as served:
        # Four deliveries at once, as redeliveries to several instances would arrive.
        with ThreadPoolExecutor(4) as pool:
            first = list(pool.map(lambda _: push_request(served.url, cloud, request), range(4)))
        record = cloud.storage.read(job_path)
        wait_until(lambda: cloud.storage.exists(metrics_path), 120, "the job's metrics")
        done = push_request(served.url, cloud, request)
        again = push_request(served.url, cloud, request)

    assert [r.status_code for r in first] == [503] * 4
    assert record is not None
    # One launch: the record was created once and never replaced but for its handle.
    job = cloud.storage.read_json(job_path)
    assert job["launcher"] == "local" and job["created_at"] == record.json()["created_at"]
    assert "pid" in job["handle"]
    assert done.status_code == 200 and done.json()["status"] == "succeeded", done.text
    assert done.json()["rows"] == 150 and done.json()["runner"] == "DirectRunner"
    assert again.json()["status"] == "duplicate"
    published = cloud.pulled(events.BATCH_PREDICTIONS_COMPLETED, expect=2)
    # The job's own (right after its metrics) and the step's recorded one: the same batch.
    assert {(e.batch_id, e.rows, e.model_version) for e in published} == {("launched", 150, 1)}
    assert {e.context.producer for e in published} == {"batch-job", "predictor"}
    assert all(e.context.request_id == "req-1" for e in published)
    metrics = cloud.storage.read_json(metrics_path)
    assert list(published[0].output_uris) == metrics["output_uris"]


def test_a_job_that_dies_before_its_metrics_is_a_failure_with_nothing_complete(
    cloud: Cloud,
    monkeypatch: pytest.MonkeyPatch,
    iris_model: events_pb2.DeploymentCompleted,
    iris_csv: str,
    tmp_path,
) -> None:
    cloud.storage.write("inputs/iris.csv", iris_csv_with(iris_csv).encode())
    request = events_pb2.BatchPredictionRequest(
        batch_id="dies",
        model_name="iris-classifier",
        input_uri=cloud.storage.uri("inputs/iris.csv"),
    )
    cloud.watch(events.BATCH_PREDICTIONS_COMPLETED, events.PIPELINE_FAILURES)
    job_path = layout.batch_job_path("iris-classifier", "dies")
    # The job inherits it: every shard is written, then the job's process is killed. In one
    # process (in_memory): a killed worker of the multi-processing runner leaves its driver
    # waiting, which only the job's deadline ends.
    monkeypatch.setenv("MLPIPE_FAULT_POINT", "batch.before_metrics")
    # The point leaves <dir>/<point> when it fires: the job got past writing its shards.
    (tmp_path / "fired").mkdir()
    monkeypatch.setenv("MLPIPE_FAULT_ONCE_DIR", str(tmp_path / "fired"))
    env = {"MLPIPE_BATCH_INLINE_MAX_BYTES": "0", "MLPIPE_BATCH_LOCAL_MODE": "in_memory"}

    with predictor(cloud, monkeypatch, **env) as served:
        first = push_request(served.url, cloud, request)
        spec = JobSpec.from_json(cloud.storage.read_json(job_path)["spec"])
        replies = [first]
        deadline = time.monotonic() + 120
        while replies[-1].status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.5)
            replies.append(push_request(served.url, cloud, request))

    last = replies[-1]
    assert first.status_code == 503
    assert last.status_code == 200 and last.json()["status"] == "rejected", last.text
    assert "batch_job_lost" in last.text or "ended without metrics" in last.text
    # Its shards were written (the job died at the point after them); with no metrics the
    # batch was never complete, and reporting it removed them.
    assert (tmp_path / "fired" / "batch.before_metrics").exists()
    assert not cloud.storage.exists(spec.metrics_path)
    assert cloud.storage.list(spec.output_prefix) == []
    failed = cloud.pulled(events.PIPELINE_FAILURES)
    assert len(failed) == 1 and failed[0].reason.startswith("batch_")
    assert "dies" in failed[0].message
    assert cloud.storage.exists(cloud.storage.path_of(failed[0].quarantine_uri))
    assert cloud.pulled(events.BATCH_PREDICTIONS_COMPLETED, expect=0, timeout=1) == []
    # Reported once: the job's records are gone, so a replay starts it again.
    assert not cloud.storage.exists(job_path)


def test_a_request_for_a_version_that_does_not_exist_starts_no_job(
    cloud: Cloud,
    monkeypatch: pytest.MonkeyPatch,
    iris_model: events_pb2.DeploymentCompleted,
    iris_csv: str,
) -> None:
    cloud.storage.write("inputs/iris.csv", iris_csv.encode())
    request = events_pb2.BatchPredictionRequest(
        batch_id="v9",
        model_name="iris-classifier",
        version=9,
        input_uri=cloud.storage.uri("inputs/iris.csv"),
    )
    cloud.watch(events.PIPELINE_FAILURES)

    with predictor(cloud, monkeypatch, MLPIPE_BATCH_INLINE_MAX_BYTES="0") as served:
        reply = push_request(served.url, cloud, request)

    assert reply.status_code == 200 and reply.json()["status"] == "rejected"
    assert "iris-classifier version 9 is not in the registry" in reply.json()["detail"]
    assert not cloud.storage.exists(layout.batch_job_path("iris-classifier", "v9"))
    failed = cloud.pulled(events.PIPELINE_FAILURES)
    assert [f.reason for f in failed] == ["unknown_model_version"]


class RefusingLauncher:
    """A launcher that cannot start jobs (as where mlpipe_batch is not installed)."""

    name = "refusing"

    def launch(self, spec: JobSpec) -> dict:
        raise PermanentError("batch_job_unavailable", f"batch {spec.batch_id}: not here")

    def state(self, handle: dict) -> str:
        raise AssertionError("nothing was launched to ask about")

    def stop(self, handle: dict) -> None:
        raise AssertionError("nothing was launched to stop")


def test_a_launch_that_fails_leaves_no_job_record_so_a_redelivery_may_launch(
    cloud: Cloud, iris_csv: str
) -> None:
    from mlpipe_predictor.launch import JobLaunch

    cloud.storage.write("inputs/iris.csv", iris_csv.encode())
    spec = spec_for(cloud, "refused", "inputs/iris.csv")

    with pytest.raises(PermanentError, match="not here"):
        JobLaunch(cloud.storage, RefusingLauncher()).follow(spec)

    assert not cloud.storage.exists(spec.job_path)
