"""Pub/Sub push envelopes and Cloud Storage notifications."""

from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import pytest

from mlpipe.errors import Held, TransientError
from mlpipe.messaging.push import (
    MAX_ENVELOPE_BYTES,
    EnvelopeError,
    PushMessage,
    make_envelope,
    parse_envelope,
    parse_object_notification,
)
from mlpipe.runtime.service import handle_push
from mlpipe.runtime.steps import Outcome, Router, StepResult, held, transient


def _body(message: Any, **envelope: Any) -> bytes:
    return json.dumps({"message": message, **envelope}).encode()


def test_parse_envelope_reads_what_make_envelope_builds() -> None:
    body = make_envelope(
        b"\x00\x01payload",
        {"event_type": "mlpipe.v1.DatasetLanded"},
        message_id="42",
        subscription="projects/p/subscriptions/trainer-push",
        publish_time="2026-01-02T03:04:05Z",
    )

    message = parse_envelope(body)

    assert message.data == b"\x00\x01payload"
    assert message.attributes == {"event_type": "mlpipe.v1.DatasetLanded"}
    assert message.message_id == "42"
    assert message.publish_time == dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    assert message.subscription == "projects/p/subscriptions/trainer-push"
    assert message.subscription_name == "trainer-push"
    assert message.raw == body


def test_the_delivery_attempt_and_ordering_key_are_read() -> None:
    body = _body({"data": "", "orderingKey": "iris"}, deliveryAttempt=3)

    message = parse_envelope(body)

    assert message.delivery_attempt == 3
    assert message.ordering_key == "iris"


@pytest.mark.parametrize("key", ["messageId", "message_id"])
def test_the_message_id_is_read_in_either_spelling(key: str) -> None:
    body = _body({"data": base64.b64encode(b"x").decode(), key: "m-7"})

    assert parse_envelope(body).message_id == "m-7"


def test_a_message_without_data_or_attributes_is_empty() -> None:
    message = parse_envelope(_body({}))

    assert message.data == b""
    assert message.attributes == {}


@pytest.mark.parametrize("body", [b"not json", b"\xff\xfe{", b""])
def test_a_body_that_is_not_json_is_refused(body: bytes) -> None:
    with pytest.raises(EnvelopeError, match="push body is not JSON"):
        parse_envelope(body)


@pytest.mark.parametrize(
    "body",
    [b"{}", b"[]", b'"message"', b'{"message": "hello"}', b'{"data": "eA=="}'],
)
def test_a_body_without_a_message_object_is_refused(body: bytes) -> None:
    with pytest.raises(EnvelopeError, match="no 'message' object"):
        parse_envelope(body)


@pytest.mark.parametrize("data", ["not base64!", "eA=", "e A=="])
def test_data_that_is_not_base64_is_refused(data: str) -> None:
    with pytest.raises(EnvelopeError, match=r"message\.data is not valid base64"):
        parse_envelope(_body({"data": data}))


@pytest.mark.parametrize("data", [123, ["eA=="], None])
def test_data_that_is_not_a_string_is_refused(data: Any) -> None:
    with pytest.raises(EnvelopeError, match=r"message\.data is not a base64 string"):
        parse_envelope(_body({"data": data}))


@pytest.mark.parametrize("attributes", [{"n": 1}, {"a": None}, ["a", "b"], {"a": {"b": "c"}}])
def test_attributes_that_are_not_strings_are_refused(attributes: Any) -> None:
    with pytest.raises(EnvelopeError, match=r"message\.attributes is not a map of strings"):
        parse_envelope(_body({"data": "", "attributes": attributes}))


def test_an_oversize_body_is_refused_before_parsing() -> None:
    body = b" " * (MAX_ENVELOPE_BYTES + 1)

    with pytest.raises(EnvelopeError, match=f"{MAX_ENVELOPE_BYTES + 1} bytes, over the"):
        parse_envelope(body)


