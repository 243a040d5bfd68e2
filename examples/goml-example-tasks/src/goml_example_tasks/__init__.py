"""An example goml task package: one task function, registered by entry point."""

from __future__ import annotations

from typing import Self

import numpy as np
from pydantic import Field, model_validator

from goml.agent.tasks import TaskArgs, TaskFunction


class MovingAverageArgs(TaskArgs):
    # Bounds keep a single submit from asking an agent for unbounded work or memory.
    values: list[float] = Field(min_length=1, max_length=100_000)
    window: int = Field(default=3, ge=1, le=10_000)

    @model_validator(mode="after")
    def _window_fits(self) -> Self:
        if self.window > len(self.values):
            raise ValueError("window must not be longer than values")
        return self


def _moving_average(a: MovingAverageArgs) -> dict[str, object]:
    """Mean of each run of `window` consecutive values ("valid" positions only)."""
    kernel = np.full(a.window, 1.0 / a.window)
    means = np.convolve(np.asarray(a.values, dtype=np.float64), kernel, mode="valid")
    return {"window": a.window, "means": [float(v) for v in means]}


moving_average = TaskFunction(
    "example_moving_average",
    MovingAverageArgs,
    _moving_average,
    "moving average of a list of numbers",
)
