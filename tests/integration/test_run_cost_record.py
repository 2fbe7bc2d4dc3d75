"""The estimate an ended run records (runs/<id>/cost.json), on the emulators: the deployer
writes it once its decision is recorded (gates failed, deployed at once, or when an
asynchronous rollout finishes), keeps the first on a redelivery, and a missing price table
gives a record that says why there is no estimate without failing the run."""

from __future__ import annotations

import pytest
from google.protobuf import timestamp_pb2

from mlpipe.messaging import events
from mlpipe.messaging.push import make_envelope, parse_envelope
from mlpipe.ml.config import PipelineConfig
from mlpipe.runtime.steps import StepResult
from mlpipe.store import layout, run_cost
from mlpipe.store.registry import Registry
from mlpipe.v1 import events_pb2
from mlpipe_deployer import progress
from mlpipe_deployer.deployment import Deployer
from mlpipe_deployer.targets import DeployTarget, LocalTarget
from mlpipe_ops import service_runtime
from tests.integration.conftest import Cloud
from tests.integration.test_rollout_progress import StepTarget
from tests.integration.test_serving import trained

pytestmark = pytest.mark.integration

COSTS = service_runtime.cost_environment("local")


def deployer(cloud: Cloud, target: DeployTarget | None = None, prices: bool = True) -> Deployer:
    return Deployer(
        cloud.storage,
        cloud.publisher,
        Registry(cloud.storage),
        "test",
        target or LocalTarget(),
        cost_sizes=COSTS["MLPIPE_COST_SIZES"],
        prices=COSTS["MLPIPE_PRICES"] if prices else "",
    )


def evaluated(
    cloud: Cloud, config: PipelineConfig, csv: str, *, passed: bool = True
) -> events_pb2.EvaluationCompleted:
    """A trained run and its verdict, recorded as the evaluator records it."""
    evaluation = trained(cloud, config, csv)
    evaluation.passed = passed
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    evaluation.context.event_time.CopyFrom(now)
    paths = layout.RunPaths(evaluation.context.run_id)
    cloud.storage.write(paths.evaluation, events.to_json(evaluation).encode())
    return evaluation


def push(deps: Deployer, evaluation: events_pb2.EvaluationCompleted) -> StepResult:
    return deps(parse_envelope(make_envelope(events.encode(evaluation))))


def test_a_run_its_gates_stopped_records_its_estimate_once_with_the_deployers_step(
    cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> None:
    deps = deployer(cloud)
    evaluation = evaluated(cloud, iris_config, iris_csv, passed=False)
    run_id = evaluation.context.run_id
    path = layout.RunPaths(run_id).cost

    decided = push(deps, evaluation)
    recorded = run_cost.read_record(cloud.storage, run_id)
    first = cloud.storage.read(path)
    now = run_cost.estimate_in_bucket(
        cloud.storage, run_id, COSTS["MLPIPE_COST_SIZES"], COSTS["MLPIPE_PRICES"]
    )
    again = push(deps, evaluation)
    second = cloud.storage.read(path)

    assert decided.status == "not_deployed"
    assert recorded is not None and recorded.cost is not None, recorded
    assert recorded.estimated_by == "deployer" and recorded.problem == ""
    # This test records only the verdict (no TrainingStarted): the deployer's step is priced.
    assert [s.step for s in recorded.cost.steps] == ["deployer"]
    assert recorded.cost.steps[0].seconds > 0
    # The same steps as an estimate from the records now (they are all written).
    assert [(s.step, s.cost) for s in recorded.cost.steps] == [(s.step, s.cost) for s in now.steps]
    assert recorded.cost.total > 0 and recorded.cost.as_of == service_runtime.load_prices().as_of
    assert again.status == "duplicate"
    assert first is not None and second is not None and second.generation == first.generation


def test_without_a_price_table_the_run_ends_and_its_record_says_why_there_is_no_estimate(
    cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> None:
    cloud.watch(events.DEPLOYMENT_COMPLETED)
    deps = deployer(cloud, prices=False)
    evaluation = evaluated(cloud, iris_config, iris_csv)

    done = push(deps, evaluation)

    published = cloud.pulled(events.DEPLOYMENT_COMPLETED)
    recorded = run_cost.read_record(cloud.storage, evaluation.context.run_id)
    assert done.status == "deployed" and len(published) == 1 and published[0].deployed
    assert recorded is not None and recorded.cost is None
    assert recorded.problem == "no sizes or prices given (MLPIPE_PRICES is not set)"


def test_a_rollout_records_the_estimate_when_it_finishes_not_when_it_starts(
    cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> None:
    target = StepTarget(steps=1)
    deps = deployer(cloud, target)
    evaluation = evaluated(cloud, iris_config, iris_csv)
    run_id = evaluation.context.run_id

    started = push(deps, evaluation)
    while_rolling_out = run_cost.read_record(cloud.storage, run_id)
    target.finish_running()
    finished = progress.check_all(deps)
    recorded = run_cost.read_record(cloud.storage, run_id)

    assert started.status == "rolling_out" and while_rolling_out is None
    assert finished[0]["finished"] and finished[0]["published"] == 1
    assert recorded is not None and recorded.cost is not None, recorded
    assert cloud.storage.exists(layout.RunPaths(run_id).deployment)
    assert "deployer" in [s.step for s in recorded.cost.steps]


def test_a_record_that_is_not_a_cost_record_is_read_as_no_estimate_naming_it(
    cloud: Cloud,
) -> None:
    path = layout.RunPaths("0123456789abcdef").cost
    cloud.storage.write(path, b"{not json")
    broken = run_cost.read_record(cloud.storage, "0123456789abcdef")
    cloud.storage.write(path, b'{"estimate": {"steps": []}}')
    partial = run_cost.read_record(cloud.storage, "0123456789abcdef")

    assert broken is not None and broken.cost is None
    assert f"{path} is not valid JSON" in broken.problem
    assert broken.heading() == "recorded (unreadable)"
    assert partial is not None and partial.cost is None
    assert f"{path} is not a cost record" in partial.problem
