"""A local Cloud Identity Groups API v1: groups.lookup and
groups.memberships.checkTransitiveMembership, the two methods the console calls to learn
whether a caller is in a `group:` entry of MLPIPE_CONSOLE_ACTORS, answering as the reference
says. The real discovery-based client (google-api-python-client) drives it with
`client_options={"api_endpoint": stand_in.url}` and anonymous credentials.

It holds groups by email, each with its members' emails; a member may itself be a group, whose
members are then members too (transitively). `requests` counts what it was asked.

Every rule and its source are in docs/cloud-identity-standin.md (G1..G11); the comments name
them.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from mlpipe_ops.standins.google_api import ApiError, close, dumps, json_handler, serve

HOST = "127.0.0.1"
# G1: https://cloud.google.com/identity/docs/reference/rest/v1/groups/lookup
LOOKUP = re.compile(r"^/v1/groups:lookup$")
# G4: https://cloud.google.com/identity/docs/reference/rest/v1/groups.memberships/checkTransitiveMembership
CHECK = re.compile(r"^/v1/groups/(?P<group>[^/]+)/memberships:checkTransitiveMembership$")
# G6: the one CEL expression served, "member_key_id == 'member_key_id_value'" (the reference's
# example query), in single or double quotes.
MEMBER_QUERY = re.compile(r"""^\s*member_key_id\s*==\s*(?P<q>['"])(?P<id>[^'"]+)(?P=q)\s*$""")


def group_id(email: str) -> str:
    """G3: a stable id for a group, 15 lowercase hex digits (like Cloud Identity's ids)."""
    return hashlib.sha256(email.lower().encode()).hexdigest()[:15]


@dataclass
class CloudIdentityStandIn:
    """The stand-in: `add_group` fills it, `start()` serves it on 127.0.0.1 (a free port unless
    `port` is given) in a thread, `stop()` ends it. With `readable` False every request is
    refused as Cloud Identity refuses an account that may not view the groups (G9)."""

    port: int = 0
    readable: bool = True
    requests: list[str] = field(default_factory=list)  # G11: "METHOD path", in order
    _members: dict[str, set[str]] = field(default_factory=dict)  # group email -> member emails
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def start(self) -> CloudIdentityStandIn:
        handler = json_handler(self, "cloud identity", ("GET", "POST"))
        self._server = serve(handler, self.port, "cloud-identity")
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        close(self._server)
        self._server = None

    def __enter__(self) -> CloudIdentityStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_group(self, email: str, *members: str) -> str:
        """Create the group `email` (or add to it) with `members` (users' or groups' emails);
        its resource name, `groups/ID`."""
        with self._lock:
            self._members.setdefault(email.lower(), set()).update(m.lower() for m in members)
        return f"groups/{group_id(email)}"

    # --- requests ----------------------------------------------------------------------------
    def handle(self, method: str, path: str, raw: bytes) -> tuple[int, bytes]:
        parts = urlsplit(path)
        query = parse_qs(parts.query)
        with self._lock:
            self.requests.append(f"{method} {parts.path}")
        try:
            if not self.readable:  # G9
                raise ApiError(
                    "PERMISSION_DENIED", "The caller does not have permission"
                )  # message: assumed
            if method == "GET" and LOOKUP.match(parts.path):
                return 200, dumps({"name": self._lookup(_one(query, "groupKey.id"))})
            if method == "GET" and (m := CHECK.match(parts.path)):
                member = _member(_one(query, "query"))
                found = self._has_member(self._group_by_id(m["group"]), member)
                # G5: a proto3 bool left at false is omitted from the JSON.
                return 200, dumps({"hasMembership": True} if found else {})
            raise ApiError("NOT_FOUND", f"no method {method} {parts.path} here")  # G10
        except ApiError as exc:
            return exc.http_status, dumps(exc.body())

    def _lookup(self, email: str) -> str:
        with self._lock:
            known = email.lower() in self._members
        if not known:  # G2
            raise ApiError("NOT_FOUND", f"Group {email} not found")
        return f"groups/{group_id(email)}"

    def _group_by_id(self, gid: str) -> str:
        with self._lock:
            for email in self._members:
                if group_id(email) == gid:
                    return email
        raise ApiError("NOT_FOUND", f"Group groups/{gid} not found")  # G7

    def _has_member(self, group: str, member: str) -> bool:
        """G8: `member` is in `group` directly or through groups in it (a cycle ends)."""
        seen: set[str] = set()
        todo = [group]
        with self._lock:
            while todo:
                current = todo.pop()
                if current in seen:
                    continue
                seen.add(current)
                members = self._members.get(current, set())
                if member in members:
                    return True
                todo.extend(m for m in members if m in self._members)
        return False


def _one(query: dict[str, list[str]], name: str) -> str:
    """G2, G6: a required query parameter."""
    values = query.get(name) or [""]
    if not values[0]:
        raise ApiError("INVALID_ARGUMENT", f"Request field {name} is required")
    return values[0]


def _member(query: str) -> str:
    """G6: the member of `member_key_id == '…'`; any other expression is refused."""
    m = MEMBER_QUERY.match(query)
    if m is None:
        raise ApiError(
            "INVALID_ARGUMENT",
            f"query {query!r} is not member_key_id == '<email>' (the one served)",
        )
    return m["id"].lower()
