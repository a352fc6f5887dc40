"""Hypothesis strategies that build config values from the JSON Schema `fieldgate schema` prints.

Each leaf of the schema gives values near and beyond its documented bounds: integers at minimum-1, minimum,
maximum, maximum+1 and between; durations and sizes (strings with x-minimum / x-maximum, in the config's
units) likewise, plus 0 and the unit-less and non-finite spellings; strings from their pattern or any text;
enums with an unknown member now and then. Used by tests/unit/test_config_bounds.py (in process, many
examples) and tests/integration/test_config_property_daemon.py (each accepted config is run by the daemon).
"""

from __future__ import annotations

import json
import re
from typing import Any

from hypothesis import strategies as st

from agent.units import parse_duration, parse_size

_DURATION = re.compile(r"^\d+(\.\d+)?(ms|s|m|h|d)$")


def config_schema() -> dict[str, Any]:
    """What `fieldgate schema` prints (the same function, without a subprocess)."""
    from agent.config import FieldgateConfig

    schema: dict[str, Any] = json.loads(json.dumps(FieldgateConfig.model_json_schema(mode="validation")))
    return schema


def _seconds_text(seconds: float) -> str:
    if seconds >= 1 and float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{seconds * 1000:.3f}".rstrip("0").rstrip(".") + "ms"


def _near(low: float, high: float) -> list[float]:
    """Values at and just beyond [low, high], and a few inside."""
    span = high - low
    out = [low, high, low + span / 2, high * 2 + 1, max(low - 1, 0) if low >= 1 else low / 2, 0]
    out += [low * 1.001 + 0.001, high * 0.999, high + 1]
    return [v for v in out if v >= 0]


def duration_values(low_text: str, high_text: str, rare_in: int | None = None) -> st.SearchStrategy[Any]:
    low, high = parse_duration(low_text), parse_duration(high_text)
    near = [_seconds_text(v) for v in _near(low, high)]
    inside = st.floats(min_value=low, max_value=min(high, low + 5), allow_nan=False).map(_seconds_text)
    odd = st.sampled_from(
        [0, 10, "-1s", "1e400s", "9" * 400 + "s", ".inf", "10 parsecs", low_text, high_text]
    )
    return _mostly(inside, st.sampled_from(near), odd, rare_in=rare_in)


def size_values(low_text: str, high_text: str) -> st.SearchStrategy[Any]:
    low, high = parse_size(low_text), parse_size(high_text)
    near = [f"{int(v)}B" for v in _near(low, high)]
    inside = st.integers(min_value=low, max_value=high).map(lambda b: f"{b}B")
    return _mostly(inside, st.sampled_from(near), st.sampled_from(["0B", "1B", "9" * 400 + "GB", low_text]))


