"""Push authentication: Pub/Sub's OIDC tokens checked against keys served from a local
endpoint (in the format Google serves its OAuth2 certificates), minted with a test key."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
import time
import types
from collections.abc import Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from google.auth import crypt, jwt

from mlpipe.messaging.push import make_envelope
from mlpipe.runtime.auth import PushAuthError, PushVerifier, push_verifier
from mlpipe.runtime.service import create_app
from mlpipe.runtime.settings import CommonSettings, SettingsError
from mlpipe.runtime.steps import StepResult

AUDIENCE = "https://mlpipe-ingest-123.us-central1.run.app"
PUSHER = "mlpipe-push-ingest@acme.iam.gserviceaccount.com"


def keypair(kid: str) -> tuple[crypt.RSASigner, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, kid)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    signer = crypt.RSASigner.from_string(pem, key_id=kid)
    return signer, cert.public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture(scope="module")
def google() -> tuple[crypt.RSASigner, crypt.RSASigner]:
    return keypair("google-1")[0], keypair("stranger")[0]


@pytest.fixture(scope="module")
def certs_url() -> Iterator[str]:
    """A local endpoint serving {kid: certificate PEM}, as Google's v1/certs does."""
    signer, cert = keypair("google-1")
    served = {"google-1": cert}
    fetches: list[float] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            fetches.append(time.time())
            body = json.dumps(served).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    CERTS["signer"] = signer
    CERTS["fetches"] = fetches
    yield f"http://127.0.0.1:{server.server_address[1]}/oauth2/v1/certs"
    server.shutdown()


CERTS: dict[str, Any] = {}


def token(signer: crypt.RSASigner | None = None, **claims: Any) -> str:
    now = int(time.time())
    payload = {
        "iss": "https://accounts.google.com",
        "aud": AUDIENCE,
        "email": PUSHER,
        "email_verified": True,
        "sub": "1234567890",
        "iat": now,
        "exp": now + 3600,
    } | claims
    return jwt.encode(signer or CERTS["signer"], payload).decode()


def unsigned(**claims: Any) -> str:
    import base64

    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    now = int(time.time())
    body = {"iss": "https://accounts.google.com", "aud": AUDIENCE, "email": PUSHER}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(body | {'exp': now + 60} | claims)}."


@pytest.fixture
def verifier(certs_url: str) -> PushVerifier:
    return PushVerifier(AUDIENCE, PUSHER, certs_url)


def test_a_valid_token_is_accepted(verifier: PushVerifier) -> None:
    claims = verifier.verify(f"Bearer {token()}")
    assert claims["email"] == PUSHER and claims["aud"] == AUDIENCE


@pytest.mark.parametrize(
    ("make", "status", "fragment"),
    [
        (lambda s: "", 401, "without a bearer token"),
        (lambda s: f"Basic {token()}", 401, "without a bearer token"),
        (lambda s: "Bearer not.a.token", 401, "malformed token"),
        (lambda s: f"Bearer {unsigned()}", 401, "'none' is not RS256"),
        (lambda s: f"Bearer {token(s)}", 401, "token rejected"),  # another key
        (
            lambda s: f"Bearer {token(exp=int(time.time()) - 120, iat=int(time.time()) - 3720)}",
            401,
            "expired",
        ),
        (lambda s: f"Bearer {token(aud='https://elsewhere.run.app')}", 403, "audience"),
        (lambda s: f"Bearer {token(email='someone@evil.example')}", 403, "identity"),
        (lambda s: f"Bearer {token(email_verified=False)}", 403, "identity"),
        (lambda s: f"Bearer {token(iss='https://evil.example')}", 403, "issuer"),
    ],
    ids=[
        "missing",
        "not-bearer",
        "malformed",
        "unsigned",
        "other-key",
        "expired",
        "wrong-audience",
        "wrong-email",
        "unverified-email",
        "wrong-issuer",
    ],
)
def test_a_bad_token_is_refused_with_the_reason(
    verifier: PushVerifier,
    google: tuple[crypt.RSASigner, crypt.RSASigner],
    make: Any,
    status: int,
    fragment: str,
) -> None:
    with pytest.raises(PushAuthError) as refused:
        verifier.verify(make(google[1]))
    assert refused.value.status == status
    assert fragment in refused.value.message, refused.value.message


