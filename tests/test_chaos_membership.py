"""A rolling replace on real processes (`goml chaos run scenarios/chaos/rolling-replace.yaml`):
each voter replaced by a spare through the real ChangeMembership RPC, under load; nothing
acknowledged lost, nothing recorded twice, the final voters the new nodes, every process
the run started gone afterwards and no proxy left, and the simulator's prediction beside
the real figures. Latency figures are reported, not asserted (they belong to benchmarks).

The run is a subprocess stopped with SIGINT then SIGKILL if it outlives the test, and
every PID it recorded is killed in a `finally` (tests/test_chaos.py's helpers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from goml.chaos.toxiproxy import Toxiproxy
from tests.test_chaos import alive, chaos_process, recorded_pids, toxiproxy

__all__ = ["toxiproxy"]  # the module's Toxiproxy server fixture (stopped by PID)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
SCENARIO = REPO / "scenarios" / "chaos" / "rolling-replace.yaml"


def test_a_rolling_replace_on_real_processes_loses_nothing(
    tmp_path: Path, toxiproxy: Toxiproxy
) -> None:
    out = tmp_path / "out"
    args = [str(SCENARIO), "--json", "--toxiproxy-url", toxiproxy.url]
    with chaos_process(args, out) as process:
        stdout, _ = process.communicate(timeout=300)
        # 1: an expectation failed. The latency ones measure this shared machine too (a
        # joining process starts slowly on 2 loaded cores): they are judged by `nox -s
        # chaos` and reported, not asserted here; everything else is.
        assert process.returncode in (0, 1), stdout[-4000:]
    # An uncaught exception exits 1 too, before any summary is written: show its output.
    assert (out / "summary.json").is_file(), stdout[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    failed = [e for e in summary["expectations"] if not e["passed"]]
    assert all(e["metric"].startswith("submit_ms") for e in failed), failed
    assert (process.returncode == 0) == (not failed)
    changes = summary["timeline"]["membership"]
    assert [c[3] for c in changes] == ["done", "done", "done"], changes
    assert changes[-1][4] == ["aws-3", "aws-4", "gcp-2"]  # the new nodes are the voters
    assert summary["membership_changes"] == 3
    assert summary["tasks_acknowledged"] > 50
    assert summary["tasks_lost"] == 0 and summary["duplicate_results"] == 0
    assert summary["settled"] is True
    # Side by side: the simulator played the same changes.
    assert summary["simulator"]["membership_changes"] == 3
    assert summary["simulator"]["tasks_lost"] == 0
    # The spares' certificates were issued when they joined, from the run's CA.
    certs = out / "work" / "certs"
    assert all((certs / f"{n}.pem").is_file() for n in ("aws-3", "aws-4", "gcp-2"))
    pids = recorded_pids(out)
    assert len(pids) >= 8  # 3 nodes + 3 joined + 2 agents
    assert [pid for pid in pids if alive(pid)] == []
    assert toxiproxy.proxies() == {}
