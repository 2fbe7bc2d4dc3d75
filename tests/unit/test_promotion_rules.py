"""Model promotion's rules without servers (docs/promotion.md): the order of environments,
where an approval is required (the environment files, which Cloud Deploy's targets follow),
who is acting, when a request expires, the paths and the events."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from mlpipe.messaging import events
from mlpipe.messaging.topology import TOPOLOGY
from mlpipe.store import layout
from mlpipe.store.approvals import (
    APPROVED,
    EXPIRED,
    PENDING,
    Actor,
    ApprovalRequest,
    expires_at,
    request_record,
)
from mlpipe.store.promotions import Refusal, check_direction, previous_env
from mlpipe.v1 import events_pb2
from mlpipe_ops import actor, cli, infra, release, service_runtime

REPO = Path(__file__).resolve().parents[2]
ENVIRONMENTS = REPO / "infra" / "environments"
ORDER = release.PROMOTION
T0 = dt.datetime(2026, 6, 1, 9, 0, tzinfo=dt.UTC)


# --- the order --------------------------------------------------------------------------------
def test_promotions_follow_the_release_order() -> None:
    assert ORDER == ("dev", "staging", "prod")


@pytest.mark.parametrize(("to", "source"), [("staging", "dev"), ("prod", "staging")])
def test_a_promotion_comes_from_the_environment_before_by_default(to: str, source: str) -> None:
    assert previous_env(ORDER, to) == source


@pytest.mark.parametrize(
    ("to", "reason", "said"),
    [
        ("dev", "first_env", "dev is the first environment (dev → staging → prod)"),
        ("qa", "unknown_env", "'qa' is not in the promotion order (dev → staging → prod)"),
    ],
)
def test_nothing_comes_before_the_first_or_outside_the_order(
    to: str, reason: str, said: str
) -> None:
    with pytest.raises(Refusal) as refused:
        previous_env(ORDER, to)

    assert refused.value.reason == reason and said in refused.value.message


@pytest.mark.parametrize(
    ("source", "to"), [("dev", "staging"), ("staging", "prod"), ("dev", "prod")]
)
def test_a_promotion_forward_along_the_order_is_allowed(source: str, to: str) -> None:
    check_direction(ORDER, source, to)


@pytest.mark.parametrize(
    ("source", "to", "reason"),
    [
        ("staging", "staging", "same_env"),
        ("prod", "prod", "same_env"),
        ("prod", "staging", "against_order"),
        ("staging", "dev", "against_order"),
        ("local", "staging", "unknown_env"),
        ("dev", "qa", "unknown_env"),
    ],
)
def test_the_same_environment_backwards_and_unknown_ones_are_refused(
    source: str, to: str, reason: str
) -> None:
    with pytest.raises(Refusal) as refused:
        check_direction(ORDER, source, to)

    assert refused.value.reason == reason


# --- where an approval is required ------------------------------------------------------------
@pytest.mark.parametrize(("name", "required"), [("dev", False), ("staging", False), ("prod", True)])
def test_prod_alone_requires_approval_in_the_shipped_files(name: str, required: bool) -> None:
    env = infra.load_environment(name, ENVIRONMENTS)

    assert env.approval_required is required
    assert env.approval_expires_hours == 72


def environment(folder: Path, name: str, **edits: Any) -> infra.Environment:
    raw = yaml.safe_load((ENVIRONMENTS / "dev.yaml").read_text())
    raw["schedules"] = []
    raw.update(edits)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    return infra.load_environment(name, folder)


@pytest.mark.parametrize(
    ("edits", "message"),
    [
        ({"approval": "maybe"}, "approval"),
        ({"approval_expires_hours": 0}, "approval_expires_hours"),
        ({"approval_expires_hours": -1}, "approval_expires_hours"),
    ],
)
def test_a_wrong_approval_setting_is_refused_naming_it(
    tmp_path: Path, edits: dict[str, Any], message: str
) -> None:
    with pytest.raises(infra.InfraError, match=message):
        environment(tmp_path, "qa", **edits)


def test_an_environment_needs_no_approval_unless_its_file_says_so(tmp_path: Path) -> None:
    env = environment(tmp_path, "qa")

    assert env.approval == "none" and not env.approval_required


@pytest.mark.parametrize("approval", ["required", "none"])
def test_cloud_deploy_targets_require_approval_where_the_environment_file_does(
    tmp_path: Path, approval: str
) -> None:
    env = environment(tmp_path, "staging", approval=approval, project="acme-ml-staging")
    runtimes = service_runtime.load_runtimes("staging", REPO / "infra" / "runtime.yaml")
    target = infra.resolve(env, "staging", project_number=222, runtimes=runtimes)
    stage = release.Stage("staging", target, runtimes)

    rendered = release.deploy_target(stage, "acme-ml-dev")

    assert rendered["requireApproval"] is (approval == "required")
    assert release.approval_stages([stage]) == (["staging"] if approval == "required" else [])


def test_the_bucket_of_an_environment_comes_from_its_template() -> None:
    env = infra.load_environment("prod", ENVIRONMENTS)

    assert infra.storage_place(env, "prod") == ("mlpipe-prod", "mlpipe-prod-mlpipe")


# --- who acts ---------------------------------------------------------------------------------
def fake_gcloud(folder: Path, prints: str, code: int = 0) -> str:
    """An executable that answers `gcloud config get-value account` as gcloud would."""
    script = folder / "gcloud"
    script.write_text(f"#!/bin/sh\nprintf '%s\\n' '{prints}'\nexit {code}\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_as_names_the_actor_before_anything_else(tmp_path: Path) -> None:
    gcloud = fake_gcloud(tmp_path, "someone@example.com")

    found = actor.resolve_actor("alice@example.com", {"MLPIPE_ACTOR": "bob"}, gcloud)

    assert found == Actor("alice@example.com", "--as")


def test_mlpipe_actor_comes_next(tmp_path: Path) -> None:
    gcloud = fake_gcloud(tmp_path, "someone@example.com")

    assert actor.resolve_actor(None, {"MLPIPE_ACTOR": " bob "}, gcloud) == Actor(
        "bob", "MLPIPE_ACTOR"
    )


def test_then_the_active_gcloud_account(tmp_path: Path) -> None:
    gcloud = fake_gcloud(tmp_path, "carol@example.com")

    assert actor.resolve_actor(None, {}, gcloud) == Actor("carol@example.com", "gcloud")


@pytest.mark.parametrize(("prints", "code"), [("(unset)", 0), ("", 0), ("carol@example.com", 1)])
def test_then_the_os_user_when_gcloud_has_no_account(
    tmp_path: Path, prints: str, code: int
) -> None:
    gcloud = fake_gcloud(tmp_path, prints, code)

    assert actor.resolve_actor("  ", {"MLPIPE_ACTOR": ""}, gcloud) == Actor(
        actor.os_user(), "os-user"
    )


def test_then_the_os_user_without_gcloud(tmp_path: Path) -> None:
    missing = str(tmp_path / "no-gcloud-here")

    assert actor.resolve_actor(None, {}, missing) == Actor(actor.os_user(), "os-user")
    assert actor.os_user()  # a name even for a uid without one


def test_every_actor_source_is_an_event_enum_value() -> None:
    for source in ("--as", "MLPIPE_ACTOR", "gcloud", "os-user"):
        assert events.ACTOR_SOURCE.of(source) != 0


# --- expiry -----------------------------------------------------------------------------------
def request(hours: float = 72, state: str = PENDING) -> ApprovalRequest:
    record = request_record(
        approval_id="0123456789ab",
        model="iris-classifier",
        version=3,
        from_env="staging",
        to_env="prod",
        source={"env": "staging"},
        requested_by=Actor("alice@example.com", "--as"),
        requested_at=T0,
        expires_hours=hours,
    )
    return ApprovalRequest({**record, "state": state})


def test_a_request_expires_its_hours_after_it_was_made() -> None:
    made = request(hours=72)

    assert made.expires_at == T0 + dt.timedelta(hours=72)
    assert made.record["requested_by_source"] == "--as"
    assert made.status(T0 + dt.timedelta(hours=71, minutes=59)) == PENDING
    assert made.status(T0 + dt.timedelta(hours=72)) == EXPIRED
    assert made.expired(T0 + dt.timedelta(days=30))


def test_a_decided_request_never_shows_as_expired() -> None:
    decided = request(hours=1, state=APPROVED)

    assert decided.status(T0 + dt.timedelta(days=30)) == APPROVED
    assert not decided.expired(T0 + dt.timedelta(days=30))


@pytest.mark.parametrize("hours", [0, -1])
def test_a_request_must_expire_after_a_positive_time(hours: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        expires_at(T0, hours)


# --- paths and events -------------------------------------------------------------------------
def test_the_paths_of_approvals_and_promotions() -> None:
    assert layout.approval_path("0123456789ab") == "approvals/0123456789ab.json"
    assert layout.promotion_path("iris-classifier", 3, "staging") == (
        "promotions/iris-classifier/3-from-staging.json"
    )
    assert layout.approval_ids(
        ["approvals/0123456789ab.json", "approvals/notes.txt", "approvals/x/0123456789ab.json"]
    ) == ["0123456789ab"]
    with pytest.raises(ValueError, match="not an approval id"):
        layout.approval_path("../registry/iris")


def test_a_promoted_run_has_its_own_stable_id() -> None:
    first = layout.promoted_run_id("staging", "acme-ml-staging", "iris-classifier", 3)

    assert layout.RUN_ID_PATTERN.match(first)
    assert first == layout.promoted_run_id("staging", "acme-ml-staging", "iris-classifier", 3)
    assert first != layout.promoted_run_id("dev", "acme-ml-dev", "iris-classifier", 3)
    assert first != layout.promoted_run_id("staging", "acme-ml-staging", "iris-classifier", 4)


def test_approval_events_share_one_topic_with_an_archive_and_no_push() -> None:
    requested, decided = events_pb2.ApprovalRequested(), events_pb2.ApprovalDecided()

    assert events.topic_for(requested) == events.topic_for(decided) == events.APPROVALS
    assert events.EVENTS_OF_TOPIC[events.APPROVALS] == (
        requested.DESCRIPTOR.full_name,
        decided.DESCRIPTOR.full_name,
    )
    # Several types: read by the event_type attribute, never by the topic alone.
    assert events.APPROVALS not in events.EVENT_FOR_TOPIC
    assert events.APPROVALS in TOPOLOGY.topics
    assert [p.name for p in TOPOLOGY.pull if p.topic == events.APPROVALS] == ["approvals-archive"]
    # The notifier is pushed both types on one subscription, and tells each apart.
    (push,) = [s for s in TOPOLOGY.push if s.topic == events.APPROVALS]
    assert push.service == "notifier" and push.event == ""


@pytest.mark.parametrize(
    ("choices", "enum"),
    [
        (events.ACTOR_SOURCE, events_pb2.ActorSource),
        (events.APPROVAL_DECISION, events_pb2.ApprovalDecision),
        (events.HOLDOUT_SOURCE, events_pb2.HoldoutSource),
    ],
)
def test_every_new_enum_value_has_one_text(choices: events.Choices[Any], enum: Any) -> None:
    assert set(choices.values.values()) == {v for v in enum.values() if v != 0}


# --- the command ---------------------------------------------------------------------------------
def test_promote_with_only_a_model_still_promotes_its_canary_on_the_local_stack(
    tmp_path: Path,
) -> None:
    result = CliRunner().invoke(
        cli.app, ["promote", "iris-classifier", "--state-dir", str(tmp_path)]
    )

    # cli_rollout's canary promotion, which needs the running stack's deployer.
    assert result.exit_code == 1
    assert "the local stack is not running" in result.output


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["promote", "iris-classifier", "3"], "add --to ENV"),
        (["promote", "iris-classifier", "--from", "dev"], "add --to ENV"),
        (["promote", "iris-classifier", "--to", "prod"], "which version?"),
        (["promote", "iris-classifier", "3", "--to", "dev"], "dev is the first environment"),
    ],
)
def test_promote_says_what_is_missing(args: list[str], said: str) -> None:
    result = CliRunner().invoke(cli.app, args)

    assert result.exit_code == 1 and said in result.output, result.output
