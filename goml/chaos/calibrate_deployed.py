"""`goml chaos calibrate --profile FILE --metrics URL...`: the simulator's costs measured
on a cluster that runs somewhere else (deployed with pyinfra, say), through its client
profile and its nodes' Prometheus endpoints, with nothing started or installed there.

Each node exports what this needs (goml.cluster.metrics): its process's CPU
(`goml_process_cpu_seconds`), the inputs its core took by kind (`goml_node_inputs_total`:
append, message, api_call, the kinds the CPU model charges) and its durable writes
(`goml_store_write_seconds`). Over three windows, read before and after each:
- idle: each follower's CPU per Raft message (an idle cluster's inputs are heartbeats
  and their housekeeping) -> `message_ms`; every node's idle CPU rate;
- Status calls to the leader, timed from here: the leader's CPU per API call beyond its
  idle rate -> `api_call_ms`; half of each round trip -> `api_hop_ms` (from this machine:
  run calibrate from a host beside the cluster);
- submits of a trivial task, one at a time: each follower's CPU per APPEND beyond its
  idle rate -> `append_ms` (the cluster's agents run the tasks).
Over all of it: the store's durable writes on every node -> `fsync_ms` (median and p99
interpolated within the histogram's buckets, as Prometheus does); the leader's heartbeat
round trips to each follower (Status `rtt_ms`, a moving average), less the follower's
CPU per message (charged on its own), halved -> `hop_ms`.
Not measured here: `dispatch_ms` (agents export no metrics; `goml chaos calibrate` on an
agent's host measures it) and `cores` (the topology's `capacity.cpu` says each host's).
CPU figures are means per input (a process's CPU cannot be split per message from
outside); the file's comments carry every node's figure.
"""

from __future__ import annotations

import datetime
import math
import statistics
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from goml.chaos.calibrate import MEDIAN_MS_MIN, Cost, Measured, write_costs_file
from goml.client import Client, ClientError, Profile
from goml.proto import api_pb2

SCRAPE_TIMEOUT_S = 5.0
CALL_TIMEOUT_S = 10.0
WARM_UP_CALLS = 20  # channels open and the leader known before anything is timed
IDLE_WINDOW_S = 3.0


class CalibrationError(Exception):
    """A deployed cluster could not be measured: the message says which part and why."""


@dataclass(frozen=True)
class NodeReading:
    """One scrape of one node's metrics endpoint."""

    url: str
    at_s: float  # time.monotonic() when read
    cpu_s: float
    inputs: dict[str, float]  # kind -> count so far
    is_leader: bool
    write_buckets: tuple[tuple[float, float], ...]  # (upper bound s, cumulative count)
    writes: float
    write_seconds: float


@dataclass(frozen=True)
class FromQuantiles:
    """A cost known by its median and p99 only (read from a histogram)."""

    name: str
    p50_ms: float
    p99_ms: float
    how: str

    def distribution(self) -> dict[str, Any]:
        median = max(MEDIAN_MS_MIN, self.p50_ms)
        return {
            "kind": "lognormal",
            "median_ms": round(median, 4),
            "p99_ms": round(max(median, self.p99_ms), 4),
        }

    def comment(self) -> str:
        return f"{self.name}: p50 {self.p50_ms:.3f} p99 {self.p99_ms:.3f} ms ({self.how})"


def _check_url(url: str) -> None:
    if not url.startswith(("http://", "https://")):
        raise CalibrationError(f"metrics endpoint {url!r}: give it as http://HOST:PORT")


