"""Price books: parsed from TOML or JSON, validated all at once, and used to price each event.

Prices are written per million tokens in currency units (as published) and held as integer
nano-units per token: $2.50 per million tokens is 2,500 nano-units per token. A price that is
not a whole number of nano-units per token (more than three decimals per million) is refused,
so pricing an event is integer arithmetic and never rounds.

A model is found by its name or an alias (case-insensitive, a provider prefix such as
`openai/` ignored), else by the longest name or alias that prefixes it up to a separator, so
dated snapshots (`gpt-4o-2024-08-06`, `claude-sonnet-4-20250514`) find their model while
`gpt-4o-mini-2024-07-18` finds `gpt-4o-mini`, not `gpt-4o`."""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from ..ingest.events import UsageData

NANOS_PER_UNIT_PER_MILLION = 1000  # 1 unit per million tokens = 10^9 nanos / 10^6 tokens
MAX_PRICE_PER_MILLION = Decimal(1_000_000)  # no published price comes near this
PREFIX_SEPARATORS = "-:@._"
RESOLVE_CACHE_SIZE = 4096
UnknownModelRule = Literal["default", "flag"]
PRICE_FIELDS = ("input", "cached_input", "cache_write", "output", "reasoning")
_TOP_LEVEL = {"version", "currency", "checked", "source", "unknown_model", "default", "models"}
_MODEL_KEYS = {*PRICE_FIELDS, "aliases"}
DEFAULT_BOOK = "default-price-book.toml"


class PriceBookError(ValueError):
    """Every problem found in a price book, one per line."""

    def __init__(self, origin: str, problems: list[str]) -> None:
        self.problems = problems
        super().__init__(f"price book {origin}:\n" + "\n".join(f"  - {p}" for p in problems))


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """Nano-units per token of each kind."""

    model: str
    input: int
    cached_input: int
    cache_write: int
    output: int
    reasoning: int

    def cost_nanos(self, data: UsageData) -> int:
        # Contract 2: cached and cache-written tokens are parts of input_tokens, reasoning
        # tokens part of output_tokens; each part is priced once, at its own price.
        uncached = data.input_tokens - data.cached_input_tokens - data.cache_write_input_tokens
        visible_output = data.output_tokens - data.reasoning_tokens
        return (
            uncached * self.input
            + data.cached_input_tokens * self.cached_input
            + data.cache_write_input_tokens * self.cache_write
            + visible_output * self.output
            + data.reasoning_tokens * self.reasoning
        )


@dataclass
class PriceBook:
    version: str
    currency: str
    unknown_model: UnknownModelRule
    models: dict[str, ModelPrice]
    default: ModelPrice | None = None
    checked: str | None = None
    origin: str = "built-in"
    _names: dict[str, ModelPrice] = field(default_factory=dict, repr=False)
    _prefixes: list[tuple[str, ModelPrice]] = field(default_factory=list, repr=False)
    _resolved: dict[str, ModelPrice | None] = field(default_factory=dict, repr=False)

    def resolve(self, model: str | None) -> ModelPrice | None:
        """The prices of `model` by name, alias or prefix; None when the book has none."""
        if not model:
            return None
        try:
            return self._resolved[model]
        except KeyError:
            pass
        found = self._lookup(model.strip().lower())
        if len(self._resolved) >= RESOLVE_CACHE_SIZE:  # bounded: model names come from outside
            self._resolved.clear()
        self._resolved[model] = found
        return found

    def _lookup(self, name: str) -> ModelPrice | None:
        candidates = [name]
        if "/" in name:  # openai/gpt-4o, azure/..., as some gateways report it
            candidates.append(name.rsplit("/", 1)[1])
        for candidate in candidates:
            if candidate in self._names:
                return self._names[candidate]
        for candidate in candidates:
            for prefix, price in self._prefixes:  # longest first
                if (
                    candidate.startswith(prefix)
                    and len(candidate) > len(prefix)
                    and candidate[len(prefix)] in PREFIX_SEPARATORS
                ):
                    return price
        return None

    def cost_nanos(self, data: UsageData) -> int | None:
        """The event's cost; None when its model is unknown and the book flags such events."""
        if data.input_tokens == 0 and data.output_tokens == 0:
            return 0
        price = self.resolve(data.model)
        if price is None:
            price = self.default if self.unknown_model == "default" else None
        return None if price is None else price.cost_nanos(data)


