"""The official Smart Data Models schemas vendored in tests/data/sdm/ (see its README), checked offline.

Every `$ref` resolves to a vendored file through a `referencing` Registry whose `retrieve` refuses anything
else: nothing is fetched from the network. Entities fieldgate sends are NGSI-LD *normalized*; the schemas
describe the *key-values* form, so an entity is converted (a Property's `value`, a Relationship's `object`,
a GeoProperty's GeoJSON, a DateTime's `@value`) before it is validated, with format checking on.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
from referencing import Registry, Resource
from referencing.exceptions import NoSuchResource

SDM = Path(__file__).resolve().parent / "data" / "sdm"

# The URIs the models' `$ref`s name -> the vendored file that answers them.
ALIASES = {
    "https://smart-data-models.github.io/data-models/common-schema.json": "common-schema.json",
    "https://raw.githubusercontent.com/smart-data-models/dataModel.Environment/master/Environment-schema.json": (
        "Environment-schema.json"
    ),
}
MODELS = (
    "AirQualityObserved",
    "DeviceMeasurement",
    "Streetlight",
    "StreetlightControlCabinet",
    "ThreePhaseAcMeasurement",
    "WaterConsumptionObserved",
)


def _load(name: str) -> Any:
    return json.loads((SDM / name).read_text(encoding="utf-8"))


def _offline(uri: str) -> Resource[Any]:
    raise NoSuchResource(ref=uri)  # never the network: a $ref not vendored is a test failure


@cache
def registry() -> Registry[Any]:
    reg: Registry[Any] = Registry(retrieve=_offline)  # type: ignore[call-arg]
    for uri, name in ALIASES.items():
        reg = reg.with_resource(uri, Resource.from_contents(_load(name)))
    for model in MODELS:
        doc = _load(f"{model}.schema.json")
        reg = reg.with_resource(doc["$id"], Resource.from_contents(doc))
    return reg


@cache
def schema(model: str) -> dict[str, Any]:
    loaded: dict[str, Any] = _load(f"{model}.schema.json")
    return loaded


def validator(model: str) -> jsonschema.protocols.Validator:
    doc = schema(model)
    cls = jsonschema.validators.validator_for(doc)
    v: jsonschema.protocols.Validator = cls(doc, registry=registry(), format_checker=cls.FORMAT_CHECKER)
    return v


def key_values(entity: dict[str, Any]) -> dict[str, Any]:
    """An NGSI-LD normalized entity in the key-values form the Smart Data Models schemas describe."""
    out: dict[str, Any] = {}
    for name, attr in entity.items():
        if name in ("id", "type") or name == "@context":
            out[name] = attr
            continue
        if not isinstance(attr, dict) or "type" not in attr:
            raise AssertionError(f"{name}: not a normalized attribute: {attr!r}")
        if attr["type"] == "Relationship":
            out[name] = attr["object"]
        elif attr["type"] in ("Property", "GeoProperty"):
            value = attr["value"]
            if isinstance(value, dict) and value.get("@type") == "DateTime":
                value = value["@value"]
            out[name] = value
        else:
            raise AssertionError(f"{name}: unknown NGSI-LD attribute type {attr['type']!r}")
    out.pop("@context", None)
    return out


def errors(entity: dict[str, Any]) -> list[str]:
    """Every schema violation of a normalized entity (empty: valid), as `path: message`."""
    kv = key_values(entity)
    found = validator(str(entity["type"])).iter_errors(kv)
    return sorted(f"{'/'.join(map(str, e.absolute_path)) or '(entity)'}: {e.message}" for e in found)


def declared(model: str) -> set[str]:
    """The attribute names a model declares (its own `properties` and those of the schemas it `$ref`s)."""
    names: set[str] = set()
    resolver = registry().resolver()

    def walk(node: Any, resolver: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                resolved = resolver.lookup(node["$ref"])
                walk(resolved.contents, resolved.resolver)
            names.update(node.get("properties", {}))
            for key in ("allOf", "anyOf", "oneOf"):
                for sub in node.get(key, []):
                    walk(sub, resolver)

    doc = schema(model)
    walk(doc, resolver.in_subresource(Resource.from_contents(doc)))
    return names
