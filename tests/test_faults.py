"""Faults of any topology (issue 11 items 6, 15, 16): latency per cloud or region pair,
repeated faults, disk faults and clock faults. The schema and its errors (with file and
line), the timeline's expansion of repeats, what the scenario player asks of a backend
(a recording fake backend: the player is sans-IO), and what the simulator does with it
(real simulations, deterministic, so sim-time figures can be asserted exactly)."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pytest

from goml.api.types import ErrorCode, GetRequest, TaskRequest
from goml.scenario.faults import Pair, describe_fault
from goml.scenario.loader import ScenarioError, load_scenario_text
from goml.scenario.player import ScenarioPlayer, SubmitDone
from goml.scenario.schema import (
    AnyLink,
    ClockFault,
    ConstantLink,
    DiskFault,
    PartitionFault,
    Scenario,
)
from goml.sim.rpc import ApiCall, ApiReply, Endpoint
from goml.sim.simulation import WALL_EPOCH_MS, Simulation, run_scenario

THREE_CLOUDS = """\
name: t
duration_s: 30
topology:
  nodes:
    - {name: a1, cloud: aws, region: us-east-1, roles: [control]}
    - {name: a2, cloud: aws, region: us-west-2, roles: [control]}
    - {name: g1, cloud: gcp, region: us-central1, roles: [control]}
    - {name: z1, cloud: azure, region: eastus, roles: [control]}
    - {name: z2, cloud: azure, region: eastus, roles: [control]}
    - {name: w1, cloud: gcp, region: us-central1, roles: [agent]}
"""


def load(text: str) -> Scenario:
    return load_scenario_text(text, "f.yaml").scenario


def problems(text: str) -> list[str]:
    with pytest.raises(ScenarioError) as caught:
        load_scenario_text(text, "f.yaml")
    return [str(p) for p in caught.value.problems]


def const(value_ms: float) -> str:
    return f"{{kind: constant, value_ms: {value_ms}}}"


# --------------------------------------------------------------- item 15: pairs


def test_latency_per_cloud_pair_region_pair_and_node_pair_most_specific_first() -> None:
    s = load(
        THREE_CLOUDS
        + f"""\
network:
  same_region: {const(1)}
  same_cloud: {const(2)}
  cross_cloud: {const(3)}
  cloud_pairs:
    aws-gcp: {const(10)}
    azure-gcp: {const(11)}
    aws-aws: {const(12)}
  region_pairs:
    us-east-1-us-central1: {const(20)}
    eastus-eastus: {const(21)}
  pairs:
    - {{between: [a1, g1], link: {const(30)}}}
"""
    )

    def ms(a: str, b: str) -> float:
        link = s.link(a, b)
        assert isinstance(link, ConstantLink)
        assert s.link(b, a) == link, "a pair holds both ways"
        return link.value_ms

    assert ms("a1", "g1") == 30  # node pair
    assert ms("a1", "w1") == 20  # region pair us-east-1 / us-central1
    assert ms("a2", "g1") == 10  # cloud pair aws-gcp (us-west-2 has no region pair)
    assert ms("g1", "z1") == 11  # cloud pair written the other way round
    assert ms("a1", "a2") == 12  # two regions of aws
    assert ms("z1", "z2") == 21  # two nodes of region eastus
    assert ms("a1", "z1") == 3  # no pair: the class
    assert ms("g1", "w1") == 1  # same region, no pair


def test_cloud_pairs_reach_the_simulated_network() -> None:
    s = load(THREE_CLOUDS + f"network:\n  cloud_pairs:\n    aws-azure: {const(42)}\n")
    sim = Simulation(s, 1)
    link = sim.network.link("a1", "z1")
    assert isinstance(link, ConstantLink) and link.value_ms == 42
    assert sim.network.link("a1", "g1") == s.network.cross_cloud


@pytest.mark.parametrize(
    ("network", "fragment"),
    [
        (
            f"  cloud_pairs:\n    aws-gpc: {const(1)}\n",
            "f.yaml:13: network.cloud_pairs.aws-gpc: 'aws-gpc' is not NAME-NAME of two "
            "declared names (did you mean 'aws-gcp'?)",
        ),
        (
            f"  region_pairs:\n    us-east-1-nowhere: {const(1)}\n",
            "f.yaml:13: network.region_pairs.us-east-1-nowhere: 'us-east-1-nowhere' is not "
            "NAME-NAME",
        ),
        (
            f"  cloud_pairs:\n    aws-gcp: {const(1)}\n    gcp-aws: {const(2)}\n",
            "f.yaml:14: network.cloud_pairs.gcp-aws: the same pair as 'aws-gcp'",
        ),
        (
            "  cloud_pairs:\n    aws-gcp: {kind: constant, value_ms: .inf}\n",
            "f.yaml:13: network.cloud_pairs.aws-gcp.value_ms: Input should be a finite number",
        ),
    ],
)
def test_bad_cloud_or_region_pairs_name_the_line(network: str, fragment: str) -> None:
    found = problems(THREE_CLOUDS + "network:\n" + network)
    assert any(fragment in p for p in found), found


def test_a_pair_key_that_splits_two_ways_is_ambiguous() -> None:
    text = """\
