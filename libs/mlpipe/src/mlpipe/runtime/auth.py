"""Who may push: Pub/Sub's OIDC token on every push request, checked before any handler runs.

A push subscription in a real project signs each request with a Google-issued ID token for its
push service account, with the receiving service's URL as audience (`mlpipe_ops.infra` sets both).
Cloud Run checks the token too when the service is private; checking it here as well means a
service that is made public by mistake, or reached another way, still refuses strangers.

    MLPIPE_PUSH_AUTH=oidc (default)   MLPIPE_PUSH_AUDIENCE, MLPIPE_PUSH_SERVICE_ACCOUNT required
    MLPIPE_PUSH_AUTH=none             only with the emulators (PUBSUB_EMULATOR_HOST and
                                      STORAGE_EMULATOR_HOST set); refused otherwise

Missing, malformed, unsigned, badly signed or expired tokens are 401; a valid token for another
audience, issuer or identity is 403. Google's certificates are fetched once and kept for an
hour (again at once when a token names a key they lack).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.auth import exceptions as auth_exceptions
from google.auth import jwt

from mlpipe.runtime.settings import CommonSettings, SettingsError

log = logging.getLogger(__name__)

GOOGLE_CERTS_URL = "https://www.googleapis.com/oauth2/v1/certs"
ISSUERS = frozenset({"accounts.google.com", "https://accounts.google.com"})
EMULATOR_HOSTS = ("PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST")


class PushAuthError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class PushVerifier:
    audience: str
    service_account: str
    certs_url: str = GOOGLE_CERTS_URL
    cache_seconds: float = 3600.0
    clock_skew_seconds: int = 10
    _certs: dict[str, str] = field(default_factory=dict)
    _fetched_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _fetch(self) -> dict[str, str]:
        with urllib.request.urlopen(self.certs_url, timeout=5) as reply:
            certs = json.loads(reply.read())
        if not isinstance(certs, dict) or not certs:
            raise PushAuthError(503, f"no signing certificates at {self.certs_url}")
        return {str(k): str(v) for k, v in certs.items()}

    def certs(self, kid: str | None) -> dict[str, str]:
        with self._lock:
            stale = time.monotonic() - self._fetched_at > self.cache_seconds
            if stale or not self._certs or (kid and kid not in self._certs):
                try:
                    self._certs = self._fetch()
                    self._fetched_at = time.monotonic()
                except (OSError, ValueError) as exc:
                    if not self._certs:
                        raise PushAuthError(
                            503, f"cannot fetch signing certificates: {exc}"
                        ) from None
                    log.warning("keeping cached signing certificates: %s", exc)
            return self._certs

    def verify(self, authorization: str) -> Mapping[str, Any]:
        """The token's claims; PushAuthError (401/403/503) when it does not admit the request."""
        claims = self.claims(authorization)
        if claims.get("email") != self.service_account or not claims.get("email_verified"):
            raise PushAuthError(
                403,
                f"token identity {claims.get('email')!r} is not the push service account "
                f"{self.service_account}",
            )
        return claims

    def verify_caller(self, authorization: str, callers: frozenset[str]) -> str:
        """A direct caller's verified identity: a Google ID token for this service whose
        identity is the push account or one of `callers` ("*": any identity, as Cloud Run's
        IAM already admitted it to a private service)."""
        claims = self.claims(authorization)
        email = str(claims.get("email", ""))
        if not email or not claims.get("email_verified"):
            raise PushAuthError(403, "token has no verified identity (email claim)")
        if "*" not in callers and email not in callers | {self.service_account}:
            raise PushAuthError(
                403, f"{email} may not call this service directly (MLPIPE_DIRECT_CALLERS)"
            )
        return email

    def claims(self, authorization: str) -> Mapping[str, Any]:
        """The claims of a valid Google-signed ID token for this service: signature, expiry,
        issuer and audience checked; who it names is for the caller to check."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise PushAuthError(401, "request without a bearer token (Authorization header)")
        token = token.strip()
        try:
            header = jwt.decode_header(token)
        except (ValueError, auth_exceptions.GoogleAuthError) as exc:
            raise PushAuthError(401, f"malformed token: {exc}") from None
        if header.get("alg") != "RS256":
            raise PushAuthError(401, f"token algorithm {header.get('alg')!r} is not RS256")
        try:
            claims = jwt.decode(
                token,
                certs=self.certs(header.get("kid")),
                verify=True,
                audience=None,  # checked below, to tell 403 from 401
                clock_skew_in_seconds=self.clock_skew_seconds,
            )
        except (ValueError, auth_exceptions.GoogleAuthError) as exc:
            raise PushAuthError(401, f"token rejected: {exc}") from None
        if claims.get("iss") not in ISSUERS:
            raise PushAuthError(403, f"token issuer {claims.get('iss')!r} is not Google")
        if claims.get("aud") != self.audience:
            raise PushAuthError(
                403, f"token audience {claims.get('aud')!r} is not this service ({self.audience})"
            )
        return claims


def push_verifier(settings: CommonSettings) -> PushVerifier | None:
    """The verifier the settings ask for, or None (emulators only); SettingsError otherwise."""
    if settings.push_auth == "none":
        missing = [name for name in EMULATOR_HOSTS if not os.environ.get(name)]
        if missing:
            raise SettingsError(
                "MLPIPE_PUSH_AUTH=none accepts unauthenticated pushes, which is only for the "
                f"emulators, but {' and '.join(missing)} is not set (real Google endpoints "
                "are configured): set MLPIPE_PUSH_AUTH=oidc"
            )
        return None
    missing = [
        env
        for env, value in (
            ("MLPIPE_PUSH_AUDIENCE", settings.push_audience),
            ("MLPIPE_PUSH_SERVICE_ACCOUNT", settings.push_service_account),
        )
        if not value
    ]
    if missing:
        raise SettingsError(
            f"MLPIPE_PUSH_AUTH=oidc needs {' and '.join(missing)} (this service's URL and the "
            "push subscription's service account); on the emulators set MLPIPE_PUSH_AUTH=none"
        )
    return PushVerifier(
        settings.push_audience, settings.push_service_account, settings.push_certs_url
    )
