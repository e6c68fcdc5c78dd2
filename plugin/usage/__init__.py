"""Token usage read from AI provider responses, normalized per docs/architecture.md, section 2.2.

- `counts.py`: the `Usage` struct and the normalization rules every provider goes through;
- `response.py`: `extract_usage`, the entry point for a response body (JSON or SSE, plain or
  compressed);
- `sse.py`: the scan that finds usage in a streamed body without decoding every event;
- `ai_proxy.py`: `usage_from_ai_proxy_log`, what Kong's ai-proxy recorded in the log phase.
"""

from .ai_proxy import usage_from_ai_proxy_log
from .counts import MAX_TOKENS, Usage
from .response import DEFAULT_MAX_BODY_SIZE, extract_usage

__all__ = [
    "DEFAULT_MAX_BODY_SIZE",
    "MAX_TOKENS",
    "Usage",
    "extract_usage",
    "usage_from_ai_proxy_log",
]