name: t
duration_s: 10
topology:
  nodes:
    - {name: n1, cloud: a, region: r1}
    - {name: n2, cloud: a-b, region: r2}
    - {name: n3, cloud: b-c, region: r3}
    - {name: n4, cloud: c, region: r4}
network:
  cloud_pairs:
    a-b-c: {kind: constant, value_ms: 1}
"""
    found = problems(text)
    assert any(
        "f.yaml:11: network.cloud_pairs.a-b-c: 'a-b-c' is ambiguous: it reads as 'a' and "
        "'b-c' or 'a-b' and 'c'" in p
        for p in found
    ), found


# ------------------------------------------------------------ item 16: repeats


def test_every_with_count_expands_into_copies_at_their_own_times() -> None:
    s = load(
        THREE_CLOUDS
        + """\
faults:
  - {at_s: 2, kind: partition, groups: [[g1]], heal_after_s: 1, every_s: 3, count: 4}
  - {at_s: 5, kind: crash, target: a2, restart_after_s: 1}
"""
    )
    timeline = s.timeline()
    assert [(f.kind, f.at_s) for f in timeline] == [
        ("partition", 2.0),
        ("partition", 5.0),  # ties keep file order: the partition is written first
        ("crash", 5.0),
        ("partition", 8.0),
        ("partition", 11.0),
    ]
    for firing in timeline:
        assert (firing.every_s, firing.count, firing.until_s) == (None, None, None)
    first = timeline[0]
    assert isinstance(first, PartitionFault) and first.heal_after_s == 1
    # The trace describes a firing as a one-off fault (and the original once).
    assert (
        describe_fault(first)
        == 'partition {"direction":"both","groups":[["g1"]],"heal_after_s":1.0}'
    )


@pytest.mark.parametrize(
    ("repeat", "times"),
    [
        ("every_s: 0.1, until_s: 0.3", [0.0, 0.1, 0.2, 0.3]),  # until_s is included
        ("every_s: 0.25, until_s: 0.9", [0.0, 0.25, 0.5, 0.75]),
        ("every_s: 5, until_s: 0", [0.0]),
        ("every_s: 5, count: 1", [0.0]),
    ],
)
def test_every_with_until_fires_up_to_and_including_until(repeat: str, times: list[float]) -> None:
    s = load(
        THREE_CLOUDS
        + f"faults: [{{at_s: 0, kind: pause, target: a1, duration_s: 0.05, {repeat}}}]\n"
    )
    assert [round(f.at_s, 9) for f in s.timeline()] == times


def test_a_flapping_link_in_one_entry_toggles_the_links_in_the_player() -> None:
    s = load(
        THREE_CLOUDS
        + "faults: [{at_s: 1, kind: partition, groups: [[z1]], heal_after_s: 1, every_s: 4, "
        "count: 3}]\n"
    )
    backend = FakeBackend()
    player = ScenarioPlayer(s, 1, backend)
    player.start()
    cut: list[tuple[float, bool]] = []
    for t in (0.5, 1.5, 2.5, 5.5, 6.5, 9.5, 10.5, 13.5):
        backend.run_until(t)
        cut.append((t, ("a1", "z1") in backend.blocked))
    assert cut == [
        (0.5, False), (1.5, True), (2.5, False), (5.5, True),
        (6.5, False), (9.5, True), (10.5, False), (13.5, False),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("fault", "fragment"),
    [
        (
            "{at_s: 1, kind: heal, every_s: 2}",
            "f.yaml:12: faults.0.every_s: every_s needs exactly one of count (how many "
            "firings) or until_s",
        ),
        (
            "{at_s: 1, kind: heal, every_s: 2, count: 3, until_s: 9}",
            "faults.0.every_s: every_s needs exactly one of count",
        ),
        ("{at_s: 1, kind: heal, count: 3}", "faults.0.count: count repeats a fault: give every_s too"),
        (
            "{at_s: 5, kind: heal, every_s: 1, until_s: 2}",
            "faults.0.until_s: until_s (2) is before at_s (5)",
        ),
        (
            "{at_s: 0, kind: heal, every_s: 0.001, until_s: 86400}",
            "faults.0.every_s: every_s 0.001 until_s 86400 fires 86400001 times, more than 10000",
        ),
        ("{at_s: 0, kind: heal, every_s: 1, count: 10001}", "faults.0.count: Input should be less than or equal to 10000"),
        ("{at_s: 0, kind: heal, every_s: .inf, count: 2}", "faults.0.every_s: Input should be a finite number"),
        ("{at_s: 0, kind: heal, every_s: 0, count: 2}", "faults.0.every_s: Input should be greater than 0"),
        ("{at_s: 0, kind: heal, every_s: 1, count: 2.5}", "faults.0.count: Input should be a valid integer"),
    ],
)  # fmt: skip
def test_bad_repeats_name_the_line(fault: str, fragment: str) -> None:
    found = problems(THREE_CLOUDS + f"faults:\n  - {fault}\n")
    assert any(fragment in p for p in found), found


def test_firings_of_the_whole_timeline_are_bounded() -> None:
    fault = "  - {at_s: 0, kind: heal, every_s: 1, count: 6000}\n"
    found = problems(THREE_CLOUDS + "faults:\n" + fault + fault)
    assert any("f.yaml:11: faults: the faults fire 12000 times in all, more than 10000" in p for p in found), found  # fmt: skip


def test_repeats_warn_when_they_overlap_or_outlast_the_run() -> None:
    loaded = load_scenario_text(
        THREE_CLOUDS + "faults: [{at_s: 20, kind: pause, target: a1, duration_s: 6, every_s: 5, count: 3}]\n",
        "f.yaml",
    )  # fmt: skip
    warnings = [str(w) for w in loaded.warnings]
    assert any("1 of its 3 firings are not before duration_s 30: they never fire" in w for w in warnings), warnings  # fmt: skip
    assert any("each firing lasts 6 s, not less than every_s 5: firings overlap" in w for w in warnings), warnings  # fmt: skip


# ------------------------------------------------------- disk and clock: schema


@pytest.mark.parametrize(
    ("fault", "fragment"),
    [
        ("{at_s: 1, kind: disk, target: a1}", "faults.0: a disk fault takes exactly one of fsync_stall_ms, full: true or wipe: true"),
        ("{at_s: 1, kind: disk, target: a1, full: true, wipe: true}", "faults.0: a disk fault takes exactly one of fsync_stall_ms, full: true or wipe: true (got full, wipe)"),
        ("{at_s: 1, kind: disk, target: a1, full: true}", "faults.0.full: full needs duration_s"),
        ("{at_s: 1, kind: disk, target: a1, fsync_stall_ms: 100}", "faults.0.fsync_stall_ms: fsync_stall_ms needs duration_s"),
        ("{at_s: 1, kind: disk, target: a1, wipe: true, duration_s: 3}", "faults.0.duration_s: wipe takes down_s"),
        ("{at_s: 1, kind: disk, target: a1, full: true, duration_s: 3, down_s: 1}", "faults.0.down_s: down_s is only for wipe: true"),
        ("{at_s: 1, kind: disk, target: a1, fsync_stall_ms: .nan, duration_s: 1}", "faults.0.fsync_stall_ms: Input should be a finite number"),
        ("{at_s: 1, kind: disk, target: a1, fsync_stall_ms: -5, duration_s: 1}", "faults.0.fsync_stall_ms: Input should be greater than 0"),
        ("{at_s: 1, kind: disk, target: a1, fsync_stall_ms: 600001, duration_s: 1}", "faults.0.fsync_stall_ms: Input should be less than or equal to 600000"),
        ("{at_s: 1, kind: disk, target: a9, wipe: true}", "faults.0.target: unknown node 'a9'"),
        ("{at_s: 1, kind: disk, target: w1, wipe: true}", "faults.0.target: node 'w1' has no control role: a disk fault hits a control node"),
        ("{at_s: 1, kind: disk, target: a1, wipe: yes please}", "faults.0.wipe: Input should be a valid boolean"),
        ("{at_s: 1, kind: clock, target: a1}", "faults.0: a clock fault takes exactly one of skew_ms or jump_ms"),
        ("{at_s: 1, kind: clock, target: a1, skew_ms: 5, jump_ms: 5}", "faults.0: a clock fault takes exactly one of skew_ms or jump_ms"),
        ("{at_s: 1, kind: clock, target: a1, skew_ms: 86400001}", "faults.0.skew_ms: Input should be less than or equal to 86400000"),
        ("{at_s: 1, kind: clock, target: a1, jump_ms: .inf}", "faults.0.jump_ms: Input should be a finite number"),
        ("{at_s: 1, kind: clock, target: a1, jump_ms: 1.5}", "faults.0.jump_ms: Input should be a valid integer"),
        ("{at_s: 1, kind: clock, target: w1, skew_ms: 5}", "faults.0.target: node 'w1' has no control role: a clock fault"),
        ("{at_s: 1, kind: clock, target: nobody, skew_ms: 5}", "faults.0.target: unknown node 'nobody'"),
        (
            "{at_s: 0, kind: clock, target: a1, jump_ms: 10000000, every_s: 1, count: 10}",
            "faults.0.jump_ms: 10 jumps of 10000000 ms move the clock more than 86400000 ms",
        ),
    ],
)  # fmt: skip
def test_bad_disk_and_clock_faults_name_the_line(fault: str, fragment: str) -> None:
    found = problems(THREE_CLOUDS + f"faults:\n  - {fault}\n")
    assert any(f"f.yaml:12: {fragment}" in p for p in found), found


def test_good_disk_and_clock_faults_load() -> None:
    s = load(
        THREE_CLOUDS
        + """\
