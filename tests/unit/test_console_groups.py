"""Who may act through a `group:` entry of MLPIPE_CONSOLE_ACTORS: the real discovery-based
client (google-api-python-client) against the local Cloud Identity stand-in."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest

from mlpipe_console.groups import GroupCheck
from mlpipe_console.identity import group_check_for, identify, may_act
from mlpipe_console.settings import ConsoleSettings
from mlpipe_ops.standins.cloud_identity import CloudIdentityStandIn

ACTORS = frozenset({"ops@example.com", "domain:sre.example.com", "group:release@example.com"})
IAP_HEADER = "x-goog-authenticated-user-email"


@pytest.fixture
def stand_in() -> Iterator[CloudIdentityStandIn]:
    with CloudIdentityStandIn() as served:
        served.add_group("release@example.com", "alice@example.com", "oncall@example.com")
        served.add_group("oncall@example.com", "bob@example.com")  # nested in release@
        served.add_group("elsewhere@example.com", "carol@example.com")
        yield served


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The console's lines (the client library logs its own warnings too)."""
    return [r.getMessage() for r in caplog.records if r.name == "mlpipe_console.groups"]


def free_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


def test_a_direct_member_and_a_member_of_a_nested_group_may_act(
    stand_in: CloudIdentityStandIn,
) -> None:
    groups = GroupCheck(stand_in.url)

    assert may_act("alice@example.com", ACTORS, groups)
    assert may_act("Bob@Example.com", ACTORS, groups)
    assert not may_act("carol@example.com", ACTORS, groups)  # in another group only
    assert not may_act("dave@example.com", ACTORS, groups)


def test_emails_and_domains_need_no_call(stand_in: CloudIdentityStandIn) -> None:
    groups = GroupCheck(stand_in.url)

    assert may_act("ops@example.com", ACTORS, groups)
    assert may_act("anyone@sre.example.com", ACTORS, groups)
    assert not may_act("someone@evil-sre.example.com", frozenset({"domain:sre.example.com"}))
    assert not may_act("alice@example.com", ACTORS)  # no one to ask: groups grant nothing
    assert stand_in.requests == []


def test_an_answer_is_kept_and_asked_again_once_it_is_old(stand_in: CloudIdentityStandIn) -> None:
    groups = GroupCheck(stand_in.url)

    assert may_act("alice@example.com", ACTORS, groups)
    assert not may_act("dave@example.com", ACTORS, groups)
    asked = len(stand_in.requests)
    assert may_act("alice@example.com", ACTORS, groups)
    assert not may_act("dave@example.com", ACTORS, groups)

    # lookup once for the group, then one membership check per caller
    assert asked == 3
    assert len(stand_in.requests) == asked
    assert stand_in.requests[0] == "GET /v1/groups:lookup"
    assert stand_in.requests[1].endswith("/memberships:checkTransitiveMembership")

    stale = GroupCheck(stand_in.url, cache_seconds=0)
    stale.is_member("alice@example.com", "release@example.com")
    stale.is_member("alice@example.com", "release@example.com")
    assert len(stand_in.requests) == asked + 4


def test_an_unknown_group_refuses_and_is_logged_once(
    stand_in: CloudIdentityStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    groups = GroupCheck(stand_in.url)
    actors = frozenset({"group:nobody@example.com"})

    with caplog.at_level(logging.WARNING, logger="mlpipe_console.groups"):
        assert not may_act("alice@example.com", actors, groups)
        assert not may_act("bob@example.com", actors, groups)

    (line,) = logged(caplog)
    assert "group:nobody@example.com" in line and "404" in line
    assert "Groups Reader admin role" in line


def test_an_account_that_may_not_read_groups_refuses(
    stand_in: CloudIdentityStandIn, caplog: pytest.LogCaptureFixture
) -> None:
    stand_in.readable = False
    groups = GroupCheck(stand_in.url)

    with caplog.at_level(logging.WARNING, logger="mlpipe_console.groups"):
        assert not may_act("alice@example.com", ACTORS, groups)

    (line,) = logged(caplog)
    assert "403" in line and "view" in line


def test_an_unreachable_api_refuses_without_raising(caplog: pytest.LogCaptureFixture) -> None:
    groups = GroupCheck(free_port_url(), timeout_seconds=2)

    with caplog.at_level(logging.WARNING, logger="mlpipe_console.groups"):
        assert not may_act("alice@example.com", ACTORS, groups)
        assert not may_act("bob@example.com", ACTORS, groups)

    (line,) = logged(caplog)
    assert "did not answer" in line and "Groups Reader admin role" in line


def test_the_caller_of_a_request_may_act_through_a_group(stand_in: CloudIdentityStandIn) -> None:
    chosen = ConsoleSettings(  # type: ignore[call-arg]
        MLPIPE_PROJECT="p",
        bucket="b",
        console_auth="iap",
        console_actors="ops@example.com, group:release@example.com",
        console_groups_url=stand_in.url,
    )
    groups = group_check_for(chosen)
    assert groups is not None

    member = identify(
        {IAP_HEADER: "accounts.google.com:bob@example.com"}, chosen, None, None, groups
    )
    viewer = identify(
        {IAP_HEADER: "accounts.google.com:dave@example.com"}, chosen, None, None, groups
    )

    assert (member.identity, member.may_act) == ("bob@example.com", True)
    assert not viewer.may_act
    without_groups = chosen.model_copy(update={"console_actors": "ops@example.com"})
    assert group_check_for(without_groups) is None
