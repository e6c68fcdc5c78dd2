"""A config field in Kong's schema vocabulary, and Kong's verdict on a value of it.

`ConfigField.kong_attributes` is the field as Kong is given it (the `-dump` output and the Lua
schema). `check` applies those same attributes the way Kong 3.x's `Schema:validate_field` does
(Kong@3.9.x:kong/db/schema/init.lua): the type first, then the validators in Kong's order
(`Schema.validators_order`), the first failure being the answer, with Kong's wording. So a config
Kong accepts is accepted here, and one it rejects is rejected for the same reason: the plugin
server never refuses what Kong let through, and a server started by something else than Kong
still gets every rule.

Kong's string validators take Lua patterns, which `lua_search` runs as Python regular expressions
over the value's UTF-8 bytes (Lua matches bytes, and its classes are the C locale's, ASCII only).
Only what regular expressions can say is supported; anything else raises ValueError.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

FieldType = Literal["string", "integer", "number", "boolean"]
Scalar = str | int | float | bool

# What `check` knows; an attribute outside these would be a rule Kong applies and this does not.
NON_VALIDATORS: Final = frozenset(
    {"type", "description", "default", "required", "referenceable", "encrypted"}
)
VALIDATORS_ORDER: Final = (
    "one_of",
    "gt",
    "between",
    "len_min",
    "len_max",
    "match_none",
    "match",
    "match_all",
    "match_any",
)


@dataclass(frozen=True, slots=True)
class Match:
    """One Lua pattern of a `match_all` or `match_none` rule, with the error Kong reports."""

    pattern: str
    err: str


@dataclass(frozen=True, slots=True)
class ConfigField:
    """One field of the plugin's `config` record, in Kong's schema vocabulary."""

    name: str
    type: FieldType
    description: str
    default: Scalar | None = None
    required: bool = False
    referenceable: bool = False
    encrypted: bool = False
    one_of: tuple[str, ...] | None = None
    gt: float | None = None
    between: tuple[float, float] | None = None
    len_max: int | None = None
    match_none: tuple[Match, ...] = ()
    match_all: tuple[Match, ...] = ()
    match_any: tuple[tuple[str, ...], str] | None = None  # (patterns, err)
    plugins: tuple[str, ...] | None = None  # the plugins that have it; None: all of them

    def kong_attributes(self) -> dict[str, Any]:
        """The field's attributes as Kong's schema DSL spells them, in a stable order."""
        attrs: dict[str, Any] = {"type": self.type}
        if self.required:
            attrs["required"] = True
        if self.default is not None:
            attrs["default"] = self.default
        if self.one_of is not None:
            attrs["one_of"] = list(self.one_of)
        if self.gt is not None:
            attrs["gt"] = self.gt
        if self.between is not None:
            attrs["between"] = list(self.between)
        if self.len_max is not None:
            attrs["len_max"] = self.len_max
        for name, rules in (("match_none", self.match_none), ("match_all", self.match_all)):
            if rules:
                attrs[name] = [{"pattern": r.pattern, "err": r.err} for r in rules]
        if self.match_any is not None:
            attrs["match_any"] = {"patterns": list(self.match_any[0]), "err": self.match_any[1]}
        if self.referenceable:
            attrs["referenceable"] = True
        if self.encrypted:
            attrs["encrypted"] = True
        attrs["description"] = self.description
        return attrs


def as_declared(field_type: FieldType, value: Any) -> Any:
    """A value Kong took, as the Python type of its field: Lua has one number type, so Kong
    may send 30 for a number and takes 30.0 as an integer."""
    if value is None or isinstance(value, bool):
        return value
    if field_type == "integer" and isinstance(value, int | float):
        return int(value)
    if field_type == "number" and isinstance(value, int | float):
        return float(value)
    return value


def check(attrs: Mapping[str, Any], value: Any) -> str | None:
    """Kong's error for a value given to a field with ``attrs``, or None when Kong takes it."""
    unknown = set(attrs) - NON_VALIDATORS - set(VALIDATORS_ORDER)
    if unknown:
        raise ValueError(f"no Python check for Kong attributes {sorted(unknown)}")
    problem = _type_problem(attrs["type"], value)
    if problem is not None:
        return problem
    if attrs.get("referenceable"):
        # Kong validates the vault reference it stores (`{vault://...}`) and skips the
        # validators for it; the plugin is given the secret it resolves to, which no rule saw.
        return None
    rules = dict(attrs)
    if attrs["type"] == "string":
        rules.setdefault("len_min", 1)  # Kong: "empty strings are not accepted by default"
    for name in VALIDATORS_ORDER:
        if name in rules:
            problem = _VALIDATORS[name](value, rules[name])
            if problem is not None:
                return problem
    return None


def _type_problem(field_type: str, value: Any) -> str | None:
    if field_type == "boolean":
        ok = isinstance(value, bool)
    elif field_type == "integer":
        # Lua has one number type: Kong takes any number equal to its floor, bar the infinities.
        ok = not isinstance(value, bool) and (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        )
    elif field_type == "number":
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif field_type == "string":
        ok = isinstance(value, str)
    else:
        raise ValueError(f"no Python check for Kong type {field_type!r}")
    return None if ok else f"expected {'an' if field_type == 'integer' else 'a'} {field_type}"


def _lua_tostring(number: float) -> str:
    return str(number) if isinstance(number, int) else f"{number:.14g}"


def _byte_length(value: str) -> int:
    return len(value.encode("utf-8", "surrogatepass"))  # Lua's `#` counts bytes


