"""Who the console's caller is and whether they may act: IAP's header or its signed assertion
(against a local stand-in of IAP's keys), a verified Google ID token (the library's verifier
against a local certificates endpoint), the local identity only with the emulators."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.auth import jwt
from google.auth.crypt import es256

from mlpipe.runtime.settings import SettingsError
from mlpipe_console.identity import (
    IdentityError,
    iap_verifier_for,
    identify,
    may_act,
    verifier_for,
)
from mlpipe_console.settings import ConsoleSettings
from tests.unit.test_push_auth import AUDIENCE, certs_url, keypair, token

__all__ = ["certs_url"]  # the fixture, shared with the push tests

ACTORS = "ops@example.com, domain:sre.example.com"


def settings(**values: str) -> ConsoleSettings:
    # The project's setting is read by its variable's name (MLPIPE_PROJECT or GOOGLE_CLOUD_PROJECT).
    fields = {"MLPIPE_PROJECT": "p", "bucket": "b", "console_actors": ACTORS, **values}
    return ConsoleSettings(**fields)  # type: ignore[arg-type]


def test_actors_are_listed_emails_and_whole_domains() -> None:
    actors = settings(console_auth="iap").actors()

    assert may_act("ops@example.com", actors)
    assert may_act("OPS@example.com", actors)
    assert may_act("anyone@sre.example.com", actors)
    assert not may_act("viewer@example.com", actors)
    assert not may_act("someone@evil-sre.example.com", actors)


def test_iap_names_the_signed_in_user() -> None:
    chosen = settings(console_auth="iap")
    header = "x-goog-authenticated-user-email"

    viewer = identify({header: "accounts.google.com:viewer@example.com"}, chosen, None)
    actor = identify({header: "accounts.google.com:ops@example.com"}, chosen, None)

    assert (viewer.identity, viewer.how, viewer.may_act) == ("viewer@example.com", "iap", False)
    assert actor.may_act
    with pytest.raises(IdentityError) as missing:
        identify({}, chosen, None)
    assert missing.value.status == 401


def test_an_id_token_is_verified_before_its_email_counts(certs_url: str) -> None:
    chosen = settings(console_audience=AUDIENCE, push_certs_url=certs_url)
    verifier = verifier_for(chosen)
    assert verifier is not None

    caller = identify(
        {"authorization": f"Bearer {token(email='ops@example.com')}"}, chosen, verifier
    )
    stranger, _ = keypair("google-1")  # same key id, another key: a forged signature

    assert (caller.identity, caller.how, caller.may_act) == ("ops@example.com", "id_token", True)
    for headers, status in (
        ({}, 401),
        ({"authorization": f"Bearer {token(stranger, email='ops@example.com')}"}, 401),
        ({"authorization": f"Bearer {token(aud='https://elsewhere')}"}, 403),
        ({"authorization": f"Bearer {token(email_verified=False)}"}, 403),
    ):
        with pytest.raises(IdentityError) as refused:
            identify(headers, chosen, verifier)
        assert refused.value.status == status, headers


def test_id_token_mode_needs_its_audience() -> None:
    with pytest.raises(ValueError, match="MLPIPE_CONSOLE_AUDIENCE"):
        settings(console_auth="id_token")


def test_the_local_identity_is_refused_away_from_the_emulators(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")

    with pytest.raises(SettingsError, match="PUBSUB_EMULATOR_HOST is not set"):
        verifier_for(settings(console_auth="local"))
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:2")
    assert verifier_for(settings(console_auth="local")) is None
    assert identify({}, settings(console_auth="local"), None).may_act


@pytest.fixture(scope="module")
def iap_keys() -> Iterator[tuple[str, es256.ES256Signer]]:
    """A local stand-in of IAP's public keys ({key id: PEM public key}, as IAP's public_key
    URL serves them) and the signer of one of them."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    body = json.dumps({"iap-1": public.decode()}).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield (
        f"http://127.0.0.1:{server.server_address[1]}/iap/verify/public_key",
        es256.ES256Signer.from_string(pem, key_id="iap-1"),
    )
    server.shutdown()


IAP_AUDIENCE = "/projects/123/locations/us-central1/services/mlpipe-console"


def assertion(signer: es256.ES256Signer, **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": "https://cloud.google.com/iap",
        "aud": IAP_AUDIENCE,
        "email": "ops@example.com",
        "sub": "accounts.google.com:1",
        "iat": now,
        "exp": now + 600,
    } | claims
    return jwt.encode(signer, payload).decode()


def test_with_its_audience_set_only_iaps_signed_assertion_names_the_user(
    iap_keys: tuple[str, es256.ES256Signer],
) -> None:
    certs_url, signer = iap_keys
    chosen = settings(
        console_auth="iap", console_iap_audience=IAP_AUDIENCE, console_iap_certs_url=certs_url
    )
    iap = iap_verifier_for(chosen)
    forged = {"x-goog-authenticated-user-email": "accounts.google.com:ops@example.com"}

    caller = identify({"x-goog-iap-jwt-assertion": assertion(signer)}, chosen, None, iap)

    assert (caller.identity, caller.how, caller.may_act) == ("ops@example.com", "iap", True)
    other = es256.ES256Signer.from_string(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        key_id="iap-1",
    )
    for headers, status in (
        (forged, 401),  # the unsigned header alone no longer counts
        ({"x-goog-iap-jwt-assertion": assertion(other)}, 401),
        ({"x-goog-iap-jwt-assertion": assertion(signer, aud="/projects/9/other")}, 401),
        ({"x-goog-iap-jwt-assertion": assertion(signer, iss="https://accounts.google.com")}, 403),
        ({"x-goog-iap-jwt-assertion": assertion(signer, exp=int(time.time()) - 600)}, 401),
    ):
        with pytest.raises(IdentityError) as refused:
            identify(headers, chosen, None, iap)
        assert refused.value.status == status, headers
