"""A stand-in for the few pydantic names the config models are written with, for the running daemon.

The daemon never imports pydantic (about 15 MiB of its 48 MiB went to pydantic and the validators it
builds: docs/PERFORMANCE.md). `fieldgate run` validates the file with pydantic in a short-lived child
process (`agent.config.validate`), which sends back the validated models as a snapshot: class names and field
values. The daemon's process defines the same model classes on this module's `BaseModel` (see
`agent.config.modelkit`) and `rebuild`s the snapshot into them.

Nothing is validated here: the child did it. What the running code uses of a model works as in pydantic:
attributes, the models' own methods and properties, frozen instances, equality and hashing by field values,
`model_copy(update=...)` and `model_dump(mode="python" | "json")` with the fields' serializers (durations
dump as `10s`, as pydantic dumps them). tests/unit/test_plainmodel.py checks the dumps of every example config
against pydantic's.
"""

from __future__ import annotations

import importlib
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path, PurePath
from typing import Annotated, Any, ClassVar, Literal, Union

_MISSING: Any = object()


class FieldInfo:
    """What `Field(...)` stands for here: the default (or its factory); constraints were the child's."""

    __slots__ = ("default", "default_factory")

    def __init__(self, default: Any, default_factory: Callable[[], Any] | None) -> None:
        self.default = default
        self.default_factory = default_factory


def Field(
    default: Any = _MISSING, *, default_factory: Callable[[], Any] | None = None, **_constraints: Any
) -> Any:
    return FieldInfo(default, default_factory)


def ConfigDict(**settings: Any) -> dict[str, Any]:
    return settings


class _Metadata:
    """BeforeValidator, WithJsonSchema, Discriminator, Tag: annotations the child acted on; kept inert."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args


BeforeValidator = WithJsonSchema = Discriminator = Tag = _Metadata


class PlainSerializer:
    """Kept: `model_dump(mode="json")` applies it, as pydantic does."""

    def __init__(
        self, func: Callable[[Any], Any], return_type: Any = None, when_used: str = "always"
    ) -> None:
        self.func = func


def model_validator(*, mode: str) -> Callable[[Any], Any]:
    return lambda f: f


def field_validator(*fields: str, mode: str = "after") -> Callable[[Any], Any]:
    return lambda f: f


def _is_field(name: str, annotation: Any) -> bool:
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return not name.startswith("_") and "ClassVar" not in text


class _Slotted(type):
    """Gives each model class a slot per field it declares, made from its annotations before the class
    exists (`__slots__` is read then, not later): no `__dict__` per instance, and an attribute that is not a
    field cannot be set. The defaults leave the class body (a class attribute would hide the slot) for
    `__plain_fields__`."""

    def __new__(mcls, name: str, bases: tuple[type, ...], ns: dict[str, Any], **kwargs: Any) -> Any:
        fields: dict[str, tuple[Any, Callable[[], Any] | None]] = {}
        for base in reversed(bases):
            fields.update(getattr(base, "__plain_fields__", {}))
        own = []
        for field, annotation in ns.get("__annotations__", {}).items():
            if not _is_field(field, annotation):
                continue
            value = ns.pop(field, _MISSING)
            if isinstance(value, FieldInfo):
                fields[field] = (value.default, value.default_factory)
            else:
                fields[field] = (value, None)
            if not any(field in getattr(b, "__plain_fields__", ()) for b in bases):
                own.append(field)
        ns["__slots__"] = tuple(own)
        ns["__plain_fields__"] = fields
        ns["__plain_names__"] = tuple(fields)
        ns["__plain_hints__"] = None
        return super().__new__(mcls, name, bases, ns, **kwargs)


class BaseModel(metaclass=_Slotted):
    """A frozen record of fields; subclasses declare fields with annotations, as for pydantic."""

    __plain_fields__: ClassVar[dict[str, tuple[Any, Callable[[], Any] | None]]]
    __plain_names__: ClassVar[tuple[str, ...]]  # the fields, in pydantic's order (base classes' first)
    __plain_hints__: ClassVar[dict[str, Any] | None]

    def __init__(self, **data: Any) -> None:
        for name, (default, factory) in self.__plain_fields__.items():
            if name in data:
                value = data.pop(name)
            elif factory is not None:
                value = factory()
            elif default is not _MISSING:
                value = default
            else:
                raise TypeError(f"{type(self).__name__}: field {name!r} is required")
            object.__setattr__(self, name, value)
        if data:
            raise TypeError(f"{type(self).__name__}: unknown fields {sorted(data)}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise TypeError(f"{type(self).__name__} is frozen: {name} cannot be set")

    def __delattr__(self, name: str) -> None:
        raise TypeError(f"{type(self).__name__} is frozen: {name} cannot be deleted")

    def _items(self) -> list[tuple[str, Any]]:
        """The fields and their values, in order."""
        return [(name, getattr(self, name)) for name in self.__plain_names__]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BaseModel):
            return NotImplemented
        return type(self) is type(other) and self._items() == other._items()

    def __hash__(self) -> int:
        return hash(type(self)) + hash(tuple(getattr(self, name) for name in self.__plain_names__))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self._items())
        return f"{type(self).__name__}({inner})"

    def model_copy(self, *, update: dict[str, Any] | None = None, deep: bool = False) -> Any:
        new = object.__new__(type(self))
        for name, value in self._items():
            object.__setattr__(new, name, value)
        for name, value in (update or {}).items():
            object.__setattr__(new, name, value)  # AttributeError: not a field of the model
        return new

    def model_dump(self, *, mode: str = "python") -> dict[str, Any]:
        if mode == "json":
            hints = type(self)._hints()
            return {k: _json(v, hints.get(k)) for k, v in self._items()}
        return {k: _python(v) for k, v in self._items()}

    @classmethod
    def _hints(cls) -> dict[str, Any]:
        if cls.__plain_hints__ is None:
            try:
                cls.__plain_hints__ = typing.get_type_hints(cls, include_extras=True)
            except Exception:  # a name only known to the type checker: dump without serializers
                cls.__plain_hints__ = {}
        return cls.__plain_hints__


# --- model_dump ---------------------------------------------------------------------------------------------


def _python(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump()
    if isinstance(value, dict):
        return {k: _python(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_python(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_python(v) for v in value)
    return value


def _matches(hint: Any, value: Any) -> bool:
    """Whether `value` belongs to this member of a union (to pick the member's serializer)."""
    origin = typing.get_origin(hint)
    if origin is Annotated:
        return _matches(typing.get_args(hint)[0], value)
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(a, value) for a in typing.get_args(hint))
    target = origin if origin is not None else hint
    if target is float:
        return isinstance(value, float | int) and not isinstance(value, bool)
    return isinstance(target, type) and isinstance(value, target)


