"""The sweep report: one self-contained HTML page per sweep (inline SVG, no script, no
external font or image), written beside the sweep's JSON lines.

Read top down it answers, in order: did any seed break safety (red, with the command that
replays it), which seeds failed, how failover time and submit p99 are spread over the
seeds (a histogram each), and which seeds were worst. The SVG helpers and the look are
the single-run report's (`goml.report.html`).
"""

from __future__ import annotations

import html
import itertools
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from goml.report.html import COLORS, HEIGHT, PAD, WIDTH, _svg, _table, _tick

# Rows of one list (failing seeds, violations): the first ones say what is wrong, and
# every line is in the JSONL file anyway.
ROWS_SHOWN_MAX = 50
WORST_SHOWN = 5
BINS_MIN, BINS_MAX = 5, 40
_RIGHT = 10  # px right of the plot area, as in goml.report.html
_TOP = 10


@dataclass(frozen=True)
class SeedResult:
    """What the sweep keeps of one seed's summary."""

    seed: int
    passed: bool
    why: str  # why it failed, one line; "" when it passed
    violation: str | None  # a safety violation's text
    crash: str | None  # the simulator raised: the traceback's last lines
    failovers_s: tuple[float, ...]
    submit_p99_ms: float | None
    tasks_lost: int
    duplicate_results: int
    sim_seconds: float
    wall_seconds: float
    trace_digest: str
    replay: str  # the command that replays this seed

    @property
    def failover_max_s(self) -> float | None:
        return max(self.failovers_s) if self.failovers_s else None


def _quantile(ordered: Sequence[float], q: float) -> float:
    """Nearest rank, as `goml.report.summary.distribution` computes it."""
    assert ordered, "a quantile of no samples"
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def describe(values: Sequence[float], unit: str) -> str:
    """`n=12: median 0.41 s, p99 0.93 s, max 0.95 s`, or `no samples`."""
    if not values:
        return "no samples"
    ordered = sorted(values)
    return (
        f"n={len(ordered)}: median {statistics.median(ordered):.3g} {unit}, "
        f"p99 {_quantile(ordered, 0.99):.3g} {unit}, max {ordered[-1]:.3g} {unit}"
    )


def _bins(values: Sequence[float]) -> tuple[float, float, list[int]]:
    """(low, high, counts): about sqrt(n) equal bins over [min, max], so a narrow spread
    (submit p99 of 70-80 ms) is not squashed into the first bin of [0, max]."""
    assert values
    low, high = min(values), max(values)
    if high == low:  # one value: a bin around it
        pad = abs(low) * 0.05 or 0.5
        low, high = low - pad, high + pad
    count = min(BINS_MAX, max(BINS_MIN, math.ceil(math.sqrt(len(values)))))
    width = (high - low) / count
    counts = [0] * count
    for value in values:
        counts[min(count - 1, int((value - low) / width))] += 1
    assert sum(counts) == len(values)
    return low, high, counts


