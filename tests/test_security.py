"""Access control, rate limiting, the audit log and data hygiene, over HTTP on the session app.

The session app's authenticator, rate limiter and audit log are swapped for each test and restored after,
which is far cheaper than loading the models into a second app. Covered here:

* API keys (``X-API-Key``, sha256 hashes, every hash compared): 401 for a missing or unknown key, 403 for a
  ``client`` key on an ``admin`` endpoint, both in the error envelope; ``admin`` keys may do everything.
* Without keys: loopback clients only (others 401), a warning at start-up; ``FACE_ENV=production`` refuses
  to start without keys. ``python -m api.keys new`` prints a key whose entry works.
* Rate limiting per key, or per client address when open: 429 ``RATE_LIMITED`` with ``Retry-After``.
* The audit log: who, what, when and which user for every change; never a biometric.
* A deleted user leaves no trace in the store file; logs and error messages never carry keys, image bytes
  or descriptor values.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import secrets
import subprocess
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.config import ApiKeyEntry, Settings
from api.deps import get_audit, get_authenticator, get_rate_limiter
from api.main import create_app
from api.security import API_KEY_HEADER, AuditLog, Authenticator, RateLimiter, check_startup_security, hash_key
from api.store.npz import NpzFaceStore
from tests.helpers import JPEG, error_of

REPO = Path(__file__).resolve().parents[1]
UNKNOWN_ID = "0" * 32
ADMIN_KEY = secrets.token_urlsafe(32)
CLIENT_KEY = secrets.token_urlsafe(32)
OTHER_ADMIN_KEY = secrets.token_urlsafe(32)
NOT_AN_IMAGE = b"name,face\nada,1\n"  # refused as 415 before any model runs: enough to see the caller got through


def entry(name: str, scope: str, key: str) -> ApiKeyEntry:
    return ApiKeyEntry(name=name, scope=scope, sha256=hash_key(key))


KEYS = [entry("ops", "admin", ADMIN_KEY), entry("kiosk", "client", CLIENT_KEY), entry("ops2", "admin", OTHER_ADMIN_KEY)]


@dataclass
class Secured:
    client: TestClient
    audit_path: Path
    store: NpzFaceStore
    overrides: Any

    def use(self, keys: list[ApiKeyEntry] | None = None, rate: str | None = None) -> None:
        if keys is not None:
            self.overrides[get_authenticator] = Authenticator(keys)
        if rate is not None:
            self.overrides[get_rate_limiter] = RateLimiter(rate)


@pytest.fixture
def secured(client: TestClient, client_store: NpzFaceStore, overrides: Any, tmp_path: Path) -> Secured:
    """The session client on an empty store, with API keys configured, a fresh limiter and audit log."""
    audit_dir = tmp_path / "audit"  # apart from the store's folder, which the durability test reads
    audit_dir.mkdir()
    audit_path = audit_dir / "audit.log"
    overrides[get_audit] = AuditLog(audit_path)
    secured = Secured(client, audit_path, client_store, overrides)
    secured.use(keys=KEYS, rate="100000/minute")
    return secured


def key(value: str | None) -> dict[str, str]:
    return {} if value is None else {API_KEY_HEADER: value}


def register(
    client: TestClient, name: str, data: bytes, api_key: str | None = ADMIN_KEY, **form: str
) -> httpx.Response:
    return client.post(
        "/api/register",
        data={"name": name, **form},
        files=[("files", ("a.jpg", data, JPEG))],
        headers=key(api_key),
    )


# Requests that reach each endpoint; those with a user id use an id that does not exist (404 once through).
ADMIN_ENDPOINTS: dict[str, dict[str, Any]] = {
    "register": {"method": "POST", "url": "/api/register", "data": {"name": "x"}, "files": {"files": NOT_AN_IMAGE}},
    "add-faces": {"method": "POST", "url": f"/api/users/{UNKNOWN_ID}/faces", "files": {"files": NOT_AN_IMAGE}},
    "rename": {"method": "PATCH", "url": f"/api/users/{UNKNOWN_ID}", "json": {"name": "y"}},
    "delete": {"method": "DELETE", "url": f"/api/users/{UNKNOWN_ID}"},
    "list": {"method": "GET", "url": "/api/users"},
    "get": {"method": "GET", "url": f"/api/users/{UNKNOWN_ID}"},
}
CLIENT_ENDPOINTS: dict[str, dict[str, Any]] = {
    "verify": {"method": "POST", "url": "/api/verify", "files": {"file": NOT_AN_IMAGE}},
    "compare": {"method": "POST", "url": "/api/compare", "files": {"image1": NOT_AN_IMAGE, "image2": NOT_AN_IMAGE}},
    "emotion": {"method": "POST", "url": "/api/emotion", "files": {"file": NOT_AN_IMAGE}},
    "anti-spoof": {"method": "POST", "url": "/api/anti-spoof", "files": {"file": NOT_AN_IMAGE}},
}
# Past authentication: 404 (unknown user) / 415 (not an image), or 503 where the optional model is off.
THROUGH = {200, 404, 415, 503}


def add_mirrored_face(
    client: TestClient, user_id: str, photo: np.ndarray, to_jpeg: Any, api_key: str
) -> httpx.Response:
    """Add the mirror image of ``photo`` to a user as a second face (a duplicate of the first, allowed)."""
    mirrored = to_jpeg(np.ascontiguousarray(photo[:, ::-1]))
    return client.post(
        f"/api/users/{user_id}/faces",
        data={"allow_duplicate": "true"},
        files=[("files", ("m.jpg", mirrored, JPEG))],
        headers=key(api_key),
    )


def send(client: TestClient, spec: dict[str, Any], api_key: str | None) -> httpx.Response:
    spec = dict(spec)
    if "files" in spec:
        spec["files"] = [(field, ("f.bin", data, JPEG)) for field, data in spec["files"].items()]
    return client.request(headers=key(api_key), **spec)


# --- keys and scopes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", [*ADMIN_ENDPOINTS, *CLIENT_ENDPOINTS])
def test_missing_and_unknown_keys_answer_401(secured: Secured, endpoint: str) -> None:
    spec = {**ADMIN_ENDPOINTS, **CLIENT_ENDPOINTS}[endpoint]
    error_of(send(secured.client, spec, None), 401, "UNAUTHORIZED")
    error_of(send(secured.client, spec, ""), 401, "UNAUTHORIZED")
    unknown = error_of(send(secured.client, spec, "not-" + ADMIN_KEY), 401, "UNAUTHORIZED")
    assert ADMIN_KEY not in json.dumps(unknown)
    error_of(send(secured.client, spec, hash_key(ADMIN_KEY)), 401, "UNAUTHORIZED")  # the hash is not the key


@pytest.mark.parametrize("endpoint", list(ADMIN_ENDPOINTS))
def test_admin_endpoints_refuse_client_keys_with_403(secured: Secured, endpoint: str) -> None:
    spec = ADMIN_ENDPOINTS[endpoint]
    error = error_of(send(secured.client, spec, CLIENT_KEY), 403, "FORBIDDEN")
    assert error["details"] == {"scope": "client"} and "admin" in error["message"]
    assert send(secured.client, spec, ADMIN_KEY).status_code in THROUGH
    assert send(secured.client, spec, OTHER_ADMIN_KEY).status_code in THROUGH


@pytest.mark.parametrize("endpoint", list(CLIENT_ENDPOINTS))
def test_client_endpoints_accept_client_and_admin_keys(secured: Secured, endpoint: str) -> None:
    spec = CLIENT_ENDPOINTS[endpoint]
    for api_key in (CLIENT_KEY, ADMIN_KEY):
        response = send(secured.client, spec, api_key)
        assert response.status_code in THROUGH, response.text


def test_keys_work_end_to_end_and_probes_need_none(secured: Secured, astronaut_jpeg: bytes) -> None:
    client = secured.client
    created = register(client, "Astronaut", astronaut_jpeg)
    assert created.status_code == 201, created.text
    verified = client.post(
        "/api/verify", files={"file": ("p.jpg", astronaut_jpeg, JPEG)}, headers={API_KEY_HEADER.lower(): CLIENT_KEY}
    )
    assert verified.status_code == 200 and verified.json()["verified"] is True, verified.text
    for path in ("/", "/health/live", "/health/ready", "/openapi.json"):
        assert client.get(path).status_code == 200, path


def test_openapi_declares_the_key_header(secured: Secured) -> None:
    schemes = secured.client.get("/openapi.json").json()["components"]["securitySchemes"]
    scheme = next(iter(schemes.values()))
    assert scheme["type"] == "apiKey" and scheme["in"] == "header" and scheme["name"] == API_KEY_HEADER


def test_every_configured_hash_is_compared(monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant time: the presented key is checked against every hash, with no early exit on a match."""
    import api.security

    calls: list[tuple[bytes, bytes]] = []
    real = api.security.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(api.security.hmac, "compare_digest", counting)
    authenticator = Authenticator(KEYS)
    for presented, identity in ((ADMIN_KEY, "ops"), (OTHER_ADMIN_KEY, "ops2"), ("wrong", None)):
        calls.clear()
        if identity is None:
            with pytest.raises(api.security.AuthenticationError):
                authenticator.identify(presented, "127.0.0.1")
        else:
            assert authenticator.identify(presented, "203.0.113.5").identity == identity  # keys work from anywhere
        assert len(calls) == len(KEYS)
        assert all(isinstance(a, bytes) and len(a) == 32 for a, _ in calls)  # digests compared, never the key


