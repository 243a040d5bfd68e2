"""The shared retry policy's hedge target (`goml.api.retry.RetryPolicy.hedge_target`),
sans-IO: where a copy of a silent call goes, by failure domain (issue 11, item 5).

The one-way partition of scenarios/chaos/one-way-partition.yaml: every
message from GCP to the leader is dropped. The client beside gcp-1 cannot reach the
leader; gcp-2 cannot either, so a copy hedged to gcp-2 is held there (its forward is
never answered) until the call's deadline. Nodes in name order, as goml.client.Client
orders a profile's.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest

from goml.api.retry import UNREACHABLE_MS, Attempt, RetryConfig, RetryPolicy
from goml.api.types import ErrorKind
from goml.scenario.loader import load_scenario
from goml.scenario.player import client_domains, client_retry_config

NODES = ("aws-2", "aws-3", "azure-1", "azure-2", "gcp-2")
CLOUDS = {"aws-2": "aws", "aws-3": "aws", "azure-1": "azure", "azure-2": "azure", "gcp-2": "gcp"}
ROOT = Path(__file__).resolve().parent.parent


def policy(domains: dict[str, str] | None, home: str) -> RetryPolicy:
    config = RetryConfig(
        nodes=NODES,
        call_timeout_ms=1000,
        redirects_max=len(NODES),
        backoff_ms_min=20,
        backoff_ms_max=500,
        give_up_after_ms=30_000,
        retry_unauthenticated=False,
        unreachable_ms=UNREACHABLE_MS,
        hedge_after_ms=300,
        domains=tuple(domains[n] for n in NODES) if domains else (),
        home_domain=home,
    )
    return RetryPolicy(config, random.Random(1), start=NODES[0])


def test_a_silent_leader_is_hedged_to_a_third_domain_not_the_callers() -> None:
    gcp_client = policy(CLOUDS, home="gcp")
    # Leader azure-2 silent: the next node in order is gcp-2, cut off from the leader as
    # the caller is; aws-2 (neither azure nor gcp) reaches the leader over other links.
    assert gcp_client.hedge_target("azure-2", now_ms=0) == "aws-2"
    # Leader azure-1: aws-2 again, before azure-2 (the silent node's own domain).
    assert gcp_client.hedge_target("azure-1", now_ms=0) == "aws-2"
    # Leader aws-3: the third domain is azure.
    assert gcp_client.hedge_target("aws-3", now_ms=0) == "azure-1"


def test_without_domains_the_hedge_takes_the_next_node_in_order() -> None:
    plain = policy(None, home="")
    assert plain.hedge_target("azure-2", now_ms=0) == "gcp-2"
    assert plain.hedge_target("azure-1", now_ms=0) == "azure-2"


def test_the_silent_nodes_domain_comes_before_the_callers() -> None:
    gcp_client = policy(CLOUDS, home="gcp")
    for node in ("aws-2", "aws-3"):  # every aws node unreachable lately: avoided
        gcp_client.failed(Attempt(0), node, ErrorKind.DEADLINE, "", now_ms=0)
    assert gcp_client.hedge_target("azure-1", now_ms=1) == "azure-2"
    gcp_client.failed(Attempt(0), "azure-2", ErrorKind.DEADLINE, "", now_ms=1)
    # Only the caller's own domain is left: better a copy there than none.
    assert gcp_client.hedge_target("azure-1", now_ms=2) == "gcp-2"


def test_a_caller_in_the_leaders_domain_hedges_to_another_domain() -> None:
    aws_client = policy(CLOUDS, home="aws")
    assert aws_client.hedge_target("aws-2", now_ms=0) == "azure-1"


def test_domains_must_match_the_nodes() -> None:
    with pytest.raises(ValueError, match="2 domains for 5 nodes"):
        RetryConfig(
            nodes=NODES,
            call_timeout_ms=1000,
            redirects_max=1,
            backoff_ms_min=20,
            backoff_ms_max=500,
            give_up_after_ms=None,
            retry_unauthenticated=False,
            unreachable_ms=UNREACHABLE_MS,
            hedge_after_ms=300,
            domains=("aws", "gcp"),
        )


def test_scenario_clients_order_and_place_nodes_as_the_real_client_does() -> None:
    """The simulator's client and goml.client.Client (the chaos runner's) run the same
    policy: the control nodes in name order, each with its cloud, and the client's."""
    scenario = load_scenario(ROOT / "scenarios" / "one-way-partition.yaml").scenario
    control = tuple(n.name for n in scenario.topology.control_nodes)
    assert control != tuple(sorted(control))  # topology order is not name order here
    domains, home = client_domains(scenario, "gcp-1")
    config = client_retry_config(control, domains, home)
    assert config.nodes == tuple(sorted(control))
    assert config.domains == ("aws", "aws", "aws", "azure", "azure", "gcp", "gcp")
    assert config.home_domain == "gcp"