# Each returns Kong's message, or None. Comparisons are written as Kong's are: with a NaN every
# Lua comparison is false, so `between` lets it through and `gt` does not. (Kong never sends one:
# it JSON-encodes the config with cjson, which refuses NaN and the infinities.)
_VALIDATORS: Final[Mapping[str, Callable[[Any, Any], str | None]]] = {
    "one_of": lambda v, options: (
        None if v in options else f"expected one of: {', '.join(map(str, options))}"
    ),
    "gt": lambda v, limit: (
        None if v > limit else f"value must be greater than {_lua_tostring(limit)}"
    ),
    "between": lambda v, limits: (
        "value should be between %d and %d" % tuple(limits)  # noqa: UP031 (Kong's %d)
        if v < limits[0] or v > limits[1]
        else None
    ),
    "len_min": lambda v, n: None if _byte_length(v) >= n else f"length must be at least {n}",
    "len_max": lambda v, n: None if _byte_length(v) <= n else f"length must be at most {n}",
    "match_none": lambda v, rules: next(
        (rule["err"] for rule in rules if lua_search(rule["pattern"], v)), None
    ),
    "match": lambda v, pattern: None if lua_search(pattern, v) else f"invalid value: {v}",
    "match_all": lambda v, rules: next(
        (rule["err"] for rule in rules if not lua_search(rule["pattern"], v)), None
    ),
    "match_any": lambda v, arg: (
        None if any(lua_search(p, v) for p in arg["patterns"]) else str(arg["err"])
    ),
}


# --- Lua patterns -------------------------------------------------------------------------------

_PUNCT: Final = rb"\x21-\x2f\x3a-\x40\x5b-\x60\x7b-\x7e"
_CLASSES: Final = {  # Lua's %-classes in the C locale, as the inside of a regex set
    "a": rb"A-Za-z",
    "c": rb"\x00-\x1f\x7f",
    "d": rb"0-9",
    "g": rb"\x21-\x7e",
    "l": rb"a-z",
    "p": _PUNCT,
    "s": rb"\x09-\x0d\x20",
    "u": rb"A-Z",
    "w": rb"A-Za-z0-9",
    "x": rb"0-9A-Fa-f",
}
_QUANTIFIERS: Final = {ord("*"): b"*", ord("+"): b"+", ord("-"): b"*?", ord("?"): b"?"}


def lua_search(pattern: str, value: str) -> bool:
    """Whether Lua's ``value:match(pattern)`` finds a match (what Kong's `match` rules ask)."""
    return lua_pattern_regex(pattern).search(value.encode("utf-8", "surrogatepass")) is not None


@functools.cache
def lua_pattern_regex(pattern: str) -> re.Pattern[bytes]:
    """The regular expression over bytes that matches where the Lua pattern does.

    Supported: anchors, `.`, %-classes and escapes, sets with ranges and lower-case classes, and
    the quantifiers `* + - ?`. Captures, `%b`, `%f` and back references raise ValueError.
    """
    src = pattern.encode("utf-8")
    out: list[bytes] = []
    i = 0
    if src.startswith(b"^"):
        out.append(rb"\A")
        i = 1
    while i < len(src):
        if src[i] == ord("$") and i == len(src) - 1:
            out.append(rb"\Z")
            break
        if src[i] in b"()":
            raise ValueError(f"Lua pattern {pattern!r}: captures are not supported")
        single, i = _single(src, i, pattern)
        if i < len(src) and src[i] in _QUANTIFIERS:
            single += _QUANTIFIERS[src[i]]
            i += 1
        out.append(single)
    return re.compile(b"".join(out), re.DOTALL)


def _byte(value: int) -> bytes:
    return b"\\x%02x" % value


def _single(src: bytes, i: int, pattern: str) -> tuple[bytes, int]:
    """One single-character class of the pattern at ``i``, and the index after it."""
    char = src[i]
    if char == ord("."):
        return b".", i + 1
    if char == ord("%"):
        if i + 1 >= len(src):
            raise ValueError(f"Lua pattern {pattern!r} ends with '%'")
        escaped = chr(src[i + 1])
        if escaped.lower() in _CLASSES:
            body = _CLASSES[escaped.lower()]
            return (b"[^" if escaped.isupper() else b"[") + body + b"]", i + 2
        if escaped.isalnum():
            raise ValueError(f"Lua pattern {pattern!r}: %{escaped} is not supported")
        return _byte(src[i + 1]), i + 2
    if char == ord("["):
        return _set(src, i, pattern)
    return _byte(char), i + 1


def _set(src: bytes, i: int, pattern: str) -> tuple[bytes, int]:
    i += 1
    negated = i < len(src) and src[i] == ord("^")
    i += negated
    items: list[bytes] = []
    first = True
    while True:
        if i >= len(src):
            raise ValueError(f"Lua pattern {pattern!r}: unclosed set")
        char = src[i]
        if char == ord("]") and not first:  # Lua takes a ']' right after '[' literally
            break
        first = False
        if char == ord("%") and i + 1 < len(src):
            escaped = chr(src[i + 1])
            if escaped in _CLASSES:
                items.append(_CLASSES[escaped])
            elif escaped.isalnum():
                raise ValueError(f"Lua pattern {pattern!r}: %{escaped} in a set is not supported")
            else:
                items.append(_byte(src[i + 1]))
            i += 2
        elif i + 2 < len(src) and src[i + 1] == ord("-") and src[i + 2] != ord("]"):
            items.append(_byte(char) + b"-" + _byte(src[i + 2]))
            i += 3
        else:
            items.append(_byte(char))
            i += 1
    return (b"[^" if negated else b"[") + b"".join(items) + b"]", i + 1