def histogram(
    values: Sequence[float], element_id: str, x_label: str, y_label: str, title: str
) -> str:
    """A histogram as inline SVG in a `<section id=element_id>`; bars are `rect.bar`, the
    p99 a dashed line. With no values the axes stay, with a note, so the page's layout
    (and what a reader looks for) does not depend on the data."""
    plot_w, plot_h = WIDTH - PAD - _RIGHT, HEIGHT - PAD - _TOP
    parts = [
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - _RIGHT}" y2="{HEIGHT - PAD}" stroke="#333"/>',
        f'<line x1="{PAD}" y1="{_TOP}" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="#333"/>',
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 10}" text-anchor="middle">{html.escape(x_label)}</text>',
        f'<text x="12" y="{HEIGHT / 2}" transform="rotate(-90 12 {HEIGHT / 2})" '
        f'text-anchor="middle">{html.escape(y_label)}</text>',
    ]
    if not values:
        parts.append(
            f'<text x="{PAD + plot_w / 2}" y="{_TOP + plot_h / 2}" text-anchor="middle" '
            f'fill="#777">no samples</text>'
        )
        body = "".join(parts)
        return f'<section id="{element_id}" class="histogram">{_svg(body, title)}</section>'
    low, high, counts = _bins(values)
    y_max = max(counts)
    bar_w = plot_w / len(counts)
    for i, count in enumerate(counts):
        if count == 0:
            continue
        height = plot_h * count / y_max
        left, right = (
            low + i * (high - low) / len(counts),
            low + (i + 1) * (high - low) / len(counts),
        )
        parts.append(
            f'<rect class="bar" x="{PAD + i * bar_w + 0.5:.1f}" y="{HEIGHT - PAD - height:.1f}" '
            f'width="{max(1.0, bar_w - 1):.1f}" height="{height:.1f}" fill="{COLORS[0]}">'
            f"<title>{_tick(left)} to {_tick(right)}: {count}</title></rect>"
        )
    for i in range(6):
        x = PAD + i * plot_w / 5
        anchor = "end" if i == 5 else "middle"  # the last one would run off the edge
        parts.append(
            f'<text x="{x:.0f}" y="{HEIGHT - PAD + 14}" text-anchor="{anchor}">'
            f"{_tick(low + (high - low) * i / 5)}</text>"
        )
    for tick in sorted({round(y_max * i / 4) for i in range(5)}):  # whole counts, once each
        y = HEIGHT - PAD - plot_h * tick / y_max
        parts.append(f'<text x="{PAD - 4}" y="{y + 4:.0f}" text-anchor="end">{tick}</text>')
    p99 = _quantile(sorted(values), 0.99)
    x99 = PAD + plot_w * (p99 - low) / (high - low)
    # The label on the side with room: p99 is often the largest value, at the right edge.
    right_half = x99 > PAD + plot_w / 2
    anchor, dx = ("end", -3) if right_half else ("start", 3)
    parts.append(
        f'<line class="p99" x1="{x99:.1f}" y1="{_TOP}" x2="{x99:.1f}" y2="{HEIGHT - PAD}" '
        f'stroke="{COLORS[3]}" stroke-dasharray="4 3"/>'
        f'<text x="{x99 + dx:.1f}" y="{_TOP + 10}" text-anchor="{anchor}" '
        f'fill="{COLORS[3]}">p99 {_tick(p99)}</text>'
    )
    return f'<section id="{element_id}" class="histogram">{_svg("".join(parts), title)}</section>'


def _seeds(count: int) -> str:
    return f"{count} seed" if count == 1 else f"{count} seeds"


def _code(text: str) -> str:
    return f"<code>{html.escape(text)}</code>"


def _more(total: int, shown: int, jsonl: Path) -> str:
    if total <= shown:
        return ""
    return f"<p>... and {total - shown} more, every one in {_code(str(jsonl))}</p>"


def _alarms(results: Sequence[SeedResult], jsonl: Path) -> str:
    violations = [r for r in results if r.violation is not None]
    crashes = [r for r in results if r.crash is not None]
    if not violations and not crashes:
        return f'<p class="pass" id="safety">No safety violation in {_seeds(len(results))}.</p>'
    parts = ['<section id="safety" class="alarm">']
    if violations:
        parts.append(f"<h2>Safety violations: {_seeds(len(violations))}</h2><ul>")
        for r in violations[:ROWS_SHOWN_MAX]:
            parts.append(
                f"<li><b>seed {r.seed}</b><pre>{html.escape(str(r.violation))}</pre>"
                f"replay: {_code(r.replay)}</li>"
            )
        parts.append("</ul>" + _more(len(violations), ROWS_SHOWN_MAX, jsonl))
    if crashes:
        # A crash is an assertion or a bug in the simulated code: as serious as a
        # violation until someone has read it.
        parts.append(f"<h2>Simulator crashed: {_seeds(len(crashes))}</h2><ul>")
        for r in crashes[:ROWS_SHOWN_MAX]:
            parts.append(
                f"<li><b>seed {r.seed}</b><pre>{html.escape(str(r.crash))}</pre>"
                f"replay: {_code(r.replay)}</li>"
            )
        parts.append("</ul>" + _more(len(crashes), ROWS_SHOWN_MAX, jsonl))
    parts.append("</section>")
    return "".join(parts)


def _failing(results: Sequence[SeedResult], jsonl: Path) -> str:
    failing = [r for r in results if not r.passed]
    if not failing:
        return "<h2>Failing seeds</h2><p class=pass>none</p>"
    rows = "".join(
        f"<tr><td>{r.seed}</td><td class=fail>{html.escape(r.why)}</td><td>{_code(r.replay)}</td></tr>"
        for r in failing[:ROWS_SHOWN_MAX]
    )
    return (
        f"<h2>Failing seeds: {len(failing)}</h2>"
        f'<table id="failing"><tr><th>seed</th><th>why</th><th>replay</th></tr>{rows}</table>'
        + _more(len(failing), ROWS_SHOWN_MAX, jsonl)
    )


