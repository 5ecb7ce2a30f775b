"""Access control: API keys with scopes, rate limiting per caller, and the audit log of changes.

Keys are configured as sha256 hashes only. A presented key is hashed and compared with every configured
hash in constant time (no early exit), so response timing tells nothing about which hash came close.
``admin`` keys may do everything; ``client`` keys may verify, compare, and analyse, but not change or list
the registered people. A key that names ``collections`` may use only those (403 for any other).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import math
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from limits import parse as parse_rate
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter

from api.config import ApiKeyEntry, Settings
from api.errors import AuthenticationError, ForbiddenError, RateLimitedError

logger = logging.getLogger(__name__)

API_KEY_HEADER = "X-API-Key"
SCOPES = ("client", "admin")  # each scope includes the ones before it


@dataclass(frozen=True)
class Caller:
    """Who makes a request: the key's name, or the client address when the service runs without keys."""

    identity: str
    scope: str
    collections: frozenset[str] | None = None  # None: every collection
    rate_limit: str | None = None  # the key's own limit, instead of FACE_RATE_LIMIT

    def may_use(self, collection: str) -> bool:
        return self.collections is None or collection in self.collections


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Authenticator:
    def __init__(self, keys: list[ApiKeyEntry]) -> None:
        self._keys = [(bytes.fromhex(k.sha256), k) for k in keys]

    @property
    def open(self) -> bool:
        return not self._keys

    def identify(self, presented: str | None, client_host: str | None) -> Caller:
        if self.open:
            if not is_loopback(client_host):
                raise AuthenticationError(
                    "This service has no API keys configured and therefore answers only on a loopback address.",
                )
            return Caller(f"open:{client_host}", "admin")
        if not presented:
            raise AuthenticationError(f"Missing API key: send it in the {API_KEY_HEADER} header.")
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found: ApiKeyEntry | None = None
        for stored, entry in self._keys:  # every hash is compared, whether or not one matched already
            if hmac.compare_digest(digest, stored):
                found = entry
        if found is None:
            raise AuthenticationError("Unknown API key.")
        collections = None if found.collections is None else frozenset(found.collections)
        return Caller(found.name, found.scope, collections, found.rate_limit)

    @staticmethod
    def authorise(caller: Caller, needed: str) -> None:
        if SCOPES.index(caller.scope) < SCOPES.index(needed):
            raise ForbiddenError(f"This endpoint needs an API key with the {needed!r} scope.", scope=caller.scope)

    @staticmethod
    def authorise_collection(caller: Caller, collection: str) -> None:
        if not caller.may_use(collection):
            # The same answer whether or not the collection exists: a bound key learns nothing about others.
            raise ForbiddenError(f"This API key may not use the collection {collection!r}.", collection=collection)


class RateLimiter:
    """Moving windows from the ``limits`` package; counts are kept per worker process.

    * Requests per caller: the caller's own key limit, else ``rate`` for everyone (per key, or per client
      address when open); no limit when neither is set, the default: a frontend behind one proxy address
      must not be capped out of the box.
    * Failed authentications per client address (``auth_failures``): an address that keeps presenting wrong
      keys gets 429 until its window clears, whatever key it sends meanwhile.
    """

    def __init__(self, rate: str | None, auth_failures: str | None = None) -> None:
        self.item = parse_rate(rate) if rate else None
        self.auth_failures = parse_rate(auth_failures) if auth_failures else None
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._per_key: dict[str, object] = {}

    def check(self, caller: Caller) -> None:
        item = self._per_key_item(caller.rate_limit) if caller.rate_limit else self.item
        if item is not None and not self._limiter.hit(item, "caller", caller.identity):
            raise self._limited(item, ("caller", caller.identity), "Too many requests")

    def refuse_blocked_address(self, host: str | None) -> None:
        """429 for an address whose failed authentications filled their window."""
        if self.auth_failures is not None and not self._limiter.test(self.auth_failures, "auth", host or "-"):
            raise self._limited(self.auth_failures, ("auth", host or "-"), "Too many failed authentications")

    def record_auth_failure(self, host: str | None) -> None:
        if self.auth_failures is not None:
            self._limiter.hit(self.auth_failures, "auth", host or "-")

    def _per_key_item(self, rate: str) -> object:
        item = self._per_key.get(rate)
        if item is None:
            item = self._per_key[rate] = parse_rate(rate)
        return item

    def _limited(self, item: object, keys: tuple[str, str], what: str) -> RateLimitedError:
        reset_at, _ = self._limiter.get_window_stats(item, *keys)
        retry_after = max(1, math.ceil(reset_at - datetime.now(UTC).timestamp()))
        return RateLimitedError(f"{what}: the limit is {item}. Retry after {retry_after} s.", retry_after_s=retry_after)


class AuditLog:
    """One JSON line per change to the registered people: who, what, when, which user. Never biometrics."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()

    def record(self, caller: Caller, action: str, user_id: str | None, **facts: str | int) -> None:
        entry = {"at": datetime.now(UTC).isoformat(), "who": caller.identity, "action": action, "user_id": user_id}
        entry.update(facts)
        line = json.dumps(entry, ensure_ascii=False)
        logger.info("audit %s", line)
        if self.path is None:
            return
        with self._lock, open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")


def check_startup_security(settings: Settings) -> None:
    """Refuse to start in production without keys; warn when running open."""
    if settings.api_keys:
        return
    if settings.env == "production":
        raise RuntimeError(
            "FACE_ENV=production needs API keys: create one with `python -m api.keys new --scope admin` "
            "and set FACE_API_KEYS."
        )
    logger.warning("No API keys configured (FACE_API_KEYS): the service answers only clients on a loopback address.")
