"""Event encoding and decoding (binary and proto3 JSON), topics, and run contexts."""

from __future__ import annotations

import datetime as dt

import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from mlpipe.messaging import events
from mlpipe.v1 import events_pb2


def _ingest_request() -> events_pb2.IngestRequest:
    record = struct_pb2.Struct()
    record.update({"sepal_length": 5.1, "species": "setosa"})
    return events_pb2.IngestRequest(
        request_id="req-1",
        dataset="iris",
        format=events_pb2.DATA_FORMAT_PARQUET,
        requested_at=events.timestamp(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)),
        inline=events_pb2.InlineRows(records=[record]),
    )


def test_binary_round_trip_keeps_every_field() -> None:
    original = events_pb2.TrainingCompleted(
        context=events_pb2.RunContext(run_id="0123456789abcdef", pipeline="iris"),
        dataset=events_pb2.DatasetRef(uri="gs://b/datasets/iris/x.csv", generation=7),
        model_uri="gs://b/runs/0123456789abcdef/model.joblib",
        train_rows=120,
        fit_seconds=1.5,
    )

    decoded = events.decode(events_pb2.TrainingCompleted, events.encode(original))

    assert decoded == original
    assert decoded.dataset.generation == 7


def test_binary_encoding_is_deterministic_for_maps() -> None:
    a = events_pb2.EvaluationCompleted(metrics={"accuracy": 0.9, "macro_f1": 0.8})
    b = events_pb2.EvaluationCompleted(metrics={"macro_f1": 0.8, "accuracy": 0.9})

    assert events.encode(a) == events.encode(b)


CAMEL_JSON = b"""{
  "requestId": "req-1",
  "dataset": "iris",
  "format": "DATA_FORMAT_PARQUET",
  "requestedAt": "2026-01-02T03:04:05Z",
  "inline": {"records": [{"sepal_length": 5.1, "species": "setosa"}]}
}"""

SNAKE_JSON = b"""{
  "request_id": "req-1",
  "dataset": "iris",
  "format": "DATA_FORMAT_PARQUET",
  "requested_at": "2026-01-02T03:04:05Z",
  "inline": {"records": [{"sepal_length": 5.1, "species": "setosa"}]}
}"""


@pytest.mark.parametrize("data", [CAMEL_JSON, SNAKE_JSON], ids=["camelCase", "field_names"])
def test_proto3_json_is_decoded(data: bytes) -> None:
    decoded = events.decode(events_pb2.IngestRequest, data)

    assert decoded == _ingest_request()
    assert decoded.WhichOneof("source") == "inline"
    assert events.to_dict(decoded.inline.records[0]) == {
        "sepal_length": 5.1,
        "species": "setosa",
    }


def test_json_after_leading_whitespace_is_still_json() -> None:
    decoded = events.decode(events_pb2.IngestRequest, b" \n\t\r\n" + CAMEL_JSON)

    assert decoded.request_id == "req-1"


@pytest.mark.parametrize("encoding", ["JSON", "json"])
def test_the_json_encoding_attribute_is_honoured(encoding: str) -> None:
    decoded = events.decode(events_pb2.IngestRequest, CAMEL_JSON, encoding)

    assert decoded.dataset == "iris"


def test_the_binary_encoding_attribute_is_honoured() -> None:
    data = events.encode(_ingest_request())

    assert events.decode(events_pb2.IngestRequest, data, "BINARY") == _ingest_request()


def test_json_under_a_binary_encoding_attribute_is_not_read_as_json() -> None:
    with pytest.raises(events.EventDecodeError, match="not a valid binary"):
        events.decode(events_pb2.IngestRequest, CAMEL_JSON, "BINARY")


def test_binary_under_a_json_encoding_attribute_is_refused() -> None:
    data = events.encode(_ingest_request())

    with pytest.raises(events.EventDecodeError, match="not a valid JSON"):
        events.decode(events_pb2.IngestRequest, data, "JSON")


@pytest.mark.parametrize("data", [b"\xff\xff\xff", b"\x80", b"\n\x05ab"])
def test_garbage_bytes_raise_a_decode_error_naming_the_type(data: bytes) -> None:
    with pytest.raises(events.EventDecodeError) as caught:
        events.decode(events_pb2.IngestRequest, data)

    assert "binary mlpipe.v1.IngestRequest" in str(caught.value)
    assert f"({len(data)} bytes)" in str(caught.value)


