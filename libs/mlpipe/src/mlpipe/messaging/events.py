"""Event helpers: topics per event type, encoding and decoding, run contexts.

Publishers send the binary protobuf encoding. Subscribers accept both encodings Pub/Sub
schemas define (BINARY and JSON), so a person can publish a request from the command line.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from mlpipe import tracing
from mlpipe.v1 import events_pb2

M = TypeVar("M", bound=Message)
# The value type of one generated enum (mypy-protobuf gives each its own int subtype).
V = TypeVar("V", bound=int)

# Topic names; the same names are used on the emulator and in every GCP project.
INGEST_REQUESTS = "ingest-requests"
GCS_OBJECTS = "gcs-objects"
DATASETS_LANDED = "datasets-landed"
TRAINING_STARTED = "training-started"
TRAINING_COMPLETED = "training-completed"
EVALUATION_COMPLETED = "evaluation-completed"
DEPLOYMENT_COMPLETED = "deployment-completed"
PIPELINE_FAILURES = "pipeline-failures"
DEAD_LETTERS = "dead-letters"
BATCH_PREDICTION_REQUESTS = "batch-prediction-requests"
MONITORING_REQUESTS = "monitoring-requests"
DRIFT_DETECTED = "drift-detected"
BATCH_PREDICTIONS_COMPLETED = "batch-predictions-completed"
# Approval requests and their decisions (docs/promotion.md): one topic for both, told apart by
# the event_type attribute, so that one subscription (a notifier) sees a request's whole story.
APPROVALS = "approvals"

TOPIC_FOR_EVENT: dict[str, str] = {
    events_pb2.IngestRequest.DESCRIPTOR.full_name: INGEST_REQUESTS,
    events_pb2.DatasetLanded.DESCRIPTOR.full_name: DATASETS_LANDED,
    events_pb2.TrainingStarted.DESCRIPTOR.full_name: TRAINING_STARTED,
    events_pb2.TrainingCompleted.DESCRIPTOR.full_name: TRAINING_COMPLETED,
    events_pb2.EvaluationCompleted.DESCRIPTOR.full_name: EVALUATION_COMPLETED,
    events_pb2.DeploymentCompleted.DESCRIPTOR.full_name: DEPLOYMENT_COMPLETED,
    events_pb2.PipelineFailed.DESCRIPTOR.full_name: PIPELINE_FAILURES,
    events_pb2.BatchPredictionRequest.DESCRIPTOR.full_name: BATCH_PREDICTION_REQUESTS,
    events_pb2.MonitoringRequest.DESCRIPTOR.full_name: MONITORING_REQUESTS,
    events_pb2.DriftDetected.DESCRIPTOR.full_name: DRIFT_DETECTED,
    events_pb2.BatchPredictionCompleted.DESCRIPTOR.full_name: BATCH_PREDICTIONS_COMPLETED,
    events_pb2.ApprovalRequested.DESCRIPTOR.full_name: APPROVALS,
    events_pb2.ApprovalDecided.DESCRIPTOR.full_name: APPROVALS,
}

# What GCS publishes on the bucket's notification topic: an object's JSON resource, with the
# notification's attributes (mlpipe.messaging.push.parse_object_notification reads it).
GCS_OBJECT_NOTIFICATION = "storage#object"

# Every event type each topic carries.
EVENTS_OF_TOPIC: dict[str, tuple[str, ...]] = {
    topic: tuple(kind for kind, t in TOPIC_FOR_EVENT.items() if t == topic)
    for topic in dict.fromkeys(TOPIC_FOR_EVENT.values())
}

# The type of event each topic of one type carries (what a push subscription to it delivers
# when a message has no event_type attribute). A topic of several types (APPROVALS) is not
# here: its messages are read by their event_type attribute, which `Publisher` always sets.
EVENT_FOR_TOPIC: dict[str, str] = {
    **{topic: kinds[0] for topic, kinds in EVENTS_OF_TOPIC.items() if len(kinds) == 1},
    GCS_OBJECTS: GCS_OBJECT_NOTIFICATION,
}

EVENT_TYPES: dict[str, type[Message]] = {
    cls.DESCRIPTOR.full_name: cls
    for cls in (
        events_pb2.IngestRequest,
        events_pb2.DatasetLanded,
        events_pb2.TrainingStarted,
        events_pb2.TrainingCompleted,
        events_pb2.EvaluationCompleted,
        events_pb2.DeploymentCompleted,
        events_pb2.PipelineFailed,
        events_pb2.BatchPredictionRequest,
        events_pb2.MonitoringRequest,
        events_pb2.DriftDetected,
        events_pb2.BatchPredictionCompleted,
        events_pb2.ApprovalRequested,
        events_pb2.ApprovalDecided,
    )
}

# Attribute Pub/Sub sets on messages of topics that have a schema.
SCHEMA_ENCODING_ATTR = "googclient_schemaencoding"
EVENT_TYPE_ATTR = "event_type"


class EventDecodeError(ValueError):
    """The bytes are not a valid message of the expected type in either encoding."""


def topic_for(message: Message) -> str:
    return TOPIC_FOR_EVENT[message.DESCRIPTOR.full_name]


def encode(message: Message) -> bytes:
    return message.SerializeToString(deterministic=True)


def decode(cls: type[M], data: bytes, encoding: str = "") -> M:
    """Decode `data` as `cls`, from the JSON or the binary encoding.

    `encoding` is the schema encoding attribute when Pub/Sub supplied one. Without it, data
    whose first non-blank byte is `{` is read as JSON, and as binary if it is not JSON: a binary
    message can look like that too, since its first byte is often field 1's tag 0x0a (a
    newline, so blank) and the next, a length of 123, is `{`.
    """
    encoding = encoding.upper()
    looks_json = data.lstrip()[:1] == b"{"
    if encoding == "JSON" or (encoding != "BINARY" and looks_json):
        try:
            return json_format.Parse(data.decode("utf-8"), cls(), ignore_unknown_fields=False)
        except (json_format.ParseError, UnicodeDecodeError) as exc:
            not_json = EventDecodeError(f"not a valid JSON {cls.DESCRIPTOR.full_name}: {exc}")
        if encoding == "JSON" or data.lstrip()[:1] == data[:1]:
            raise not_json
        try:
            return _binary(cls, data)
        except EventDecodeError:
            raise not_json from None
    return _binary(cls, data)


def _binary(cls: type[M], data: bytes) -> M:
    message = cls()
    try:
        message.ParseFromString(data)
    except DecodeError as exc:
        raise EventDecodeError(
            f"not a valid binary {cls.DESCRIPTOR.full_name} ({len(data)} bytes): {exc}"
        ) from exc
    return message


def to_json(message: Message) -> str:
    return json_format.MessageToJson(message, preserving_proto_field_name=True, indent=None)


def to_dict(message: Message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def from_json(cls: type[M], text: str | bytes) -> M:
    return json_format.Parse(text, cls())


def timestamp(when: dt.datetime | None = None) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when or dt.datetime.now(dt.UTC))
    return ts


def context(
    *,
    producer: str,
    code_version: str,
    run_id: str = "",
    pipeline: str = "",
    config_sha256: str = "",
    request_id: str = "",
) -> events_pb2.RunContext:
    return events_pb2.RunContext(
        run_id=run_id,
        pipeline=pipeline,
        config_sha256=config_sha256,
        code_version=code_version,
        request_id=request_id,
        producer=producer,
        event_time=timestamp(),
        trace_id=tracing.trace_id(),
    )


def next_context(
    previous: events_pb2.RunContext, *, producer: str, code_version: str
) -> events_pb2.RunContext:
    """The context for the event a step emits in answer to `previous`: same run, new time."""
    ctx = events_pb2.RunContext()
    ctx.CopyFrom(previous)
    ctx.producer = producer
    ctx.code_version = code_version
    ctx.event_time.CopyFrom(timestamp())
    if not ctx.trace_id:
        ctx.trace_id = tracing.trace_id()
    return ctx


@dataclass(frozen=True)
class Choices(Generic[V]):
    """The values of one proto enum and the text each had when its field was a string.

    Writers set the enum field (`of`); readers read it back as that text (`text`). Events
    recorded before the enum existed carry only the old string field, which readers fall back
    to (the field helpers below), so stored events stay readable.
    """

    enum: str
    values: Mapping[str, V]

    def of(self, text: str) -> V:
        """The enum value of `text`; text outside the set is a bug in the writer."""
        try:
            return self.values[text]
        except KeyError:
            raise ValueError(
                f"{text!r} is not a {self.enum} (one of {sorted(self.values)})"
            ) from None

    def text(self, value: V, fallback: str = "") -> str:
        """The text of `value`; `fallback` (the old string field) when it is unspecified."""
        for text, number in self.values.items():
            if number == value and number != 0:
                return text
        return fallback


DATA_FORMAT = Choices(
    "DataFormat", {"csv": events_pb2.DATA_FORMAT_CSV, "parquet": events_pb2.DATA_FORMAT_PARQUET}
)
TRAINING_BACKEND = Choices(
    "TrainingBackend",
    {"local": events_pb2.TRAINING_BACKEND_LOCAL, "vertex": events_pb2.TRAINING_BACKEND_VERTEX},
)
MODEL_TASK = Choices(
    "ModelTask",
    {
        "classification": events_pb2.MODEL_TASK_CLASSIFICATION,
        "regression": events_pb2.MODEL_TASK_REGRESSION,
    },
)
GATE_COMPARISON = Choices(
    "GateComparison",
    {">=": events_pb2.GATE_COMPARISON_AT_LEAST, "<=": events_pb2.GATE_COMPARISON_AT_MOST},
)
DEPLOY_TARGET = Choices(
    "DeployTarget",
    {
        "local": events_pb2.DEPLOY_TARGET_LOCAL,
        "cloud_run": events_pb2.DEPLOY_TARGET_CLOUD_RUN,
        "vertex": events_pb2.DEPLOY_TARGET_VERTEX,
    },
)
MODEL_ALIAS = Choices(
    "ModelAlias",
    {"champion": events_pb2.MODEL_ALIAS_CHAMPION, "canary": events_pb2.MODEL_ALIAS_CANARY},
)
ROLLOUT_ACTION = Choices(
    "RolloutAction",
    {
        "promote": events_pb2.ROLLOUT_ACTION_PROMOTE,
        "canary": events_pb2.ROLLOUT_ACTION_CANARY,
        "rollback": events_pb2.ROLLOUT_ACTION_ROLLBACK,
    },
)
PIPELINE_STAGE = Choices(
    "PipelineStage",
    {
        "ingest": events_pb2.PIPELINE_STAGE_INGEST,
        "trainer": events_pb2.PIPELINE_STAGE_TRAINER,
        "training-job": events_pb2.PIPELINE_STAGE_TRAINING_JOB,
        "evaluator": events_pb2.PIPELINE_STAGE_EVALUATOR,
        "deployer": events_pb2.PIPELINE_STAGE_DEPLOYER,
        "predictor": events_pb2.PIPELINE_STAGE_PREDICTOR,
        "earthengine": events_pb2.PIPELINE_STAGE_EARTHENGINE,
        "notifier": events_pb2.PIPELINE_STAGE_NOTIFIER,
    },
)

HOLDOUT_SOURCE = Choices(
    "HoldoutSource",
    {
        "target_dataset": events_pb2.HOLDOUT_SOURCE_TARGET_DATASET,
        "copied": events_pb2.HOLDOUT_SOURCE_COPIED,
    },
)
ACTOR_SOURCE = Choices(
    "ActorSource",
    {
        "--as": events_pb2.ACTOR_SOURCE_FLAG,
        "MLPIPE_ACTOR": events_pb2.ACTOR_SOURCE_ENV,
        "gcloud": events_pb2.ACTOR_SOURCE_GCLOUD,
        "os-user": events_pb2.ACTOR_SOURCE_OS_USER,
    },
)
APPROVAL_DECISION = Choices(
    "ApprovalDecision",
    {
        "approved": events_pb2.APPROVAL_DECISION_APPROVED,
        "rejected": events_pb2.APPROVAL_DECISION_REJECTED,
    },
)

BAD_ROW_POLICY = Choices(
    "BadRowPolicy",
    {
        "reject_batch": events_pb2.BAD_ROW_POLICY_REJECT_BATCH,
        "write_rejected": events_pb2.BAD_ROW_POLICY_WRITE_REJECTED,
    },
)


def data_format(dataset: events_pb2.DatasetRef) -> str:
    """ "csv" or "parquet" ("" when the event says neither)."""
    return DATA_FORMAT.text(dataset.data_format, dataset.format)


def training_backend(started: events_pb2.TrainingStarted) -> str:
    return TRAINING_BACKEND.text(started.training_backend, started.backend)


def model_task(completed: events_pb2.TrainingCompleted) -> str:
    return MODEL_TASK.text(completed.model_task, completed.task)


def gate_comparison(gate: events_pb2.GateResult) -> str:
    """ ">=" or "<="."""
    return GATE_COMPARISON.text(gate.gate_comparison, gate.comparison)


def deploy_target(deployment: events_pb2.DeploymentCompleted) -> str:
    return DEPLOY_TARGET.text(deployment.deploy_target, deployment.target)


def model_alias(item: events_pb2.DeploymentCompleted | events_pb2.TrafficShare) -> str:
    """The alias a deployment moved, or a traffic share's alias."""
    return MODEL_ALIAS.text(item.model_alias, item.alias)


def rollout_action(deployment: events_pb2.DeploymentCompleted) -> str:
    return ROLLOUT_ACTION.text(deployment.rollout_action, deployment.action)


def pipeline_stage(failed: events_pb2.PipelineFailed) -> str:
    return PIPELINE_STAGE.text(failed.pipeline_stage, failed.stage)
