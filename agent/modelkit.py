"""What the config models are built with: pydantic, or in the running daemon a plain stand-in.

Every config model imports its base and helpers from here, never from pydantic directly. A process that
validates a config (`fieldgate check`, the child `fieldgate run` starts, the tests) gets pydantic. The daemon
calls `agent.plainmodel.use()` before any config module is imported and gets `agent.plainmodel`: the same classes,
no validation, about 15 MiB less (docs/PERFORMANCE.md). The choice is made once per process, at the first
import of this module.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING


def _plain_requested() -> bool:
    return bool(getattr(sys.modules.get("agent.plainmodel"), "requested", False))


if TYPE_CHECKING or not _plain_requested():
    from pydantic import (
        BaseModel,
        BeforeValidator,
        ConfigDict,
        Discriminator,
        Field,
        PlainSerializer,
        Tag,
        WithJsonSchema,
        field_validator,
        model_validator,
    )
else:
    from agent.plainmodel import (
        BaseModel,
        BeforeValidator,
        ConfigDict,
        Discriminator,
        Field,
        PlainSerializer,
        Tag,
        WithJsonSchema,
        field_validator,
        model_validator,
    )

PLAIN = not TYPE_CHECKING and _plain_requested()

__all__ = [
    "PLAIN",
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
]
