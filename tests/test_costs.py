"""Calibrated costs (`costs:`, goml.scenario.schema.Costs) and the simulator's CPU model
(goml.sim.cpu): validated like the rest of a scenario, read from a calibration file,
absent = the simulator as it was, and each cost moving the prediction the way it must."""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from goml.chaos.calibrate import Measured, ProcessCpu
from goml.chaos.calibrate_deployed import bucket_quantile
from goml.cluster import local
from goml.cluster.config import NodeFileConfig, RaftTiming, load_node_config
from goml.cluster.daemon import core_config
from goml.raft.replica import raft_config
from goml.report.fidelity import compare
from goml.report.html import write_report
from goml.scenario.loader import ScenarioError, inline_costs, load_scenario, load_scenario_text
from goml.sim.simulation import Simulation, run_scenario

SHORT = """
name: short
duration_s: 8
workload:
  clients: [{name: c-aws, node: aws-1}, {name: c-gcp, node: gcp-1}]
  rate_per_s: 10
  stop_s: 7
  mix:
    matmul: {args: {n: 8}}
  duration_ms: {kind: uniform, min_ms: 5, max_ms: 50}
"""
SEED = 4
ROOT = Path(__file__).resolve().parent.parent


def run(extra: str = "") -> dict[str, Any]:
    return run_scenario(load_scenario_text(SHORT + extra).scenario, SEED)


def p50(summary: dict[str, Any]) -> float:
    submit = summary["submit_ms"]
    assert isinstance(submit, dict)
    return float(submit["p50"])


# --------------------------------------------------------------------------- absent


def test_no_costs_and_empty_costs_run_as_before() -> None:
    plain = run()
    empty = run("costs: {}\n")
    # fsync given as the disk's own distribution: the same draws, the same trace.
    same_fsync = run("costs: {fsync_ms: {kind: lognormal, median_ms: 0.5, p99_ms: 1.4}}\n")
    assert plain["trace_digest"] == empty["trace_digest"] == same_fsync["trace_digest"]
    assert "cpu_busy_s" not in plain and "cpu_busy_s" not in empty
    assert plain["tasks_acknowledged"] == plain["tasks_submitted"] > 50


# --------------------------------------------------------------------------- direction


def test_a_slower_fsync_gives_slower_submits() -> None:
    fast = run("costs: {fsync_ms: {kind: constant, value_ms: 1}}\n")
    slow = run("costs: {fsync_ms: {kind: constant, value_ms: 40}}\n")
    # A submit waits for the leader's write and a quorum's: at least one more fsync.
    assert p50(slow) > p50(fast) + 30, (p50(fast), p50(slow))
    assert slow["tasks_lost"] == fast["tasks_lost"] == 0


def test_costs_of_messages_calls_and_hops_slow_submits_down() -> None:
    base = p50(run())
    # Small enough that no process is overloaded (a leader takes ~100 messages a second
    # here: at 15 ms each its queue grows without end, as a real one would).
    for field in ("append_ms", "message_ms", "api_call_ms", "hop_ms", "api_hop_ms"):
        charged = run(f"costs: {{{field}: {{kind: constant, value_ms: 3}}}}\n")
        assert p50(charged) > base + 2, (field, base, p50(charged))
        assert charged["tasks_lost"] == 0 and charged["settled"] is True
        if field not in ("hop_ms", "api_hop_ms"):
            assert float(charged["cpu_busy_s"]) > 0


def test_api_hops_cost_api_messages_only() -> None:
    """`api_hop_ms` takes the place of `hop_ms` on API calls and answers; Raft messages
    keep `hop_ms`."""
    hop = "{kind: constant, value_ms: 3}"
    raft_only = run(f"costs: {{hop_ms: {hop}, api_hop_ms: {{kind: constant, value_ms: 0}}}}\n")
    api_only = run(f"costs: {{api_hop_ms: {hop}}}\n")
    both = run(f"costs: {{hop_ms: {hop}}}\n")
    base = p50(run())
    # A submit is two API messages (call, answer) and at least two Raft ones (append
    # out to a follower, its answer back): each part alone adds about 6 ms.
    assert base + 4 < p50(raft_only) < p50(both), (base, p50(raft_only), p50(both))
    assert base + 4 < p50(api_only) < p50(both), (base, p50(api_only), p50(both))


