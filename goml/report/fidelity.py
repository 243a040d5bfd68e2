"""How far a prediction is from a measurement (issue 14): per figure, the simulator's
value over the real one and whether it is within tolerance. The one place the
tolerances live (the chaos report and bench/fidelity.py both use them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Relative tolerance of each figure; failovers must match exactly.
TOLERANCE = {"failover_p50": 0.25, "steady_p50": 0.25, "steady_p99": 0.50}
FIGURES = ("failovers", *TOLERANCE)


@dataclass(frozen=True)
class Compared:
    figure: str
    real: float | None
    predicted: float | None

    @property
    def ratio(self) -> float | None:
        """predicted / real (None when either is missing or the real one is 0)."""
        if self.real is None or self.predicted is None or self.real == 0:
            return None
        return self.predicted / self.real

    @property
    def within(self) -> bool | None:
        """Within tolerance (None: nothing to compare, e.g. no failover in either)."""
        if self.figure == "failovers":
            return self.real == self.predicted
        ratio = self.ratio
        if ratio is None:
            return None if self.real is None and self.predicted is None else False
        return abs(ratio - 1) <= TOLERANCE[self.figure]


def figures(summary: dict[str, Any]) -> dict[str, float | None]:
    failover = summary.get("failover_s") or {}
    steady = summary.get("submit_ms_steady") or {}
    return {
        "failovers": failover.get("count"),
        "failover_p50": failover.get("p50"),
        "steady_p50": steady.get("p50"),
        "steady_p99": steady.get("p99"),
    }


def compare(real: dict[str, Any], predicted: dict[str, Any]) -> list[Compared]:
    r, p = figures(real), figures(predicted)
    return [Compared(name, r[name], p[name]) for name in FIGURES]
