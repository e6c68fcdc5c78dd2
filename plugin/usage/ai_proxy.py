"""Usage that Kong's ai-proxy plugin recorded, read from `kong.log.serialize()` in the log phase.

Pure functions: no I/O, no PDK. The same `Usage` as `extract_usage` gives, from what ai-proxy
counted instead of the response body (`token-meter-log`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from .counts import MAX_TOKENS, Usage, as_int, first, is_count
from .sse import is_sse_type

# Where ai-proxy puts its analytics in kong.log.serialize(), read from Kong's source
# (kong/llm/drivers/shared.lua, kong/llm/plugin/shared-filters/serialize-analytics.lua):
#   3.9: ai.proxy.{usage,meta}                     usage.prompt_tokens / completion_tokens
#   3.8: ai["ai-proxy"].{usage,meta}               usage.prompt_tokens / completion_tokens
#   3.7: ai["ai-proxy"].{usage,meta}               usage.prompt_token / completion_token
#   3.6: ai.usage, ai.meta                         usage.prompt_tokens / completion_tokens
# 3.7 and 3.8 key the container by plugin name, so ai-proxy-advanced lands beside it. None of
# these versions records cached or reasoning tokens. Kong fills the counts with 0 when the
# upstream sent none (and 3.9 estimates streamed completions at 4 characters a token).
_AI_PROXY_CONTAINERS: Final = ("proxy", "ai-proxy", "ai-proxy-advanced")
_UNSPECIFIED_MODEL: Final = "UNSPECIFIED"


def usage_from_ai_proxy_log(serialized: Mapping[str, Any]) -> Usage | None:
    """Usage recorded by Kong's ai-proxy (3.6 to 3.9) in ``kong.log.serialize()`` output.

    None when the log has no ai-proxy data at all (ai-proxy absent, or its
    ``logging.log_statistics`` off). ``usage_missing`` when ai-proxy data is there without
    valid counts, or with zero input and output (Kong's placeholder for "no usage": a real
    request always has input tokens).
    """
    ai = serialized.get("ai")
    if not isinstance(ai, Mapping):
        return None
    container: Mapping[str, Any] | None = None
    for key in _AI_PROXY_CONTAINERS:
        candidate = ai.get(key)
        if isinstance(candidate, Mapping) and ("usage" in candidate or "meta" in candidate):
            container = candidate
            break
    if container is None:
        if "usage" not in ai and "meta" not in ai:
            return None
        container = ai  # Kong 3.6
    meta = container.get("meta")
    provider = model = None
    if isinstance(meta, Mapping):
        provider = _clean_str(meta.get("provider_name"))
        model = _clean_str(meta.get("response_model")) or _clean_str(meta.get("request_model"))
    streamed = _logged_response_is_sse(serialized)
    usage = container.get("usage")
    prompt = completion = None
    if isinstance(usage, Mapping):
        prompt = first(usage.get("prompt_tokens"), usage.get("prompt_token"))
        completion = first(usage.get("completion_tokens"), usage.get("completion_token"))
    if (
        not is_count(prompt)
        or not is_count(completion)
        or (prompt == 0 and completion == 0)
        or as_int(prompt) + as_int(completion) > MAX_TOKENS
    ):
        return Usage(provider=provider, model=model, streamed=streamed, usage_missing=True)
    inp, out = as_int(prompt), as_int(completion)
    return Usage(
        provider=provider,
        model=model,
        input_tokens=inp,
        output_tokens=out,
        total_tokens=inp + out,
        streamed=streamed,
    )


def _clean_str(value: object) -> str | None:
    if isinstance(value, str) and value and value != _UNSPECIFIED_MODEL:
        return value
    return None


def _logged_response_is_sse(serialized: Mapping[str, Any]) -> bool:
    response = serialized.get("response")
    if not isinstance(response, Mapping):
        return False
    headers = response.get("headers")
    if not isinstance(headers, Mapping):
        return False
    value = headers.get("content-type")
    if isinstance(value, list):
        value = value[0] if value else None
    return isinstance(value, str) and is_sse_type(value)