def _worst(
    results: Sequence[SeedResult], key: str, value_of: dict[int, float], unit: str, title: str
) -> str:
    ranked = sorted(
        (r for r in results if r.seed in value_of), key=lambda r: (-value_of[r.seed], r.seed)
    )[:WORST_SHOWN]
    if not ranked:
        return f"<h3>{html.escape(title)}</h3><p>no samples</p>"
    rows = "".join(
        f"<tr><td>{r.seed}</td><td>{value_of[r.seed]:.4g} {unit}</td>"
        f"<td class={'pass' if r.passed else 'fail'}>{'pass' if r.passed else 'FAIL'}</td>"
        f"<td>{html.escape(r.trace_digest[:16])}</td><td>{_code(r.replay)}</td></tr>"
        for r in ranked
    )
    return (
        f"<h3>{html.escape(title)}</h3>"
        f'<table id="worst-{key}" class="worst"><tr><th>seed</th><th>value</th><th>verdict</th>'
        f"<th>trace</th><th>replay</th></tr>{rows}</table>"
    )


def write_sweep_report(
    results: Sequence[SeedResult], scenario: str, source: str, jsonl: Path, path: Path
) -> Path:
    """Write the sweep's page to `path` (results: one per seed, in seed order)."""
    assert all(a.seed < b.seed for a, b in itertools.pairwise(results)), "seed order"
    failovers = [v for r in results for v in r.failovers_s]
    p99s = [r.submit_p99_ms for r in results if r.submit_p99_ms is not None]
    failover_max = {r.seed: m for r in results if (m := r.failover_max_s) is not None}
    p99_of = {r.seed: r.submit_p99_ms for r in results if r.submit_p99_ms is not None}
    passed = sum(r.passed for r in results)
    sim_s = sum(r.sim_seconds for r in results)
    wall_s = sum(r.wall_seconds for r in results)
    speed = f"{sim_s / wall_s:.1f} simulated s per wall s" if wall_s > 0 else "n/a"
    rows = [
        ("scenario", f"{scenario} ({source})"),
        ("seeds", f"{len(results)}: {passed} passed, {len(results) - passed} failed"),
        ("failover (every failover)", describe(failovers, "s")),
        ("submit p99 (one per seed)", describe(p99s, "ms")),
        ("tasks lost (sum)", str(sum(r.tasks_lost for r in results))),
        ("results twice (sum)", str(sum(r.duplicate_results for r in results))),
        ("simulator", f"{sim_s:.0f} simulated s in {wall_s:.0f} s of runs: {speed}"),
        ("every seed's summary", str(jsonl)),
    ]
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>goml sweep: {html.escape(scenario)}, {len(results)} seeds</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}th{{text-align:left;padding-right:1em}}
td{{padding-right:1em;vertical-align:top}}.pass{{color:#2ca02c}}.fail{{color:#d62728;font-weight:bold}}
figure{{margin:1em 0}}code{{font-size:90%;background:#f4f4f4}}pre{{white-space:pre-wrap;margin:.3em 0}}
.alarm{{border:3px solid #d62728;background:#fdecea;color:#8b0000;padding:0 1em .5em}}</style></head><body>
<h1>{html.escape(scenario)} <small>sweep of {len(results)} seeds</small></h1>
{_alarms(results, jsonl)}
{_failing(results, jsonl)}
<h2>Summary</h2>{_table(rows)}
<h2>Distributions over seeds</h2>
{histogram(failovers, "failover-histogram", "failover time (s)", "failovers", f"Failover time, every failover of every seed ({len(failovers)} in {len(results)} seeds)")}
{histogram(p99s, "submit-p99-histogram", "submit p99 (ms)", "seeds", f"Submit latency p99, one per seed ({len(p99s)} seeds)")}
<h2>Worst seeds</h2>
{_worst(results, "failover", failover_max, "s", "Highest failover time (the seed's longest)")}
{_worst(results, "submit-p99", p99_of, "ms", "Highest submit p99")}
</body></html>"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
