"""Membership changes on real processes (`goml node run` on loopback, mutual TLS): grow
3 -> 5 under a light submit load, replace a node whose data directory was deleted,
shrink 5 -> 3 (the leader removed first), then check every remaining replica's store:
every acknowledged task there exactly once.

Each node is started with `local.spawn` and stopped by PID (`local.stop_all` on exit,
also when the test fails). Waits poll the cluster with deadlines.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import grpc
import pytest

from goml.client import Client, ClientError, Profile
from goml.cluster import local
from goml.cluster.config import load_node_config
from goml.cluster.inspect import replay_cluster
from goml.cluster.manifest import Manifest
from goml.cluster.membership import Operator, prepare_node

ROOT = Path(__file__).resolve().parent.parent
LEADER_TIMEOUT_S = 30.0
STEP_TIMEOUT_S = 60.0
CATCH_UP_WAIT_S = 60.0


class Submitter(threading.Thread):
    """Submits with unique keys, a few a second (a light load), until stopped; records
    each acknowledged (key, task id) and how long each took."""

    def __init__(self, profile: Profile) -> None:
        super().__init__(name="submitter", daemon=True)
        self.profile = profile
        self.acked: dict[str, str] = {}
        self.latencies_s: list[float] = []
        self.errors: list[str] = []
        self.halt = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        with Client(self.profile, call_timeout_s=2.0, retry_s=30.0) as client:
            n = 0
            while not self.halt.wait(0.02):  # the load's pace, not a synchronisation
                key = f"load-{n}"
                n += 1
                sent = time.monotonic()
                try:
                    task_id = client.submit("matmul", {"n": 2}, idempotency_key=key)
                except ClientError as error:
                    with self.lock:
                        self.errors.append(f"{key}: {error}")
                    continue
                with self.lock:
                    self.acked[key] = task_id
                    self.latencies_s.append(time.monotonic() - sent)

    def count(self) -> int:
        with self.lock:
            return len(self.acked)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.1)  # polling remote processes: nothing local to wait on


def survivors_now(operator: Operator) -> tuple[str, ...]:
    return operator.members().voters


def tasks_of(manifest: Manifest) -> list[tuple[str, str]]:
    return [(t.id, t.idempotency_key) for t in manifest.list_tasks(limit=manifest.limits.tasks_max)]


@pytest.mark.slow
def test_grow_replace_shrink_under_load(tmp_path: Path) -> None:
    layout = local.prepare(tmp_path / "cluster", 3, insecure=False)
    certs = layout.data_dir / "certs"
    template = load_node_config(layout.node_configs["n1"])
    admin = Profile.load(layout.data_dir / "admin-profile.json")
    new_names = ["n4", "n5", "n6"]
    ports = local.free_ports(len(new_names))
    addresses = {n: f"127.0.0.1:{p}" for n, p in zip(new_names, ports, strict=True)}
    # Clients know every address that will ever serve: an operator's profile follows the
    # members (`goml node add` updates it); a dead or removed node is routed around.
    every = {**layout.profile.nodes, **addresses}
    client_profile = replace(layout.profile, nodes=every)
    admin = replace(admin, nodes=every)
    said: list[str] = []
    operator = Operator(admin, STEP_TIMEOUT_S, say=said.append)
    data_dirs = {n: load_node_config(p).data_dir for n, p in layout.node_configs.items()}

    with local.running_cluster(layout) as processes:

        def process(name: str) -> local.Process:
            (found,) = [p for p in processes if p.name == name]
            return found

        def start_new(name: str) -> None:
            data_dirs[name] = layout.data_dir / "nodes" / name
            path = prepare_node(
                certs,
                template,
                name,
                addresses[name],
                data_dirs[name],
                layout.data_dir / "config" / f"{name}.yaml",
                operator.members().addresses,
                [],
            )
            log = layout.data_dir / "logs" / f"{name}.log"
            processes.append(local.spawn(name, local.node_argv(path), log))

        def stop(name: str) -> None:
            proc = process(name).popen
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0, f"{name} did not stop cleanly"

        local.wait_for_leader(client_profile, LEADER_TIMEOUT_S)
        submitter = Submitter(client_profile)
        submitter.start()
        try:
            wait_until(lambda: submitter.count() >= 20, 30.0, "20 acknowledged submits")

            # Grow 3 -> 5: each new node is a learner first, a voter once caught up.
            for name in ("n4", "n5"):
                start_new(name)
                members = operator.add(name, addresses[name], CATCH_UP_WAIT_S)
                assert name in members.voters, members
            members = operator.members()
            assert members.voters == ("n1", "n2", "n3", "n4", "n5"), members
            assert members.learners == (), members
            with Client(admin, call_timeout_s=2.0, retry_s=10.0) as c:
                status = c.status()
                assert {m.id for m in status.members} == set(members.voters)

                def all_caught_up() -> bool:
                    # The leader's view; under the submit load a follower may be an entry
                    # behind at any one instant, so wait for a moment when none is.
                    status = c.status()
                    return all(m.caught_up for m in status.members if m.id != status.leader_id)

                wait_until(all_caught_up, 30.0, "every follower caught up")

            # n2 dies and its data directory is deleted: n6 takes its place.
            mark = submitter.count()
            os.kill(process("n2").popen.pid, signal.SIGKILL)
            process("n2").popen.wait(timeout=10)
            shutil.rmtree(data_dirs["n2"])
            start_new("n6")
            members = operator.replace("n2", "n6", addresses["n6"], CATCH_UP_WAIT_S)
            assert members.voters == ("n1", "n3", "n4", "n5", "n6"), members
            wait_until(lambda: submitter.count() >= mark + 20, 30.0, "20 more submits")

            # Shrink 5 -> 3: the leader first (it hands over and steps down), then one more.
            with Client(admin, call_timeout_s=2.0, retry_s=10.0) as c:
                leader = c.status().leader_id
            assert leader in members.voters
            operator.remove(leader)
            stop(leader)
            other = next(v for v in operator.members().voters if v != leader)
            operator.remove(other)
            stop(other)
            members = operator.members()
            assert len(members.voters) == 3 and leader not in members.voters, members
            assert other not in members.voters, members
            mark = submitter.count()
            wait_until(lambda: submitter.count() >= mark + 20, 30.0, "20 submits after shrink")
            # Only an admin changes membership; a bad request is refused, naming why.
            with Client(client_profile, call_timeout_s=2.0, retry_s=5.0) as c:
                with pytest.raises(ClientError) as refused:
                    c.change_membership("remove", survivors_now(operator)[0])
                assert refused.value.code is grpc.StatusCode.PERMISSION_DENIED
            with Client(admin, call_timeout_s=2.0, retry_s=5.0) as c:
                with pytest.raises(ClientError) as refused:
                    c.change_membership("demote", "n1")
                assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
                assert "unknown membership change 'demote'" in refused.value.detail
                with pytest.raises(ClientError) as refused:
                    c.change_membership("promote", "n3")
                assert refused.value.code is grpc.StatusCode.FAILED_PRECONDITION
                assert "already a voter" in refused.value.detail or "not a learner" in (
                    refused.value.detail
                )
            assert len(survivors_now(operator)) == 3  # nothing changed
        finally:
            submitter.halt.set()
            submitter.join(timeout=60)
        assert not submitter.is_alive()
        assert submitter.errors == [], submitter.errors[:5]
        survivors = list(members.voters)
        with Client(admin, call_timeout_s=2.0, retry_s=10.0) as c:
            target = c.status().commit_index

            def applied_everywhere() -> bool:
                for name in survivors:
                    (me,) = [m for m in c.status(name).members if m.id == name]
                    if me.applied_index < target:
                        return False
                return True

            wait_until(applied_everywhere, 30.0, f"{survivors} to apply {target}")
        for name in survivors:
            stop(name)

    # Each new node went learner first, voter second, each change committed by the leader.
    for name in new_names:
        learner = next(i for i, line in enumerate(said) if f"add-learner {name}: committed" in line)
        voter = next(i for i, line in enumerate(said) if f"promote {name}: committed" in line)
        assert learner < voter, said
    assert any(f"remove {leader}: committed" in line for line in said) or any(
        f"remove {leader}: done" in line for line in said
    ), said
    print("\n".join(said))
    latencies = sorted(submitter.latencies_s)
    p99_ms = latencies[int(len(latencies) * 0.99) - 1] * 1000
    print(
        f"{len(latencies)} submits acknowledged during the changes; p99 {p99_ms:.0f} ms, "
        f"max {latencies[-1] * 1000:.0f} ms (measured under load, load avg "
        f"{os.getloadavg()[0]:.1f})"
    )
    manifests = replay_cluster({n: data_dirs[n] for n in survivors})
    for name, manifest in manifests.items():
        tasks = tasks_of(manifest)
        keys = [key for _, key in tasks if key.startswith("load-")]
        assert len(keys) == len(set(keys)), f"{name}: a key mapped to two tasks"
        ids = dict(tasks)
        missing = sorted(k for k, i in submitter.acked.items() if ids.get(i) != k)
        assert not missing, f"{name}: acknowledged tasks missing: {missing[:10]}"
    reference = tasks_of(manifests[survivors[0]])
    for name, manifest in manifests.items():
        assert tasks_of(manifest) == reference, name


def cli(profile: Path, *args: str) -> tuple[int, str, str]:
    """One `goml` command as a user runs it; (exit code, stdout, stderr)."""
    env = {**os.environ, "GOML_PROFILE": str(profile), "COLUMNS": "200"}
    popen = subprocess.Popen(
        [sys.executable, "-m", "goml", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = popen.communicate(timeout=120)
    finally:
        if popen.poll() is None:
            popen.kill()
            popen.wait()
    return popen.returncode, out, err


@pytest.mark.slow
def test_cli_node_add_status_remove(tmp_path: Path) -> None:
    """`goml node add` writes the new node's certificate and config, adds it as a learner
    and promotes it; `goml status` shows it a caught-up voter; `goml node remove` takes it
    out again; a client (no admin) is refused."""
    layout = local.prepare(tmp_path / "cluster", 3, insecure=False)
    admin = layout.data_dir / "admin-profile.json"
    client = layout.data_dir / "profile.json"
    (port,) = local.free_ports(1)
    address = f"127.0.0.1:{port}"
    config = layout.data_dir / "config" / "n4.yaml"
    with local.running_cluster(layout) as processes:
        local.wait_for_leader(layout.profile, LEADER_TIMEOUT_S)
        code, out, err = cli(
            admin, "node", "add", "n4", "--address", address,
            "--template", str(layout.node_configs["n1"]), "--prepare-only",
        )  # fmt: skip
        assert code == 0, err
        assert f"goml node run --config {config}" in out
        joining = load_node_config(config)
        assert joining.join and joining.node_id == "n4" and joining.listen == address
        assert set(joining.peers) == {"n1", "n2", "n3", "n4"}
        assert joining.tls is not None and joining.tls.cert == layout.data_dir / "certs/n4.pem"
        processes.append(
            local.spawn("n4", local.node_argv(config), layout.data_dir / "logs" / "n4.log")
        )
        code, out, err = cli(admin, "node", "add", "n4", "--address", address, "--wait", "60")
        assert code == 0, err
        assert "add-learner n4: committed" in out and "promote n4: committed" in out, out
        assert Profile.load(admin).nodes["n4"] == address  # the profile follows

        code, out, err = cli(admin, "status")
        assert code == 0, err
        assert "voters n1, n2, n3, n4  learners -" in out, out
        row = next(line for line in out.splitlines() if " n4 " in f" {line} " and address in line)
        assert "yes" in row.split(address, 1)[1], row  # reachable and caught up

        code, out, err = cli(client, "node", "remove", "n4")
        assert code != 0 and "may not call ChangeMembership" in err, err
        code, out, err = cli(admin, "node", "remove", "n4")
        assert code == 0, err
        assert "n4 is no member any more: stop its process" in out
        n4 = next(p for p in processes if p.name == "n4").popen
        n4.send_signal(signal.SIGTERM)
        assert n4.wait(timeout=30) == 0
        code, out, err = cli(admin, "status")
        assert code == 0 and "voters n1, n2, n3  learners -" in out, out
        assert "n4" not in Profile.load(admin).nodes
