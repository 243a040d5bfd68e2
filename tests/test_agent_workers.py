"""Warm workers and batched reports on a real cluster (issue 12): 3 node processes and
agent processes on loopback, mutual TLS, started by `goml.cluster.local` as
`goml cluster up` does (tests/test_agent_integration.py's `live_cluster`).

  * kill -9 of a worker process mid-task: the task is retried and succeeds, the agent
    stays up and runs the next task in a new worker;
  * a task whose peak memory passes the agent's `worker_memory_mb_max`: it succeeds, and
    the worker that ran it is replaced;
  * kill -9 of the leader while reports are being committed in batches: every task ends
    SUCCEEDED with its result recorded exactly once on every replica.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from goml.agent.runtime import AgentConfig
from goml.cluster import inspect as cluster_inspect
from goml.cluster.commands import ReportResults, decode_command
from goml.raft.types import EntryKind
from tests.test_agent_integration import (
    live_cluster,
    spec,
    state_name,
    task_processes,
    wait_until,
)

pytestmark = pytest.mark.slow

WORKER_MEMORY_MB_MAX = 256  # a worker starts near 40 MiB; the leaky task takes 400
POOL_SIZE = AgentConfig.model_fields["tasks_running_max"].default  # the agents' default


def warm_pool(agent_pid: int) -> list[int]:
    """The agent's worker processes once its pool is full (it starts them all at start,
    one after another): the one running a task is among them."""
    wait_until(f"{POOL_SIZE} warm workers", lambda: len(task_processes(agent_pid)) == POOL_SIZE, 30)
    return task_processes(agent_pid)


def test_kill_9_of_a_worker_mid_task_retries_it_and_the_agent_carries_on(
    tmp_path: Path,
) -> None:
    with live_cluster(tmp_path, agents=1) as cluster:
        client = cluster.client
        agent = cluster.process("agent-1")
        [task_id] = client.submit_specs([spec("sleep_ms", {"ms": 3000}, max_attempts=3)])
        wait_until("the task runs", lambda: state_name(client.get(task_id)) == "RUNNING", 30)
        workers = warm_pool(agent.popen.pid)
        for pid in workers:  # the busy one among them; idle ones are replaced as well
            os.kill(pid, signal.SIGKILL)
        done = cluster.wait_all([task_id], timeout_s=60)[task_id]
        assert state_name(done) == "SUCCEEDED", done.error
        assert done.attempts == 2, "the killed run counts as a failed attempt, then a retry"
        assert json.loads(done.result_json) == {"slept_ms": 3000}
        assert agent.popen.poll() is None, "the agent process survived its worker"
        assert cluster.alive_agents() == {"agent-1"}
        [after] = client.submit_specs([spec("matmul", {"n": 3, "m": 3, "k": 3, "seed": 1})])
        assert state_name(cluster.wait_all([after], timeout_s=30)[after]) == "SUCCEEDED"
        assert not set(task_processes(agent.popen.pid)) & set(workers), "the killed stay gone"


def test_a_task_past_the_worker_memory_limit_gets_its_worker_replaced(tmp_path: Path) -> None:
    def small_workers(path: Path) -> None:
        body = yaml.safe_load(path.read_text())
        body["worker_memory_mb_max"] = WORKER_MEMORY_MB_MAX
        path.write_text(yaml.safe_dump(body, sort_keys=False))

    with live_cluster(tmp_path, agents=1, agent_config=small_workers) as cluster:
        client = cluster.client
        agent = cluster.process("agent-1")
        tiny = spec("matmul", {"n": 3, "m": 3, "k": 3, "seed": 1})
        [first] = client.submit_specs([tiny])
        assert state_name(cluster.wait_all([first], timeout_s=30)[first]) == "SUCCEEDED"
        warm = set(warm_pool(agent.popen.pid))
        [leaky] = client.submit_specs([spec("allocate_mb", {"mb": 400})])
        done = cluster.wait_all([leaky], timeout_s=60)[leaky]
        assert state_name(done) == "SUCCEEDED" and done.attempts == 1, done.error
        assert json.loads(done.result_json) == {"allocated_mb": 400}
        # The worker that ran it (one of the warm ones) is killed after its task; the
        # others stay.
        wait_until(
            "the worker that ran it is replaced",
            lambda: len(warm - set(task_processes(agent.popen.pid))) == 1,
            30,
        )
        [after] = client.submit_specs([spec("matmul", {"n": 3, "m": 3, "k": 3, "seed": 2})])
        assert state_name(cluster.wait_all([after], timeout_s=30)[after]) == "SUCCEEDED"
        assert agent.popen.poll() is None


def test_kill_9_of_the_leader_during_batched_reports_records_each_result_once(
    tmp_path: Path,
) -> None:
    work = [("sleep_ms", {"ms": 20 + (i % 7) * 10}) for i in range(120)]
    with live_cluster(tmp_path) as cluster:
        client = cluster.client
        ids = client.submit_specs([spec(f, a, cpu=0.25) for f, a in work])

        def reports_flowing() -> bool:
            counts = client.status().tasks_by_state
            return counts.get("SUCCEEDED", 0) >= 30

        wait_until("30 tasks reported", reports_flowing, 60)
        old_leader = cluster.leader()
        cluster.kill9(old_leader)
        done = cluster.wait_all(ids, timeout_s=120)
        assert all(state_name(t) == "SUCCEEDED" for t in done.values()), [
            (t.id, t.error) for t in done.values() if state_name(t) != "SUCCEEDED"
        ]
        results = {task_id: done[task_id].result_json for task_id in ids}
        cluster.restart_node(old_leader)
        cluster.wait_replicas_caught_up(timeout_s=60)
        data_dirs = cluster.data_dirs()
    # Every process is stopped: replay each node's store.
    manifests = cluster_inspect.replay_cluster(data_dirs)
    assert sorted(manifests) == ["n1", "n2", "n3"]
    for name, manifest in manifests.items():
        for task_id, result_json in results.items():
            task = manifest.get_task(task_id)
            assert task is not None, (name, task_id)
            assert task.state.value == "SUCCEEDED", (name, task_id, task.state)
            assert task.results_recorded == 1, (name, task_id)
            assert task.result_json == result_json, (name, task_id)
    # The reports really went in batches: some ReportResults carried several results.
    image = cluster_inspect.read_store(data_dirs[old_leader])
    batch_sizes = [
        len(command.reports)
        for entry in image.persisted.entries
        if entry.kind is EntryKind.NORMAL
        and isinstance(command := decode_command(entry.data), ReportResults)
    ]
    assert batch_sizes and max(batch_sizes) >= 2, batch_sizes
