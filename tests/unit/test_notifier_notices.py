"""What each event becomes as a notice: its text, its link, and a key that every delivery of
the event derives alike."""

from __future__ import annotations

import pytest
from google.protobuf.message import Message

from mlpipe.messaging import events, topology
from mlpipe.store import layout
from mlpipe_notifier.notices import (
    Milestone,
    NoticeKind,
    approval_notice,
    canary_notice,
    decision_notice,
    drift_notice,
    failure_notice,
    gate_notice,
    milestone,
    notice_key,
)
from tests import notifier_samples as sample

CONSOLE = "https://console.example.com"


def redelivered(event: Message) -> Message:
    """The event as another delivery decodes it (binary on the wire, or JSON by hand)."""
    return events.decode(type(event), events.encode(event))


def test_a_failure() -> None:
    notice = failure_notice(sample.failed(), CONSOLE)

    assert notice.kind is NoticeKind.FAILURE
    assert notice.title == f"iris run {sample.RUN} failed in trainer: missing_column"
    assert notice.details == (
        "column 'species' is missing from datasets/iris/dt=2026-11-23/upload-1.csv",
        "input kept at gs://b/quarantine/missing_column/trainer-4242",
    )
    assert notice.link == f"{CONSOLE}/runs/{sample.RUN}"
    assert (notice.run_id, notice.stage, notice.reason) == (sample.RUN, "trainer", "missing_column")
    assert notice.occurred_at == "2026-11-23T09:30:00Z"
    assert notice.event_type == "mlpipe.v1.PipelineFailed"


def test_a_failure_before_any_run_links_to_the_failures_page() -> None:
    failed = sample.failed(run_id="")
    failed.context.pipeline = ""

    notice = failure_notice(failed, CONSOLE)

    assert notice.title == "an input failed in trainer: missing_column"
    assert (notice.link, notice.link_text) == (f"{CONSOLE}/failures", "failures")


def test_a_long_message_is_cut_to_one_short_line() -> None:
    failed = sample.failed()
    failed.message = "bad\nrow " * 200

    (first, _) = failure_notice(failed, "").details

    assert len(first) == 300 and first.endswith("…") and "\n" not in first


def test_a_blocked_evaluation() -> None:
    notice = gate_notice(sample.evaluated(passed=False), CONSOLE)

    assert notice is not None and notice.kind is NoticeKind.GATE_BLOCKED
    assert notice.title == (
        f"iris run {sample.RUN} blocked by its quality gates: iris-classifier not deployed"
    )
    assert notice.details == ("min_accuracy: 0.6100 < 0.75", "iris-classifier v3 keeps serving")
    assert notice.link == f"{CONSOLE}/runs/{sample.RUN}"
    assert notice.key == f"gate_blocked-{sample.RUN}"


def test_a_passing_evaluation_is_nothing_to_tell() -> None:
    assert gate_notice(sample.evaluated(passed=True), CONSOLE) is None


def test_drift() -> None:
    notice = drift_notice(sample.drifted(), CONSOLE)

    assert notice.kind is NoticeKind.DRIFT
    assert notice.title == (
        "drift in iris-classifier v3: petal_width (500 served rows, check daily-2026-11-23)"
    )
    assert notice.details == (
        "petal_width: PSI 0.41 > 0.2",
        "retraining requested (drift-daily-2026-11-23)",
    )
    assert notice.link == f"{CONSOLE}/drift"
    assert notice.key == "drift-iris-classifier-daily-2026-11-23"


@pytest.mark.parametrize(
    ("event", "step", "title", "key"),
    [
        (
            sample.deployed("canary"),
            Milestone.STARTED,
            "iris-classifier v4 is a canary at 10% beside v3, waiting for promotion",
            "canary-iris-classifier-v4-started",
        ),
        (
            sample.deployed("promote", requested_by="cli"),
            Milestone.PROMOTED,
            "iris-classifier canary v4 promoted to champion (was v3)",
            "canary-iris-classifier-v4-promoted",
        ),
        (
            sample.deployed("rollback", version=3, previous=4, requested_by="console"),
            Milestone.ROLLED_BACK,
            "iris-classifier rolled back: canary v4 stopped; v3 keeps 100%",
            "canary-iris-classifier-v4-rolled_back",
        ),
    ],
)
def test_canary_milestones(event: Message, step: Milestone, title: str, key: str) -> None:
    notice = canary_notice(event, CONSOLE)  # type: ignore[arg-type]

    assert notice is not None and notice.kind is NoticeKind.CANARY
    assert (notice.milestone, notice.title, notice.key) == (step.value, title, key)
    assert notice.link == f"{CONSOLE}/models"


def test_a_started_canary_says_how_to_promote_or_roll_back() -> None:
    notice = canary_notice(sample.deployed("canary"), "")

    assert notice is not None
    assert notice.details == (
        "promote: mlpipe promote iris-classifier · roll back: mlpipe rollback iris-classifier",
    )
    assert notice.link == ""  # no console configured


