"""`goml chaos run`: a scenario on real processes behind Toxiproxy, played and measured by
the scenario player (`goml.scenario.player`, which states the definitions) exactly as in
the simulator, and reported side by side with the simulator's prediction.

This module is the player's real backend: it builds the cluster (`ChaosCluster`), turns
the player's links into Toxiproxy toxics, kills, stops and starts processes, submits
through `goml.client.Client` on SUBMIT_THREADS threads, settles by polling status, and
checks the stopped nodes' stores: tasks_lost are acknowledged tasks missing (or with
another id) on any replica (`replay_cluster`), duplicate_results the extra results of
tasks recorded more than once, commands_per_task the committed commands of the longest
stored log.

Threads: the player runs on the main thread only. Submitting threads hand their outcomes
(with the times they measured) to it through a queue that the main loop drains, between
the player's timers and its polls of the leader.

Membership faults: the player's plan is driven by `goml.cluster.membership.Operator` (the
plan's own driver, over the real ChangeMembership RPC with the admin's credentials) on a
thread of its own, which hands each step's start and the outcome to the main loop through
a queue of its own (seen at the next poll, within MONITOR_EVERY_S). A spare is prepared
(`ChaosCluster.prepare_joiner`) and started when it joins; a removed node is stopped.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import json
import math
import queue
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from goml.api.types import SubmitRequest, TaskRequest
from goml.api.wire import request_to_pb
from goml.chaos.cluster import (
    ChaosCluster,
    ManagedProcess,
    Member,
    ProxyState,
    Runtime,
    record_pids,
)
from goml.chaos.containers import ContainerError, container_runtime
from goml.chaos.node_faults import NodeFaults, NodeFaultsUnavailable, node_faults
from goml.chaos.server import ToxiproxyUnavailable, toxiproxy_server
from goml.chaos.toxiproxy import Stream, Toxiproxy, ToxiproxyError
from goml.client import Client, ClientError
from goml.cluster.config import Duties
from goml.cluster.inspect import agreed_prefix, read_store, replay_cluster
from goml.cluster.membership import Operator
from goml.cluster.membership_plan import (
    SCENARIO_CATCH_UP_WAIT_MS,
    SCENARIO_STEP_TIMEOUT_MS,
    Failed,
    Finished,
    Step,
)
from goml.proto import api_pb2
from goml.raft.types import EntryKind
from goml.report.fidelity import compare
from goml.report.html import write_report
from goml.scenario.faults import Pair
from goml.scenario.player import (
    CLIENT_CALL_TIMEOUT_MS,
    CLIENT_GIVE_UP_MS,
    CLIENT_HEDGE_AFTER_MS,
    COMMAND_TYPES,
    ChangeDone,
    FinalState,
    ScenarioPlayer,
    StepStarted,
    SubmitDone,
    SubmitOutcome,
    client_domains,
    count_commands,
    count_retried,
)
from goml.scenario.schema import AnyLink, ClockFault, DiskFault, Scenario
from goml.sim.runner import judge, load_for_run, print_summary, simulate

SUBMIT_THREADS = 6
SUBMITS_QUEUED_MAX = 1000  # submits handed to the threads and not yet reported back
STARTUP_TIMEOUT_S = 60.0
SETTLE_TIMEOUT_S = 120.0
SETTLE_CHECK_EVERY_S = 0.25
MONITOR_EVERY_S = 0.1  # leader polls: how soon a new leader is seen
STOP_SUBMITTERS_TIMEOUT_S = CLIENT_GIVE_UP_MS / 1000 + 5  # a call in flight ends by then
# As `status` counts them: FAILED is a PENDING task waiting for its retry.
UNFINISHED = ("PENDING", "FAILED", "LEASED", "RUNNING")
# Agents are noticed dead after agent_timeout_ms: the defaults (as the simulator's).
CHAOS_DUTIES = Duties()


class ChaosError(RuntimeError):
    pass


@dataclass(frozen=True, slots=True)
class _Work:
    client: str
    spec: api_pb2.TaskSpec
    done: SubmitDone
    queued_s: float


class ChaosRun:
    """The scenario player's backend on a running `ChaosCluster`."""

    def __init__(
        self,
        scenario: Scenario,
        seed: int,
        cluster: ChaosCluster,
        node_faults: NodeFaults | None = None,
    ) -> None:
        self.scenario = scenario
        self.seed = seed
        self.cluster = cluster
        # Disks and clocks of the nodes (set up by run_chaos when the scenario has such
        # faults; a disk or clock fault without it is a harness error).
        self.node_faults = node_faults
        self.t0 = time.monotonic()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._counter = itertools.count()
        self._observer = cluster.observer_client()
        self._leader_seen: tuple[str, int] | None = None
        # What the proxies show now (set_links changes only the difference).
        self._blocked: frozenset[Pair] = frozenset()
        self._clogged: frozenset[Pair] = frozenset()
        self._latency: dict[Pair, AnyLink] = {}
        self._clients: dict[str, Client] = {}
        self._threads: list[threading.Thread] = []
        # Sized so that no put can find them full: at most SUBMITS_QUEUED_MAX submits are
        # outstanding (`_outstanding`), plus one stop marker per thread.
        self._work: queue.Queue[_Work | None] = queue.Queue(SUBMITS_QUEUED_MAX + SUBMIT_THREADS)
        self._outcomes: queue.Queue[tuple[SubmitDone, SubmitOutcome]] = queue.Queue(
            SUBMITS_QUEUED_MAX
        )
        self._outstanding = 0  # main thread only
        # From the membership thread: a step started, a change ended (bounded: one change
        # at a time, a handful of steps each).
        self._membership_events: queue.Queue[Callable[[], None]] = queue.Queue(64)
        self._changer: threading.Thread | None = None
        self.log: Callable[[str], None] = lambda _: None
        self._submitting = False
        self.player = ScenarioPlayer(scenario, seed, self)

    # ------------------------------------------------------ backend: clock

    def now_s(self) -> float:
        return time.monotonic() - self.t0

    def schedule(self, delay_s: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._timers, (self.now_s() + delay_s, next(self._counter), action))

    # -------------------------------------------------- backend: processes

    def crash_node(self, name: str) -> None:
        self.cluster.kill(self.cluster.nodes[name])

    def start_node(self, name: str) -> None:
        if self.cluster.in_service(name):  # a spare starts when it joins, a removed node never
            self.cluster.start(self.cluster.nodes[name])

    def pause_node(self, name: str, duration_s: float) -> None:
        self._pause(self.cluster.nodes[name], duration_s)

    def crash_agent(self, name: str) -> None:
        self.cluster.kill(self.cluster.agent_processes[name])

    def start_agent(self, name: str) -> None:
        self.cluster.start(self.cluster.agent_processes[name])

    def pause_agent(self, name: str, duration_s: float) -> None:
        self._pause(self.cluster.agent_processes[name], duration_s)

    def _pause(self, process: Member, duration_s: float) -> None:
        self.cluster.pause(process)
        self.schedule(duration_s, functools.partial(self.cluster.resume, process))

    # ------------------------------------------------ backend: disks, clocks

    def _faults(self) -> NodeFaults:
        if self.node_faults is None:
            raise ChaosError("a disk or clock fault fired, but no disks or clocks were set up")
        return self.node_faults

    def disk_stall(self, name: str, stall_ms: float | None) -> None:
        self._faults().stall(name, stall_ms)

    def disk_full(self, name: str, full: bool) -> None:
        self._faults().full(name, full)

    def wipe_node(self, name: str) -> None:
        self._faults().wipe(name)

    def set_clock(self, name: str, offset_ms: int) -> None:
        self._faults().set_clock(name, offset_ms)

    # ------------------------------------------------------ backend: links

    def set_links(
        self,
        blocked: frozenset[Pair],
        clogged: frozenset[Pair],
        latency: Mapping[Pair, AnyLink],
    ) -> None:
        update = self.cluster.update_pairs
        if blocked != self._blocked:
            update(set(blocked - self._blocked), _block)
            update(set(self._blocked - blocked), _unblock)
            self._blocked = blocked
        if clogged != self._clogged:
            update(set(clogged - self._clogged), _clog)
            update(set(self._clogged - clogged), _unclog)
            self._clogged = clogged
        # A proxy has one latency for both its streams; latency faults slow both ways.
        for pair in sorted(self._latency.keys() | latency.keys()):
            link = latency.get(pair)
            if link != self._latency.get(pair):
                update({pair}, functools.partial(_override, link))
        self._latency = dict(latency)

    # -------------------------------------------------- backend: membership

    def join_node(self, name: str, peers: tuple[str, ...]) -> None:
        self.cluster.prepare_joiner(name, peers)
        self.cluster.start(self.cluster.nodes[name])

    def member_address(self, name: str) -> str:
        # The proxy from the node that leads now (see goml.chaos.cluster: one address
        # per member in a configuration).
        source = self._leader_seen[0] if self._leader_seen else self.cluster.voters[0]
        if source == name:
            source = next(n for n in self.cluster.voters if n != name)
        return self.cluster.proxies[f"{source}->{name}"].listen

    def change_membership(
        self, steps: tuple[Step, ...], started: StepStarted, done: ChangeDone
    ) -> None:
        assert self._changer is None or not self._changer.is_alive(), "one change at a time"
        assert self.cluster.admin is not None
        operator = Operator(self.cluster.admin, SCENARIO_STEP_TIMEOUT_MS / 1000, say=self.log)
        events = self._membership_events

        def change() -> None:
            """The membership thread: never touches the player, only the queue."""
            outcome: Finished | Failed
            try:
                outcome, _ = operator.drive(
                    steps,
                    SCENARIO_CATCH_UP_WAIT_MS / 1000,
                    lambda step: events.put(
                        functools.partial(started, step, self.now_s()), timeout=5.0
                    ),
                )
            except Exception as error:  # a harness bug: the change fails, the run goes on
                outcome = Failed(f"harness error: {type(error).__name__}: {error}")
            events.put(functools.partial(done, outcome), timeout=5.0)

        self._changer = threading.Thread(target=change, name="chaos-membership", daemon=True)
        self._changer.start()

    def stop_node(self, name: str) -> None:
        self.cluster.retired.add(name)
        self.cluster.stop(self.cluster.nodes[name])

    def _membership_hand_over(self) -> None:
        while True:
            try:
                event = self._membership_events.get_nowait()
            except queue.Empty:
                return
            event()

    # ------------------------------------------------------ backend: views

    def leader(self) -> tuple[str, int] | None:
        leader = self.cluster.leader(self._observer)
        if leader is not None and leader != self._leader_seen:
            self._leader_seen = leader
            self.player.leader_seen(*leader)
        return leader

    def task_counts(self) -> dict[str, int] | None:
        leader = self._leader_seen
        if leader is None:
            return None
        try:
            status = self._observer.status(leader[0])
        except ClientError:
            return None
        return {k: int(v) for k, v in status.tasks_by_state.items()}

    def note(self, kind: str, subject: str, detail: str) -> None:
        pass  # no trace digest for real processes: the summary's timeline says what happened

    # ---------------------------------------------------- backend: submits

    def submit(self, client: str, request: TaskRequest, done: SubmitDone) -> None:
        now_s = self.now_s()
        if not self._submitting or self._outstanding >= SUBMITS_QUEUED_MAX:
            why = "the run is ending" if not self._submitting else "the submit queue is full"
            done(SubmitOutcome(now_s, now_s, None, f"not sent: {why}"))
            return
        pb = request_to_pb(SubmitRequest((request,)))
        assert isinstance(pb, api_pb2.SubmitRequest)
        self._outstanding += 1
        self._work.put_nowait(_Work(client, pb.tasks[0], done, now_s))

    def _start_submitters(self) -> None:
        workload = self.scenario.workload
        if workload is None:
            return
        self._clients = {}
        for c in workload.clients:
            domains, home = client_domains(self.scenario, c.node)
            self._clients[c.name] = Client(
                self.cluster.profiles[c.node],
                call_timeout_s=CLIENT_CALL_TIMEOUT_MS / 1000,
                retry_s=CLIENT_GIVE_UP_MS / 1000,
                rng=random.Random(f"{self.seed}:client:{c.name}"),
                hedge_after_s=CLIENT_HEDGE_AFTER_MS / 1000,
                # As the simulator's client: retry for the whole budget, even when every
                # node is cut off the same way (a scenario's faults heal); it hedges by
                # the same failure domains.
                give_up_unreachable=False,
                domains=domains,
                home_domain=home,
            )
        for i in range(SUBMIT_THREADS):
            thread = threading.Thread(target=self._submitter, name=f"chaos-submit-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._submitting = True

    def _submitter(self) -> None:
        """A submitting thread: never touches the player, only the two queues."""
        while True:
            item = self._work.get()
            if item is None:
                return
            started_s = self.now_s()
            try:
                task_ids = self._clients[item.client].submit_specs([item.spec])
                outcome = SubmitOutcome(started_s, self.now_s(), task_ids[0], "")
            except ClientError as error:
                outcome = SubmitOutcome(started_s, self.now_s(), None, str(error) or "failed")
            except BaseException as error:  # a bug: report the submit, then die loudly
                detail = f"harness error: {type(error).__name__}: {error}"
                self._outcomes.put_nowait(
                    (item.done, SubmitOutcome(started_s, self.now_s(), None, detail))
                )
                raise
            self._outcomes.put_nowait((item.done, outcome))

    def _hand_over(self, wait_s: float) -> None:
        """Give the player the outcomes reported so far, waiting up to `wait_s` for one."""
        try:
            item = self._outcomes.get(timeout=max(0.0, wait_s))
        except queue.Empty:
            return
        while True:
            done, outcome = item
            self._outstanding -= 1
            assert self._outstanding >= 0
            done(outcome)
            try:
                item = self._outcomes.get_nowait()
            except queue.Empty:
                return

    def _stop_submitters(self) -> None:
        """No new submits; what never left the queue ends as not sent; wait (bounded)
        for the calls in flight and hand their outcomes over."""
        self._submitting = False
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                now_s = self.now_s()
                outcome = SubmitOutcome(item.queued_s, now_s, None, "not sent: the run ended")
                self._outcomes.put_nowait((item.done, outcome))
        for _ in self._threads:
            self._work.put_nowait(None)
        deadline = time.monotonic() + STOP_SUBMITTERS_TIMEOUT_S
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        self._hand_over(0.0)
        for client in self._clients.values():
            client.close()

    # ------------------------------------------------------------------ run

    def _drive(self, until_s: float, done: Callable[[], bool] | None) -> bool:
        """The main loop: run the player's timers due by `until_s`, poll the leader, hand
        the submit outcomes over, until `until_s` or until `done()` (checked every
        SETTLE_CHECK_EVERY_S). Returns done()'s last answer (False without one)."""
        next_poll_s = next_check_s = self.now_s()
        while True:
            now_s = self.now_s()
            while self._timers and self._timers[0][0] <= min(now_s, until_s):
                _, _, action = heapq.heappop(self._timers)
                action()
                now_s = self.now_s()
            if now_s >= next_poll_s:
                # Steps first: the player judges them by the leader it saw last.
                self._membership_hand_over()
                self.leader()
                next_poll_s = self.now_s() + MONITOR_EVERY_S
            if done is not None and now_s >= next_check_s:
                if done():
                    return True
                next_check_s = self.now_s() + SETTLE_CHECK_EVERY_S
            if now_s >= until_s:
                return False
            wake_s = min(until_s, next_poll_s, self._timers[0][0] if self._timers else math.inf)
            if done is not None:
                wake_s = min(wake_s, next_check_s)
            self._hand_over(wake_s - self.now_s())  # waits for the threads, not a sleep

    def play(self) -> None:
        """Run the timeline and the workload until duration_s (main thread)."""
        self.t0 = time.monotonic()
        self._start_submitters()
        self.player.start()
        self._drive(self.scenario.duration_s, None)

    def settle(self, timeout_s: float) -> bool:
        """Faults end: links restored, what is paused resumed and what is down started;
        wait until the submits in flight ended, the tasks are done and every node has
        applied the leader's commit (bounded). The submitting threads then stop."""
        self.player.end_faults()
        out_of_service = [
            self.cluster.nodes[n] for n in self.cluster.control if not self.cluster.in_service(n)
        ]
        for process in self.cluster.all_processes():
            if process.paused:
                self.cluster.resume(process)
            if not process.running and process not in out_of_service:
                self.cluster.start(process)
        settled = self._drive(self.now_s() + timeout_s, self._converged)
        self._stop_submitters()
        return settled

    def _converged(self) -> bool:
        if self.player.in_flight or self.player.changes_in_flight:
            return False
        leader = self.leader()
        if leader is None:
            return False
        try:
            status = self._observer.status(leader[0])
        except ClientError:
            return False
        if any(int(status.tasks_by_state.get(state, 0)) for state in UNFINISHED):
            return False
        commit = int(status.commit_index)
        for name in self.cluster.replicas():
            try:
                seen = self._observer.status(name)
            except ClientError:
                return False
            mine = next((m for m in seen.members if m.id == name), None)
            if mine is None or int(mine.applied_index) < commit:
                return False
        return True

    def close(self) -> None:
        self._submitting = False
        self._observer.close()
        if self._changer is not None:
            # Bounded by the plan's deadlines; a daemon thread past this does no harm.
            self._changer.join(timeout=5.0)


def _block(state: ProxyState, stream: Stream) -> None:
    state.blocked.add(stream)


def _unblock(state: ProxyState, stream: Stream) -> None:
    state.blocked.discard(stream)


def _clog(state: ProxyState, stream: Stream) -> None:
    state.clogged.add(stream)


def _unclog(state: ProxyState, stream: Stream) -> None:
    state.clogged.discard(stream)


def _override(link: AnyLink | None, state: ProxyState, stream: Stream) -> None:
    state.override = link


def check_stores(
    cluster: ChaosCluster, acknowledged: dict[str, str]
) -> tuple[int, int, dict[str, int], int]:
    """(tasks lost, extra results, task counts by state, tasks retried) from every stopped
    node's store (counts and retries: the replica that holds the most tasks)."""
    manifests = replay_cluster({n: cluster.data_dirs[n] for n in cluster.replicas()})
    lost: set[str] = set()
    for manifest in manifests.values():
        for key, task_id in acknowledged.items():
            if manifest.task_id_for_key(key) != task_id:
                lost.add(task_id)
    duplicate = 0
    for task_id in acknowledged.values():
        recorded = [
            task.results_recorded
            for manifest in manifests.values()
            if (task := manifest.get_task(task_id)) is not None
        ]
        duplicate += max(0, max(recorded, default=0) - 1)
    reference = max(manifests.values(), key=lambda m: sum(m.counts_by_state().values()))
    counts = {state.value: count for state, count in reference.counts_by_state().items()}
    return len(lost), duplicate, counts, count_retried(reference, acknowledged.values())


def count_store_commands(cluster: ChaosCluster) -> tuple[dict[str, int], str | None]:
    """Committed commands by type from the longest stored log (stopped nodes), and a
    note when that log was compacted (then only what is left of it is counted)."""
    images = [read_store(cluster.data_dirs[name]) for name in cluster.replicas()]
    reference = max(images, key=lambda image: image.commit)  # as replay_cluster
    longest = max(images, key=lambda image: image.last_index)
    up_to = agreed_prefix(longest, reference, reference.commit)
    commands = count_commands(
        entry.data
        for entry in longest.persisted.entries
        if entry.index <= up_to and entry.kind is EntryKind.NORMAL
    )
    note = None
    if longest.snapshot_index > 0:
        note = (
            f"{longest.data_dir.name}'s log was compacted up to index {longest.snapshot_index}: "
            f"commands_per_task counts entries {longest.snapshot_index + 1}..{up_to} only"
        )
    return commands, note


# --------------------------------------------------------------------------- entry


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread, so every `finally`
    below runs (processes stopped by PID, proxies deleted, the server stopped)."""

    interrupted = [False]

    def handler(signum: int, frame: FrameType | None) -> None:
        if interrupted[0]:  # already cleaning up: a second Ctrl-C must not cut that short
            print("still cleaning up (stopping processes, deleting proxies)", file=sys.stderr)
            return
        interrupted[0] = True
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


RUNTIMES = ("processes", "containers")
RUNTIME_KINDS = {
    "processes": "chaos (real processes behind Toxiproxy)",
    "containers": "chaos (real containers behind Toxiproxy, on a Docker network)",
}


@contextlib.contextmanager
def _members_and_toxiproxy(
    runtime: str,
    scenario: Scenario,
    work_dir: Path,
    client_locations: list[str],
    toxiproxy_url: str | None,
    toxiproxy_bin: Path | None,
    notes: list[str],
    pids: list[int],
) -> Iterator[tuple[Toxiproxy, Runtime | None]]:
    """Toxiproxy and the runtime of the members (None: ChaosCluster's processes)."""
    if runtime == "containers":
        if toxiproxy_url is not None or toxiproxy_bin is not None:
            raise ValueError(
                "--toxiproxy-url and --toxiproxy-bin are for --runtime processes: the "
                "container runtime runs Toxiproxy from its own image"
            )
        with container_runtime(scenario, client_locations, work_dir, notes) as (toxiproxy, members):
            yield toxiproxy, members
        return
    with toxiproxy_server(
        toxiproxy_url, toxiproxy_bin, work_dir / "logs" / "toxiproxy.log", notes, pids
    ) as toxiproxy:
        yield toxiproxy, None


def run_chaos(
    scenario: Scenario,
    seed: int,
    work_dir: Path,
    toxiproxy_url: str | None = None,
    toxiproxy_bin: Path | None = None,
    log: Callable[[str], None] = print,
    runtime: str = "processes",
) -> dict[str, Any]:
    """One real run; returns the summary (without expectations judged)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r}: expected one of {', '.join(RUNTIMES)}")
    if work_dir.exists():
        shutil.rmtree(work_dir)
    work_dir.mkdir(parents=True)
    pids: list[int] = []
    pid_file = work_dir / "pids.json"

    def on_spawn(pid: int) -> None:
        pids.append(pid)
        record_pids(pid_file, pids)

    notes: list[str] = []
    started = time.monotonic()
    client_locations = [c.node for c in (scenario.workload.clients if scenario.workload else [])]
    disk_or_clock = any(isinstance(f, DiskFault | ClockFault) for f in scenario.faults)
    if scenario.topology.spare_names and runtime != "processes":
        raise ValueError("spare nodes (membership faults) need --runtime processes")
    if disk_or_clock and runtime != "processes":
        raise ValueError(
            "disk and clock faults need --runtime processes (loop devices, the block I/O "
            "throttle and libfaketime act on host processes)"
        )
    with (
        _members_and_toxiproxy(
            runtime, scenario, work_dir, client_locations, toxiproxy_url, toxiproxy_bin, notes, pids
        ) as (toxiproxy, members),
        node_faults(work_dir, log) as faults,  # exits last: the stores are read before
    ):
        record_pids(pid_file, pids)
        (work_dir / "toxiproxy_url").write_text(toxiproxy.url + "\n")
        for note in notes:
            log(note)
        cluster = ChaosCluster(scenario, work_dir, toxiproxy, CHAOS_DUTIES, on_spawn, members)
        run: ChaosRun | None = None
        try:
            cluster.create(client_locations)
            if disk_or_clock:
                for note in faults.setup(scenario, cluster.data_dirs, _preloader(cluster)):
                    log(note)
            (work_dir / "cluster.json").write_text(json.dumps(cluster.describe(), indent=2))
            for process in cluster.all_processes():
                if process not in [cluster.nodes[n] for n in cluster.spares]:
                    cluster.start(process)  # a spare starts when it joins
            _wait_ready(cluster, STARTUP_TIMEOUT_S)
            log(f"cluster up: {len(cluster.control)} nodes, {len(cluster.agents)} agents, "
                f"{len(cluster.proxies)} proxies; playing {scenario.duration_s:g} s")  # fmt: skip
            run = ChaosRun(scenario, seed, cluster, faults if disk_or_clock else None)
            run.log = log
            run.play()
            settled = run.settle(SETTLE_TIMEOUT_S)
            # As the simulator's sim_seconds: the scenario plus the settling after it.
            played_s = run.now_s()
        finally:
            if run is not None:
                run.close()
            cluster.stop_all()
            errors = cluster.delete_proxies() + cluster.collect()
            for error in errors:
                log(f"cleanup: {error}")
        assert run is not None
        lost, duplicate, counts, retried = check_stores(cluster, run.player.obs.acknowledged)
        commands, commands_note = count_store_commands(cluster)
    final = FinalState(
        settled=settled,
        tasks_by_state=counts,
        tasks_lost=lost,
        duplicate_results=duplicate,
        commands=commands,
        tasks_retried=retried,
    )
    summary: dict[str, Any] = {
        **run.player.summary(final),
        "kind": RUNTIME_KINDS[runtime],
        "runtime": runtime,
        "trace_digest": "",
        "sim_seconds": round(played_s, 3),
        "wall_seconds": round(time.monotonic() - started, 3),
        "work_dir": str(work_dir),
    }
    if commands_note is not None:
        summary["commands_note"] = commands_note
    return summary


def _preloader(cluster: ChaosCluster) -> Callable[[str, dict[str, str]], None]:
    """Run a node's process with extra environment (libfaketime): `env` before its argv,
    so the PID is still the node's (env execs it)."""

    def preload(name: str, env: dict[str, str]) -> None:
        process = cluster.nodes[name]
        assert isinstance(process, ManagedProcess), "processes runtime only (checked above)"
        process.argv = ["env", *(f"{k}={v}" for k, v in sorted(env.items())), *process.argv]

    return preload


def _wait_ready(cluster: ChaosCluster, timeout_s: float) -> None:
    """A leader is elected, every node answers, every agent is registered and alive."""
    deadline = time.monotonic() + timeout_s
    with cluster.observer_client() as client:
        while True:
            problem = _not_ready(cluster, client)
            if problem is None:
                return
            spares = [cluster.nodes[n] for n in cluster.spares]
            dead = [p.name for p in cluster.all_processes() if not p.running and p not in spares]
            if dead:
                raise ChaosError(f"{', '.join(dead)} exited at start: see {cluster.work_dir}/logs")
            if time.monotonic() > deadline:
                raise ChaosError(f"cluster not ready after {timeout_s:.0f} s: {problem}")
            time.sleep(0.2)  # polling other processes, bounded by the deadline


def _not_ready(cluster: ChaosCluster, client: Client) -> str | None:
    leader = cluster.leader(client)
    if leader is None:
        return "no leader"
    for name in cluster.voters:
        if cluster.node_status(name, client) is None:
            return f"node {name} does not answer"
    try:
        status = client.status(leader[0])
    except ClientError as error:
        return f"leader {leader[0]}: {error}"
    alive = {a.id for a in status.agents if a.state == "ALIVE"}
    missing = sorted(set(cluster.agents) - alive)
    return f"agents not registered yet: {', '.join(missing)}" if missing else None


def prediction(scenario: Scenario, seed: int, first_leader: str | None = None) -> dict[str, Any]:
    """The simulator's summary for the same scenario and seed, started with the real
    run's first leader (the first election is a coin toss in both worlds, and the
    leader's place decides every submit's latency). A simulator failure must not cost
    the real run: it is reported in the comparison instead."""
    try:
        summary, _ = simulate(scenario, seed, first_leader)
    except Exception as error:  # a bug in the simulator: say so next to the real figures
        return {
            "scenario": scenario.name,
            "seed": seed,
            "kind": "simulator prediction (FAILED)",
            "error": f"{type(error).__name__}: {error}",
        }
    summary["kind"] = "simulator prediction"
    return summary


KEY_FIGURES = (
    "failover_s", "submit_ms", "submit_ms_steady", "submit_ms_steady_by_client",
    "submit_ms_steady_slowest",
    "tasks_submitted", "tasks_acknowledged",
    "tasks_succeeded", "tasks_dead", "tasks_lost", "duplicate_results", "leader_changes",
    "settled", "submits_given_up", "commands_per_task", "membership_changes",
    "membership_changes_failed",
)  # fmt: skip


def first_leader(summary: dict[str, Any]) -> str | None:
    """The node a run's timeline shows leading first, if any."""
    leaders = (summary.get("timeline") or {}).get("leaders") or []
    return str(leaders[0][1]) if leaders else None


def _slowest(summary: dict[str, Any], shown: int = 5) -> str:
    """The slowest steady submits as `started_s client ms`, slowest first."""
    slowest = summary.get("submit_ms_steady_slowest") or []
    return (
        ", ".join(f"{s['started_s']:.2f}s {s['client']} {s['ms']:.0f}ms" for s in slowest[:shown])
        or "-"
    )


def _readable(summary: dict[str, Any]) -> str:
    sim = summary.get("simulator", {})
    verdicts = [
        f"{c.figure} {'-' if c.ratio is None else f'x{c.ratio:.2f}'}"
        f"{'' if c.within is None else ' ok' if c.within else ' OFF'}"
        for c in compare(summary, sim)
    ]

    def row(label: str, key: str, fields: tuple[str, ...] = (), item: str = "") -> str:
        real, predicted = summary.get(key), sim.get(key)
        if item:  # one entry of a dict figure
            real = real.get(item) if isinstance(real, dict) else None
            predicted = predicted.get(item) if isinstance(predicted, dict) else None
        if fields:
            real = ", ".join(f"{f} {real.get(f) if real else None}" for f in fields)
            predicted = ", ".join(f"{f} {predicted.get(f) if predicted else None}" for f in fields)
        return f"  {label:<22} {real!s:<40} sim: {predicted}"

    stats = ("count", "p50", "p99", "max")
    lines = [
        f"chaos {summary['scenario']}  seed {summary['seed']}  "
        f"({summary['sim_seconds']} s played and settled, {summary['wall_seconds']} s wall)",
        row("failover s", "failover_s", stats),
        row("submit ms", "submit_ms", stats),
        row("submit ms (steady)", "submit_ms_steady", stats),
        *(
            row(f"  {client}", "submit_ms_steady_by_client", ("count", "p50", "p99"), client)
            for client in sorted(summary.get("submit_ms_steady_by_client") or {})
        ),
        f"  slowest steady         {_slowest(summary)}",
        f"  {'':<22} sim: {_slowest(sim)}",
        row("submitted", "tasks_submitted"),
        row("acknowledged", "tasks_acknowledged"),
        row("given up", "submits_given_up"),
        row("succeeded", "tasks_succeeded"),
        row("lost", "tasks_lost"),
        row("results twice", "duplicate_results"),
        row("leader changes", "leader_changes"),
        row("settled", "settled"),
        *(
            [
                row("membership changes", "membership_changes"),
                row("  failed", "membership_changes_failed"),
            ]
            if summary.get("membership_changes") or summary.get("membership_changes_failed")
            else []
        ),
        # Issue 14's tolerances: failovers equal, p50s within 25 %, steady p99 within 50 %.
        "  prediction / real     " + ", ".join(verdicts),
        "  commands per task",
        *(row(f"  {name}", "commands_per_task", item=name) for name in (*COMMAND_TYPES, "total")),
    ]
    if "commands_note" in summary:
        lines.append(f"    ({summary['commands_note']})")
    lines += [f"  {e['text']}" for e in summary.get("expectations", [])]
    return "\n".join(lines)


def run_command(
    path: Path,
    seed: int | None,
    out_dir: Path | None,
    as_json: bool,
    toxiproxy_bin: Path | None = None,
    toxiproxy_url: str | None = None,
    runtime: str = "processes",
) -> int:
    scenario = load_for_run(path)
    if scenario is None:
        return 2
    chosen = seed if seed is not None else scenario.seed
    target = out_dir or Path("reports") / f"chaos-{scenario.name}-seed{chosen}"

    def say(message: str) -> None:
        print(message, file=sys.stderr if as_json else sys.stdout, flush=True)

    try:
        with _signals_raise():
            summary = run_chaos(
                scenario, chosen, target / "work", toxiproxy_url, toxiproxy_bin, say, runtime
            )
            predicted = prediction(scenario, chosen, first_leader(summary))
    except KeyboardInterrupt:
        if runtime == "containers":
            gone = "every container, network, volume and proxy this run made is removed"
        else:
            gone = "every process and proxy this run started is stopped"
        print(f"interrupted: {gone}", file=sys.stderr)
        return 130
    except (
        ToxiproxyUnavailable,
        ToxiproxyError,
        ChaosError,
        ContainerError,
        NodeFaultsUnavailable,
        ValueError,
    ) as error:
        print(f"goml chaos run: {error}", file=sys.stderr)
        return 2
    summary["simulator"] = {k: predicted.get(k) for k in (*KEY_FIGURES, "error") if k in predicted}
    if "error" in predicted:
        say(f"the simulator failed on this scenario and seed: {predicted['error']}")
    passed = judge(scenario, summary)
    report = write_report(summary, target, comparison=predicted)
    print_summary(summary, _readable(summary), report, target, as_json)
    if not passed:
        print(
            f"FAILED; rerun: goml chaos run {path} --seed {chosen}"
            f"{' --runtime containers' if runtime == 'containers' else ''}  "
            f"(logs: {target / 'work' / 'logs'})",
            file=sys.stderr,
        )
    return 0 if passed else 1
