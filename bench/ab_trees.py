"""A/B of two source trees on bench/peers.py: the runs alternate A B, B A, ... so both
see the same machine in the same minutes; prints every run, then the medians and the
ratio B/A of the medians. For a shared, loaded machine, where one run proves nothing.

A tree is a copy of the checkout (bench/peers.py starts each node with PYTHONPATH set
to its own tree, so each side runs its own goml):

    mkdir /tmp/a && git archive HEAD | tar -x -C /tmp/a       # or: cp -r of a checkout
    python bench/ab_trees.py /tmp/a . --pairs 4 -- --only goml --trials 0 --seconds 2
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

RUN_TIMEOUT_S = 900.0
PAIRS_MAX = 50
# bench/peers.py prints one line per system: "  NAME: C commits/s (...), lone p50 P ms, p99 Q ms"
FIGURES = re.compile(
    r"^\s+(?P<name>[^:]+): (?P<cps>\d+) commits/s .* lone p50 (?P<p50>[\d.]+) ms, "
    r"p99 (?P<p99>[\d.]+) ms"
)
DEFAULT_ARGS = ["--only", "goml", "--trials", "0", "--seconds", "2", "--latency-count", "300"]

Row = tuple[str, float, float, float]  # (system, commits/s, p50 ms, p99 ms)


def run(tree: Path, peers_args: list[str]) -> list[Row]:
    script = tree / "bench" / "peers.py"
    done = subprocess.run(
        [sys.executable, str(script), *peers_args],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    rows = []
    for line in done.stdout.splitlines():
        match = FIGURES.match(line)
        if match:
            rows.append(
                (match["name"], float(match["cps"]), float(match["p50"]), float(match["p99"]))
            )
    if not rows:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise SystemExit(f"{script}: no figures (exit {done.returncode})\n{tail}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else "",
        usage="%(prog)s [--pairs N] A B [-- PEERS_ARGS...]",
    )
    parser.add_argument("a", type=Path, help="tree A (the baseline)")
    parser.add_argument("b", type=Path, help="tree B (the change)")
    parser.add_argument("--pairs", type=int, default=4, help="runs of each, alternating")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.peers_args = argv[split + 1 :]  # after --: arguments for peers.py
    if not 1 <= args.pairs <= PAIRS_MAX:
        parser.error(f"--pairs takes 1 to {PAIRS_MAX}")
    trees = {"A": args.a.resolve(), "B": args.b.resolve()}
    for label, tree in trees.items():
        if not (tree / "bench" / "peers.py").is_file():
            parser.error(f"tree {label} ({tree}) has no bench/peers.py")
    peers_args = args.peers_args or DEFAULT_ARGS
    results: dict[str, list[Row]] = {"A": [], "B": []}
    for pair in range(args.pairs):
        for label in ("A", "B") if pair % 2 == 0 else ("B", "A"):
            for row in run(trees[label], peers_args):
                results[label].append(row)
                load = os.getloadavg()[0]
                print(
                    f"{label} {row[0]:36}{row[1]:8.0f} commits/s  p50 {row[2]:6.2f} ms  "
                    f"p99 {row[3]:7.2f} ms  (load {load:.1f})",
                    flush=True,
                )
    print(f"medians over {args.pairs} runs each (A = {trees['A']}, B = {trees['B']}):")
    for system in sorted({row[0] for rows in results.values() for row in rows}):
        medians: dict[str, tuple[float, float, float]] = {}
        for label, rows in results.items():
            mine = [row for row in rows if row[0] == system]
            cps = statistics.median(row[1] for row in mine)
            p50 = statistics.median(row[2] for row in mine)
            p99 = statistics.median(row[3] for row in mine)
            medians[label] = (cps, p50, p99)
            print(
                f"  {label} {system:34}{cps:8.0f} commits/s  p50 {p50:6.2f} ms  p99 {p99:7.2f} ms"
            )
        a, b = medians["A"], medians["B"]
        print(
            f"  B/A {system:32}x{b[0] / a[0]:.2f} commits/s, p50 x{b[1] / a[1]:.2f}, "
            f"p99 x{b[2] / a[2]:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