def parse_price_book(document: Mapping[str, Any], origin: str) -> PriceBook:
    problems: list[str] = []
    for key in sorted(set(document) - _TOP_LEVEL):
        problems.append(f"unknown key {key!r}")
    version = document.get("version")
    if not isinstance(version, str) or not version.strip():
        problems.append("version must be a non-empty string (it is stored with every event)")
        version = ""
    currency = document.get("currency", "USD")
    if not isinstance(currency, str) or not currency.strip():
        problems.append("currency must be a string such as USD")
        currency = "USD"
    checked = document.get("checked")
    if checked is not None and not isinstance(checked, str):
        checked = str(checked)  # a TOML date
    rule = document.get("unknown_model", "flag")
    if rule not in ("default", "flag"):
        problems.append('unknown_model must be "default" or "flag"')
        rule = "flag"
    default: ModelPrice | None = None
    if "default" in document:
        default = _model_price("default", document["default"], problems, allow_aliases=False)
    if rule == "default" and default is None:
        problems.append('unknown_model = "default" needs a [default] table of prices')
    raw_models = document.get("models", {})
    models: dict[str, ModelPrice] = {}
    names: dict[str, ModelPrice] = {}
    if not isinstance(raw_models, Mapping) or not raw_models:
        problems.append("models must be a table of at least one model")
        raw_models = {}
    owners: dict[str, str] = {}  # every name and alias, even of a model with bad prices
    for name, entry in raw_models.items():
        price = _model_price(name, entry, problems, allow_aliases=True)
        aliases = entry.get("aliases", []) if isinstance(entry, Mapping) else []
        for alias in [name, *(a for a in aliases if isinstance(a, str))]:
            key = alias.strip().lower()
            owner = owners.setdefault(key, name)
            if owner != name:
                problems.append(f"{alias!r} names both {owner!r} and {name!r}")
            if price is not None:
                names[key] = price
        if price is not None:
            models[name] = price
    if problems:
        raise PriceBookError(origin, problems)
    assert isinstance(version, str) and isinstance(currency, str)
    book = PriceBook(
        version=version.strip(),
        currency=currency.strip().upper(),
        unknown_model=rule,
        models=models,
        default=default,
        checked=checked,
        origin=origin,
    )
    book._names = names
    book._prefixes = sorted(names.items(), key=lambda item: len(item[0]), reverse=True)
    return book


def _model_price(
    name: str, entry: Any, problems: list[str], *, allow_aliases: bool
) -> ModelPrice | None:
    where = "default" if not allow_aliases else f"models.{name}"
    if not isinstance(entry, Mapping):
        problems.append(f"{where} must be a table")
        return None
    allowed = _MODEL_KEYS if allow_aliases else set(PRICE_FIELDS)
    for key in sorted(set(entry) - allowed):
        problems.append(f"{where}: unknown key {key!r}")
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        problems.append(f"{where}.aliases must be a list of names")
    before = len(problems)
    nanos: dict[str, int] = {}
    for key in ("input", "output"):
        if key not in entry:
            problems.append(f"{where}.{key} is required (price per million tokens)")
    for key in PRICE_FIELDS:
        if key in entry:
            value = _nanos_per_token(f"{where}.{key}", entry[key], problems)
            if value is not None:
                nanos[key] = value
    if len(problems) > before:
        return None
    return ModelPrice(
        model=name,
        input=nanos["input"],
        # Unpublished kinds cost what their whole does: OpenAI charges nothing extra for
        # writing its cache; reasoning tokens are billed as output by every provider here.
        cached_input=nanos.get("cached_input", nanos["input"]),
        cache_write=nanos.get("cache_write", nanos["input"]),
        output=nanos["output"],
        reasoning=nanos.get("reasoning", nanos["output"]),
    )


def _nanos_per_token(where: str, value: Any, problems: list[str]) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | str | Decimal):
        # Floats never get here from TOML (parsed as Decimal); from JSON they come as text.
        problems.append(f"{where} must be a number (per million tokens)")
        return None
    try:
        price = Decimal(value)
    except InvalidOperation:
        problems.append(f"{where}: {value!r} is not a number")
        return None
    if not price.is_finite() or price < 0 or price > MAX_PRICE_PER_MILLION:
        problems.append(f"{where} must be between 0 and {MAX_PRICE_PER_MILLION}")
        return None
    nanos = price * NANOS_PER_UNIT_PER_MILLION
    if nanos != nanos.to_integral_value():
        problems.append(
            f"{where}: {value} per million is not a whole number of nano-units per token"
            " (at most 3 decimals)"
        )
        return None
    return int(nanos)


def loads_price_book(text: str, origin: str, fmt: Literal["toml", "json"]) -> PriceBook:
    try:
        if fmt == "toml":
            document = tomllib.loads(text, parse_float=Decimal)
        else:
            document = json.loads(text, parse_float=Decimal)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise PriceBookError(origin, [f"not valid {fmt.upper()}: {exc}"]) from exc
    if not isinstance(document, dict):
        raise PriceBookError(origin, ["the document must be a table / object"])
    return parse_price_book(document, origin)


def load_price_book(path: Path) -> PriceBook:
    """A book from a .toml or .json file."""
    fmt: Literal["toml", "json"] = "json" if path.suffix.lower() == ".json" else "toml"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PriceBookError(str(path), [f"cannot read: {exc.strerror}"]) from exc
    return loads_price_book(text, str(path), fmt)


def default_price_book() -> PriceBook:
    """The built-in book: published OpenAI and Anthropic prices, dated in the file."""
    text = (resources.files(__package__ or "") / DEFAULT_BOOK).read_text(encoding="utf-8")
    return loads_price_book(text, f"built-in {DEFAULT_BOOK}", "toml")
