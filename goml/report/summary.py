"""Figures shared by the simulator's and the chaos runner's run summaries, so both
report a distribution the same way."""

from __future__ import annotations


def distribution(values: list[float], digits: int, with_values: bool = False) -> dict[str, object]:
    """count, p50, p99 and max (nearest rank; None when there are no samples)."""
    ordered = sorted(values)

    def quantile(q: float) -> float | None:
        if not ordered:
            return None
        position = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
        return round(ordered[position], digits)

    stats: dict[str, object] = {
        "count": len(ordered),
        "p50": quantile(0.5),
        "p99": quantile(0.99),
        "max": round(ordered[-1], digits) if ordered else None,
    }
    if with_values:
        stats["values"] = [round(v, digits) for v in values]
    return stats