def test_dispatch_cost_delays_tasks_not_submits() -> None:
    base = run()
    charged = run("costs: {dispatch_ms: {kind: constant, value_ms: 200}}\n")
    assert p50(charged) == pytest.approx(p50(base), rel=0.5)  # submits barely change
    assert float(charged["cpu_busy_s"]) >= 0.2 * int(charged["tasks_succeeded"]) * 0.99
    assert charged["tasks_succeeded"] == charged["tasks_acknowledged"]


def test_isolated_tasks_pay_their_own_dispatch_cost() -> None:
    """`isolated: true` in the mix: each task's process start costs
    `isolated_dispatch_ms`, warm tasks keep `dispatch_ms`."""
    costs = "costs: {dispatch_ms: {kind: constant, value_ms: 1}, isolated_dispatch_ms: {kind: constant, value_ms: 200}}\n"
    warm = run(costs)
    isolated_text = SHORT.replace(
        "matmul: {args: {n: 8}}", "matmul: {args: {n: 8}, isolated: true}"
    )
    assert isolated_text != SHORT
    isolated = run_scenario(load_scenario_text(isolated_text + costs).scenario, SEED)
    for summary in (warm, isolated):
        assert summary["tasks_succeeded"] == summary["tasks_acknowledged"] > 50
    succeeded = int(isolated["tasks_succeeded"])
    assert float(isolated["cpu_busy_s"]) >= 0.2 * succeeded * 0.99
    assert float(warm["cpu_busy_s"]) < 0.01 * int(warm["tasks_succeeded"])
    # Unset, an isolated task costs what a warm one does.
    same = run_scenario(
        load_scenario_text(
            isolated_text + "costs: {dispatch_ms: {kind: constant, value_ms: 1}}\n"
        ).scenario,
        SEED,
    )
    assert float(same["cpu_busy_s"]) < 0.01 * int(same["tasks_succeeded"])


def test_processes_on_one_host_share_its_cores() -> None:
    costs = "costs: {{api_call_ms: {{kind: constant, value_ms: 8}}, append_ms: {{kind: constant, value_ms: 8}}, cores: {cores}}}\n"
    one = run(costs.format(cores=1))
    many = run(costs.format(cores=64))
    # All the cluster's processes behind one core queue behind each other.
    assert p50(one) > p50(many), (p50(one), p50(many))


def test_costs_are_deterministic_by_seed() -> None:
    extra = "costs: {api_call_ms: {kind: lognormal, median_ms: 1, p99_ms: 5}, hop_ms: {kind: uniform, min_ms: 0.1, max_ms: 0.4}}\n"
    first, again = run(extra), run(extra)
    assert first["trace_digest"] == again["trace_digest"]
    assert first["trace_digest"] != run()["trace_digest"]


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("costs", "fragment"),
    [
        ("{cores: 0}", ":11: costs.cores: Input should be greater than or equal to 1"),
        ("{hop_ms: {kind: constant, value_ms: -1}}", ":11: costs.hop_ms.value_ms: Input should"),
        ("{fsync_ms: {kind: lognormal, median_ms: .inf, p99_ms: 2}}", "costs.fsync_ms.median_ms"),
        ("{apend_ms: {kind: constant, value_ms: 1}}", "unknown field 'apend_ms' (did you mean"),
        ("{api_call_ms: {kind: gamma}}", ":11: costs.api_call_ms.kind: unknown kind 'gamma'"),
    ],
)
def test_bad_costs_get_file_line_and_field(costs: str, fragment: str) -> None:
    with pytest.raises(ScenarioError) as error:
        load_scenario_text(SHORT + f"costs: {costs}\n", "s.yaml")
    assert any(fragment in str(p) for p in error.value.problems), str(error.value)
    assert str(error.value).startswith("s.yaml:11:")