def _json(value: Any, hint: Any) -> Any:
    """`value` as pydantic's `model_dump(mode="json")` gives it, for a field annotated `hint`."""
    if value is None:
        return None
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    origin = typing.get_origin(hint)
    if origin is Annotated:
        base, *metadata = typing.get_args(hint)
        for item in metadata:
            if isinstance(item, PlainSerializer):
                return item.func(value)
        return _json(value, base)
    if origin in (Union, types.UnionType):
        member = next((a for a in typing.get_args(hint) if a is not type(None) and _matches(a, value)), None)
        return _json(value, member)
    args = typing.get_args(hint)
    if isinstance(value, dict):
        inner = args[1] if origin is dict and len(args) == 2 else None
        return {_json(k, None): _json(v, inner) for k, v in value.items()}
    if isinstance(value, list | tuple):
        inner = args[0] if args and origin is not tuple else None
        return [_json(v, inner) for v in value]
    if isinstance(value, PurePath):
        return str(value)
    return value  # str, int, float, bool: what else a snapshot carries (agent.config.validate.snapshot)


# --- the snapshot the validating child sends -----------------------------------------------------------------


MODEL, PATH, TUPLE = "model", "path", "tuple"  # the tags of a snapshot (agent.config.validate.snapshot)


def rebuild(value: Any) -> Any:
    """The objects of a snapshot, its models rebuilt on this module's BaseModel."""
    if type(value) is tuple:
        tag = value[0]
        if tag == MODEL:
            obj = object.__new__(_model_class(value[1]))
            for k, v in value[2].items():
                object.__setattr__(obj, k, rebuild(v))  # AttributeError: not a field of the model
            return obj
        if tag == PATH:
            return Path(value[1])
        if tag == TUPLE:
            return tuple(rebuild(v) for v in value[1])
        raise ValueError(f"not a snapshot: a tuple tagged {tag!r}")
    if type(value) is dict:
        # Keys interned: devices of one profile share their points' names (marshal gives each its own copy).
        return {sys.intern(k) if type(k) is str else k: rebuild(v) for k, v in value.items()}
    if type(value) is list:
        return [rebuild(v) for v in value]
    return value


_classes: dict[str, type[BaseModel]] = {}


def _model_class(name: str) -> type[BaseModel]:
    cls = _classes.get(name)
    if cls is None:
        module, _, qualname = name.partition(":")
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
        if not (isinstance(found, type) and issubclass(found, BaseModel)):
            raise TypeError(
                f"{name} is not a plain model here (was the pydantic kit selected? see agent.config.modelkit)"
            )
        _classes[name] = cls = found
    return cls
