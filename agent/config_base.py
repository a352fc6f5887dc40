"""The base models every config section and driver config inherits: unknown keys are errors."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from agent.units import Duration


class Model(BaseModel):
    """A config section: strict about unknown keys, immutable once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceConfigBase(Model):
    """Fields every device has, whatever its driver. Drivers narrow `driver` to a Literal of their name."""

    driver: str
    poll: Duration = Field(10.0, description="time between two reads of the device (polled drivers)")
    timeout: Duration | None = Field(
        None,
        description="longest time one read cycle may take, queueing on a shared bus included; "
        "default: 3 x poll, between 10s and 60s",
    )
    enabled: bool = True

    def cycle_timeout(self) -> float:
        return self.timeout if self.timeout is not None else min(max(3 * self.poll, 10.0), 60.0)