def test_costs_file_is_read_beside_the_scenario(tmp_path: Path) -> None:
    (tmp_path / "calibration.yaml").write_text(
        "# measured here\ncosts:\n  fsync_ms: {kind: constant, value_ms: 40}\n  cores: 2\n"
    )
    path = tmp_path / "s.yaml"
    path.write_text(SHORT + "costs_file: calibration.yaml\n")
    scenario = load_scenario(path).scenario
    assert scenario.costs is not None and scenario.costs.cores == 2
    assert scenario.fsync_ms.expected_ms() == 40
    inline = run("costs: {fsync_ms: {kind: constant, value_ms: 40}, cores: 2}\n")
    assert run_scenario(scenario, SEED)["trace_digest"] == inline["trace_digest"]
    # What a sweep's workers get: the text with the file's costs in it.
    text = inline_costs(path.read_text(), scenario)
    assert "costs_file" not in text
    assert load_scenario_text(text).scenario.costs == scenario.costs


def test_costs_file_problems_name_that_file(tmp_path: Path) -> None:
    calibration = tmp_path / "calibration.yaml"
    calibration.write_text("costs:\n  cores: 2\n  hop_ms: {kind: constant, value_ms: nope}\n")
    path = tmp_path / "s.yaml"
    path.write_text(SHORT + "costs_file: calibration.yaml\n")
    with pytest.raises(ScenarioError) as error:
        load_scenario(path)
    assert f"{calibration}:3: costs.hop_ms.value_ms: Input should be a valid number" in str(
        error.value
    )
    calibration.write_text("cost: {}\n")
    with pytest.raises(ScenarioError) as error:
        load_scenario(path)
    assert f"{calibration}:1: cost: unknown field 'cost'" in str(error.value)
    path.write_text(SHORT + "costs_file: missing.yaml\n")
    with pytest.raises(ScenarioError) as error:
        load_scenario(path)
    assert f"{path}:11: costs_file: cannot read: [Errno 2]" in str(error.value)
    path.write_text(SHORT + "costs: {}\ncosts_file: calibration.yaml\n")
    with pytest.raises(ScenarioError) as error:
        load_scenario(path)
    assert f"{path}:12: costs_file: a scenario takes costs: or costs_file:, not both" in str(
        error.value
    )


def test_costs_fsync_beside_disk_fsync_warns() -> None:
    loaded = load_scenario_text(
        SHORT
        + "disk: {fsync_ms: {kind: constant, value_ms: 1}}\n"
        + "costs: {fsync_ms: {kind: constant, value_ms: 2}}\n",
        "s.yaml",
    )
    assert [str(w) for w in loaded.warnings] == [
        "s.yaml:11: disk.fsync_ms: warning: costs.fsync_ms replaces it: this one is not used"
    ]


# --------------------------------------------------------------------------- calibrate


CALIBRATE_TIMEOUT_S = 240.0


def calibrate(*args: str) -> subprocess.CompletedProcess[str]:
    """`goml chaos calibrate ARGS` as a user runs it (killed if it overruns)."""
    command = [sys.executable, "-m", "goml", "chaos", "calibrate", *args]
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=CALIBRATE_TIMEOUT_S
    )