def read_node(url: str) -> NodeReading:
    """Scrape `url` (a node's `metrics_listen`, http://HOST:PORT[/metrics])."""
    _check_url(url)
    target = url if url.rstrip("/").endswith("/metrics") else url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(target, timeout=SCRAPE_TIMEOUT_S) as response:
            text = response.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise CalibrationError(f"metrics endpoint {url}: {error}") from error
    at_s = time.monotonic()
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))

    def one(name: str) -> float:
        found = samples.get(name)
        if not found:
            raise CalibrationError(
                f"metrics endpoint {url}: no {name} (is it a goml node of this version?)"
            )
        return found[0][1]

    inputs = {labels["kind"]: value for labels, value in samples.get("goml_node_inputs_total", [])}
    if not inputs:
        one("goml_node_inputs_total")  # raises with the reason
    buckets = tuple(
        sorted(
            (math.inf if labels["le"] == "+Inf" else float(labels["le"]), value)
            for labels, value in samples.get("goml_store_write_seconds_bucket", [])
        )
    )
    return NodeReading(
        url=url,
        at_s=at_s,
        cpu_s=one("goml_process_cpu_seconds"),
        inputs=inputs,
        is_leader=one("goml_raft_is_leader") == 1,
        write_buckets=buckets,
        writes=one("goml_store_write_seconds_count"),
        write_seconds=one("goml_store_write_seconds_sum"),
    )


def bucket_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float:
    """The q-quantile of a histogram given as (upper bound, cumulative count), linear
    within its bucket (Prometheus's histogram_quantile); the last finite bound when it
    falls in the +Inf bucket."""
    assert 0 < q < 1 and buckets, (q, buckets)
    total = buckets[-1][1]
    assert total > 0, "an empty histogram has no quantile"
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (
                count - lower_count
            )
        lower_bound, lower_count = bound, count
    return lower_bound


def _delta_buckets(before: NodeReading, after: NodeReading) -> tuple[tuple[float, float], ...]:
    previous = dict(before.write_buckets)
    return tuple((bound, count - previous.get(bound, 0.0)) for bound, count in after.write_buckets)


