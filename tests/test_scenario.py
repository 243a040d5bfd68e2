"""Scenario schema and loader: shipped files load, bad files are reported at FILE:LINE."""

from __future__ import annotations

import json
import random
import textwrap
from pathlib import Path
from typing import get_args

import pytest
from typer.testing import CliRunner

from goml.cli import app
from goml.cluster import commands
from goml.scenario import schema
from goml.scenario.loader import (
    DEPTH_MAX,
    FILE_BYTES_MAX,
    LoadedScenario,
    ScenarioError,
    _lookup_metric,
    evaluate_expectations,
    load_scenario,
    load_scenario_text,
)
from goml.scenario.schema import (
    CrashFault,
    Expectation,
    LogNormalDist,
    NormalLink,
    PartitionFault,
    Scenario,
    json_schema,
)
from goml.sim.simulation import run_scenario

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
SHIPPED = sorted(SCENARIOS.glob("*.yaml"))

MINIMAL = """\
name: t
duration_s: 30
"""


def write(tmp_path: Path, text: str, name: str = "s.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ScenarioError) as info:
        load_scenario(path)
    return str(info.value).splitlines()


# --------------------------------------------------------------------------- shipped files


def test_the_expected_scenarios_are_shipped() -> None:
    names = {p.stem for p in SHIPPED}
    assert {
        "steady",
        "leader-crash",
        "cloud-partition",
        "latency-spike",
        "rolling-restart",
        "agent-crash",
    } <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_scenario_loads_cleanly(path: Path) -> None:
    loaded = load_scenario(path)
    assert loaded.scenario.name == path.stem
    assert loaded.warnings == []
    assert loaded.scenario.expectations, "every scenario states what it expects"


def test_steady_is_the_reference_setup_at_20_per_second() -> None:
    s = load_scenario(SCENARIOS / "steady.yaml").scenario
    assert s.duration_s == 60
    assert s.workload is not None and s.workload.rate_per_s == 20
    assert len(s.topology.nodes) == 5


# --------------------------------------------------------------------------- defaults


def test_default_topology_is_the_reference_setup() -> None:
    s = load_scenario_text(MINIMAL).scenario
    topo = s.topology
    assert topo.node_names == ["aws-1", "aws-2", "aws-3", "gcp-1", "gcp-2"]
    assert topo.cloud_regions == {"aws": ["us-east-1"], "gcp": ["us-central1"]}
    assert all(n.roles == ["control", "agent"] for n in topo.nodes)
    assert s.seed == 1
    assert (s.raft.election_timeout_ms_min, s.raft.election_timeout_ms_max) == (300, 600)
    assert s.raft.heartbeat_interval_ms == 50


def test_link_classes_and_pair_overrides() -> None:
    s = load_scenario_text(
        MINIMAL
        + """\
network:
  pairs:
    - {between: [aws-1, gcp-2], link: {kind: constant, value_ms: 40}}
"""
    ).scenario
    assert s.link("aws-1", "aws-2") == s.network.same_region
    assert s.link("aws-1", "gcp-1") == s.network.cross_cloud
    assert s.link("gcp-2", "aws-1").expected_ms() == 40
    # Defaults: sub-millisecond in a region, ~30-40 ms RTT across clouds.
    assert s.network.same_region.expected_ms() < 1
    assert 15 <= s.network.cross_cloud.expected_ms() <= 20


def test_distributions_sample_deterministically_and_never_negative() -> None:
    link = NormalLink(mean_ms=1.0, stddev_ms=5.0, jitter_ms=2.0)
    a = [link.delay_ms(random.Random(7)) for _ in range(3)]
    b = [link.delay_ms(random.Random(7)) for _ in range(3)]
    assert a == b
    rng = random.Random(1)
    assert min(link.delay_ms(rng) for _ in range(1000)) >= 0
    fsync = LogNormalDist(median_ms=0.33, p99_ms=1.2)
    samples = sorted(fsync.sample_ms(rng) for _ in range(20000))
    assert samples[len(samples) // 2] == pytest.approx(0.33, rel=0.05)
    assert samples[int(len(samples) * 0.99)] == pytest.approx(1.2, rel=0.1)


def test_faults_parse_into_their_kinds_and_timeline_sorts() -> None:
    s = load_scenario_text(
        MINIMAL
        + """\
faults:
  - {at_s: 9, kind: crash, target: leader}
  - {at_s: 3, kind: partition, direction: one_way, from: cloud:aws, to: [gcp-1, gcp-2]}
"""
    ).scenario
    crash, part = s.faults
    assert isinstance(crash, CrashFault)
    assert isinstance(part, PartitionFault)
    assert part.from_ == ["cloud:aws"]  # a single member may be written bare
    assert s.topology.resolve("cloud:aws") == ["aws-1", "aws-2", "aws-3"]
    assert [f.at_s for f in s.timeline()] == [3, 9]


def test_json_schema_covers_the_file() -> None:
    schema = json_schema()
    assert set(schema["properties"]) >= {"name", "topology", "faults", "expectations"}
    assert json.loads(json.dumps(schema)) == schema
    assert "from" in schema["$defs"]["PartitionFault"]["properties"]


# --------------------------------------------------------------------------- errors


def test_unknown_field_names_line_and_path(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        name: t
        duration_s: 30
        raft:
          election_timeout_ms_min: 300
          hearbeat_interval_ms: 50
        """,
    )
    (line,) = problems(path)
    assert line.startswith(f"{path}:5: raft.hearbeat_interval_ms: unknown field")
    assert "did you mean 'heartbeat_interval_ms'" in line


def test_wrong_type(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        name: t
        duration_s: thirty
        """,
    )
    (line,) = problems(path)
    assert line.startswith(f"{path}:2: duration_s: ")
    assert "number" in line


def test_bad_enum_in_a_fault(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        name: t
        duration_s: 30
        faults:
          - at_s: 5
            kind: explode
        """,
    )
    (line,) = problems(path)
    assert line.startswith(f"{path}:5: faults.0.kind: unknown kind 'explode'")


def test_bad_enum_in_a_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        name: t
        duration_s: 30
        faults:
          - {at_s: 5, kind: partition, direction: sideways, groups: [[aws-1]]}
        """,
    )
    (line,) = problems(path)
    assert line.startswith(f"{path}:4: faults.0.direction: ")


def test_unknown_node_in_a_fault(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        name: t
        duration_s: 30
        faults:
          - {at_s: 1, kind: crash, target: leader}
          - at_s: 5
            kind: crash
            target: aws-9
        """,
    )
    (line,) = problems(path)
    assert line.startswith(f"{path}:7: faults.1.target: unknown node 'aws-9'")


def test_unknown_cloud_in_a_partition_group(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        name: t
        duration_s: 30
        faults:
          - at_s: 5
            kind: partition
            groups:
              - [cloud:aws]
              - [cloud:azure]
        """,
    )
    (line,) = problems(path)
    assert line.startswith(f"{path}:8: faults.0.groups.1.0: unknown cloud 'azure'")


def test_heartbeat_not_below_election_timeout(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        name: t
        duration_s: 30
        raft:
          election_timeout_ms_min: 100
          election_timeout_ms_max: 200
          heartbeat_interval_ms: 100
        """,
    )
    (line,) = problems(path)
    assert line.startswith(f"{path}:6: raft.heartbeat_interval_ms: ")
    assert "less than election_timeout_ms_min" in line


def test_missing_field_points_at_its_parent(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        name: t
        duration_s: 30
        faults:
          - kind: pause
            target: aws-1
            duration_s: 2
        """,
    )
    (line,) = problems(path)
    assert line == f"{path}:4: faults.0.at_s: Field required"


def test_malformed_yaml_gives_line_and_column(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        name: t
        duration_s: 30
        raft:
          heartbeat_interval_ms: [50
        """,
    )
    (line,) = problems(path)
    assert line.startswith(f"{path}:5:1: invalid YAML: ")


def test_empty_file(tmp_path: Path) -> None:
    path = write(tmp_path, "# nothing here\n")
    assert problems(path) == [f"{path}:1: empty file: expected a mapping of scenario fields"]


def test_top_level_list(tmp_path: Path) -> None:
    path = write(tmp_path, "- name: t\n")
    (line,) = problems(path)
    assert line.startswith(f"{path}:1: the top level must be a mapping")


def test_missing_file(tmp_path: Path) -> None:
    (line,) = problems(tmp_path / "nope.yaml")
    assert "cannot read" in line


def test_duplicate_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        name: t
        duration_s: 30
        duration_s: 40
        """,
    )
    assert problems(path) == [f"{path}:3: duration_s: duplicate key (first at line 2)"]


def test_every_error_is_reported(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        name: t
        duration_s: 30
        network:
          cross_cloud: {kind: normal, mean_ms: 17, stdev_ms: 2}
        workload:
          clients: [{name: c, node: aws-1}]
          rate_per_s: lots
          mix: {matmul: {args: {n: 8}}}
        """,
    )
    lines = problems(path)
    assert len(lines) == 3
    assert lines[0].startswith(f"{path}:4: network.cross_cloud.stddev_ms: Field required")
    assert lines[1].startswith(f"{path}:4: network.cross_cloud.stdev_ms: unknown field")
    assert lines[2].startswith(f"{path}:7: workload.rate_per_s: ")


def test_even_control_count_warns(tmp_path: Path) -> None:
    nodes = """\
name: t
duration_s: 30
topology:
  nodes:
    - {name: a, cloud: aws, region: us-east-1}
    - {name: b, cloud: aws, region: us-east-1}
    - {name: c, cloud: gcp, region: us-central1}
"""
    odd = load_scenario_text(nodes)
    assert odd.warnings == []
    even = load_scenario_text(nodes + "    - {name: d, cloud: gcp, region: us-central1}\n")
    (warning,) = even.warnings
    assert str(warning).startswith("<string>:4: topology.nodes: warning: 4 control nodes")


def test_no_control_node_is_an_error() -> None:
    with pytest.raises(ScenarioError, match=r"topology.nodes: at least one node"):
        load_scenario_text(
            MINIMAL + "topology:\n  nodes:\n    - {name: a, cloud: x, region: y, roles: [agent]}\n"
        )


def test_programmatic_construction_validates_references() -> None:
    with pytest.raises(ValueError, match="unknown node 'nope'"):
        Scenario(name="t", duration_s=1, faults=[CrashFault(at_s=1, target="nope")])


# --------------------------------------------------------------------------- expectations


def test_expectation_shorthand_and_mapping_agree() -> None:
    s = load_scenario_text(
        MINIMAL
        + """\
expectations:
  - failover_s.p99 < 5
  - {metric: failover_s.p99, op: "<", value: 5}
"""
    ).scenario
    assert (
        s.expectations[0]
        == s.expectations[1]
        == Expectation(metric="failover_s.p99", op="<", value=5)
    )


def test_evaluate_expectations() -> None:
    expectations = [
        Expectation(metric="failover_s.p99", op="<", value=5),
        Expectation(metric="tasks_lost", op="==", value=0),
        Expectation(metric="submit_ms.p99", op="<", value=500),
        Expectation(metric="duplicate_results", op="==", value=0),
        Expectation(metric="failover_s.p50", op="<", value=1),
    ]
    summary = {
        "failover_s": {"count": 1, "p50": None, "p99": 0.8},
        "submit_ms": {"p50": 4, "p99": 700.0},
        "tasks_lost": 0,
    }
    verdicts = evaluate_expectations(expectations, summary)
    assert [v.passed for v in verdicts] == [True, True, False, False, False]
    assert verdicts[0].value == 0.8 and verdicts[0].bound == 5
    assert str(verdicts[2]) == "FAIL submit_ms.p99 < 500 (got 700)"
    assert verdicts[3].value is None and "missing" in str(verdicts[3])
    assert "null" in verdicts[4].note


def test_unknown_metric_is_an_error_with_a_suggestion() -> None:
    with pytest.raises(ScenarioError) as info:
        load_scenario_text(MINIMAL + "expectations: ['failover.p99 < 5', 'tasks_lots == 0']\n")
    lines = str(info.value).splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("<string>:3: expectations.0.metric: unknown metric 'failover.p99'")
    assert "did you mean 'failover_s.p99'?" in lines[0]
    assert lines[1].startswith("<string>:3: expectations.1.metric: unknown metric 'tasks_lots'")
    assert "did you mean 'tasks_lost'?" in lines[1]


@pytest.mark.parametrize(
    ("metric", "fragment"),
    [
        ("settled", "'settled' cannot be compared with a number: true or false"),
        ("trace_digest", "'trace_digest' cannot be compared with a number: a hex digest"),
        ("scenario", "'scenario' cannot be compared with a number"),
        ("failover_s", "a distribution: compare failover_s.count, .p50, .p99 or .max"),
        ("submit_ms.p95", "'submit_ms.p95' is not in the summary"),
        ("messages_dropped", "only the simulator reports it"),
        ("commands_per_task", "one figure per command type"),
        ("commands_per_task.SubmitTask", "did you mean 'commands_per_task.SubmitTasks'?"),
        ("submit_ms_steady_by_client.c.p99", "keyed by client names, which metric names"),
    ],
)
def test_non_numeric_metric_is_an_error(metric: str, fragment: str) -> None:
    with pytest.raises(ScenarioError) as info:
        load_scenario_text(MINIMAL + "expectations:\n" + f"  - {metric} == 1\n")
    (line,) = str(info.value).splitlines()
    assert line.startswith("<string>:4: expectations.0.metric: "), line
    assert fragment in line, line


def test_every_command_type_has_a_per_task_metric() -> None:
    names = sorted(t.__name__ for t in get_args(commands.Command))
    assert len(names) >= 9  # the nine of the issue, and the batches added since
    text = "expectations:\n" + "".join(
        f"  - commands_per_task.{name} < 10\n" for name in [*names, "total"]
    )
    loaded = load_scenario_text(MINIMAL + text)
    assert [e.metric for e in loaded.scenario.expectations] == [
        f"commands_per_task.{name}" for name in [*names, "total"]
    ]
    assert loaded.warnings == []


def test_expectation_metrics_match_what_a_run_reports() -> None:
    """Every metric the schema accepts is a number in a real summary, and every field a
    summary holds is either accepted or refused with a reason: a summary field added
    without telling the schema fails here, not in a user's run."""
    scenario = load_scenario_text(
        """\
name: metrics
duration_s: 3
faults: [{at_s: 1, kind: crash, target: leader, restart_after_s: 1}]
workload:
  clients: [{name: c, node: aws-1}]
  rate_per_s: 5
  mix: {matmul: {args: {n: 8}}}
"""
    ).scenario
    summary = run_scenario(scenario, seed=1)
    for metric in sorted(schema.NUMERIC_METRICS):
        value, note = _lookup_metric(summary, metric)
        assert value is not None, (metric, note)
    known = schema.NUMERIC_METRICS | set(schema.NOT_COMPARABLE)
    for field, content in summary.items():
        # Keyed by client names, refused as a whole (its reason in NOT_COMPARABLE).
        whole = ("timeline", "submit_ms_steady_by_client")
        if isinstance(content, dict) and field not in whole:
            for key in content:
                dotted = f"{field}.{key}"
                assert dotted in known, f"summary field {dotted} is unknown to the schema"
        else:
            assert field in known, f"summary field {field} is unknown to the schema"
    # The refused ones are not numbers, but for the few whose reason says otherwise.
    numbers_refused = {"seed"} | {
        k for k, why in schema.NOT_COMPARABLE.items() if "only the simulator" in why
    }
    for field in sorted(set(schema.NOT_COMPARABLE) - numbers_refused):
        refused, _ = _lookup_metric(summary, field)
        assert refused is None, (field, refused)


# --------------------------------------------------------------------------- limits


@pytest.mark.parametrize(
    ("body", "line", "path", "fragment"),
    [
        ("duration_s: .inf\n", 2, "duration_s", "finite number"),
        ("duration_s: 1e400\n", 2, "duration_s", "finite number"),
        ("duration_s: .nan\n", 2, "duration_s", "finite number"),
        ("duration_s: 86401\n", 2, "duration_s", "less than or equal to 86400"),
        ("duration_s: 10\nseed: 99999999999999999999\n", 3, "seed", "less than or equal"),
        (
            "duration_s: 10\nexpectations: ['tasks_lost < nan']\n",
            3,
            "expectations.0.value",
            "finite number",
        ),
        (
            "duration_s: 10\nexpectations: ['tasks_lost < 1e13']\n",
            3,
            "expectations.0.value",
            "less than or equal",
        ),
        (
            "duration_s: 10\nfaults: [{at_s: 1, kind: pause, target: aws-1, duration_s: .inf}]\n",
            3,
            "faults.0.duration_s",
            "finite number",
        ),
        (
            "duration_s: 10\nnetwork: {cross_cloud: {kind: constant, value_ms: 600001}}\n",
            3,
            "network.cross_cloud.value_ms",
            "less than or equal to 600000",
        ),
        (
            "duration_s: 10\nnetwork: {same_cloud: {kind: normal, mean_ms: 1, stddev_ms: .inf}}\n",
            3,
            "network.same_cloud.stddev_ms",
            "finite number",
        ),
        (
            "duration_s: 10\ndisk: {fsync_ms: {kind: lognormal, median_ms: 1e-300, p99_ms: 1}}\n",
            3,
            "disk.fsync_ms.median_ms",
            "greater than or equal to 0.001",
        ),
        (
            "duration_s: 10\nraft: {heartbeat_interval_ms: 10, election_timeout_ms_max: 10000000}\n",
            3,
            "raft.election_timeout_ms_max",
            "less than or equal to 600000",
        ),
    ],
)
def test_numbers_must_be_finite_and_bounded(
    tmp_path: Path, body: str, line: int, path: str, fragment: str
) -> None:
    scenario = write(tmp_path, "name: t\n" + body)
    found = problems(scenario)
    assert len(found) == 1, found
    assert found[0].startswith(f"{scenario}:{line}: {path}: "), found
    assert fragment in found[0], found


WORKLOAD = """\
name: t
duration_s: {duration_s}
workload:
  clients: [{{name: c, node: aws-1}}]
  {arrivals}
  mix: {{matmul: {{args: {{n: 8}}}}}}
"""


@pytest.mark.parametrize(
    ("duration_s", "arrivals", "path", "fragment"),
    [
        (10, "rate_per_s: .inf", "workload.rate_per_s", "finite number"),
        (10, "rate_per_s: 100001", "workload.rate_per_s", "less than or equal to 100000"),
        # Each within its bound, together 8.6e9 tasks: a simulator that does not end.
        (86400, "rate_per_s: 100000", "workload.rate_per_s", "more than 1000000"),
        (10, "schedule: [{at_s: 1, count: 1000001}]", "workload.schedule.0.count", "1000000"),
        (
            10,
            "schedule: [{at_s: 1, count: 600000}, {at_s: 2, count: 600000}]",
            "workload.schedule",
            "the schedule submits 1200000 tasks, more than 1000000",
        ),
        (10, "rate_per_s: 1\n  max_attempts: 3000000000", "workload.max_attempts", "1000"),
    ],
)
def test_offered_load_is_bounded(
    tmp_path: Path, duration_s: int, arrivals: str, path: str, fragment: str
) -> None:
    scenario = write(tmp_path, WORKLOAD.format(duration_s=duration_s, arrivals=arrivals))
    (line,) = problems(scenario)
    assert line.startswith(f"{scenario}:"), line
    assert f": {path}: " in line, line
    assert fragment in line, line


def test_nan_inside_task_args_is_refused() -> None:
    with pytest.raises(ScenarioError, match=r"workload.mix.fail.args.message.*finite number"):
        load_scenario_text(
            WORKLOAD.format(duration_s=10, arrivals="rate_per_s: 1").replace(
                "matmul: {args: {n: 8}}", "fail: {args: {message: .nan}}"
            )
        )


def test_size_and_depth_are_capped_before_parsing(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    big.write_bytes(b"name: t\nduration_s: 1\ndescription: '" + b"x" * FILE_BYTES_MAX + b"'\n")
    (line,) = problems(big)
    assert line == (
        f"{big}: larger than {FILE_BYTES_MAX} bytes, the limit for a scenario file: not parsed"
    )
    with pytest.raises(ScenarioError, match="larger than 1048576 bytes"):
        load_scenario_text("x" * (FILE_BYTES_MAX + 1))
    deep = write(tmp_path, "name: t\nduration_s: 1\nx-deep: " + "[" * 500 + "]" * 500 + "\n")
    (line,) = problems(deep)
    assert (
        line
        == f"{deep}:3: nested more than {DEPTH_MAX} levels deep (the limit for a scenario file)"
    )
    # Exactly at the limit is fine (the top-level mapping is the first level).
    at_limit = "[" * (DEPTH_MAX - 1) + "]" * (DEPTH_MAX - 1)
    assert load_scenario_text(f"name: t\nduration_s: 1\nx-ok: {at_limit}\n").warnings == []


# --------------------------------------------------------------------------- CLI


def test_cli_validate_ok_and_errors(tmp_path: Path) -> None:
    bad = write(tmp_path, "name: t\nduration_s: 30\nbogus: 1\n", "bad.yaml")
    runner = CliRunner()

    ok = runner.invoke(app, ["scenario", "validate", str(SCENARIOS / "steady.yaml")])
    assert ok.exit_code == 0, ok.output
    assert f"{SCENARIOS / 'steady.yaml'}: ok" in ok.output

    mixed = runner.invoke(app, ["scenario", "validate", str(SCENARIOS / "steady.yaml"), str(bad)])
    assert mixed.exit_code == 2  # bad input, as for every other command of the CLI
    assert f"{bad}:3: bogus: unknown field 'bogus'" in mixed.output
    assert "Traceback" not in mixed.output


def test_cli_prints_warnings(tmp_path: Path) -> None:
    path = write(tmp_path, "name: t\nduration_s: 30\nfaults: [{at_s: 40, kind: heal}]\n")
    result = CliRunner().invoke(app, ["scenario", "validate", str(path)])
    assert result.exit_code == 0
    assert f"{path}:3: faults.0.at_s: warning: at_s 40 is not before duration_s 30" in result.output


def test_cli_schema() -> None:
    result = CliRunner().invoke(app, ["scenario", "schema"])
    assert result.exit_code == 0
    assert json.loads(result.output)["title"] == "Scenario"


def test_loaded_scenario_keeps_its_source() -> None:
    loaded = load_scenario(SCENARIOS / "steady.yaml")
    assert isinstance(loaded, LoadedScenario)
    assert loaded.source == SCENARIOS / "steady.yaml"


def test_x_keys_hold_shared_anchors() -> None:
    s = load_scenario_text(
        """\
x-link: &slow {kind: constant, value_ms: 80}
name: t
duration_s: 30
network: {cross_cloud: *slow, same_cloud: *slow}
"""
    ).scenario
    assert s.network.cross_cloud.expected_ms() == 80
