"""What the config models are built with: pydantic, or in the running daemon a plain stand-in.

Every config model imports its base and helpers from here, never from pydantic directly. A process that
validates a config (`fieldgate check`, the child `fieldgate run` starts, the tests) gets pydantic. The daemon
calls `agent.config.plainmodel.use()` before any config module is imported and gets `agent.config.plainmodel`: the same classes,
no validation, about 15 MiB less (docs/PERFORMANCE.md). The choice is made once per process, at the first
import of this module.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

PLAIN = not TYPE_CHECKING and bool(getattr(sys.modules.get("agent.config.plainmodel"), "requested", False))

if TYPE_CHECKING or not PLAIN:
    import pydantic as _kit
else:
    from agent.config import plainmodel as _kit

# The names the config modules use; agent.config.plainmodel defines each of them.
BaseModel = _kit.BaseModel
BeforeValidator = _kit.BeforeValidator
ConfigDict = _kit.ConfigDict
Discriminator = _kit.Discriminator
Field = _kit.Field
PlainSerializer = _kit.PlainSerializer
Tag = _kit.Tag
WithJsonSchema = _kit.WithJsonSchema
field_validator = _kit.field_validator
model_validator = _kit.model_validator