def test_a_node_that_failed_lately_comes_last_once_no_longer_avoided() -> None:
    gcp_client = policy(CLOUDS, home="gcp")
    # The leader azure-1 timed out from here: the cut began. The calls go through a
    # follower since; one of them is slow, and its copy must not go to azure-1, which
    # is no longer avoided after UNREACHABLE_MS but still across the cut.
    gcp_client.failed(Attempt(0), "azure-1", ErrorKind.DEADLINE, "", now_ms=0)
    later = UNREACHABLE_MS + 5_000
    assert gcp_client.hedge_target("aws-2", now_ms=later) == "azure-2"
    # Unknown domains: the next node in order, skipping the one that failed lately.
    plain = policy(None, home="")
    plain.failed(Attempt(0), "aws-3", ErrorKind.DEADLINE, "", now_ms=0)
    assert plain.hedge_target("aws-2", now_ms=later) == "azure-1"


def test_the_domain_decides_before_a_failure_lately() -> None:
    gcp_client = policy(CLOUDS, home="gcp")
    # The leader aws-2 timed out at the cut; under load the azure nodes were outpaced
    # once each (slow, not cut off): all three are marked failed lately, gcp-2 is not.
    # A copy of a slow call to the follower aws-3 still goes to azure, not to gcp-2
    # (cut off from the leader as the caller is). Seen in a real run, seed 1.
    gcp_client.failed(Attempt(0), "aws-2", ErrorKind.DEADLINE, "", now_ms=0)
    gcp_client.outpaced("azure-1", now_ms=0)
    gcp_client.outpaced("azure-2", now_ms=0)
    later = UNREACHABLE_MS + 5_000
    assert gcp_client.hedge_target("aws-3", now_ms=later) == "azure-1"


def test_calls_caught_by_a_cut_are_stranded_once_one_of_them_is_outpaced() -> None:
    # Three submits to the leader aws-2 went out at 0, 200 and 400 ms, and a cut swallows
    # them all. The first one's hedged copy answers at 450 ms: aws-2 is outpaced, so the
    # two still waiting are stranded (hedged now, not at 500 and 700 ms). A call sent
    # after the lesson is not stranded (it went elsewhere), nor is one to another node,
    # nor anything once aws-2 is no longer avoided.
    gcp_client = policy(CLOUDS, home="gcp")
    assert not gcp_client.stranded("aws-2", sent_ms=200, now_ms=440)  # nothing learnt yet
    gcp_client.outpaced("aws-2", now_ms=450)
    assert gcp_client.stranded("aws-2", sent_ms=200, now_ms=450)
    assert gcp_client.stranded("aws-2", sent_ms=400, now_ms=450)
    assert not gcp_client.stranded("aws-2", sent_ms=460, now_ms=470)
    assert not gcp_client.stranded("aws-3", sent_ms=200, now_ms=450)
    assert not gcp_client.stranded("aws-2", sent_ms=200, now_ms=450 + UNREACHABLE_MS)


def test_a_timeout_strands_the_other_calls_to_that_node_and_no_hedging_none() -> None:
    gcp_client = policy(CLOUDS, home="gcp")
    gcp_client.failed(Attempt(0), "aws-2", ErrorKind.DEADLINE, "", now_ms=1000)
    assert gcp_client.stranded("aws-2", sent_ms=600, now_ms=1000)
    unhedged = RetryPolicy(
        dataclasses.replace(gcp_client.config, hedge_after_ms=None), random.Random(1), "aws-2"
    )
    unhedged.failed(Attempt(0), "aws-2", ErrorKind.DEADLINE, "", now_ms=1000)
    assert not unhedged.stranded("aws-2", sent_ms=600, now_ms=1000)
