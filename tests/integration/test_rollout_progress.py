"""The deployer's asynchronous rollouts (mlpipe_deployer.progress) against the emulators, with a
target that answers as a cloud target does: an operation name per step, done when it says so.
The mechanism sees only `Rollout` (operations, error, resource), so any target can use it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from fastapi.testclient import TestClient

from mlpipe.messaging import events
from mlpipe.messaging.push import make_envelope, parse_envelope
from mlpipe.ml.config import PipelineConfig
from mlpipe.runtime.steps import StepResult
from mlpipe.store import layout
from mlpipe.store.registry import ModelVersion, Registry, Traffic
from mlpipe.v1 import events_pb2
from mlpipe_deployer import progress, rollout
from mlpipe_deployer.deployment import Deployer
from mlpipe_deployer.targets import Rollout
from tests.integration.conftest import Cloud, forward
from tests.integration.test_serving import renamed_iris, trained

pytestmark = pytest.mark.integration

MODEL = "iris-classifier"


@dataclass
class StepTarget:
    """Starts `steps` operations one after another; each runs until `finish_running()`."""

    steps: int = 2
    fail_with: str = ""
    # Events name the target by its DeployTarget value; this one stands in for a cloud target.
    name: str = "vertex"
    started: list[str] = field(default_factory=list)
    done: set[str] = field(default_factory=set)
    calls: list[tuple[Traffic, tuple[str, ...]]] = field(default_factory=list)

    def apply(
        self,
        model: str,
        traffic: Traffic,
        versions: dict[int, ModelVersion],
        running: Sequence[str] = (),
    ) -> Rollout:
        self.calls.append((traffic, tuple(running)))
        left = [op for op in running if op not in self.done]
        if left:
            return Rollout("res", left)
        if running and self.fail_with:
            return Rollout("res", error=self.fail_with)
        if len(self.started) < self.steps:
            self.started.append(f"operations/{len(self.started) + 1}")
            return Rollout("res", [self.started[-1]])
        return Rollout(f"res (v{traffic.champion})")

    def finish_running(self) -> None:
        self.done.update(self.started)


def push(deps: Deployer, evaluation: events_pb2.EvaluationCompleted) -> StepResult:
    return deps(parse_envelope(make_envelope(events.encode(evaluation))))


def test_a_rollout_is_acknowledged_recorded_and_published_once_when_its_operations_end(
    cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> None:
    cloud.watch(events.DEPLOYMENT_COMPLETED)
    target = StepTarget(steps=2)
    deps = Deployer(cloud.storage, cloud.publisher, Registry(cloud.storage), "test", target)
    evaluation = trained(cloud, iris_config, iris_csv)
    recorded_at = layout.RunPaths(evaluation.context.run_id).deployment

    first = push(deps, evaluation)
    record = cloud.storage.read_json(layout.rollout_path(MODEL))
    redelivered = push(deps, evaluation)
    record_after_redelivery = cloud.storage.read_json(layout.rollout_path(MODEL))
    still_running = progress.check_all(deps)
    early = cloud.pulled(events.DEPLOYMENT_COMPLETED, expect=1, timeout=1, settle=0)
    target.finish_running()  # the upload is done: the next check starts the deployment
    next_step = progress.check_all(deps)
    target.finish_running()
    finished = progress.check_all(deps)
    published = cloud.pulled(events.DEPLOYMENT_COMPLETED)
    nothing_left = progress.check_all(deps)

    assert first.status == "rolling_out" and first.detail["operations"] == ["operations/1"]
    assert record["operations"] == ["operations/1"] and len(record["waiting"]) == 1
    # The redelivery only hands the running operation back: nothing starts twice.
    assert redelivered.status == "rolling_out"
    assert target.calls[1][1] == ("operations/1",)
    assert len(record_after_redelivery["waiting"]) == 1
    assert still_running == [
        {
            "model": MODEL,
            "finished": False,
            "operations": ["operations/1"],
            "error": "",
            "published": 0,
        }
    ]
    assert early == []
    assert next_step[0]["operations"] == ["operations/2"] and not next_step[0]["finished"]
    assert finished[0]["finished"] and finished[0]["published"] == 1
    assert target.started == ["operations/1", "operations/2"]
    assert [(e.version, e.deployed, e.target_resource) for e in published] == [
        (1, True, "res (v1)")
    ]
    assert cloud.storage.exists(recorded_at)
    assert not cloud.storage.exists(layout.rollout_path(MODEL))
    assert nothing_left == []
    assert push(deps, evaluation).status == "duplicate"


def test_a_failed_rollout_publishes_the_step_as_not_deployed_with_the_reason(
    cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> None:
    cloud.watch(events.DEPLOYMENT_COMPLETED)
    target = StepTarget(steps=1, fail_with="Model server never became ready")
    deps = Deployer(cloud.storage, cloud.publisher, Registry(cloud.storage), "test", target)
    evaluation = trained(cloud, iris_config, iris_csv)

    push(deps, evaluation)
    target.finish_running()
    checked = progress.check_all(deps)
    published = cloud.pulled(events.DEPLOYMENT_COMPLETED)

    assert checked[0]["error"] == "Model server never became ready"
    assert [(e.deployed, e.reason) for e in published] == [
        (False, "rollout failed: Model server never became ready")
    ]
    assert not cloud.storage.exists(layout.rollout_path(MODEL))


def test_a_promotion_on_an_asynchronous_target_is_published_when_it_has_rolled_out(
    cloud: Cloud, iris_config: PipelineConfig, iris_csv: str
) -> None:
    target = StepTarget(steps=0)  # the first two versions roll out at once
    deps = Deployer(
        cloud.storage, cloud.publisher, Registry(cloud.storage), "test", target, canary_percent=10
    )
    push(deps, trained(cloud, iris_config, iris_csv))
    push(deps, trained(cloud, iris_config, renamed_iris(iris_csv)))
    cloud.watch(events.DEPLOYMENT_COMPLETED)
    target.steps = 1

    step = rollout.promote(deps, MODEL, "test")
    before = cloud.pulled(events.DEPLOYMENT_COMPLETED, expect=1, timeout=1, settle=0)
    target.finish_running()
    progress.check_all(deps)
    published = cloud.pulled(events.DEPLOYMENT_COMPLETED)

    assert not step.finished and step.operations == ["operations/1"]
    assert before == []
    assert [(events.rollout_action(e), e.version, e.previous_version) for e in published] == [
        ("promote", 2, 1)
    ]


def test_the_deployers_own_timer_finishes_a_rollout_when_asked_to(
    cloud: Cloud, monkeypatch: pytest.MonkeyPatch, iris_config: PipelineConfig, iris_csv: str
) -> None:
    monkeypatch.setenv("MLPIPE_PROJECT", cloud.project)
    monkeypatch.setenv("MLPIPE_BUCKET", cloud.storage.bucket_name)
    monkeypatch.setenv("MLPIPE_ROLLOUT_CHECK_SECONDS", "0.2")
    monkeypatch.setenv("MLPIPE_COMPILE_ONNX", "false")
    from mlpipe_deployer.main import app

    evaluation = trained(cloud, iris_config, iris_csv)
    cloud.watch(events.DEPLOYMENT_COMPLETED)
    target = StepTarget(steps=1)
    with TestClient(app) as deployer:
        app.state.step.target = target  # a target whose operation ends when the test says
        reply = forward(deployer, evaluation)
        before = cloud.pulled(events.DEPLOYMENT_COMPLETED, expect=1, timeout=1, settle=0)
        target.finish_running()
        published = cloud.pulled(events.DEPLOYMENT_COMPLETED, timeout=30)

    assert reply["status"] == "rolling_out"
    assert before == []
    assert [(e.version, e.deployed) for e in published] == [(1, True)]
