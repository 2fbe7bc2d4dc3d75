"""Who is calling, and whether they may act (promote, roll back, replay).

Everyone the platform lets in may read. Acting needs an identity in MLPIPE_CONSOLE_ACTORS,
checked here from the request itself, never from anything the page sends:
- iap: Identity-Aware Proxy names the signed-in user. With MLPIPE_CONSOLE_IAP_AUDIENCE set
  (the "Signed Header JWT audience" of IAP's settings) the identity is the email of IAP's signed
  `X-Goog-IAP-JWT-Assertion` (ES256, IAP's public keys, issuer https://cloud.google.com/iap,
  that audience: cloud.google.com/iap/docs/signed-headers-howto), which nobody who bypasses
  IAP can forge; without it, IAP's unsigned `X-Goog-Authenticated-User-Email`
  ("accounts.google.com:alice@example.com"), to be trusted only when nothing but IAP may invoke
  the service;
- id_token: a Google ID token for this service in `Authorization: Bearer`, verified with the
  library's verifier (signature, expiry, issuer, audience), its verified email the identity;
- local: with the emulators only, everyone is "local" and may act.
A `group:` entry of the actors lets a group's members act, as Cloud Identity says (groups.py).
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.auth import exceptions as auth_exceptions
from google.auth import jwt

from mlpipe.runtime.auth import EMULATOR_HOSTS, PushAuthError, PushVerifier
from mlpipe.runtime.settings import SettingsError
from mlpipe_console.groups import GroupCheck
from mlpipe_console.settings import ConsoleSettings

IAP_EMAIL_HEADER = "x-goog-authenticated-user-email"
IAP_ASSERTION_HEADER = "x-goog-iap-jwt-assertion"
IAP_ISSUER = "https://cloud.google.com/iap"
LOCAL = "local"


@dataclass(frozen=True)
class Caller:
    identity: str  # an email, or "local"
    how: str  # iap, id_token or local
    may_act: bool


class IdentityError(Exception):
    """The request carries no identity the console accepts (401) or a bad one (403)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class IapVerifier:
    """Checks IAP's signed header: an ES256 JWT by one of IAP's keys ({key id: PEM} at
    `certs_url`, fetched once and kept for an hour, again at once for an unknown key id), for
    `audience`, issued by IAP."""

    audience: str
    certs_url: str
    cache_seconds: float = 3600.0
    _certs: dict[str, str] = field(default_factory=dict)
    _fetched_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _keys(self, kid: str) -> dict[str, str]:
        with self._lock:
            stale = time.monotonic() - self._fetched_at > self.cache_seconds
            if stale or kid not in self._certs:
                try:
                    with urllib.request.urlopen(self.certs_url, timeout=5) as reply:
                        found = json.loads(reply.read())
                    self._certs = {str(k): str(v) for k, v in dict(found).items()}
                    self._fetched_at = time.monotonic()
                except (OSError, ValueError, TypeError) as exc:
                    if not self._certs:
                        raise IdentityError(503, f"cannot fetch IAP's keys: {exc}") from None
            return self._certs

    def email(self, assertion: str) -> str:
        if not assertion:
            raise IdentityError(401, f"no IAP assertion ({IAP_ASSERTION_HEADER} header missing)")
        try:
            header = jwt.decode_header(assertion)
            if header.get("alg") != "ES256":
                raise IdentityError(401, f"IAP assertion algorithm {header.get('alg')!r}")
            claims: Mapping[str, Any] = jwt.decode(
                assertion,
                certs=self._keys(str(header.get("kid", ""))),
                audience=self.audience,
                clock_skew_in_seconds=10,
            )
        except (ValueError, auth_exceptions.GoogleAuthError) as exc:
            raise IdentityError(401, f"IAP assertion rejected: {exc}") from None
        if claims.get("iss") != IAP_ISSUER:
            raise IdentityError(403, f"assertion issuer {claims.get('iss')!r} is not IAP")
        email = str(claims.get("email", ""))
        if not email:
            raise IdentityError(403, "the IAP assertion names no email")
        return email


def iap_verifier_for(settings: ConsoleSettings) -> IapVerifier | None:
    if settings.console_auth != "iap" or not settings.console_iap_audience:
        return None
    return IapVerifier(settings.console_iap_audience, settings.console_iap_certs_url)


def verifier_for(settings: ConsoleSettings) -> PushVerifier | None:
    """The ID token verifier (id_token), None otherwise; SettingsError for `local` away from
    the emulators."""
    if settings.console_auth == "local":
        missing = [name for name in EMULATOR_HOSTS if not os.environ.get(name)]
        if missing:
            raise SettingsError(
                "MLPIPE_CONSOLE_AUTH=local lets anyone act, which is only for the emulators, "
                f"but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
                "use iap or id_token"
            )
        return None
    if settings.console_auth == "id_token":
        # The verifier checks the token; who it names is checked against the actors below.
        return PushVerifier(settings.console_audience, "", settings.push_certs_url)
    return None


def listed_groups(actors: frozenset[str]) -> list[str]:
    """The emails of the `group:` entries of `actors`."""
    return sorted(a.removeprefix("group:") for a in actors if a.startswith("group:"))


def group_check_for(settings: ConsoleSettings) -> GroupCheck | None:
    """What asks Cloud Identity about the `group:` entries; None when there are none."""
    if not listed_groups(settings.actors()):
        return None
    return GroupCheck(settings.console_groups_url, settings.console_groups_cache_seconds)


def may_act(identity: str, actors: frozenset[str], groups: GroupCheck | None = None) -> bool:
    """Listed, in a listed domain, or (asked with `groups`) in a listed group."""
    identity = identity.lower()
    domain = identity.rpartition("@")[2]
    if identity in actors or (bool(domain) and f"domain:{domain}" in actors):
        return True
    if groups is None or not domain:
        return False
    return any(groups.is_member(identity, group) for group in listed_groups(actors))


def identify(
    headers: Mapping[str, str],
    settings: ConsoleSettings,
    verifier: PushVerifier | None,
    iap: IapVerifier | None = None,
    groups: GroupCheck | None = None,
) -> Caller:
    """The caller of one request; IdentityError when it names nobody."""
    if settings.console_auth == "local":
        return Caller(LOCAL, "local", True)
    if settings.console_auth == "iap" and iap is not None:
        email = iap.email(headers.get(IAP_ASSERTION_HEADER, ""))
        return Caller(email, "iap", may_act(email, settings.actors(), groups))
    if settings.console_auth == "iap":
        value = headers.get(IAP_EMAIL_HEADER, "")
        email = value.rpartition(":")[2].strip()
        if not email:
            raise IdentityError(401, f"no signed-in user ({IAP_EMAIL_HEADER} header missing)")
        return Caller(email, "iap", may_act(email, settings.actors(), groups))
    assert verifier is not None
    try:
        claims = verifier.claims(headers.get("authorization", ""))
    except PushAuthError as exc:
        raise IdentityError(exc.status, exc.message) from None
    email = str(claims.get("email", ""))
    if not email or not claims.get("email_verified"):
        raise IdentityError(403, "the token names no verified identity (email claim)")
    return Caller(email, "id_token", may_act(email, settings.actors(), groups))