def test_a_body_at_the_size_limit_is_parsed() -> None:
    body = make_envelope(b"")
    padded = body + b" " * (MAX_ENVELOPE_BYTES - len(body))

    assert parse_envelope(padded).data == b""


def test_a_non_numeric_delivery_attempt_is_an_envelope_error() -> None:
    with pytest.raises(EnvelopeError, match="deliveryAttempt is not an integer: 'soon'"):
        parse_envelope(_body({"data": ""}, deliveryAttempt="soon"))


GCS_ATTRIBUTES = {
    "bucketId": "landing",
    "objectId": "datasets/iris/dt=2026-01-02/abc.csv",
    "objectGeneration": "1767322800123456",
    "eventType": "OBJECT_FINALIZE",
    "payloadFormat": "JSON_API_V1",
}

OBJECT_RESOURCE = {
    "kind": "storage#object",
    "bucket": "landing",
    "name": "datasets/iris/dt=2026-01-02/abc.csv",
    "generation": "1767322800123456",
    "size": "4551",
    "contentType": "text/csv",
    "timeCreated": "2026-01-02T03:00:00.123Z",
    "metadata": {"sha256": "ab" * 32, "row_count": "150"},
}


def _push(data: bytes, attributes: dict[str, str]) -> PushMessage:
    return parse_envelope(make_envelope(data, attributes))


def test_a_storage_notification_is_read_from_attributes_and_resource() -> None:
    message = _push(json.dumps(OBJECT_RESOURCE).encode(), GCS_ATTRIBUTES)

    note = parse_object_notification(message)

    assert note.bucket == "landing"
    assert note.name == "datasets/iris/dt=2026-01-02/abc.csv"
    assert note.uri == "gs://landing/datasets/iris/dt=2026-01-02/abc.csv"
    assert note.generation == 1767322800123456
    assert note.event_type == "OBJECT_FINALIZE"
    assert note.metadata == {"sha256": "ab" * 32, "row_count": "150"}
    assert note.size == 4551
    assert note.content_type == "text/csv"
    assert note.time_created == dt.datetime(2026, 1, 2, 3, 0, 0, 123000, tzinfo=dt.UTC)


def test_the_generation_falls_back_to_the_resource() -> None:
    attributes = {k: v for k, v in GCS_ATTRIBUTES.items() if k != "objectGeneration"}
    message = _push(json.dumps({**OBJECT_RESOURCE, "generation": "99"}).encode(), attributes)

    assert parse_object_notification(message).generation == 99


@pytest.mark.parametrize("data", [b"", b"not json", b"[1, 2]"])
def test_a_notification_without_a_readable_resource_keeps_the_attributes(data: bytes) -> None:
    note = parse_object_notification(_push(data, GCS_ATTRIBUTES))

    assert note.name == GCS_ATTRIBUTES["objectId"]
    assert note.generation == 1767322800123456
    assert note.metadata == {}
    assert note.size == 0
    assert note.time_created is None


@pytest.mark.parametrize("missing", ["bucketId", "objectId", "eventType"])
def test_a_message_missing_a_storage_attribute_is_refused(missing: str) -> None:
    attributes = {k: v for k, v in GCS_ATTRIBUTES.items() if k != missing}

    with pytest.raises(EnvelopeError, match=f"not a Cloud Storage notification.*{missing}"):
        parse_object_notification(_push(b"", attributes))


def test_a_non_numeric_generation_is_an_envelope_error() -> None:
    attributes = {**GCS_ATTRIBUTES, "objectGeneration": "latest"}

    with pytest.raises(EnvelopeError, match="objectGeneration is not an integer: 'latest'"):
        parse_object_notification(_push(b"", attributes))


def test_a_non_numeric_size_is_an_envelope_error() -> None:
    resource = json.dumps({**OBJECT_RESOURCE, "size": "large"}).encode()

    with pytest.raises(EnvelopeError, match="size"):
        parse_object_notification(_push(resource, GCS_ATTRIBUTES))


