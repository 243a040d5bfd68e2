"""Run reports: the JSON summary and one self-contained HTML page with SVG plots
(submit latency CDF, a timeline of leaders, terms and faults, tasks by state over time).
No plotting library: the SVG is written by hand, so a report needs nothing installed.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from goml.report.fidelity import compare

WIDTH, HEIGHT, PAD = 720, 260, 48
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
STATE_COLORS = {
    "PENDING": "#ff7f0e",
    "LEASED": "#9467bd",
    "RUNNING": "#1f77b4",
    "SUCCEEDED": "#2ca02c",
    "DEAD": "#d62728",
    "CANCELLED": "#7f7f7f",
}


def _svg(body: str, title: str) -> str:
    return (
        f"<figure><figcaption>{html.escape(title)}</figcaption>"
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
        f'font-family="sans-serif" font-size="11">{body}</svg></figure>'
    )


def _tick(value: float) -> str:
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _axes(x_max: float, y_max: float, x_label: str, y_label: str, y_ticks: bool = True) -> str:
    parts = [
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - 10}" y2="{HEIGHT - PAD}" stroke="#333"/>',
        f'<line x1="{PAD}" y1="10" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="#333"/>',
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 10}" text-anchor="middle">{html.escape(x_label)}</text>',
        f'<text x="12" y="{HEIGHT / 2}" transform="rotate(-90 12 {HEIGHT / 2})" '
        f'text-anchor="middle">{html.escape(y_label)}</text>',
    ]
    for i in range(6):
        x = PAD + i * (WIDTH - PAD - 10) / 5
        y = HEIGHT - PAD - i * (HEIGHT - PAD - 10) / 5
        parts.append(
            f'<text x="{x:.0f}" y="{HEIGHT - PAD + 14}" text-anchor="middle">{_tick(x_max * i / 5)}</text>'
        )
        if y_ticks:
            parts.append(
                f'<text x="{PAD - 4}" y="{y + 4:.0f}" text-anchor="end">{_tick(y_max * i / 5)}</text>'
            )
    return "".join(parts)


def _x(value: float, x_max: float) -> float:
    return PAD + (WIDTH - PAD - 10) * (value / x_max if x_max else 0)


def _y(value: float, y_max: float) -> float:
    return HEIGHT - PAD - (HEIGHT - PAD - 10) * (value / y_max if y_max else 0)


def latency_cdf(
    samples_ms: list[float], title: str, overlay: tuple[str, list[float]] | None = None
) -> str:
    """The CDF of `samples_ms`; `overlay` (a label and its samples, e.g. the simulator's
    prediction) is drawn over it, dashed, on the same axes."""
    if not samples_ms:
        return f"<p>{html.escape(title)}: no samples</p>"
    ordered = sorted(samples_ms)
    other = sorted(overlay[1]) if overlay is not None else []
    x_max = max(ordered[-1], other[-1] if other else 0.0) or 1.0

    def points(values: list[float]) -> str:
        return " ".join(
            f"{_x(v, x_max):.1f},{_y((i + 1) / len(values), 1.0):.1f}" for i, v in enumerate(values)
        )

    body = _axes(x_max, 1.0, "submit latency (ms)", "fraction of submits")
    body += f'<polyline fill="none" stroke="{COLORS[0]}" stroke-width="1.5" points="{points(ordered)}"/>'
    if overlay is not None and other:
        body += (
            f'<polyline fill="none" stroke="{COLORS[1]}" stroke-width="1.5" '
            f'stroke-dasharray="5 3" points="{points(other)}"/>'
            f'<text x="{WIDTH - 20}" y="{HEIGHT - PAD - 24}" text-anchor="end" fill="{COLORS[0]}">this run</text>'
            f'<text x="{WIDTH - 20}" y="{HEIGHT - PAD - 10}" text-anchor="end" fill="{COLORS[1]}">'
            f"{html.escape(overlay[0])} (dashed)</text>"
        )
    return _svg(body, title)


def leader_timeline(
    leaders: list[list[Any]], faults: list[list[Any]], duration_s: float, title: str
) -> str:
    """One bar per leadership (term), coloured by node; faults as red marks."""
    nodes = sorted({str(node) for _, node, _ in leaders})
    rows = max(1, len(nodes))
    row_h = (HEIGHT - PAD - 20) / rows
    body = _axes(duration_s, 0, "time (s)", "", y_ticks=False)
    for i, node in enumerate(nodes):
        body += f'<text x="{PAD - 4}" y="{14 + row_h * (i + 0.6):.0f}" text-anchor="end">{html.escape(node)}</text>'
    for position, (start, node, term) in enumerate(leaders):
        end = leaders[position + 1][0] if position + 1 < len(leaders) else duration_s
        row = nodes.index(str(node))
        x0, x1 = _x(float(start), duration_s), _x(float(end), duration_s)
        y = 12 + row_h * row
        body += (
            f'<rect x="{x0:.1f}" y="{y:.1f}" width="{max(1.0, x1 - x0):.1f}" height="{row_h * 0.7:.1f}" '
            f'fill="{COLORS[row % len(COLORS)]}"><title>{html.escape(str(node))} term {term}</title></rect>'
            f'<text x="{x0 + 2:.1f}" y="{y + row_h * 0.5:.1f}" fill="#fff">t{term}</text>'
        )
    for at_s, description in faults:
        x = _x(float(at_s), duration_s)
        body += (
            f'<line x1="{x:.1f}" y1="10" x2="{x:.1f}" y2="{HEIGHT - PAD}" stroke="#d62728" '
            f'stroke-dasharray="4 3"><title>{html.escape(str(description))}</title></line>'
        )
    return _svg(body, title)


def tasks_over_time(samples: list[list[Any]], title: str) -> str:
    if not samples:
        return f"<p>{html.escape(title)}: no samples</p>"
    x_max = float(samples[-1][0]) or 1.0
    y_max = max((max(counts.values(), default=0) for _, counts in samples), default=0) or 1
    body = _axes(x_max, float(y_max), "time (s)", "tasks")
    legend_x = PAD + 10
    for state, color in STATE_COLORS.items():
        points = " ".join(
            f"{_x(float(t), x_max):.1f},{_y(float(counts.get(state, 0)), float(y_max)):.1f}"
            for t, counts in samples
        )
        body += f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{points}"/>'
        body += f'<text x="{legend_x}" y="22" fill="{color}">{state}</text>'
        legend_x += 80
    return _svg(body, title)


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items() if k != "values")
    return str(value)


def write_report(
    summary: dict[str, Any], out_dir: Path, comparison: dict[str, Any] | None = None
) -> Path:
    """Write summary.json and report.html into out_dir; returns the HTML path.

    `comparison`, when given, is another run's summary (the simulator's prediction next
    to a real chaos run) shown side by side."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    timeline = summary.get("timeline", {})
    keys = [
        "scenario", "seed", "trace_digest", "sim_seconds", "wall_seconds", "failover_s",
        "submit_ms", "submit_ms_steady", "tasks_submitted", "tasks_acknowledged", "tasks_succeeded", "tasks_lost",
        "duplicate_results", "leader_changes",
    ]  # fmt: skip
    rows = [(k, _fmt(summary.get(k))) for k in keys if k in summary]
    verdicts = "".join(
        f"<li class={'pass' if v['passed'] else 'fail'}>{html.escape(v['text'])}</li>"
        for v in summary.get("expectations", [])
    )
    side_by_side = ""
    if comparison is not None:
        compare_rows = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(_fmt(summary.get(k)))}</td>"
            f"<td>{html.escape(_fmt(comparison.get(k)))}</td></tr>"
            for k in keys[3:]
        )
        verdict_rows = "".join(
            f"<tr><th>{html.escape(c.figure)}</th><td>{html.escape(_fmt(c.real))}</td>"
            f"<td>{html.escape(_fmt(c.predicted))}</td>"
            f"<td>{'-' if c.ratio is None else f'{c.ratio:.2f}'}</td>"
            f"<td class={'pass' if c.within else 'fail'}>"
            f"{'-' if c.within is None else 'yes' if c.within else 'no'}</td></tr>"
            for c in compare(summary, comparison)
        )
        side_by_side = (
            "<h2>Side by side</h2><table><tr><th></th><th>this run</th>"
            f"<th>{html.escape(str(comparison.get('kind', 'simulator prediction')))}</th></tr>"
            f"{compare_rows}</table>"
            "<h2>Prediction against measurement</h2><table><tr><th></th><th>this run</th>"
            "<th>predicted</th><th>ratio</th><th>within tolerance</th></tr>"
            f"{verdict_rows}</table><p>Tolerance: failovers equal; failover p50 and steady "
            "submit p50 within 25 %, steady submit p99 within 50 % (issue 14).</p>"
        )
    predicted_timeline = (comparison or {}).get("timeline") or {}
    overlay = ("simulator", predicted_timeline.get("submit_ms", [])) if predicted_timeline else None
    duration = float(summary.get("sim_seconds") or summary.get("wall_seconds") or 1.0)
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<title>goml report: {html.escape(str(summary.get("scenario")))} seed {summary.get("seed")}</title>
<style>body{{font-family:sans-serif;max-width:780px;margin:2em auto}}th{{text-align:left;padding-right:1em}}
.pass{{color:#2ca02c}}.fail{{color:#d62728;font-weight:bold}}figure{{margin:1em 0}}</style></head><body>
<h1>{html.escape(str(summary.get("scenario")))} <small>seed {summary.get("seed")}</small></h1>
<h2>Expectations</h2><ul>{verdicts or "<li>none</li>"}</ul>
<h2>Summary</h2>{_table(rows)}
{side_by_side}
<h2>Plots</h2>
{latency_cdf(timeline.get("submit_ms", []), "Submit latency CDF", overlay)}
{leader_timeline(timeline.get("leaders", []), timeline.get("faults", []), duration, "Leaders and terms over time; dashed red lines are faults")}
{leader_timeline(predicted_timeline.get("leaders", []), predicted_timeline.get("faults", []), duration, "Simulator: leaders and terms over time") if predicted_timeline else ""}
{tasks_over_time(timeline.get("tasks_by_state", []), "Tasks by state over time")}
{tasks_over_time(predicted_timeline.get("tasks_by_state", []), "Simulator: tasks by state over time") if predicted_timeline else ""}
</body></html>"""
    path = out_dir / "report.html"
    path.write_text(page)
    return path