@pytest.mark.parametrize(
    "event",
    [
        # A version deployed straight to champion was never a canary.
        sample.deployed("promote", requested_by="deployer"),
        sample.deployed("promote", requested_by=""),
    ],
)
def test_other_deployments_are_no_milestone(event: Message) -> None:
    assert milestone(event) is None  # type: ignore[arg-type]
    assert canary_notice(event, CONSOLE) is None  # type: ignore[arg-type]


def test_a_deployment_that_did_not_happen_is_no_milestone() -> None:
    event = sample.deployed("canary")
    event.deployed = False

    assert canary_notice(event, CONSOLE) is None


@pytest.mark.parametrize(
    "build",
    [
        lambda: failure_notice(sample.failed(), CONSOLE),
        lambda: gate_notice(sample.evaluated(), CONSOLE),
        lambda: drift_notice(sample.drifted(), CONSOLE),
        lambda: canary_notice(sample.deployed("canary"), CONSOLE),
    ],
)
def test_the_key_is_the_same_for_every_delivery_and_names_an_object(build: object) -> None:
    first = build()  # type: ignore[operator]
    again = build()  # type: ignore[operator]

    assert first.key == again.key
    assert layout.notification_path("team", first.key).endswith(f"/{first.key}.json")


def test_a_redelivered_or_republished_failure_is_the_same_notice() -> None:
    failed = sample.failed()
    republished = sample.failed()
    republished.context.event_time.CopyFrom(events.timestamp())  # reported again, later

    keys = {
        failure_notice(failed, "").key,
        failure_notice(redelivered(failed), "").key,  # type: ignore[arg-type]
        failure_notice(republished, "").key,
    }

    assert len(keys) == 1


def test_another_input_or_stage_is_another_failure() -> None:
    base = failure_notice(sample.failed("1"), "").key
    other_input = failure_notice(sample.failed("2"), "").key
    at_ingest = sample.failed("1")
    at_ingest.pipeline_stage = events.PIPELINE_STAGE.of("ingest")

    assert len({base, other_input, failure_notice(at_ingest, "").key}) == 3


def test_a_failure_without_a_source_message_is_keyed_on_the_event() -> None:
    failed = sample.failed(source_message_id="")
    failed.quarantine_uri = ""
    other = sample.failed(source_message_id="")
    other.quarantine_uri = ""
    other.message = "another problem"

    assert failure_notice(failed, "").key == failure_notice(redelivered(failed), "").key  # type: ignore[arg-type]
    assert failure_notice(failed, "").key != failure_notice(other, "").key


def test_a_long_key_stays_one_object_name_and_distinct() -> None:
    long_a = notice_key("drift", "m" * 200, "a")
    long_b = notice_key("drift", "m" * 200, "b")

    assert len(long_a) == 128 and long_a != long_b
    assert notice_key("drift", "model/../x", "c d") == "drift-model___x-c_d"


def test_each_kind_has_its_own_subscription_that_holds_nothing_else() -> None:
    """A channel that does not answer holds up its own notices only: each event type reaches
    the notifier on a subscription of its own, with a bounded number of attempts."""
    mine = [s for s in topology.TOPOLOGY.push if s.service == "notifier"]

    assert {s.name: s.topic for s in mine} == {
        "notifier-failures-push": events.PIPELINE_FAILURES,
        "notifier-evaluations-push": events.EVALUATION_COMPLETED,
        "notifier-drift-push": events.DRIFT_DETECTED,
        "notifier-deployments-push": events.DEPLOYMENT_COMPLETED,
        "notifier-approvals-push": events.APPROVALS,
    }
    assert all(
        (s.min_backoff_seconds, s.max_backoff_seconds, s.max_delivery_attempts) == (10, 600, 15)
        for s in mine
    )
    assert topology.TOPOLOGY.publishes["notifier"] == ()
    assert "notifier" in topology.TOPOLOGY.services


def test_an_approval_request_says_how_to_decide_it_and_when_it_expires() -> None:
    request = sample.approval_requested()
    notice = approval_notice(request, CONSOLE)

    assert notice.kind is NoticeKind.APPROVAL
    assert notice.title == "iris-classifier v3 waits for approval to reach prod (from staging)"
    assert "mlpipe approve a1b2c3d4e5f6 --env prod" in notice.details[0]
    assert "expires 2026-11-26T09:30:00Z" in notice.details[1]
    assert notice.link == f"{CONSOLE}/models"
    assert notice.key == "approval-a1b2c3d4e5f6-requested"
    assert approval_notice(redelivered(request), "").key == notice.key  # type: ignore[arg-type]


def test_a_decision_is_its_own_notice_naming_who_decided() -> None:
    approved = decision_notice(sample.approval_decided(approved=True), CONSOLE)
    rejected = decision_notice(sample.approval_decided(approved=False), CONSOLE)

    assert approved.title == "iris-classifier v3 approved for prod by bo@example.com"
    assert approved.link == f"{CONSOLE}/runs/7a0b1c2d3e4f5a6b"
    assert rejected.title == "iris-classifier v3 rejected for prod by bo@example.com"
    assert rejected.details == ("the holdout is a week old",)
    assert len({approved.key, rejected.key, "approval-a1b2c3d4e5f6-requested"}) == 3