def calibrate_deployed(
    out: Path,
    profile: Profile,
    metrics_urls: Sequence[str],
    calls: int = 200,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure the cluster behind `profile` through its nodes' `metrics_urls` (one per
    node, every voter), write the calibration file `out`, return its `costs:`."""
    if len(metrics_urls) < 2:
        raise CalibrationError("give every node's metrics endpoint (--metrics, at least two)")
    for url in metrics_urls:
        _check_url(url)

    def read_all() -> list[NodeReading]:
        return [read_node(url) for url in metrics_urls]

    with Client(profile, call_timeout_s=CALL_TIMEOUT_S, retry_s=30.0) as client:
        try:
            for _ in range(WARM_UP_CALLS):
                client.status()
        except ClientError as error:
            raise CalibrationError(f"the cluster behind the profile: {error}") from error
        first = read_all()
        leaders = [r for r in first if r.is_leader]
        if len(leaders) != 1:
            raise CalibrationError(
                f"{len(leaders)} of the {len(first)} metrics endpoints report leading: give"
                " one endpoint per node of one cluster"
            )
        say(f"idle cluster ({IDLE_WINDOW_S:.0f} s) ...")
        time.sleep(IDLE_WINDOW_S)  # a measurement window of the idle cluster
        idle = read_all()
        rate = [(b.cpu_s - a.cpu_s) / (b.at_s - a.at_s) for a, b in zip(first, idle, strict=True)]

        def beyond_idle(
            before: list[NodeReading], after: list[NodeReading], kind: str
        ) -> list[float]:
            """Per node: CPU ms per input of `kind` beyond the node's idle rate."""
            per_input: list[float] = []
            for a, b, idle_rate in zip(before, after, rate, strict=True):
                count = b.inputs.get(kind, 0.0) - a.inputs.get(kind, 0.0)
                spent_s = b.cpu_s - a.cpu_s - idle_rate * (b.at_s - a.at_s)
                per_input.append(max(0.0, spent_s) * 1000 / count if count > 0 else math.nan)
            return per_input

        say(f"Status calls to the leader ({calls}) ...")
        round_trips_ms: list[float] = []
        heartbeat_rtts_ms: list[float] = []
        for _ in range(calls):
            started = time.perf_counter()
            status = client.status()
            round_trips_ms.append((time.perf_counter() - started) * 1000)
            heartbeat_rtts_ms += [m.rtt_ms for m in status.members if m.rtt_ms > 0]
        called = read_all()
        say(f"submits of a trivial task, one at a time ({calls}) ...")
        run = time.strftime("%Y%m%d%H%M%S")
        for i in range(calls):
            spec = api_pb2.TaskSpec(
                function="matmul", args_json='{"n": 2}', idempotency_key=f"calibrate-{run}-{i}"
            )
            client.submit_specs([spec])
        submitted = read_all()

    leader_at = next(i for i, r in enumerate(first) if r.is_leader)
    followers = [i for i in range(len(first)) if i != leader_at]
    message_ms = [
        (idle[i].cpu_s - first[i].cpu_s)
        * 1000
        / max(1.0, idle[i].inputs.get("message", 0.0) - first[i].inputs.get("message", 0.0))
        for i in followers
    ]
    api_call_ms = beyond_idle(idle, called, "api_call")[leader_at]
    append_ms = [
        x for i, x in enumerate(beyond_idle(called, submitted, "append")) if i in followers
    ]
    if math.isnan(api_call_ms) or all(math.isnan(x) for x in append_ms):
        raise CalibrationError(
            "the nodes counted no API calls or appends: is this the leader's cluster?"
        )
    writes = [_delta_buckets(a, b) for a, b in zip(first, submitted, strict=True)]
    merged: dict[float, float] = {}
    for node_buckets in writes:
        for bound, count in node_buckets:
            merged[bound] = merged.get(bound, 0.0) + count
    buckets = tuple(sorted(merged.items()))
    write_count = sum(b.writes - a.writes for a, b in zip(first, submitted, strict=True))
    if write_count <= 0:
        raise CalibrationError("no durable writes were counted on any node during the submits")
    write_mean_ms = (
        sum(b.write_seconds - a.write_seconds for a, b in zip(first, submitted, strict=True))
        * 1000
        / write_count
    )
    fsync_p50_ms = bucket_quantile(0.5, buckets) * 1000
    fsync_p99_ms = bucket_quantile(0.99, buckets) * 1000
    if not heartbeat_rtts_ms:
        raise CalibrationError("the leader reported no heartbeat round trip to any follower")

    follower_message_ms = statistics.median(message_ms)

    def node_figures(values: Sequence[float]) -> str:
        return ", ".join(f"{first[i].url} {v:.3f}" for i, v in zip(followers, values, strict=True))

    measured: list[Cost] = [
        FromQuantiles(
            "fsync_ms",
            fsync_p50_ms,
            fsync_p99_ms,
            f"the nodes' {write_count:.0f} fsync'd store writes, mean {write_mean_ms:.3f} ms;"
            " p50/p99 within goml_store_write_seconds buckets",
        ),
        Measured(
            "append_ms",
            [x for x in append_ms if not math.isnan(x)],
            f"followers' process CPU per APPEND beyond idle: {node_figures(append_ms)}",
        ),
        Measured(
            "message_ms",
            message_ms,
            f"followers' process CPU per Raft message, idle: {node_figures(message_ms)}",
        ),
        Measured(
            "api_call_ms",
            [api_call_ms],
            f"the leader's ({first[leader_at].url}) process CPU per API call beyond idle",
        ),
        Measured(
            "api_hop_ms",
            [x / 2 for x in round_trips_ms],
            "half a Status round trip from this machine to the leader",
        ),
        Measured(
            "hop_ms",
            # A round trip holds the follower's work on the heartbeat, which the
            # simulator charges as message_ms on its own: taken out before halving.
            [max(MEDIAN_MS_MIN, (x - follower_message_ms) / 2) for x in heartbeat_rtts_ms],
            "half of each heartbeat round trip of the leader to a follower (moving averages)"
            f" less the follower's {follower_message_ms:.3f} ms of CPU per message",
        ),
    ]
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    where = f"the cluster of {len(metrics_urls)} nodes at {', '.join(metrics_urls)}, {when}"
    notes = [
        "not measured on a deployed cluster: dispatch_ms (agents export no metrics) and"
        " cores (each topology node is a host of its capacity.cpu)",
        f"idle CPU rate per node: {', '.join(f'{r.url} {x * 100:.2f} %' for r, x in zip(first, rate, strict=True))}",
        f"API round trips: median {statistics.median(round_trips_ms):.3f} ms",
    ]
    return write_costs_file(out, measured, notes, where, cores=None, say=say)