def test_certificates_are_fetched_once_and_kept(verifier: PushVerifier) -> None:
    before = len(CERTS["fetches"])
    for _ in range(5):
        verifier.verify(f"Bearer {token()}")
    assert len(CERTS["fetches"]) - before == 1


def test_the_push_route_refuses_before_any_handler_runs(verifier: PushVerifier) -> None:
    handled: list[Any] = []

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        app.state.clients = types.SimpleNamespace(
            push_verifier=verifier,
            settings=types.SimpleNamespace(max_push_bytes=4096),
            failures=None,
        )
        app.state.step = lambda message: handled.append(message) or StepResult("done")
        yield

    body = make_envelope(b'{"requestId": "r1"}')
    with TestClient(create_app("ingest", lifespan)) as client:
        refused = client.post("/pubsub/push", content=body)
        stranger = client.post(
            "/pubsub/push",
            content=body,
            headers={"authorization": f"Bearer {token(aud='https://elsewhere.run.app')}"},
        )
        big = client.post(
            "/pubsub/push",
            content=b"x" * 5000,
            headers={"authorization": f"Bearer {token()}"},
        )
        admitted = client.post(
            "/pubsub/push", content=body, headers={"authorization": f"Bearer {token()}"}
        )

    assert refused.status_code == 401 and "bearer" in refused.json()["detail"]
    assert stranger.status_code == 403
    assert big.status_code == 413 and "4096-byte limit" in big.json()["detail"]
    assert admitted.status_code == 200 and admitted.json()["status"] == "done"
    assert len(handled) == 1


def settings(**values: str) -> CommonSettings:
    return CommonSettings(MLPIPE_PROJECT="p", bucket="b", **values)  # type: ignore[call-arg]


def test_no_push_auth_is_refused_outside_the_emulators(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:1")
    with pytest.raises(SettingsError, match="PUBSUB_EMULATOR_HOST is not set"):
        push_verifier(settings(push_auth="none"))

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:2")
    assert push_verifier(settings(push_auth="none")) is None


def test_oidc_needs_its_audience_and_service_account() -> None:
    with pytest.raises(SettingsError, match="MLPIPE_PUSH_AUDIENCE and MLPIPE_PUSH_SERVICE_ACCOUNT"):
        push_verifier(settings(push_auth="oidc"))
    made = push_verifier(
        settings(push_auth="oidc", push_audience=AUDIENCE, push_service_account=PUSHER)
    )
    assert made is not None and made.audience == AUDIENCE


CALLER = "scheduler-job@acme.iam.gserviceaccount.com"


@pytest.mark.parametrize(
    ("email", "callers", "admitted"),
    [
        (PUSHER, frozenset(), True),  # the push account may always call directly
        (CALLER, frozenset({CALLER}), True),
        (CALLER, frozenset({"*"}), True),  # whoever Cloud Run's IAM admitted
        (CALLER, frozenset(), False),
        ("someone@example.com", frozenset({CALLER}), False),
    ],
)
def test_a_direct_caller_is_admitted_only_when_listed(
    verifier: PushVerifier, email: str, callers: frozenset[str], admitted: bool
) -> None:
    authorization = f"Bearer {token(email=email)}"
    if admitted:
        assert verifier.verify_caller(authorization, callers) == email
    else:
        with pytest.raises(PushAuthError) as refused:
            verifier.verify_caller(authorization, callers)
        assert refused.value.status == 403 and email in refused.value.message


def test_a_direct_caller_needs_a_verified_identity_for_this_service(
    verifier: PushVerifier,
) -> None:
    with pytest.raises(PushAuthError, match="no verified identity") as unverified:
        verifier.verify_caller(f"Bearer {token(email_verified=False)}", frozenset({"*"}))
    assert unverified.value.status == 403
    with pytest.raises(PushAuthError, match="audience") as elsewhere:
        verifier.verify_caller(f"Bearer {token(aud='https://other.run.app')}", frozenset({"*"}))
    assert elsewhere.value.status == 403
    with pytest.raises(PushAuthError, match="without a bearer token") as anonymous:
        verifier.verify_caller("", frozenset({"*"}))
    assert anonymous.value.status == 401