@pytest.mark.parametrize(
    "name",
    [
        "..",
        "../registry",
        "a/../b",
        "/etc/passwd",
        "a/b",
        "",
        ".hidden",
        "tab\there",
        "nl\n",
        "bell\x07",
        "x" * 129,
        "über",
    ],
)
def test_names_from_input_that_cannot_name_an_object_are_refused(name: str) -> None:
    from mlpipe.store.storage import check_name_part

    with pytest.raises(ValueError, match="cannot name an object"):
        check_name_part(name, "batch_id")


def test_ordinary_names_pass() -> None:
    from mlpipe.store.storage import check_name_part

    for name in ("iris-classifier", "nightly-2026-11-23", "v1.2_rc", "dt=2026-11-23"):
        assert check_name_part(name, "batch_id") == name


@pytest.mark.parametrize(
    ("error", "status", "level"),
    [
        (Held("run r1 is training; acknowledged once the run is recorded"), "held", "INFO"),
        (TransientError("gcs unavailable"), None, "WARNING"),
    ],
)
def test_a_held_delivery_is_answered_503_without_a_warning(
    error: Exception, status: str | None, level: str, caplog: pytest.LogCaptureFixture
) -> None:
    def step(message: PushMessage) -> StepResult:
        raise error

    caplog.set_level("INFO", logger="mlpipe.runtime.service")
    # The reporter is only used for permanent failures and invalid envelopes.
    code, reply = handle_push(make_envelope(b"x", message_id="m1"), step, failures=None)  # type: ignore[arg-type]

    assert code == 503
    assert reply.get("status") == status and reply["detail"] == str(error)
    assert [r.levelname for r in caplog.records] == [level]
    assert str(error) in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    ("result", "status", "level"),
    [
        (held("run r1's job is starting", "r1"), "held", "INFO"),
        (transient("r1 waits for memory", "r1"), None, "WARNING"),
    ],
)
def test_held_and_transient_outcomes_are_values_answered_503(
    result: StepResult, status: str | None, level: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="mlpipe.runtime.service")
    code, reply = handle_push(
        make_envelope(b"x", message_id="m1"),
        lambda message: result,
        failures=None,  # type: ignore[arg-type]
    )

    assert code == 503
    assert reply.get("status") == status and reply["detail"] == result.detail["detail"]
    assert reply["run_id"] == "r1"
    assert [r.levelname for r in caplog.records] == [level]


def test_the_router_decodes_the_type_its_subscription_carries() -> None:
    from mlpipe.v1 import events_pb2

    seen: list[Any] = []
    router = Router(
        {
            "mlpipe.v1.TrainingCompleted": lambda e, m: seen.append(e) or StepResult("scored"),
        }
    )
    event = events_pb2.TrainingCompleted(model_name="iris-classifier")
    body = make_envelope(
        event.SerializeToString(), subscription="projects/p/subscriptions/evaluator-push"
    )

    result = router(parse_envelope(body))

    assert result.status == "scored"
    assert seen == [event]


def test_a_type_without_a_step_is_a_permanent_outcome_naming_what_it_takes() -> None:
    router = Router({"mlpipe.v1.TrainingCompleted": lambda e, m: StepResult("scored")})
    body = make_envelope(b"{}", {"event_type": "mlpipe.v1.DeploymentCompleted"})

    result = router(parse_envelope(body))

    assert result.outcome is Outcome.PERMANENT and result.failure is not None
    assert result.failure.reason == "unexpected_event"
    assert "['mlpipe.v1.TrainingCompleted']" in result.failure.message


def test_an_undecodable_event_is_a_permanent_outcome() -> None:
    router = Router({"mlpipe.v1.TrainingCompleted": lambda e, m: StepResult("scored")})
    body = make_envelope(b"\xff\xff\xff", subscription="projects/p/subscriptions/evaluator-push")

    result = router(parse_envelope(body))

    assert result.outcome is Outcome.PERMANENT and result.failure is not None
    assert result.failure.reason == "invalid_message"
