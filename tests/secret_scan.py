"""No secret in any log line: every token and key the suite makes or uses is registered here,
every log line the suite produces is kept, and the session fails if a line holds a secret.

What is kept (tests/conftest.py feeds it): pytest's captured stdout, stderr and log of every
test phase, passed or not (in-process apps, the plugin code, structlog's and the standard
library's loggers), and at the end every `*.log` file under the session's temporary directory
(collector processes, plugin servers, the fakes' subprocesses). What is registered: the tokens
and Stripe keys `make_settings` builds settings with, those the tests' collector processes are
given or generate, and the harness's fixed tokens. Each secret is looked for whole; one
shorter than `MIN_LENGTH`, or made of fewer than `MIN_DISTINCT` characters ("a" * 32, which
tests use as a placeholder), is not registered, since it could occur in any text by chance.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

MIN_LENGTH = 8
MIN_DISTINCT = 5
SEPARATOR = "\n\x00\n"  # between kept texts: no secret spans two of them


@dataclass
class SecretScan:
    secrets: set[str] = field(default_factory=set)
    _texts: list[str] = field(default_factory=list)
    _origins: list[str] = field(default_factory=list)

    def register(self, *values: str | None) -> None:
        for value in values:
            secret = (value or "").strip()
            if len(secret) >= MIN_LENGTH and len(set(secret)) >= MIN_DISTINCT:
                self.secrets.add(secret)

    def keep(self, text: str, origin: str) -> None:
        if text:
            self._texts.append(text)
            self._origins.append(origin)

    def keep_files(self, paths: Iterable[Path]) -> None:
        for path in paths:
            try:
                self.keep(path.read_text(errors="replace"), str(path))
            except OSError:
                continue  # removed while the session ran: nothing to read

    @property
    def kept_chars(self) -> int:
        return sum(len(text) for text in self._texts)

    def leaks(self) -> list[str]:
        """One line per secret found: where, and the secret masked."""
        # One joined text: each secret costs one substring search, however many texts there are.
        joined = SEPARATOR.join(self._texts)
        starts, offset = [], 0
        for text in self._texts:
            starts.append(offset)
            offset += len(text) + len(SEPARATOR)
        found = []
        for secret in sorted(self.secrets):
            at = joined.find(secret)
            if at >= 0:
                origin = self._origins[bisect.bisect_right(starts, at) - 1]
                found.append(f"{mask(secret)} in {origin}")
        return found


def mask(secret: str) -> str:
    """Enough of a secret to recognise it in the report, not enough to use it."""
    return f"{secret[:4]}...({len(secret)} characters)"
