"""Stripe's request parameters: bracket-encoded forms into nested values, checked against specs.

v1 bodies and query strings are `application/x-www-form-urlencoded` with keys that nest by
brackets, as the SDK writes them (stripe-python@v16.1.0:stripe/_encode.py `_api_encode`: a dict
as `key[sub]=v`, a list always indexed, `key[0]=v`). `urllib.parse.parse_qsl` only splits the
pairs and nothing we depend on (aiohttp's MultiDict, yarl) rebuilds the nesting, so
`parse_pairs` does. v2 bodies are JSON and already nested; the same specs check both, `typed`
saying whether scalars arrive as JSON values or as form strings.

A failed check raises `ParamError` with the code, message and bracketed `param` Stripe uses for
it (`parameter_unknown`, `parameter_missing`, `parameter_invalid_integer`,
`parameter_invalid_empty`). Validation errors are answered before an endpoint starts
executing, so the idempotency layer never saves them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_PART = re.compile(r"\[([^\[\]]*)\]")
_INTEGER = re.compile(r"^-?\d+$")


class ParamError(ValueError):
    """A parameter Stripe would refuse (answered as a 400 `invalid_request_error`)."""

    def __init__(self, message: str, param: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


def parse_pairs(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    """`[("a[b][0]", "x")]` -> `{"a": {"b": ["x"]}}`; `a[]` appends; a later scalar wins."""
    root: dict[str, Any] = {}
    for key, value in pairs:
        match = _KEY.match(key)
        if match is None:
            raise ParamError(f"Received unknown parameter: {key}", key, "parameter_unknown")
        path = [match.group(1), *_PART.findall(match.group(2))]
        node = root
        for depth, part in enumerate(path[:-1]):
            child = node.setdefault(part or str(len(node)), {})
            if not isinstance(child, dict):
                param = _bracketed(path[: depth + 1])
                raise ParamError(f"Invalid hash: {param} is given both a value and keys", param)
            node = child
        last = path[-1] or str(len(node))
        if isinstance(node.get(last), dict):
            param = _bracketed(path)
            raise ParamError(f"Invalid hash: {param} is given both a value and keys", param)
        node[last] = value
    return {key: _lists(value) for key, value in root.items()}  # the top level stays a hash


def _bracketed(path: list[str]) -> str:
    return path[0] + "".join(f"[{part}]" for part in path[1:])


def _lists(node: Any) -> Any:
    """Dicts keyed exactly 0..n-1 (the SDK's indexed lists) become lists."""
    if not isinstance(node, dict):
        return node
    converted = {key: _lists(value) for key, value in node.items()}
    if converted and set(converted) == {str(i) for i in range(len(converted))}:
        return [converted[str(i)] for i in range(len(converted))]
    return converted


def join(parent: str, key: str) -> str:
    return f"{parent}[{key}]" if parent else key


class Spec(Protocol):
    @property
    def required(self) -> bool: ...

    def check(self, value: Any, param: str, *, typed: bool) -> Any:
        """The normalized value, or raise ParamError."""
        ...


def _empty(param: str) -> ParamError:
    return ParamError(
        f"You passed an empty string for '{param}'. We assume empty values are an attempt to "
        f"unset a parameter; however '{param}' cannot be unset. You should remove '{param}' "
        "from your request or supply a non-empty value.",
        param,
        "parameter_invalid_empty",
    )


@dataclass(frozen=True, slots=True)
class String:
    required: bool = False
    max_length: int | None = None

    def check(self, value: Any, param: str, *, typed: bool) -> Any:
        if not isinstance(value, str):
            raise ParamError(f"Invalid string: {param} must be a string", param)
        if self.max_length is not None and len(value) > self.max_length:
            raise ParamError(
                f"Invalid string: {param} must be at most {self.max_length} characters", param
            )
        return value


@dataclass(frozen=True, slots=True)
class Integer:
    required: bool = False
    minimum: int | None = None
    maximum: int | None = None

    def check(self, value: Any, param: str, *, typed: bool) -> Any:
        if typed:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str) and _INTEGER.match(value) is not None
        if not ok:
            raise ParamError(f"Invalid integer: {value}", param, "parameter_invalid_integer")
        number = int(value)
        if self.minimum is not None and number < self.minimum:
            raise ParamError(
                f"This value must be greater than or equal to {self.minimum}.",
                param,
                "parameter_invalid_integer",
            )
        if self.maximum is not None and number > self.maximum:
            raise ParamError(
                f"This value must be less than or equal to {self.maximum}.",
                param,
                "parameter_invalid_integer",
            )
        return number


@dataclass(frozen=True, slots=True)
class Enum:
    values: tuple[str, ...]
    required: bool = False

    def check(self, value: Any, param: str, *, typed: bool) -> Any:
        if value not in self.values:
            *head, tail = self.values
            choices = f"{', '.join(head)}, or {tail}" if head else tail
            raise ParamError(f"Invalid {param}: must be one of {choices}", param)
        return value


@dataclass(frozen=True, slots=True)
class Map:
    """A free-form hash of strings (`payload`, `metadata`): any keys, scalar values."""

    required: bool = False

    def check(self, value: Any, param: str, *, typed: bool) -> Any:
        if not isinstance(value, dict):
            raise ParamError(f"Invalid object: {param} must be a hash", param)
        for key, item in value.items():
            if not isinstance(item, str):
                raise ParamError(
                    f"Invalid string: {join(param, key)} must be a string", join(param, key)
                )
        return dict(value)


@dataclass(frozen=True, slots=True)
class List:
    item: Spec
    required: bool = False
    max_items: int | None = None

    def check(self, value: Any, param: str, *, typed: bool) -> Any:
        if not isinstance(value, list):
            raise ParamError(f"Invalid array: {param} must be an array", param)
        if self.max_items is not None and len(value) > self.max_items:
            raise ParamError(
                f"Invalid array: {param} can have at most {self.max_items} items", param
            )
        return [self.item.check(v, join(param, str(i)), typed=typed) for i, v in enumerate(value)]


@dataclass(frozen=True, slots=True)
class Object:
    fields: Mapping[str, Spec] = field(default_factory=dict)
    required: bool = False

    def check(self, value: Any, param: str, *, typed: bool) -> Any:
        if not isinstance(value, dict):
            raise ParamError(f"Invalid object: {param} must be a hash", param)
        for key in value:
            if key not in self.fields:
                name = join(param, key)
                raise ParamError(f"Received unknown parameter: {name}", name, "parameter_unknown")
        checked: dict[str, Any] = {}
        for key, spec in self.fields.items():
            name = join(param, key)
            item = value.get(key)
            # In a form an empty string unsets a parameter: absent if optional, refused if not.
            if item == "" and not typed and not isinstance(spec, Map | Object | List):
                if spec.required:
                    raise _empty(name)
                item = None
            if item is None:
                if spec.required:
                    raise ParamError(f"Missing required param: {name}.", name, "parameter_missing")
                continue
            checked[key] = spec.check(item, name, typed=typed)
        return checked


def check(spec: Object, params: Mapping[str, Any], *, typed: bool = False) -> dict[str, Any]:
    """The top-level params, checked (param names as Stripe reports them, unprefixed)."""
    checked: dict[str, Any] = spec.check(dict(params), "", typed=typed)
    return checked
