"""The exports mechanism on its own (mlpipe_ingest.exports), with a scripted backend and a
clock the test moves, on the emulators: when checks poll, back off and give up, and what a
backend may bring (cancel, its own landing). The Earth Engine backend runs through it in
test_sources_earthengine.py."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import pytest

from mlpipe.messaging import events
from mlpipe.messaging.push import PushMessage, make_envelope
from mlpipe.store import layout
from mlpipe.v1 import events_pb2
from mlpipe_ingest.exports import Exports, ExportStatus, check_exports
from tests.integration.conftest import Cloud

pytestmark = pytest.mark.integration

T0 = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


@dataclass
class Clock:
    now: dt.datetime = T0

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += dt.timedelta(seconds=seconds)


@dataclass
class ScriptedBackend:
    """Answers each poll with the next scripted status (the last one repeats)."""

    statuses: list[ExportStatus]
    kind: str = "earth_engine"
    started: list[str] = field(default_factory=list)
    polls: int = 0
    cancelled: list[dict[str, str]] = field(default_factory=list)

    def start(
        self, request: events_pb2.IngestRequest, staging_uri: str, export_id: str
    ) -> dict[str, str]:
        self.started.append(export_id)
        return {"job": f"job-{export_id}"}

    def poll(self, recorded: dict[str, str]) -> ExportStatus:
        status = self.statuses[min(self.polls, len(self.statuses) - 1)]
        self.polls += 1
        return status

    def cancel(self, recorded: dict[str, str]) -> None:
        self.cancelled.append(recorded)


def landed_event(uri: str) -> events_pb2.DatasetLanded:
    return events_pb2.DatasetLanded(
        context=events_pb2.RunContext(run_id="0123456789abcdef", request_id="r1"),
        dataset=events_pb2.DatasetRef(uri=uri, name="crops"),
    )


def make(cloud: Cloud, backend: ScriptedBackend, clock: Clock) -> Exports:
    def land(
        request: events_pb2.IngestRequest, objects: tuple[str, ...], when: dt.datetime
    ) -> events_pb2.DatasetLanded:
        return landed_event(objects[0].replace("ingest/exports", "datasets/crops"))

    return Exports(
        cloud.storage,
        cloud.publisher,
        {backend.kind: backend},
        land=land,
        failures=cloud.reporter("ingest"),
        timeout_seconds=600,
        backoff_seconds=30,
        max_backoff_seconds=100,
        clock=clock,
    )


def begin(exports: Exports) -> str:
    request = events_pb2.IngestRequest(request_id="r1", dataset="crops")
    request.earth_engine.class_property = "crop"
    message = PushMessage(events.encode(request), {}, "m1", T0)
    result = exports.begin(request, message)
    assert result.status == "exporting", result
    return str(result.detail["export_id"])


def record(cloud: Cloud, export_id: str) -> dict:
    found = cloud.storage.read_json(layout.export_record_path(export_id))
    assert found is not None
    return found


def test_transient_errors_back_off_doubling_up_to_the_limit(cloud: Cloud) -> None:
    quota = ExportStatus("running", reason="quota", message="429", transient=True)
    backend = ScriptedBackend([quota, quota, quota, quota, ExportStatus("running")])
    clock = Clock()
    exports = make(cloud, backend, clock)
    export_id = begin(exports)

    waits = []
    for _ in range(4):
        exports.check(export_id)
        next_at = dt.datetime.fromisoformat(record(cloud, export_id)["next_check_at"])
        waits.append((next_at - clock.now).total_seconds())
        assert "waiting_until" in exports.check(export_id)  # no poll while it waits
        clock.advance(waits[-1])
    exports.check(export_id)

    assert waits == [30, 60, 100, 100]
    assert backend.polls == 5
    assert record(cloud, export_id)["transient_failures"] == 0  # reset once it answered


def test_an_export_past_its_time_limit_is_cancelled_and_reported(cloud: Cloud) -> None:
    cloud.watch(events.PIPELINE_FAILURES)
    backend = ScriptedBackend([ExportStatus("running")])
    clock = Clock()
    exports = make(cloud, backend, clock)
    export_id = begin(exports)

    clock.advance(599)
    assert exports.check(export_id)["state"] == "exporting"
    clock.advance(1)
    done = exports.check(export_id)

    assert done["state"] == "failed" and done["reason"] == "export_timeout"
    assert backend.cancelled == [{"job": f"job-{export_id}"}]
    failed = cloud.pulled(events.PIPELINE_FAILURES)
    assert [f.reason for f in failed] == ["export_timeout"]
    assert "600s" in failed[0].message and f"job-{export_id}" in failed[0].message
    assert record(cloud, export_id)["failure"]["quarantine_uri"] == failed[0].quarantine_uri
    assert exports.check(export_id)["state"] == "failed"  # finished: never polled again
    assert backend.polls == 2


def test_a_backend_with_its_own_landing_lands_its_way(cloud: Cloud) -> None:
    cloud.watch(events.DATASETS_LANDED)
    backend = ScriptedBackend(
        [ExportStatus("done", objects=("gs://b/ingest/exports/x/0.parquet",))]
    )
    own: list[tuple[tuple[str, ...], dict[str, str]]] = []

    def land(
        request: events_pb2.IngestRequest,
        objects: tuple[str, ...],
        when: dt.datetime,
        recorded: dict[str, str],
        **context: object,
    ) -> events_pb2.DatasetLanded:
        assert context["storage"] is cloud.storage
        own.append((objects, recorded))
        return landed_event("gs://b/datasets/crops/dt=2026-06-01/copied.parquet")

    backend.land = land  # type: ignore[attr-defined]
    exports = make(cloud, backend, Clock())
    export_id = begin(exports)

    done = exports.check(export_id)

    assert own == [(("gs://b/ingest/exports/x/0.parquet",), {"job": f"job-{export_id}"})]
    assert done["dataset_uri"] == "gs://b/datasets/crops/dt=2026-06-01/copied.parquet"
    assert [e.dataset.uri for e in cloud.pulled(events.DATASETS_LANDED)] == [done["dataset_uri"]]


def test_check_all_reads_only_records_not_staged_files(cloud: Cloud) -> None:
    backend = ScriptedBackend([ExportStatus("running")])
    exports = make(cloud, backend, Clock())
    export_id = begin(exports)
    cloud.storage.write(layout.export_staging_prefix(export_id) + "samples.csv", b"a\n1\n")

    checked = exports.check_all()

    assert [c["export_id"] for c in checked] == [export_id]
    assert backend.started == [export_id]


def test_a_push_body_is_begun_and_a_bad_one_reported_with_the_body_kept(cloud: Cloud) -> None:
    cloud.watch(events.PIPELINE_FAILURES)
    backend = ScriptedBackend([ExportStatus("running")])
    exports = Exports(cloud.storage, cloud.publisher, {backend.kind: backend})
    request = events_pb2.IngestRequest(request_id="r1", dataset="crops")
    request.earth_engine.class_property = "crop"

    begun = exports.push(make_envelope(events.encode(request), message_id="m1"))
    request.dataset = ""
    refused = exports.push(make_envelope(events.encode(request), message_id="m2"))

    assert begun.status == "exporting" and backend.started == [begun.detail["export_id"]]
    assert refused.status == "rejected"
    failed = cloud.pulled(events.PIPELINE_FAILURES)
    assert [f.reason for f in failed] == ["invalid_message"]
    assert cloud.storage.read(cloud.storage.path_of(failed[0].quarantine_uri)) is not None
    assert [c["export_id"] for c in check_exports(exports)] == [begun.detail["export_id"]]