def test_calibrate_measures_real_components_and_its_file_validates(tmp_path: Path) -> None:
    out = tmp_path / "calibration.yaml"
    done = calibrate(
        *("--out", str(out), "--data-dir", str(tmp_path), "--fsync-samples", "30"),
        *("--hop-samples", "30", "--dispatch-samples", "5"),
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    path = tmp_path / "s.yaml"
    path.write_text(SHORT + "costs_file: calibration.yaml\n")
    scenario = load_scenario(path).scenario  # the file validates, as a scenario reads it
    costs = scenario.costs
    assert costs is not None and costs.cores is not None and costs.cores >= 1
    measured = (
        costs.fsync_ms,
        costs.hop_ms,
        costs.append_ms,
        costs.message_ms,
        costs.api_call_ms,
        costs.api_hop_ms,
        costs.dispatch_ms,
        costs.isolated_dispatch_ms,
    )
    for distribution in measured:
        assert distribution is not None and 0 < distribution.expected_ms() < 10_000
    text = out.read_text()
    assert "30 samples" in text  # the raw figures ride along as comments
    # The core's own time, shifted to a real node process's CPU per input (the core
    # alone stays in the comments).
    assert "node core alone: append_ms" in text
    assert text.count("a real node process's CPU per input") == 3
    calibrated = run_scenario(scenario, SEED)
    assert calibrated["tasks_lost"] == 0 and calibrated["settled"] is True
    assert float(calibrated["cpu_busy_s"]) > 0
    # Every message pays a hop and every input its core time: never faster than free.
    assert p50(calibrated) >= p50(run())


def test_process_cpu_shifts_the_cores_times_to_the_real_mean() -> None:
    """The node core's spread, moved so that its mean is the real process's CPU per input;
    never below the core's own time."""
    core = Measured("append_ms", [0.05, 0.1, 0.15, 0.9], "node core")
    real = ProcessCpu(message_ms=1.0, append_ms=1.3, api_call_ms=0.01, load=0.5)
    shifted = real.add_to(core)
    assert shifted.name == "append_ms"
    assert statistics.fmean(shifted.samples_ms) == pytest.approx(1.3)
    assert shifted.samples_ms[3] - shifted.samples_ms[0] == pytest.approx(0.85)
    assert "1.300 ms on average" in shifted.how
    cheap = real.add_to(Measured("api_call_ms", [0.05, 0.1], "node core"))
    assert cheap.samples_ms == [0.05, 0.1]  # the real figure is below the core's: unchanged


# --------------------------------------------------------------------------- raft knobs


def test_raft_knobs_default_to_what_a_node_runs() -> None:
    scenario = load_scenario_text(SHORT).scenario
    simulated = Simulation(scenario, SEED).node_config("aws-1").replica.raft
    standard = raft_config("aws-1", simulated.voters, 300, 600, 50)
    assert simulated == standard  # every knob at goml's standard
    node = NodeFileConfig(
        node_id="aws-1",
        listen="127.0.0.1:1",
        data_dir=Path("unused"),
        peers={name: "127.0.0.1:1" for name in simulated.voters},
        insecure=True,
        secret_file=Path("unused"),
        tokens_file=Path("unused"),
        raft=RaftTiming(**scenario.raft.model_dump()),  # as the chaos runner writes it
    )
    assert core_config(node).replica.raft == standard


def test_raft_knobs_reach_the_simulated_and_the_real_core() -> None:
    knobs = (
        "raft: {election_timeout_ms_min: 150, election_timeout_ms_max: 300,"
        " heartbeat_interval_ms: 30, pre_vote: false, check_quorum: false,"
        " inflight_messages_max: 4, entries_per_message_max: 1,"
        " uncommitted_entries_max: 100, message_bytes_max: 65536}\n"
    )
    scenario = load_scenario_text(SHORT + knobs).scenario
    simulated = Simulation(scenario, SEED).node_config("gcp-1").replica.raft
    assert (simulated.pre_vote, simulated.check_quorum) == (False, False)
    assert (simulated.inflight_messages_max, simulated.entries_per_message_max) == (4, 1)
    assert (simulated.uncommitted_entries_max, simulated.message_bytes_max) == (100, 65536)
    assert simulated.election_timeout_ms_min == 150 and simulated.heartbeat_interval_ms == 30
    node = NodeFileConfig(
        node_id="gcp-1",
        listen="127.0.0.1:1",
        data_dir=Path("unused"),
        peers={name: "127.0.0.1:1" for name in simulated.voters},
        insecure=True,
        secret_file=Path("unused"),
        tokens_file=Path("unused"),
        raft=RaftTiming(**scenario.raft.model_dump()),
    )
    real = core_config(node).replica.raft
    assert real == simulated
    # And they change the run: one entry per APPEND means more messages for the same load.
    batched = run_scenario(load_scenario_text(SHORT).scenario, SEED)
    one_by_one = run_scenario(
        load_scenario_text(SHORT + "raft: {entries_per_message_max: 1}\n").scenario, SEED
    )
    assert one_by_one["tasks_lost"] == 0
    assert int(one_by_one["messages_sent"]) >= int(batched["messages_sent"])
    assert one_by_one["trace_digest"] != batched["trace_digest"]


def test_bad_raft_knobs_are_refused() -> None:
    with pytest.raises(ScenarioError) as error:
        load_scenario_text(SHORT + "raft: {inflight_messages_max: 0, pre_vote: maybe}\n", "s.yaml")
    text = str(error.value)
    assert (
        "s.yaml:11: raft.inflight_messages_max: Input should be greater than or equal to 1" in text
    )
    assert "s.yaml:11: raft.pre_vote: Input should be a valid boolean" in text


# --------------------------------------------------------------------------- first leader


def test_the_simulator_can_start_with_the_real_runs_first_leader() -> None:
    scenario = load_scenario_text(SHORT).scenario
    free = run_scenario(scenario, SEED)
    natural = free["timeline"]["leaders"][0][1]  # type: ignore[index]
    other = next(n.name for n in scenario.topology.control_nodes if n.name != natural)
    handed = run_scenario(scenario, SEED, first_leader=other)
    assert handed["timeline"]["leaders"][0][1] == other  # type: ignore[index]
    assert handed["tasks_lost"] == 0 and handed["settled"] is True
    assert handed["tasks_acknowledged"] == handed["tasks_submitted"] > 50


# --------------------------------------------------------------------------- report


def test_prediction_against_measurement_ratios_and_tolerance() -> None:
    real = {"failover_s": {"count": 2, "p50": 0.5}, "submit_ms_steady": {"p50": 40, "p99": 100}}
    close = {"failover_s": {"count": 2, "p50": 0.6}, "submit_ms_steady": {"p50": 45, "p99": 149}}
    far = {"failover_s": {"count": 1, "p50": 0.7}, "submit_ms_steady": {"p50": 20, "p99": 151}}
    assert [c.within for c in compare(real, close)] == [True, True, True, True]
    assert [c.within for c in compare(real, far)] == [False, False, False, False]
    assert compare(real, close)[2].ratio == pytest.approx(45 / 40)
    none = {"failover_s": {"count": 0}, "submit_ms_steady": {"p50": 40, "p99": 100}}
    assert [c.within for c in compare(none, none)] == [True, None, True, True]


def test_the_report_draws_the_prediction_over_the_measurement(tmp_path: Path) -> None:
    real = run_scenario(load_scenario_text(SHORT).scenario, SEED)
    predicted = run(
        "costs: {hop_ms: {kind: constant, value_ms: 5}}\n"
    )  # another run: what matters is that both are drawn
    page = write_report(real, tmp_path, comparison=predicted).read_text()
    assert "Prediction against measurement" in page
    assert 'stroke-dasharray="5 3"' in page  # the simulator's CDF over the real one
    assert "simulator (dashed)" in page
    assert "Simulator: leaders and terms over time" in page
    assert "Simulator: tasks by state over time" in page
    plain = write_report(real, tmp_path / "alone").read_text()
    assert "Prediction against measurement" not in plain and "dashed)" not in plain


def test_calibrate_measures_a_running_cluster_through_its_profile_and_metrics(
    tmp_path: Path,
) -> None:
    # A real three-node cluster stands in for a deployed one: calibrate reaches it only
    # through the client profile and the nodes' metrics endpoints, as it would reach
    # hosts elsewhere (the lab test does that over SSH-deployed hosts).
    layout = local.prepare(tmp_path / "cluster", 3, insecure=False)
    metrics = [
        f"http://{load_node_config(path).metrics_listen}"
        for _, path in sorted(layout.node_configs.items())
    ]
    profile_path = tmp_path / "profile.json"
    layout.profile.save(profile_path)
    out = tmp_path / "deployed.yaml"
    args = ["--out", str(out), "--profile", str(profile_path), "--hop-samples", "40"]
    for url in metrics:
        args += ["--metrics", url]
    with local.running_cluster(layout):
        local.wait_for_leader(layout.profile, CALIBRATE_TIMEOUT_S / 4)
        done = calibrate(*args)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    path = tmp_path / "s.yaml"
    path.write_text(SHORT + "costs_file: deployed.yaml\n")
    costs = load_scenario(path).scenario.costs
    assert costs is not None
    assert costs.cores is None  # a deployed cluster's hosts: their capacity says
    assert costs.dispatch_ms is None  # agents export no metrics: not measured here
    for distribution in (
        costs.fsync_ms,
        costs.hop_ms,
        costs.append_ms,
        costs.message_ms,
        costs.api_call_ms,
        costs.api_hop_ms,
    ):
        assert distribution is not None and 0 < distribution.expected_ms() < 10_000
    text = out.read_text()
    assert "fsync'd store writes" in text and "per APPEND beyond idle" in text
    assert all(url in text for url in metrics)  # every node's figure rides along


def test_calibrate_of_a_deployed_cluster_names_what_is_missing(tmp_path: Path) -> None:
    alone = calibrate("--metrics", "http://127.0.0.1:1")
    assert alone.returncode == 2 and "needs both --profile FILE and --metrics" in alone.stderr
    layout = local.prepare(tmp_path / "cluster", 3, insecure=False)
    profile_path = tmp_path / "profile.json"
    layout.profile.save(profile_path)
    one = calibrate("--profile", str(profile_path), "--metrics", "http://127.0.0.1:1")
    assert one.returncode == 2 and "at least two" in one.stderr, one.stderr
    files = ["--metrics", "file:///etc/passwd", "--metrics", "http://127.0.0.1:1"]
    wrong = calibrate("--profile", str(profile_path), *files)
    assert wrong.returncode == 2 and "give it as http://HOST:PORT" in wrong.stderr, wrong.stderr
    (closed,) = local.free_ports(1)
    args = ["--profile", str(profile_path)]
    args += ["--metrics", f"http://127.0.0.1:{closed}"] * 2
    with local.running_cluster(layout):
        local.wait_for_leader(layout.profile, CALIBRATE_TIMEOUT_S / 4)
        unreachable = calibrate(*args)
    assert unreachable.returncode == 2, unreachable.stderr
    assert f"metrics endpoint http://127.0.0.1:{closed}" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


def test_histogram_quantiles_interpolate_within_buckets() -> None:
    # 100 writes: 50 under 1 ms, 40 in (1, 2] ms, 9 in (2, 5] ms, 1 beyond the last bound.
    buckets = ((0.001, 50.0), (0.002, 90.0), (0.005, 99.0), (math.inf, 100.0))
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.001)
    assert bucket_quantile(0.7, buckets) == pytest.approx(0.0015)
    assert bucket_quantile(0.99, buckets) == pytest.approx(0.005)
    assert bucket_quantile(0.995, buckets) == pytest.approx(0.005)  # +Inf: the last bound
    assert bucket_quantile(0.25, buckets) == pytest.approx(0.0005)  # from zero