def test_configuration_holds_only_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FACE_API_KEYS", json.dumps([k.model_dump() for k in KEYS]))
    settings = Settings()
    assert [k.name for k in settings.api_keys] == ["ops", "kiosk", "ops2"]
    assert ADMIN_KEY not in repr(settings) and ADMIN_KEY not in settings.model_dump_json()
    with pytest.raises(ValueError):
        ApiKeyEntry(name="plain", scope="admin", sha256=ADMIN_KEY)  # a plain key is not a hash
    with pytest.raises(ValueError):
        ApiKeyEntry(name="x", scope="root", sha256=hash_key("k"))


def test_keys_cli_prints_a_working_key_and_entry(secured: Secured, monkeypatch: pytest.MonkeyPatch) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "api.keys", "new", "--scope", "admin", "--name", "cli-made"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout
    new_key = lines[0].rsplit(": ", 1)[1].strip()
    new_entry = json.loads(lines[1][lines[1].index("{") :])
    assert new_entry == {"name": "cli-made", "scope": "admin", "sha256": hash_key(new_key)}
    assert len(new_key) >= 32 and new_key not in lines[1]

    monkeypatch.setenv("FACE_API_KEYS", json.dumps([new_entry]))
    secured.use(keys=Settings().api_keys)
    assert secured.client.get("/api/users", headers=key(new_key)).status_code == 200
    error_of(secured.client.get("/api/users", headers=key(new_key[:-1])), 401, "UNAUTHORIZED")

    client_run = subprocess.run(
        [sys.executable, "-m", "api.keys", "new", "--scope", "client"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    client_entry = json.loads(client_run.stdout[client_run.stdout.index("{") :])
    assert client_entry["scope"] == "client" and client_entry["name"].startswith("client-")


# --- open mode (no keys) -------------------------------------------------------------------------------


def test_without_keys_only_loopback_clients_are_served(secured: Secured) -> None:
    secured.use(keys=[])
    app = secured.client.app
    assert secured.client.get("/api/users").status_code == 200  # the session client is 127.0.0.1
    outsider = TestClient(app, client=("203.0.113.5", 5000))  # no `with`: no second lifespan, same app state
    for spec in [*ADMIN_ENDPOINTS.values(), *CLIENT_ENDPOINTS.values()]:
        error = error_of(send(outsider, spec, None), 401, "UNAUTHORIZED")
        assert "loopback" in error["message"]
    error_of(send(outsider, ADMIN_ENDPOINTS["list"], ADMIN_KEY), 401, "UNAUTHORIZED")  # a key opens nothing
    assert outsider.get("/health/live").status_code == 200
    assert TestClient(app, client=("::1", 5000)).get("/api/users").status_code == 200
    assert TestClient(app, client=("127.0.0.2", 5000)).get("/api/users").status_code == 200
    error_of(TestClient(app, client=("10.0.0.1", 5000)).get("/api/users"), 401, "UNAUTHORIZED")


def test_open_mode_warns_at_start_up(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="api.security"):
        check_startup_security(Settings(env="development", api_keys=[]))
    assert any("No API keys" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="api.security"):
        check_startup_security(Settings(env="production", api_keys=KEYS))  # keys: starts, no warning
    assert not caplog.records


def test_production_without_keys_refuses_to_start(tmp_path: Path) -> None:
    settings = Settings(env="production", api_keys=[], store_path=tmp_path / "s.npz", audit_log_path=None)
    app = create_app(settings)

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pytest.fail("the app started in production without API keys")

    with pytest.raises(RuntimeError, match="FACE_ENV=production needs API keys"):
        asyncio.run(start())
    assert not (tmp_path / "s.npz").exists()  # refused before opening anything


# --- rate limiting -------------------------------------------------------------------------------------


def test_rate_limit_per_key_answers_429_with_retry_after(secured: Secured) -> None:
    secured.use(rate="3/minute")
    client = secured.client
    for _ in range(3):
        assert client.get("/api/users", headers=key(ADMIN_KEY)).status_code == 200
    limited = client.get("/api/users", headers=key(ADMIN_KEY))
    error = error_of(limited, 429, "RATE_LIMITED")
    retry_after = int(limited.headers["Retry-After"])
    assert 1 <= retry_after <= 60 and error["details"] == {"retry_after_s": retry_after}
    error_of(
        client.post("/api/verify", files={"file": ("a.jpg", b"x", JPEG)}, headers=key(ADMIN_KEY)), 429, "RATE_LIMITED"
    )
    # Other keys have buckets of their own.
    assert client.get("/api/users", headers=key(OTHER_ADMIN_KEY)).status_code == 200
    for _ in range(3):
        assert send(client, CLIENT_ENDPOINTS["verify"], CLIENT_KEY).status_code == 415
    error_of(send(client, CLIENT_ENDPOINTS["verify"], CLIENT_KEY), 429, "RATE_LIMITED")


def test_rate_limit_per_address_when_open(secured: Secured) -> None:
    secured.use(keys=[], rate="2/minute")
    client = secured.client
    assert [client.get("/api/users").status_code for _ in range(2)] == [200, 200]
    limited = client.get("/api/users")
    error_of(limited, 429, "RATE_LIMITED")
    assert int(limited.headers["Retry-After"]) >= 1
    neighbour = TestClient(client.app, client=("127.0.0.2", 5000))
    assert neighbour.get("/api/users").status_code == 200


# --- audit log -----------------------------------------------------------------------------------------


def test_audit_log_records_who_what_when_and_which_user_but_no_biometrics(
    secured: Secured, astronaut: np.ndarray, astronaut_jpeg: bytes, to_jpeg: Any
) -> None:
    client = secured.client
    before = datetime.now(UTC) - timedelta(seconds=1)
    created = register(client, "Audited Person", astronaut_jpeg)
    assert created.status_code == 201, created.text
    user_id = created.json()["user"]["id"]
    added = add_mirrored_face(client, user_id, astronaut, to_jpeg, OTHER_ADMIN_KEY)
    assert added.status_code == 200, added.text
    assert client.patch(f"/api/users/{user_id}", json={"name": "Renamed"}, headers=key(ADMIN_KEY)).status_code == 200
    embeddings = secured.store.embeddings_of(user_id)
    assert client.delete(f"/api/users/{user_id}", headers=key(ADMIN_KEY)).status_code == 204
    # Refused or read-only requests leave no entry.
    assert send(client, ADMIN_ENDPOINTS["delete"], CLIENT_KEY).status_code == 403
    assert client.get("/api/users", headers=key(ADMIN_KEY)).status_code == 200
    after = datetime.now(UTC) + timedelta(seconds=1)

    text = secured.audit_path.read_text(encoding="utf-8")
    entries = [json.loads(line) for line in text.splitlines()]
    assert [(e["action"], e["who"], e["user_id"]) for e in entries] == [
        ("register", "ops", user_id),
        ("add_faces", "ops2", user_id),
        ("rename", "ops", user_id),
        ("delete", "ops", user_id),
    ]
    for e in entries:
        assert before <= datetime.fromisoformat(e["at"]) <= after
        assert set(e) <= {"at", "who", "action", "user_id", "collection", "faces"}, e
        assert e["collection"] == "default", e  # the audit log records the collection of every change
        assert all(isinstance(v, str | int) and not isinstance(v, bool) for v in e.values()), e
    assert entries[0]["faces"] == 1 and entries[1]["faces"] == 2
    for secret in (ADMIN_KEY, OTHER_ADMIN_KEY, hash_key(ADMIN_KEY)):
        assert secret not in text
    assert "Audited Person" not in text and "Renamed" not in text  # names are personal data too
    assert not leaked_values(text, embeddings)


# --- no trace after delete; nothing sensitive in logs or error messages ----------------------------------


def leaked_values(text: str, embeddings: np.ndarray) -> list[str]:
    """Descriptor values of ``embeddings`` (truncated to 6 decimals, as any printout of them starts) in ``text``."""
    found = []
    for value in np.asarray(embeddings, dtype=np.float64).ravel():
        if abs(value) >= 0.01:
            printed = f"{value:.9f}"[: f"{value:.9f}".index(".") + 7]
            if printed in text:
                found.append(printed)
    return found


def test_deleted_user_leaves_no_trace_in_the_store_file(
    secured: Secured, astronaut: np.ndarray, astronaut_jpeg: bytes, to_jpeg: Any
) -> None:
    client = secured.client
    name = "Delete-Me Zoë 测试"
    doomed = register(client, name, astronaut_jpeg)
    assert doomed.status_code == 201, doomed.text
    doomed_id = doomed.json()["user"]["id"]
    extra = add_mirrored_face(client, doomed_id, astronaut, to_jpeg, ADMIN_KEY)
    assert extra.status_code == 200, extra.text
    kept = register(client, "Kept", to_jpeg(astronaut[10:, 10:]), allow_duplicate="true")
    assert kept.status_code == 201, kept.text
    kept_id = kept.json()["user"]["id"]

    store = secured.store
    doomed_rows = store.embeddings_of(doomed_id)
    kept_rows = store.embeddings_of(kept_id)
    assert doomed_rows.shape[0] == 2
    path = store.path
    before = path.read_bytes()
    assert all(row.astype(np.float32).tobytes() in before for row in doomed_rows)  # the check can see them

    assert client.delete(f"/api/users/{doomed_id}", headers=key(ADMIN_KEY)).status_code == 204
    for file in path.parent.iterdir():  # the store, its lock and any temporary file beside it
        if not file.is_file():
            continue
        data = file.read_bytes()
        for row in doomed_rows:
            assert row.astype(np.float32).tobytes() not in data, file
        assert doomed_id.encode() not in data and name.encode("utf-8") not in data, file
    after = path.read_bytes()
    assert all(row.astype(np.float32).tobytes() in after for row in kept_rows)
    assert kept_id.encode() in after

    from api.store.npz import NpzFaceStore

    reopened = NpzFaceStore(path)
    assert [u.id for u in reopened.list_users()[0]] == [kept_id]
    verified = client.post("/api/verify", files={"file": ("p.jpg", astronaut_jpeg, JPEG)}, headers=key(CLIENT_KEY))
    assert {c["id"] for c in verified.json()["candidates"]} == {kept_id}


def test_logs_and_errors_never_carry_keys_images_or_descriptors(
    secured: Secured, astronaut_jpeg: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    client = secured.client
    responses: list[httpx.Response] = []
    with caplog.at_level(logging.DEBUG):
        responses.append(register(client, "Logged Person", astronaut_jpeg))
        assert responses[-1].status_code == 201, responses[-1].text
        user_id = responses[-1].json()["user"]["id"]
        embeddings = secured.store.embeddings_of(user_id)
        responses.append(
            client.post("/api/verify", files={"file": ("p.jpg", astronaut_jpeg, JPEG)}, headers=key(CLIENT_KEY))
        )
        responses.append(
            client.post(
                "/api/compare",
                files={"image1": ("a.jpg", astronaut_jpeg, JPEG), "image2": ("b.jpg", astronaut_jpeg[:3000], JPEG)},
                headers=key(CLIENT_KEY),
            )
        )  # a truncated image: an error message
        responses.append(client.delete(f"/api/users/{user_id}", headers=key(CLIENT_KEY)))  # 403
        responses.append(client.get("/api/users", headers=key(CLIENT_KEY + "x")))  # 401, unknown key
        responses.append(client.delete(f"/api/users/{user_id}", headers=key(ADMIN_KEY)))
    assert [r.status_code for r in responses] == [201, 200, 422, 403, 401, 204]

    logged = "\n".join(f"{r.name} {r.levelname} {r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records)
    answered = "\n".join(r.text for r in responses)
    assert "audit" in logged and user_id in logged  # the capture did see the service's log
    chunk = astronaut_jpeg[1000:1048]
    for where, text in (("log", logged), ("responses", answered)):
        for secret in (ADMIN_KEY, CLIENT_KEY, hash_key(ADMIN_KEY), hash_key(CLIENT_KEY)):
            assert secret not in text, f"a key in the {where}"
        for form in (chunk.hex(), base64.b64encode(chunk).decode(), repr(chunk)[2:40], chunk[:24].decode("latin-1")):
            assert form not in text, f"image bytes in the {where}"
        assert not leaked_values(text, embeddings), f"descriptor values in the {where}"
        assert not re.search(r"\[\s*-?\d\.\d{4,}(,?\s+-?\d\.\d{4,}){7,}", text), f"a vector in the {where}"