def int_values(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    low = schema.get("minimum", schema.get("exclusiveMinimum", -(2**31)))
    high = schema.get("maximum", schema.get("exclusiveMaximum", 2**31))
    edges = [low - 1, low, low + 1, high - 1, high, high + 1, 0, -1, 2**63, 10**30]
    return _mostly(st.integers(min_value=low, max_value=high), st.sampled_from(edges))


def float_values(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    low = schema.get("minimum", -1e6)
    high = schema.get("maximum", 1e6)
    specials = [float("nan"), float("inf"), -float("inf"), low, high, low - 1, high + 1, 0.0, 1e308]
    return _mostly(st.floats(min_value=low, max_value=high, allow_nan=False), st.sampled_from(specials))


def _text(schema: dict[str, Any], rare_in: int | None = None) -> st.SearchStrategy[Any]:
    pattern = schema.get("pattern")
    low, high = schema.get("x-minimum"), schema.get("x-maximum")
    if isinstance(low, str) and isinstance(high, str):
        if _DURATION.match(low):
            return duration_values(low, high, rare_in)
        return size_values(low, high)
    if pattern and "(ms|s|m|h|d)" in pattern:  # a duration without bounds: test_every_duration_is_bounded
        return st.sampled_from(["0s", "10ms", "10s", "1h", "1d", "10"])
    if pattern:
        return _mostly(st.from_regex(pattern, fullmatch=True), st.text(max_size=12))
    return _mostly(st.from_regex(r"[a-z][a-z0-9_-]{0,7}", fullmatch=True), st.text(max_size=12))


RARE_IN = 12  # one leaf in RARE_IN is drawn from its out-of-range values


def _mostly(
    usual: st.SearchStrategy[Any], *rare: st.SearchStrategy[Any], rare_in: int | None = None
) -> st.SearchStrategy[Any]:
    """Mostly `usual` (valid) values, so that a config with many fields often loads, else one of `rare`."""
    choices: list[st.SearchStrategy[Any]] = [usual] * ((rare_in or RARE_IN) - 1) + [st.one_of(*rare)]
    return st.sampled_from(choices).flatmap(lambda strategy: strategy)


class SchemaStrategies:
    """`value(schema)`: a strategy for the JSON Schema `schema` (with $refs into this schema's $defs)."""

    def __init__(
        self,
        root: dict[str, Any],
        overrides: dict[str, st.SearchStrategy[Any]] | None = None,
        always: set[str] | None = None,
        durations_rare_in: int | None = None,
    ):
        self.defs: dict[str, Any] = root.get("$defs", {})
        self.overrides = (
            overrides or {}
        )  # "Def.field" -> strategy, e.g. a URL that must reach the test broker
        self.always = always or set()  # "Def.field" drawn in every example (else a few optional fields are)
        self.rare_in = durations_rare_in  # one duration in this many is at or beyond a bound

    def ref(self, name: str) -> st.SearchStrategy[Any]:
        return self.value({"$ref": f"#/$defs/{name}"})

    def value(self, schema: dict[str, Any], depth: int = 0) -> st.SearchStrategy[Any]:
        if "$ref" in schema:
            name = schema["$ref"].rsplit("/", 1)[1]
            return st.deferred(lambda: self._object(name, self.defs[name], depth + 1))
        if depth > 6:
            return st.none()
        if "anyOf" in schema and "x-minimum" in schema:  # an optional duration: the bounds are outside
            bounded = {"type": "string", "x-minimum": schema["x-minimum"], "x-maximum": schema["x-maximum"]}
            return st.one_of(st.none(), st.none(), _text(bounded, self.rare_in))
        for key in ("oneOf", "anyOf"):
            if key in schema:
                return st.one_of([self.value(s, depth + 1) for s in schema[key]])
        if "const" in schema:
            return st.just(schema["const"])
        if "enum" in schema:
            return _mostly(st.sampled_from(schema["enum"]), st.sampled_from(["", "other"]))
        kind = schema.get("type")
        if kind == "integer":
            return int_values(schema)
        if kind == "number":
            return float_values(schema)
        if kind == "boolean":
            return st.booleans()
        if kind == "null":
            return st.none()
        if kind == "string":
            return _text(schema, self.rare_in)
        if kind == "array":
            return st.lists(self.value(schema.get("items", {}), depth + 1), max_size=3)
        if kind == "object":
            if "properties" in schema:
                return self._object("", schema, depth + 1)
            extra = schema.get("additionalProperties")
            inner = self.value(extra, depth + 1) if isinstance(extra, dict) else st.integers()
            return st.dictionaries(st.from_regex(r"[a-z][a-z0-9_-]{0,6}", fullmatch=True), inner, max_size=2)
        return st.one_of(st.integers(-5, 5), st.text(max_size=5), st.none())

    def _object(self, name: str, schema: dict[str, Any], depth: int) -> st.SearchStrategy[dict[str, Any]]:
        props: dict[str, Any] = schema.get("properties", {})
        required = set(schema.get("required", []))
        fields: dict[str, st.SearchStrategy[Any]] = {}
        optional: dict[str, st.SearchStrategy[Any]] = {}
        for field, sub in props.items():
            key = f"{name}.{field}"
            strategy = self.overrides[key] if key in self.overrides else self.value(sub, depth)
            forced = field in required or key in self.overrides or key in self.always
            (fields if forced else optional)[field] = strategy
        # A few optional fields at a time: each may be out of range, and the property needs configs that load.
        few = (
            st.lists(st.sampled_from(sorted(optional)), max_size=3, unique=True) if optional else st.just([])
        )
        return few.flatmap(lambda keys: st.fixed_dictionaries({**fields, **{k: optional[k] for k in keys}}))
