"""Stripe's idempotency layer: the first answer to a key is saved and replayed.

As docs.stripe.com/api/idempotent_requests describes it: the status and body of the first
request with a key are saved, whether it succeeded or failed, 500s included, and a later
request with the same key gets them back (with `Idempotent-Replayed: true`); the same key with
another endpoint or other parameters is an `idempotency_error`; a result is saved only once
the endpoint started executing (not for validation failures or conflicts); keys are at most
255 characters and may be pruned after 24 hours. A second request while the first is still
running is a 409 `idempotency_key_in_use` (also not saved). Keys are scoped per credential.

stripe-python@v16.1.0:stripe/_api_requestor.py `request_headers` sends a fresh random
`Idempotency-Key` on every POST unless the caller gives one, and reuses it for its own retries
(none with `max_network_retries=0`): a replay only happens when the caller sets the key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import ApiError
from .state import DAY, Clock

MAX_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True)
class SavedAnswer:
    fingerprint: str
    status: int
    body: bytes
    headers: dict[str, str]
    request_id: str
    saved_at: float


def fingerprint(method: str, path: str, params: Any) -> str:
    return json.dumps([method, path, params], sort_keys=True, default=str)


class IdempotencyStore:
    """Server thread only."""

    def __init__(self, clock: Clock, ttl: float = DAY) -> None:
        self._clock = clock
        self._ttl = ttl
        self._saved: dict[tuple[str, str], SavedAnswer] = {}
        self._running: set[tuple[str, str]] = set()

    def begin(self, scope: str, key: str, print_: str) -> SavedAnswer | None:
        """The saved answer to replay, or None after marking the key as running."""
        if len(key) > MAX_KEY_LENGTH:
            raise ApiError(
                400,
                f"Idempotency-Key must be at most {MAX_KEY_LENGTH} characters long.",
                saved=False,
            )
        slot = (scope, key)
        saved = self._saved.get(slot)
        if saved is not None and self._clock.now() - saved.saved_at >= self._ttl:
            del self._saved[slot]
            saved = None
        if saved is not None:
            if saved.fingerprint != print_:
                raise ApiError(
                    400,
                    "Keys for idempotent requests can only be used with the same parameters "
                    f"they were first used with. Try using a key other than '{key}' if you "
                    "meant to execute a different request.",
                    type="idempotency_error",
                    saved=False,
                )
            return saved
        if slot in self._running:
            raise ApiError(
                409,
                "There is currently another in-progress request using this idempotency key "
                "(that probably means you submitted twice, and the other request is still "
                "going through). Please try again later.",
                code="idempotency_key_in_use",
                saved=False,
            )
        self._running.add(slot)
        return None

    def save(self, scope: str, key: str, answer: SavedAnswer) -> None:
        self._saved[(scope, key)] = answer

    def end(self, scope: str, key: str) -> None:
        self._running.discard((scope, key))
