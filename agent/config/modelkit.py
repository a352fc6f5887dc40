"""What the config models are built with: pydantic, or in the running daemon a plain stand-in.

Every config model imports its base and helpers from here, never from pydantic directly. The kit is chosen
once per process, explicitly, at its entry point, before any config model is built: `fieldgate run`
(agent/cli.py) selects `plain` (agent/config/plainmodel.py: the same classes, no validation, about 15 MiB
less, docs/PERFORMANCE.md); the validating child (`python -m agent.config.validate`) and every other verb
select `pydantic`. A process that selects nothing (the tests, the benches, a script) gets pydantic.

The names below are bound on first use: the first `from agent.config.modelkit import BaseModel` fixes the
kit, and a `select()` of the other kit after that raises `ModelKitChosenLate` instead of leaving a process
with models of both kinds.
"""

from __future__ import annotations

from collections.abc import Collection
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal

from agent import registry
from agent.errors import FieldgateError

Kit = Literal["pydantic", "plain"]

# The names the config modules use; agent.config.plainmodel defines each of them.
NAMES = (
    "BaseModel",
    "BeforeValidator",
    "ConfigDict",
    "Discriminator",
    "Field",
    "PlainSerializer",
    "Tag",
    "WithJsonSchema",
    "field_validator",
    "model_validator",
)


class ModelKitChosenLate(FieldgateError):
    """A process asked for a model kit after its config models were built on the other one."""


_chosen: Kit | None = None  # what the entry point selected
_kit: ModuleType | None = None  # the module the names come from, once one was used


def select(kit: Kit) -> None:
    """Choose this process's model kit: at its entry point, before any config model is imported."""
    global _chosen
    if kit not in ("pydantic", "plain"):
        raise ValueError(f"no model kit {kit!r}")
    fixed = _fixed_kit()
    if fixed is not None and fixed != kit:
        raise ModelKitChosenLate(
            f"model kit {kit!r} selected after config models were built on {fixed!r}: "
            "select it at the process's entry point, before any config module is imported"
        )
    if _chosen is not None and _chosen != kit:
        raise ModelKitChosenLate(f"model kit {kit!r} selected after {_chosen!r}: a process has one kit")
    _chosen = kit


def select_in_forked_child(kit: Kit) -> None:
    """In a child forked before any config model was built (the daemon's validating child,
    agent/config/validate.py): the child's own kit, whatever its parent chose."""
    global _chosen
    if _kit is not None:
        raise ModelKitChosenLate("forked after config models were built: the child cannot choose its kit")
    _chosen = None
    select(kit)


def models_built() -> bool:
    """Whether this process has built config models (a child forked from it could not choose its own kit)."""
    return _kit is not None


def selected() -> Kit:
    """The kit this process runs on (or will, at the first config model): pydantic unless `plain` was chosen."""
    return _fixed_kit() or _chosen or "pydantic"


def _fixed_kit() -> Kit | None:
    if _kit is None:
        return None
    return "pydantic" if _kit.__name__ == "pydantic" else "plain"


def _load() -> ModuleType:
    global _kit
    if _kit is None:
        if (_chosen or "pydantic") == "plain":
            from agent.config import plainmodel

            _kit = plainmodel
        else:
            import pydantic

            _kit = pydantic
    return _kit


# --- the device union: every driver's config model, or those of the one file a process validates --------------

_only_drivers: frozenset[str] | None = None  # chosen by `only_drivers`; None: every registered driver
_union_built = False  # agent.config.models has built its device union (of `_only_drivers`)


def only_drivers(names: Collection[str]) -> None:
    """Build the config's device union of these drivers' models only, not of every registered driver: for a
    process that validates one file (the validating child, agent/config/validate.py), which then neither
    imports the other drivers' config modules nor builds their validators. A union of the drivers a file's
    devices name validates that file exactly as the whole union does (it dispatches on the device's
    `driver`). Called before agent.config.models is imported; after, a union that holds these drivers is
    kept, and one that lacks some raises ModelKitChosenLate."""
    global _only_drivers
    wanted = frozenset(names) or frozenset({registry.DEFAULT_DRIVER})  # no device: the union needs a member
    if _union_built:
        if _only_drivers is not None and not wanted <= _only_drivers:
            raise ModelKitChosenLate(
                f"device union of {sorted(_only_drivers)} built before {sorted(wanted)} were asked for"
            )
        return
    _only_drivers = wanted


def union_drivers() -> list[str]:
    """The drivers agent.config.models builds its device union of, in the registry's order (called once)."""
    global _union_built
    _union_built = True
    return [name for name in registry.DRIVERS if _only_drivers is None or name in _only_drivers]


if TYPE_CHECKING:  # the names as mypy checks them
    import pydantic as _pydantic

    BaseModel = _pydantic.BaseModel
    BeforeValidator = _pydantic.BeforeValidator
    ConfigDict = _pydantic.ConfigDict
    Discriminator = _pydantic.Discriminator
    Field = _pydantic.Field
    PlainSerializer = _pydantic.PlainSerializer
    Tag = _pydantic.Tag
    WithJsonSchema = _pydantic.WithJsonSchema
    field_validator = _pydantic.field_validator
    model_validator = _pydantic.model_validator
else:

    def __getattr__(name: str) -> Any:
        if name not in NAMES:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(_load(), name)
        globals()[name] = value  # later imports find it without this function
        return value
