"""Fields with a fixed set of values are proto enums: writers set the enum, readers read the
enum and fall back to the old string field of events recorded before it existed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from google.protobuf.message import Message

from mlpipe.messaging import events
from mlpipe.v1 import events_pb2

# (choices, the proto enum, the message, its new enum field, its old string field, the reader)
FIELDS: list[tuple[events.Choices[Any], Any, type[Message], str, str, Callable[[Any], str]]] = [
    (
        events.DATA_FORMAT,
        events_pb2.DataFormat,
        events_pb2.DatasetRef,
        "data_format",
        "format",
        events.data_format,
    ),
    (
        events.TRAINING_BACKEND,
        events_pb2.TrainingBackend,
        events_pb2.TrainingStarted,
        "training_backend",
        "backend",
        events.training_backend,
    ),
    (
        events.MODEL_TASK,
        events_pb2.ModelTask,
        events_pb2.TrainingCompleted,
        "model_task",
        "task",
        events.model_task,
    ),
    (
        events.GATE_COMPARISON,
        events_pb2.GateComparison,
        events_pb2.GateResult,
        "gate_comparison",
        "comparison",
        events.gate_comparison,
    ),
    (
        events.DEPLOY_TARGET,
        events_pb2.DeployTarget,
        events_pb2.DeploymentCompleted,
        "deploy_target",
        "target",
        events.deploy_target,
    ),
    (
        events.MODEL_ALIAS,
        events_pb2.ModelAlias,
        events_pb2.DeploymentCompleted,
        "model_alias",
        "alias",
        events.model_alias,
    ),
    (
        events.MODEL_ALIAS,
        events_pb2.ModelAlias,
        events_pb2.TrafficShare,
        "model_alias",
        "alias",
        events.model_alias,
    ),
    (
        events.ROLLOUT_ACTION,
        events_pb2.RolloutAction,
        events_pb2.DeploymentCompleted,
        "rollout_action",
        "action",
        events.rollout_action,
    ),
    (
        events.PIPELINE_STAGE,
        events_pb2.PipelineStage,
        events_pb2.PipelineFailed,
        "pipeline_stage",
        "stage",
        events.pipeline_stage,
    ),
]
IDS = [f"{m.DESCRIPTOR.name}.{new}" for _, _, m, new, _, _ in FIELDS]


@pytest.mark.parametrize(("choices", "enum", "cls", "new", "old", "read"), FIELDS, ids=IDS)
def test_every_enum_value_has_one_text(
    choices: events.Choices[Any], enum: Any, cls: Any, new: str, old: str, read: Any
) -> None:
    named = {v for v in enum.values() if v != 0}
    assert set(choices.values.values()) == named
    assert len(set(choices.values)) == len(named)


@pytest.mark.parametrize(("choices", "enum", "cls", "new", "old", "read"), FIELDS, ids=IDS)
def test_the_enum_is_written_and_read_back_as_its_text(
    choices: events.Choices[Any], enum: Any, cls: Any, new: str, old: str, read: Any
) -> None:
    for text in choices.values:
        message = cls(**{new: choices.of(text)})
        decoded = events.from_json(cls, events.to_json(message))

        assert read(decoded) == text
        assert getattr(decoded, old) == ""


@pytest.mark.parametrize(("choices", "enum", "cls", "new", "old", "read"), FIELDS, ids=IDS)
def test_an_event_recorded_before_the_enum_is_read_from_its_string(
    choices: events.Choices[Any], enum: Any, cls: Any, new: str, old: str, read: Any
) -> None:
    text = next(iter(choices.values))
    stored = f'{{"{old}": "{text}"}}'  # what the recorded JSON of an older event holds

    assert read(events.from_json(cls, stored)) == text


def test_the_enum_wins_over_the_old_string() -> None:
    ref = events_pb2.DatasetRef(format="csv", data_format=events_pb2.DATA_FORMAT_PARQUET)

    assert events.data_format(ref) == "parquet"


def test_an_event_that_says_neither_reads_empty() -> None:
    assert events.data_format(events_pb2.DatasetRef()) == ""


def test_text_outside_the_set_is_refused_naming_the_choices() -> None:
    with pytest.raises(
        ValueError, match=r"'orc' is not a DataFormat \(one of \['csv', 'parquet'\]\)"
    ):
        events.DATA_FORMAT.of("orc")


def test_gates_are_written_with_the_enum_only() -> None:
    from mlpipe.ml.config import GatesSpec
    from mlpipe_evaluator.metrics import apply_gates

    [gate] = apply_gates(GatesSpec(max_rmse=1.0), {"rmse": 0.5})

    assert gate.gate_comparison == events_pb2.GATE_COMPARISON_AT_MOST
    assert gate.comparison == ""


def test_a_failure_reporter_for_an_unknown_stage_fails_at_start_up() -> None:
    from mlpipe.runtime.failures import FailureReporter

    with pytest.raises(ValueError, match="is not a PipelineStage"):
        FailureReporter(None, None, stage="trainr", code_version="dev")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "share",
    [
        {"version": "2", "percent": 100, "model_alias": "MODEL_ALIAS_CHAMPION"},
        {"version": "2", "percent": 100, "alias": "champion"},  # a deployer before the enum
    ],
)
def test_the_rollout_command_names_each_share_s_alias(share: dict[str, Any]) -> None:
    from mlpipe_ops.cli_rollout import rollout_summary

    line = rollout_summary("iris", "promote", {"reason": "canary v2 promoted", "traffic": [share]})

    assert line == "iris: canary v2 promoted; traffic now v2 100% champion"


@pytest.mark.parametrize(
    "recorded",
    [
        {"uri": "gs://b/datasets/iris/x.parquet", "data_format": "DATA_FORMAT_PARQUET"},
        {"uri": "gs://b/datasets/iris/x.parquet", "format": "parquet"},  # before the enum
    ],
)
def test_a_drift_check_reads_the_champion_s_dataset_in_its_format(
    recorded: dict[str, Any],
) -> None:
    from mlpipe.store.registry import ModelVersion
    from mlpipe_evaluator.monitor import dataset_of

    champion = ModelVersion("iris", 1, "0123456789abcdef", "", "", {"dataset": recorded})

    assert events.data_format(dataset_of(champion)) == "parquet"
