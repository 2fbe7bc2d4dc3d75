"""Whether a caller is in a Google group: the `group:team@example.com` entries of
MLPIPE_CONSOLE_ACTORS, asked of Cloud Identity through its discovery-based client.

Two calls a (caller, group): groups.lookup turns the group's email into its resource name
(https://cloud.google.com/identity/docs/reference/rest/v1/groups/lookup), then
groups.memberships.checkTransitiveMembership says whether the caller is a member, directly or
through groups in it
(https://cloud.google.com/identity/docs/reference/rest/v1/groups.memberships/checkTransitiveMembership).
Each answer is kept for `cache_seconds`. A call that fails (unreachable, 403, 404) grants
nothing: the caller may not act, and the reason is logged once per group with what to grant.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import google.auth
import google_auth_httplib2  # type: ignore[import-untyped]
import httplib2  # type: ignore[import-untyped]
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials, Credentials
from googleapiclient import discovery, errors  # type: ignore[import-untyped]

log = logging.getLogger(__name__)

GROUPS_SCOPE = "https://www.googleapis.com/auth/cloud-identity.groups.readonly"
# A failed check is asked again after this long (or the cache's time, if shorter): an
# unreachable API must not hold every page for its time-out, nor a fixed grant wait 5 minutes.
FAILURE_SECONDS = 30.0
TO_GRANT = (
    "the console's service account needs permission to view the group's memberships: in "
    "Google Workspace or Cloud Identity, the Groups Reader admin role, or the group's "
    "membership visible to it (and the Cloud Identity API enabled in its project)"
)


class GroupCheckFailed(Exception):
    """Cloud Identity gave no answer: why, for the log."""


@dataclass
class GroupCheck:
    """Asks Cloud Identity at `url` ("" the real API, with the default credentials; a local
    URL, anonymously) whether a caller is in a group, keeping each answer."""

    url: str = ""
    cache_seconds: float = 300.0
    timeout_seconds: float = 5.0
    _answers: dict[tuple[str, str], tuple[bool, float]] = field(default_factory=dict)
    _names: dict[str, tuple[str, float]] = field(default_factory=dict)
    _reported: set[str] = field(default_factory=set)
    _client: Any = None
    _credentials: Credentials | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def is_member(self, email: str, group: str) -> bool:
        """Whether `email` is a transitive member of the group `group` (False when Cloud
        Identity cannot say)."""
        key = (email.lower(), group.lower())
        with self._lock:
            cached = self._answers.get(key)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        try:
            answer, keep = self._ask(*key), self.cache_seconds
            with self._lock:
                self._reported.discard(key[1])
        except GroupCheckFailed as exc:
            answer, keep = False, min(FAILURE_SECONDS, self.cache_seconds)
            self._report(key[1], str(exc))
        with self._lock:
            self._answers[key] = (answer, time.monotonic() + keep)
        return answer

    def _report(self, group: str, reason: str) -> None:
        with self._lock:
            if group in self._reported:
                return
            self._reported.add(group)
        log.warning(
            "cannot tell who is in group:%s, so none of its members may act: %s; %s",
            group,
            reason,
            TO_GRANT,
        )

    def _ask(self, email: str, group: str) -> bool:
        if any(c in email for c in "'\"\\"):  # not a quoted CEL string; no such account here
            raise GroupCheckFailed(f"{email!r} cannot be asked about")
        try:
            client = self._service()
            name = self._name(client, group)
            reply = (
                client.groups()
                .memberships()
                .checkTransitiveMembership(parent=name, query=f"member_key_id == '{email}'")
                .execute(http=self._http())
            )
        except errors.HttpError as exc:
            raise GroupCheckFailed(self._refusal(exc)) from None
        except (
            OSError,
            httplib2.HttpLib2Error,
            errors.Error,
            auth_exceptions.GoogleAuthError,
            ValueError,
        ) as exc:
            where = self.url or "cloudidentity.googleapis.com"
            raise GroupCheckFailed(f"Cloud Identity at {where} did not answer: {exc!r}") from None
        # A false bool is left out of the JSON (proto3's JSON mapping).
        return bool(dict(reply).get("hasMembership", False))

    def _name(self, client: Any, group: str) -> str:
        with self._lock:
            found = self._names.get(group)
        if found is not None and found[1] > time.monotonic():
            return found[0]
        reply = client.groups().lookup(groupKey_id=group).execute(http=self._http())
        name = str(dict(reply).get("name", ""))
        if not name.startswith("groups/"):
            raise GroupCheckFailed(f"groups.lookup answered no group name: {reply!r}")
        with self._lock:
            self._names[group] = (name, time.monotonic() + self.cache_seconds)
        return name

    @staticmethod
    def _refusal(exc: errors.HttpError) -> str:
        status = exc.status_code
        said = f"Cloud Identity answered {status}: {exc.reason}"
        if status == 404:
            return f"{said} (no such group, or one the console's account may not see)"
        if status == 403:
            # checkTransitiveMembership is also refused with 403 outside Google Workspace
            # Enterprise and Cloud Identity Premium accounts (its reference page).
            return f"{said} (the console's account may not view this group's memberships)"
        return said

    def _service(self) -> Any:
        with self._lock:
            if self._client is None:
                if self.url:
                    self._credentials = AnonymousCredentials()
                else:
                    self._credentials, _ = google.auth.default(scopes=[GROUPS_SCOPE])
                options = {"api_endpoint": self.url} if self.url else None
                self._client = discovery.build(
                    "cloudidentity",
                    "v1",
                    credentials=self._credentials,
                    static_discovery=True,
                    client_options=options,
                    cache_discovery=False,
                )
            return self._client

    def _http(self) -> google_auth_httplib2.AuthorizedHttp:
        """A connection for one call: httplib2's are not safe across threads, and the
        client's own waits up to a minute."""
        return google_auth_httplib2.AuthorizedHttp(
            self._credentials, http=httplib2.Http(timeout=self.timeout_seconds)
        )