faults:
  - {at_s: 1, kind: disk, target: leader, fsync_stall_ms: 250, duration_s: 2}
  - {at_s: 2, kind: disk, target: random, full: true, duration_s: 2}
  - {at_s: 3, kind: disk, target: a2, wipe: true}
  - {at_s: 4, kind: clock, target: leader, jump_ms: -3000}
  - {at_s: 5, kind: clock, target: g1, skew_ms: 1500, every_s: 1, count: 2}
"""
    )
    disks = [f for f in s.faults if isinstance(f, DiskFault)]
    assert [f.action for f in disks] == ["stall", "full", "wipe"]
    clocks = [f for f in s.timeline() if isinstance(f, ClockFault)]
    assert [(f.at_s, f.jump_ms, f.skew_ms) for f in clocks] == [
        (4.0, -3000, None), (5.0, None, 1500), (6.0, None, 1500),
    ]  # fmt: skip


# ------------------------------------------------------------ the player


@dataclass
class FakeBackend:
    """Timers on a fake clock; records every disk, clock and process call."""

    leading: tuple[str, int] | None = ("a1", 1)
    clock_s: float = 0.0
    calls: list[tuple[float, str, str]] = field(default_factory=list)
    blocked: frozenset[Pair] = frozenset()
    _timers: list[tuple[float, int, Callable[[], None]]] = field(default_factory=list)
    _sequence: itertools.count[int] = field(default_factory=itertools.count)

    def run_until(self, until_s: float) -> None:
        while self._timers and self._timers[0][0] <= until_s:
            due_s, _, action = heapq.heappop(self._timers)
            self.clock_s = max(self.clock_s, due_s)
            action()
        self.clock_s = until_s

    def now_s(self) -> float:
        return self.clock_s

    def schedule(self, delay_s: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (self.clock_s + delay_s, next(self._sequence), action))

    def _did(self, what: str, detail: str) -> None:
        self.calls.append((round(self.clock_s, 6), what, detail))

    def crash_node(self, name: str) -> None:
        self._did("crash_node", name)

    def start_node(self, name: str) -> None:
        self._did("start_node", name)

    def pause_node(self, name: str, duration_s: float) -> None:
        self._did("pause_node", name)

    def crash_agent(self, name: str) -> None:
        self._did("crash_agent", name)

    def start_agent(self, name: str) -> None:
        self._did("start_agent", name)

    def pause_agent(self, name: str, duration_s: float) -> None:
        self._did("pause_agent", name)

    def disk_stall(self, name: str, stall_ms: float | None) -> None:
        self._did("disk_stall", f"{name} {stall_ms}")

    def disk_full(self, name: str, full: bool) -> None:
        self._did("disk_full", f"{name} {full}")

    def wipe_node(self, name: str) -> None:
        self._did("wipe_node", name)

    def set_clock(self, name: str, offset_ms: int) -> None:
        self._did("set_clock", f"{name} {offset_ms}")

    def set_links(
        self, blocked: frozenset[Pair], clogged: frozenset[Pair], latency: Mapping[Pair, AnyLink]
    ) -> None:
        self.blocked = blocked

    def leader(self) -> tuple[str, int] | None:
        return self.leading

    def submit(self, client: str, request: TaskRequest, done: SubmitDone) -> None:
        raise AssertionError("no workload here")

    def task_counts(self) -> Mapping[str, int] | None:
        return None

    def note(self, kind: str, subject: str, detail: str) -> None:
        pass


def play(faults: str, until_s: float, end: bool = False) -> tuple[FakeBackend, ScenarioPlayer]:
    backend = FakeBackend()
    player = ScenarioPlayer(load(THREE_CLOUDS + "faults:\n" + faults), 1, backend)
    player.start()
    backend.run_until(until_s)
    if end:
        player.end_faults()
    return backend, player


def disk_and_process_calls(backend: FakeBackend) -> list[tuple[float, str, str]]:
    return [c for c in backend.calls if c[1] not in ("crash_agent", "start_agent")]


def test_stalls_overlap_the_strongest_wins_and_each_ends_on_its_own() -> None:
    backend, _ = play(
        "  - {at_s: 1, kind: disk, target: a2, fsync_stall_ms: 100, duration_s: 4}\n"
        "  - {at_s: 2, kind: disk, target: a2, fsync_stall_ms: 300, duration_s: 1}\n",
        10,
    )
    assert disk_and_process_calls(backend) == [
        (1.0, "disk_stall", "a2 100.0"),
        (2.0, "disk_stall", "a2 300.0"),
        (3.0, "disk_stall", "a2 100.0"),
        (5.0, "disk_stall", "a2 None"),
    ]


def test_a_full_disk_of_the_leader_is_a_failover_and_ends_with_a_restart() -> None:
    backend, player = play(
        "  - {at_s: 1, kind: disk, target: leader, full: true, duration_s: 3}\n", 2
    )
    assert player.failover_started_s == 1.0  # the leader's next write fails: it stops leading
    backend.leading = ("g1", 2)
    backend.run_until(10)
    assert disk_and_process_calls(backend) == [
        (1.0, "disk_full", "a1 True"),
        (4.0, "disk_full", "a1 False"),
        (4.0, "crash_node", "a1"),  # restarted, as an operator who freed the space would
        (4.0, "start_node", "a1"),
    ]


def test_a_wipe_stops_the_node_empties_it_and_starts_it_down_s_later() -> None:
    backend, player = play("  - {at_s: 1, kind: disk, target: g1, wipe: true, down_s: 2.5}\n", 10)
    assert disk_and_process_calls(backend) == [
        (1.0, "crash_node", "g1"),
        (1.0, "wipe_node", "g1"),
        (3.5, "start_node", "g1"),
    ]
    assert player.failover_started_s is None  # a follower's amnesia is no failover


def test_clock_faults_set_and_add_to_a_node_offset() -> None:
    backend, _ = play(
        "  - {at_s: 1, kind: clock, target: leader, skew_ms: 500}\n"
        "  - {at_s: 2, kind: clock, target: a1, jump_ms: -2000, every_s: 1, count: 2}\n"
        "  - {at_s: 5, kind: clock, target: a1, skew_ms: 0}\n",
        10,
    )
    assert [c for c in backend.calls if c[1] == "set_clock"] == [
        (1.0, "set_clock", "a1 500"),
        (2.0, "set_clock", "a1 -1500"),
        (3.0, "set_clock", "a1 -3500"),
        (5.0, "set_clock", "a1 0"),
    ]


def test_the_end_of_the_faults_frees_disks_and_ends_stalls_even_mid_fault() -> None:
    backend, _ = play(
        "  - {at_s: 1, kind: disk, target: a2, fsync_stall_ms: 50, duration_s: 100}\n"
        "  - {at_s: 1, kind: disk, target: z1, full: true, duration_s: 100}\n",
        5,
        end=True,
    )
    assert disk_and_process_calls(backend)[-3:] == [
        (5.0, "disk_stall", "a2 None"),
        (5.0, "disk_full", "z1 False"),
        (5.0, "crash_node", "z1"),  # the backend starts it as it settles
    ]
    backend.run_until(200)  # the faults' own ends no longer run
    assert backend.calls[-1][0] == 5.0


# ------------------------------------------------------------ the simulator

SIM_BASE = """\
name: t
duration_s: {duration}
topology:
  nodes:
    - {{name: a1, cloud: aws, region: r1}}
    - {{name: a2, cloud: aws, region: r1}}
    - {{name: g1, cloud: gcp, region: r2}}