@pytest.mark.parametrize(
    ("data", "detail"),
    [
        (b'{"requestId": ', "Failed to load JSON"),
        (b'{"nope": 1}', 'no field named "nope"'),
        (b'{"dataset": 5}', "dataset"),
        (b'{"format": "DATA_FORMAT_XML"}', "DATA_FORMAT_XML"),
        (b'{"inline": {"records": [1]}}', "records"),
        (b'{"dataset": "\xff"}', "utf-8"),
    ],
)
def test_invalid_json_raises_a_decode_error_naming_the_type(data: bytes, detail: str) -> None:
    with pytest.raises(events.EventDecodeError) as caught:
        events.decode(events_pb2.IngestRequest, data)

    assert "JSON mlpipe.v1.IngestRequest" in str(caught.value)
    assert detail in str(caught.value)


def test_to_json_uses_field_names_and_decodes_back() -> None:
    original = _ingest_request()

    text = events.to_json(original)

    assert '"request_id": "req-1"' in text
    assert events.from_json(events_pb2.IngestRequest, text) == original


@pytest.mark.parametrize(
    ("message", "topic"),
    [
        (events_pb2.IngestRequest(), "ingest-requests"),
        (events_pb2.DatasetLanded(), "datasets-landed"),
        (events_pb2.TrainingStarted(), "training-started"),
        (events_pb2.TrainingCompleted(), "training-completed"),
        (events_pb2.EvaluationCompleted(), "evaluation-completed"),
        (events_pb2.DeploymentCompleted(), "deployment-completed"),
        (events_pb2.PipelineFailed(), "pipeline-failures"),
    ],
)
def test_each_event_type_has_its_topic(message: Message, topic: str) -> None:
    assert events.topic_for(message) == topic


def test_every_event_type_is_mapped_to_a_topic() -> None:
    assert set(events.EVENT_TYPES) == set(events.TOPIC_FOR_EVENT)


def test_a_message_that_is_not_an_event_has_no_topic() -> None:
    with pytest.raises(KeyError):
        events.topic_for(events_pb2.RunContext())


def test_next_context_keeps_the_run_and_names_the_new_producer() -> None:
    requested = events.timestamp(dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    previous = events.context(
        producer="ingest",
        code_version="abc123",
        run_id="0123456789abcdef",
        pipeline="iris",
        config_sha256="f" * 64,
        request_id="req-1",
    )
    previous.requested_at.CopyFrom(requested)
    previous.event_time.CopyFrom(events.timestamp(dt.datetime(2020, 1, 1, tzinfo=dt.UTC)))

    following = events.next_context(previous, producer="trainer", code_version="def456")

    assert following.run_id == "0123456789abcdef"
    assert following.request_id == "req-1"
    assert following.pipeline == "iris"
    assert following.config_sha256 == "f" * 64
    assert following.requested_at == requested
    assert following.producer == "trainer"
    assert following.code_version == "def456"
    assert following.event_time.ToDatetime() > dt.datetime(2025, 1, 1)


def test_next_context_leaves_the_previous_context_unchanged() -> None:
    previous = events.context(producer="ingest", code_version="abc123", run_id="r")
    before = events_pb2.RunContext()
    before.CopyFrom(previous)

    events.next_context(previous, producer="trainer", code_version="def456")

    assert previous == before


def test_a_binary_event_that_looks_like_json_after_its_first_byte_is_read_as_binary() -> None:
    # Field 1's tag is 0x0a, a newline: with a context of 123 bytes, the first non-blank byte
    # is `{` and the data looks like JSON to a sniffer that skips blanks.
    failed = events_pb2.PipelineFailed(
        context=events_pb2.RunContext(run_id="0" * 16, producer="ingest", request_id="r" * 95),
        reason="missing_column",
    )
    data = failed.SerializeToString()
    assert data[:2] == b"\n{"

    assert events.decode(events_pb2.PipelineFailed, data) == failed
    with pytest.raises(events.EventDecodeError, match="not a valid JSON"):
        events.decode(events_pb2.PipelineFailed, b"\n{not json")
    with pytest.raises(events.EventDecodeError, match="not a valid JSON"):
        events.decode(events_pb2.PipelineFailed, data, "JSON")
