"""The simulator's fidelity: each chaos scenario run for real (`goml chaos run`, which
also prints the simulator's prediction for the scenario as written), then simulated
again with this machine's calibration (`goml chaos calibrate`), side by side, with the
tolerances of issue 14 (the simulator starts with the real run's first leader, as
the chaos runner's prediction does; --free-leader lets it elect its own): the same number of failovers, failover p50 and steady-submit p50
within 25 % of the real run, steady-submit p99 within 50 %.

    python bench/fidelity.py [--seeds 1] [--calibration FILE] [--out reports/fidelity]
                             [SCENARIO ...]

Without --calibration, it calibrates first (into OUT/calibration.yaml). Figures move with
the machine's load: the table says the load average around each real run. Writes
OUT/fidelity.md (the table) and OUT/fidelity.json (every figure).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from goml.report.fidelity import compare, figures  # noqa: E402
from goml.scenario.loader import load_scenario  # noqa: E402
from goml.scenario.schema import Costs  # noqa: E402
from goml.sim.runner import simulate  # noqa: E402

CHAOS_TIMEOUT_S = 900.0


def first_leader(summary: dict[str, Any]) -> str:
    leaders = (summary.get("timeline") or {}).get("leaders") or []
    return str(leaders[0][1]) if leaders else "-"


def real_run(scenario: str, seed: int, out: Path, reuse: bool) -> dict[str, Any]:
    """`goml chaos run --json` in its own process, killed by PID if it outlives the limit
    (`reuse`: the summary a previous run left in `out`, if there is one)."""
    previous = out / "summary.json"
    if reuse and previous.is_file():
        kept: dict[str, Any] = json.loads(previous.read_text())
        return kept
    previous.unlink(missing_ok=True)  # a failed run must not pass off an older summary
    command = [sys.executable, "-m", "goml", "chaos", "run", scenario, "--seed", str(seed)]
    command += ["--json", "--out", str(out)]
    popen = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        stdout, _ = popen.communicate(timeout=CHAOS_TIMEOUT_S)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
    # The printed JSON leaves the timeline out (goml.sim.runner.print_summary), and the
    # first leader is in it: read the whole summary the run wrote, when it wrote one.
    if previous.is_file():
        written: dict[str, Any] = json.loads(previous.read_text())
        return written
    try:
        summary: dict[str, Any] = json.loads(stdout)
    except json.JSONDecodeError:
        return {"error": f"goml chaos run exited {popen.returncode} without a summary"}
    return summary


def off_by(real: float | None, sim: float | None) -> float | None:
    if real is None or sim is None or real == 0:
        return None
    return (sim - real) / real


def cell(real: float | None, sim: float | None, cal: float | None) -> str:
    def show(value: float | None) -> str:
        return "-" if value is None else f"{value:g}"

    def pct(value: float | None) -> str:
        error = off_by(real, value)
        return "" if error is None else f" ({error:+.0%})"

    return f"{show(real)} / {show(sim)}{pct(sim)} / {show(cal)}{pct(cal)}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("scenarios", nargs="*")
    parser.add_argument("--seeds", default="1", help="comma-separated, e.g. 1,2,3")
    parser.add_argument("--calibration", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "fidelity")
    parser.add_argument(
        "--free-leader",
        action="store_true",
        help="let the simulator elect its own first leader (default: the real run's)",
    )
    parser.add_argument(
        "--reuse-real", action="store_true", help="take real runs already in OUT, if any"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    scenarios = args.scenarios or sorted(glob.glob(str(ROOT / "scenarios/chaos/*.yaml")))
    calibration: Path = args.calibration or args.out / "calibration.yaml"
    if args.calibration is None:
        subprocess.run(
            [sys.executable, "-m", "goml", "chaos", "calibrate", "--out", str(calibration)],
            cwd=ROOT,
            check=True,
            timeout=CHAOS_TIMEOUT_S,
        )
    costs = Costs.model_validate(yaml.safe_load(calibration.read_text())["costs"])
    rows = [
        "| scenario | seed | load avg | first leader | failovers real / sim / calibrated"
        " | failover p50 s | steady submit p50 ms | steady submit p99 ms | calibrated |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    results: list[dict[str, Any]] = []
    for path in scenarios:
        scenario = load_scenario(path).scenario
        for seed in (int(s) for s in args.seeds.split(",")):
            out = args.out / f"{scenario.name}-seed{seed}"
            kept_load = out / "load.json"
            if args.reuse_real and kept_load.is_file():  # the load of the run reused
                load_before, load_after = json.loads(kept_load.read_text())
                real = real_run(path, seed, out, reuse=True)
            else:
                load_before = os.getloadavg()[0]
                real = real_run(path, seed, out, reuse=False)
                load_after = os.getloadavg()[0]
                if out.is_dir():
                    kept_load.write_text(json.dumps([load_before, load_after]))
            if "error" in real:
                rows.append(f"| {scenario.name} | {seed} | | | {real['error']} | | | | |")
                continue
            with_costs = scenario.model_copy(update={"costs": costs})
            leader = None if args.free_leader else first_leader(real)
            leader = None if leader == "-" else leader
            cal_summary, _ = simulate(with_costs, seed, leader)
            as_written, _ = simulate(scenario, seed, leader)  # the runner's prediction
            r, s, c = figures(real), figures(as_written), figures(cal_summary)
            leaders = " / ".join(first_leader(x) for x in (real, as_written, cal_summary))
            misses = [x.figure for x in compare(real, cal_summary) if x.within is False]
            ok, why = not misses, ", ".join(misses)
            rows.append(
                f"| {scenario.name} | {seed} | {load_before:.1f}-{load_after:.1f} | {leaders} | "
                + " | ".join(cell(r[k], s[k], c[k]) for k in r)
                + f" | {'yes' if ok else 'no: ' + why} |"
            )
            results.append(
                {"scenario": scenario.name, "seed": seed, "real": r, "sim": s, "calibrated": c}
            )
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    note = (
        f"\nreal / simulated as written / simulated with {calibration.name} "
        f"({costs.measured_on}); (±%: off the real run)\n"
    )
    (args.out / "fidelity.md").write_text(table + "\n" + note)
    (args.out / "fidelity.json").write_text(json.dumps(results, indent=2))
    print(table + "\n" + note)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