workload:
  clients: [{{name: c, node: a1}}]
  rate_per_s: 10
  stop_s: {stop}
  mix: {{matmul: {{args: {{n: 8}}}}}}
  duration_ms: {{kind: constant, value_ms: 20}}
"""


def sim(faults: str, duration: int = 20, stop: int = 18) -> Simulation:
    text = SIM_BASE.format(duration=duration, stop=stop) + "faults:\n" + faults
    return Simulation(load(text), 1)


def test_sim_full_disk_of_a_follower_fails_it_then_the_restart_repairs_it() -> None:
    s = sim("  - {at_s: 5, kind: disk, target: g1, full: true, duration_s: 5}\n")
    s._wait_ready()
    s._t0_ms = s.env.now
    s._playing = True
    s.player.start()
    s.env.run(until=s._t0_ms + 7000)
    node = s.nodes["g1"]
    assert node.alive and node.failed is not None and "disk full" in node.failed
    stored = node.storage.entries[-1].index if node.storage.entries else 0
    s.env.run(until=s._t0_ms + 9000)  # the leader goes on with the two others
    assert node.storage.entries[-1].index == stored, "a failed node stores nothing more"
    leader = s.leading_node()
    assert leader is not None and leader.name != "g1"
    assert leader.core is not None and leader.core.commit > stored
    s.env.run(until=s._t0_ms + 20_000)
    s._settle()
    summary = s._summary(1.0)
    assert s.nodes["g1"].failed is None  # restarted when the space came back
    assert summary["tasks_lost"] == 0 and summary["settled"] is True
    assert summary["tasks_acknowledged"] == summary["tasks_submitted"]


def test_sim_full_disk_of_the_leader_is_a_failover_that_loses_nothing() -> None:
    s = sim("  - {at_s: 1, kind: disk, target: leader, full: true, duration_s: 8}\n")
    summary = s.run()
    # The leader's next write fails: it stops serving and another node takes over.
    assert summary["failover_s"]["count"] == 1  # type: ignore[index]
    assert summary["failover_s"]["max"] < 5  # type: ignore[index]
    assert summary["leader_changes"] >= 1  # type: ignore[operator]
    assert summary["tasks_lost"] == 0
    assert summary["settled"] is True
    # The client retried past a1's refusals: every submit was acknowledged in the end.
    assert summary["submits_given_up"] == 0


def test_sim_failed_node_refuses_calls_with_a_clear_error() -> None:
    s = sim("  - {at_s: 1, kind: disk, target: g1, full: true, duration_s: 8}\n")
    node = s.nodes["g1"]
    node.failed = "disk full: the store's write was refused (no space left)"
    replies: list[ApiReply] = []

    class Caller(Endpoint):
        name = "probe"
        location = "a1"

        def on_reply(self, reply: ApiReply) -> None:
            replies.append(reply)

    node.receive(ApiCall(7, GetRequest("t-1"), Caller()))
    s.env.run(until=s.env.now + 100)
    assert len(replies) == 1 and replies[0].request_id == 7
    error = replies[0].error
    assert error is not None and error.code is ErrorCode.UNAVAILABLE
    assert error.message == "g1 failed: disk full: the store's write was refused (no space left)"


def test_sim_wipe_gives_the_node_a_new_empty_store_and_loses_nothing() -> None:
    s = sim("  - {at_s: 8, kind: disk, target: g1, wipe: true, down_s: 1}\n")
    incarnation = s.nodes["g1"].storage.incarnation
    summary = s.run()
    assert s.nodes["g1"].storage.incarnation == incarnation + 1
    assert summary["tasks_lost"] == 0 and summary["settled"] is True


def test_sim_stall_of_the_leader_slows_its_commits_by_the_stall() -> None:
    quiet = run_scenario(load(SIM_BASE.format(duration=20, stop=18)), 1)
    stalled = sim(
        "  - {at_s: 0, kind: disk, target: leader, fsync_stall_ms: 300, duration_s: 20}\n"
    ).run()
    assert quiet["submit_ms"]["p50"] < 100  # type: ignore[index]
    # The leader persists before it replicates: each commit waits at least the stall.
    assert stalled["submit_ms"]["p50"] > 300  # type: ignore[index]
    assert stalled["tasks_lost"] == 0


def test_sim_clock_offsets_move_one_node_wall_clock_only() -> None:
    s = sim(
        "  - {at_s: 1, kind: clock, target: g1, skew_ms: -5000}\n"
        "  - {at_s: 2, kind: clock, target: g1, jump_ms: 1500}\n"
    )
    s._wait_ready()
    s._t0_ms = s.env.now
    s._playing = True
    s.player.start()
    s.env.run(until=s._t0_ms + 3000)
    now = int(s.env.now)
    assert s.wall_ms("a1") == WALL_EPOCH_MS + now
    assert s.wall_ms("g1") == WALL_EPOCH_MS + now - 3500


def test_sim_without_clock_faults_keeps_wall_clocks_at_sim_time() -> None:
    s = Simulation(load(SIM_BASE.format(duration=5, stop=4)), 1)
    s.env.run(until=1234)
    assert s.wall_ms("a1") == 1234  # as before clock faults existed: same traces
