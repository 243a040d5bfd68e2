"""End to end: the real pyinfra deploy over real SSH to five systemd-nspawn hosts (systemd
as PID 1, real sshd), then faults: kill -9, reboot, a host cut off by its veth link, a
rolling upgrade under load; then membership changes from the inventory: one host
replaced by a freshly provisioned one under load, a sixth host added.

Runs only with GOML_LAB=1 (`nox -s deploy_lab`), as root; skipped with the reason
otherwise. Everything the lab creates is torn down by PID and name, also on failure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

from goml.client import Client, ClientError, Profile
from goml.proto import api_pb2

pytestmark = [pytest.mark.lab, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
PYINFRA_DIR = REPO / "pyinfra"
INVENTORY = PYINFRA_DIR / "inventories" / "lab.py"
FAILOVER_BOUND_S = 5.0
T = TypeVar("T")


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, PYINFRA_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def wait_for(condition: Callable[[], T | None], timeout_s: float, what: str) -> T:
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except (ClientError, OSError) as error:
            last_error = error
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout_s:g} s waiting for {what} ({last_error})"
            )
        time.sleep(0.2)  # polling interval of a condition with a deadline


def snapshot_source(directory: Path, version: str | None = None) -> Path:
    """The goml release being deployed: a copy of the sources (optionally with another
    version), so edits to the working tree during the test change nothing."""
    shutil.copytree(REPO / "goml", directory / "goml", ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (REPO / "pyproject.toml").read_text()
    if version is not None:
        assert 'version = "0.1.0"' in pyproject
        pyproject = pyproject.replace('version = "0.1.0"', f'version = "{version}"')
    (directory / "pyproject.toml").write_text(pyproject)
    return directory


@dataclass
class Deployed:
    lab: Any
    first_run: subprocess.CompletedProcess[str]
    first_run_s: float
    names: tuple[str, ...]  # the deployed hosts (five, until the membership tests)
    # What every later deploy passes: the release the hosts run (after the rolling
    # upgrade: its source and version) and the inventory's state (hosts left out).
    source: Path | None = None
    data: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    @property
    def certs(self) -> Path:
        return Path(self.lab.dir) / "cluster-state" / "certs"

    def profile(self) -> Profile:
        return Profile(
            nodes={name: f"{self.lab.hosts[name].address}:7000" for name in self.names},
            token=(self.certs / "client.token").read_text().strip(),
            ca=self.certs / "ca.pem",
            cert=self.certs / "client.pem",
            key=self.certs / "client.key",
        )

    def client(self, call_timeout_s: float = 1.0, retry_s: float = 15.0) -> Client:
        return Client(self.profile(), call_timeout_s=call_timeout_s, retry_s=retry_s)

    def ssh(self, name: str, command: str, check: bool = True, timeout_s: float = 60.0) -> str:
        import paramiko

        host = self.lab.hosts[name]
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        try:
            client.connect(
                host.address,
                username="root",
                key_filename=str(self.lab.key),
                look_for_keys=False,
                allow_agent=False,
                timeout=5,
            )
            _, stdout, stderr = client.exec_command(command, timeout=timeout_s)
            out = stdout.read().decode()
            status = stdout.channel.recv_exit_status()
            if check and status != 0:
                raise AssertionError(
                    f"{name}: `{command}` exited {status}: {stderr.read().decode()}"
                )
            return out.strip()
        except (paramiko.SSHException, OSError) as error:
            if check:
                raise
            return f"ssh error: {error}"
        finally:
            client.close()

    def pyinfra(
        self, *args: str, env: dict[str, str] | None = None, timeout_s: float = 900
    ) -> subprocess.CompletedProcess[str]:
        source = {"GOML_SOURCE_DIR": str(self.source)} if self.source else {}
        return run_pyinfra(
            self.lab,
            *self.data,
            *args,
            env={**source, **self.env, **(env or {})},
            timeout_s=timeout_s,
        )

    def main_pids(self) -> dict[tuple[str, str], str]:
        pids = {}
        for name in self.names:
            for service in ("goml-node", "goml-agent"):
                pids[(name, service)] = self.ssh(
                    name, f"systemctl show -p MainPID --value {service}"
                )
        return pids

    def healthy(self) -> api_pb2.StatusResponse | None:
        """The leader's status when every member is reachable and every agent alive."""
        with self.client() as client:
            status = client.status()
        members_ok = all(m.reachable or m.role == "leader" for m in status.members)
        alive = {a.id for a in status.agents if a.state == "ALIVE"}
        agents_ok = {f"{name}-agent" for name in self.names} <= alive
        return status if status.leader_id and members_ok and agents_ok else None


def run_pyinfra(
    lab: Any, *args: str, env: dict[str, str] | None = None, timeout_s: float = 900
) -> subprocess.CompletedProcess[str]:
    full_env = {
        **os.environ,
        "GOML_LAB_STATE": str(lab.state_path),
        "GOML_SOURCE_DIR": str(Path(lab.dir) / "source"),
        **(env or {}),
    }
    command = [
        sys.executable,
        "-m",
        "pyinfra",
        "-y",
        str(INVENTORY),
        str(PYINFRA_DIR / "deploy.py"),
    ]
    return subprocess.run(
        [*command, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # pyinfra logs to stderr; one stream keeps the order
        text=True,
        env=full_env,
        cwd=REPO,
        timeout=timeout_s,
        check=False,
    )


def results(output: str) -> dict[str, tuple[int, int]]:
    """pyinfra's results table: operation name -> (hosts changed, hosts unchanged)."""
    rows: dict[str, tuple[int, int]] = {}
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if "--> Results:" in line)
    for line in lines[start + 2 :]:
        cells = [c for c in line.strip().split("  ") if c.strip()]
        if len(cells) < 5 or cells[0].strip() == "Grand total":
            if cells and cells[0].strip() == "Grand total":
                break
            continue
        name = cells[0].strip()
        changed, unchanged = cells[-3].strip(), cells[-1].strip()
        rows[name] = (
            0 if changed == "-" else int(changed),
            0 if unchanged == "-" else int(unchanged),
        )
    return rows


READ_ONLY_OPERATIONS = ("goml: measure latency", "goml: verify")


def changed_operations(output: str) -> dict[str, int]:
    return {
        name: changed
        for name, (changed, _) in results(output).items()
        if changed and not name.startswith(READ_ONLY_OPERATIONS)
    }


def _skip_reason() -> str | None:
    if os.environ.get("GOML_LAB") != "1":
        return "the lab boots five containers as root: run `nox -s deploy_lab` (sets GOML_LAB=1)"
    if importlib.util.find_spec("pyinfra.api") is None:
        return "pyinfra is not installed (nox -s deploy_lab installs it)"
    lab_module = _load("lab")
    reason: str | None = lab_module.unavailable_reason()
    return reason


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployed]:
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    lab_module = _load("lab")
    lab = lab_module.Lab(tmp_path_factory.mktemp("lab"))
    try:
        snapshot_source(Path(lab.dir) / "source")
        started = time.monotonic()
        lab.up()
        print(f"lab: 5 hosts up in {time.monotonic() - started:.1f} s (rootfs cached)")
        started = time.monotonic()
        first = run_pyinfra(lab)
        elapsed = time.monotonic() - started
        print(f"lab: fresh deploy in {elapsed:.1f} s")
        assert first.returncode == 0, f"deploy failed:\n{first.stdout[-6000:]}"
        yield Deployed(lab, first, elapsed, tuple(lab.hosts))
    finally:
        problems = lab.down()
        assert not problems, f"lab teardown problems: {problems}"


# ---------------------------------------------------------------------- the deploy


def test_fresh_deploy_verified_leader_agents_and_latency(deployed: Deployed) -> None:
    out = deployed.first_run.stdout
    assert "goml: leader " in out and "5 members, 5 agents alive" in out, out[-4000:]
    assert "TCP round trip in ms" in out
    for name in deployed.names:
        assert any(line.strip().startswith(name) and "[<" in line for line in out.splitlines())
    changed = changed_operations(out)
    assert changed.get("goml: install goml==0.1.0 from the wheelhouse") == 5
    assert changed.get("goml: goml-node running and enabled") == 5


def test_health_answers_on_every_host_address(deployed: Deployed) -> None:
    with deployed.client() as client:
        leaders = {client.status(node_id=name).leader_id for name in deployed.names}
        assert len(leaders) == 1 and leaders != {""}, leaders
        task_id = client.submit("matmul", {"n": 8})
        task = client.wait(task_id, 60)
    assert task.state == api_pb2.SUCCEEDED, task


def test_calibrate_measures_the_deployed_hosts(deployed: Deployed, tmp_path: Path) -> None:
    # Issue 14: `goml chaos calibrate` against a pyinfra-deployed cluster, through its
    # client profile and its nodes' metrics (goml_metrics_port, 9100 by default).
    profile_path = tmp_path / "profile.json"
    deployed.profile().save(profile_path)
    urls = [f"http://{deployed.lab.hosts[name].address}:9100" for name in deployed.names]
    out = tmp_path / "lab-costs.yaml"
    command = [sys.executable, "-m", "goml", "chaos", "calibrate", "--out", str(out)]
    command += ["--profile", str(profile_path), "--hop-samples", "50"]
    for url in urls:
        command += ["--metrics", url]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    from goml.scenario.loader import load_scenario

    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        "name: lab\nduration_s: 5\ncosts_file: lab-costs.yaml\n"
        "workload:\n  clients: [{name: c, node: aws-1}]\n  rate_per_s: 1\n  stop_s: 4\n"
        "  mix: {matmul: {args: {n: 8}}}\n"
    )
    costs = load_scenario(scenario).scenario.costs
    assert costs is not None and costs.cores is None
    for distribution in (costs.fsync_ms, costs.append_ms, costs.message_ms, costs.hop_ms):
        assert distribution is not None and 0 < distribution.expected_ms() < 10_000
    text = out.read_text()
    assert all(url in text for url in urls), text[:2000]
    print(text)  # the lab's figures, in the session's log


def test_services_active_enabled_and_secrets_private(deployed: Deployed) -> None:
    for name in deployed.names:
        assert deployed.ssh(name, "systemctl is-active goml-node goml-agent").split() == [
            "active",
            "active",
        ]
        assert deployed.ssh(name, "systemctl is-enabled goml-node goml-agent").split() == [
            "enabled",
            "enabled",
        ]
        modes = deployed.ssh(
            name,
            "stat -c '%n %a %U' /etc/goml/tls/cluster.secret /etc/goml/tls/node.key /var/lib/goml",
        ).splitlines()
        assert modes == [
            "/etc/goml/tls/cluster.secret 600 goml",
            "/etc/goml/tls/node.key 600 goml",
            "/var/lib/goml 700 goml",
        ]
        assert (
            deployed.ssh(name, "/opt/goml/venv/bin/python -c 'import sys; print(sys.base_prefix)'")
            == "/usr"
        )
    secret = (deployed.certs / "cluster.secret").read_text().strip()
    assert secret not in deployed.first_run.stdout


def test_second_run_changes_nothing(deployed: Deployed) -> None:
    started = time.monotonic()
    second = deployed.pyinfra()
    print(f"lab: repeat deploy in {time.monotonic() - started:.1f} s")
    assert second.returncode == 0, second.stdout[-4000:]
    assert changed_operations(second.stdout) == {}
    assert results(second.stdout)["goml: install goml==0.1.0 from the wheelhouse"] == (0, 5)


def test_one_changed_setting_restarts_only_that_agent(deployed: Deployed) -> None:
    before = deployed.main_pids()
    run = deployed.pyinfra(
        env={"GOML_LAB_OVERRIDES": json.dumps({"gcp-2": {"goml_capacity_cpu": 2.0}})}
    )
    assert run.returncode == 0, run.stdout[-4000:]
    assert changed_operations(run.stdout) == {
        "goml: agent config": 1,
        "goml: restart goml-agent (its inputs changed)": 1,
    }
    after = deployed.main_pids()
    moved = sorted(key for key in before if before[key] != after[key])
    assert moved == [("gcp-2", "goml-agent")], moved

    def registered_with_two_cpus() -> bool:
        with deployed.client() as client:
            agents = {a.id: a for a in client.status().agents}
        agent = agents.get("gcp-2-agent")
        return agent is not None and agent.capacity.cpu == 2.0 and agent.state == "ALIVE"

    wait_for(registered_with_two_cpus, 30, "gcp-2-agent to re-register with cpu 2")


# ---------------------------------------------------------------------- faults


def test_kill_9_of_the_node_is_restarted_by_systemd(deployed: Deployed) -> None:
    name = "aws-1"
    old_pid = deployed.ssh(name, "systemctl show -p MainPID --value goml-node")
    restarts = int(deployed.ssh(name, "systemctl show -p NRestarts --value goml-node"))
    assert old_pid not in ("", "0")
    deployed.ssh(name, f"kill -9 {old_pid}")

    def restarted() -> bool:
        pid = deployed.ssh(name, "systemctl show -p MainPID --value goml-node")
        active = deployed.ssh(name, "systemctl is-active goml-node", check=False)
        return pid not in ("", "0", old_pid) and active == "active"

    wait_for(restarted, 30, "systemd to restart goml-node")
    assert int(deployed.ssh(name, "systemctl show -p NRestarts --value goml-node")) == restarts + 1
    wait_for(deployed.healthy, 30, "the cluster to be healthy again")


def test_link_down_fails_over_within_bound_and_host_rejoins(deployed: Deployed) -> None:
    status = wait_for(deployed.healthy, 30, "a healthy cluster")
    old_leader = status.leader_id
    client = deployed.client(call_timeout_s=1.0, retry_s=FAILOVER_BOUND_S * 3)
    try:
        deployed.lab.link(old_leader, up=False)
        cut = time.monotonic()
        task_id = client.submit("matmul", {"n": 4}, idempotency_key=str(uuid.uuid4()))
        failover_s = time.monotonic() - cut
        new_leader = client.status().leader_id
    finally:
        deployed.lab.link(old_leader, up=True)
        client.close()
    print(
        f"lab: {old_leader} cut off; submit acknowledged after {failover_s:.2f} s by {new_leader}"
    )
    assert failover_s < FAILOVER_BOUND_S
    assert new_leader and new_leader != old_leader

    def rejoined() -> bool:
        healthy = deployed.healthy()
        if healthy is None:
            return False
        with deployed.client() as local:
            view = local.status(node_id=old_leader)
        return (
            view.leader_id == healthy.leader_id and view.commit_index >= healthy.commit_index - 100
        )

    wait_for(rejoined, 60, f"{old_leader} to rejoin after its link returned")
    with deployed.client() as check:
        assert check.wait(task_id, 60).state == api_pb2.SUCCEEDED


def test_reboot_brings_services_back_with_data_kept(deployed: Deployed) -> None:
    name = "gcp-1"
    with deployed.client() as client:
        task_id = client.submit("matmul", {"n": 8})
        assert client.wait(task_id, 60).state == api_pb2.SUCCEEDED
        applied = client.status(node_id=name).commit_index
    inode = deployed.ssh(name, "stat -c %i /var/lib/goml/raft/raft.sqlite3")
    boot_id = deployed.ssh(
        name,
        "cat /proc/sys/kernel/random/boot_id; systemctl show -p ActiveEnterTimestampMonotonic --value goml-node",
    )
    started = time.monotonic()
    deployed.lab.reboot(name, deployed.ssh)
    wait_for(
        lambda: (
            deployed.ssh(name, "systemctl is-active goml-node goml-agent", check=False).split()
            == ["active", "active"]
        ),
        60,
        f"services on {name} after the reboot",
    )
    print(f"lab: {name} rebooted, services active after {time.monotonic() - started:.1f} s")
    assert (
        deployed.ssh(
            name,
            "cat /proc/sys/kernel/random/boot_id; systemctl show -p ActiveEnterTimestampMonotonic --value goml-node",
        )
        != boot_id
    )
    assert deployed.ssh(name, "stat -c %i /var/lib/goml/raft/raft.sqlite3") == inode
    wait_for(deployed.healthy, 60, "the cluster to be healthy after the reboot")
    with deployed.client() as client:
        assert client.status(node_id=name).commit_index >= applied
        assert client.get(task_id).state == api_pb2.SUCCEEDED


def test_unreachable_host_stops_the_deploy_before_any_change(deployed: Deployed) -> None:
    extra = [{"name": "gcp-3", "cloud": "gcp", "region": "us-central1", "address": "10.200.0.99"}]
    before = deployed.main_pids()
    run = deployed.pyinfra(env={"GOML_LAB_EXTRA": json.dumps(extra)}, timeout_s=120)
    assert run.returncode != 0
    output = run.stdout
    assert "unreachable host(s): gcp-3" in output, output[-3000:]
    assert "--> Results:" not in output  # no operation ran
    assert deployed.main_pids() == before


# ------------------------------------------------------- Docker on the same machine


def _sh(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)


def _forward_policy() -> str:
    first = _sh("iptables", "-w", "-S", "FORWARD").stdout.splitlines()[0]  # "-P FORWARD ACCEPT"
    return first.split()[-1]


BRIDGE_NF = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")


@contextlib.contextmanager
def dockers_firewall() -> Iterator[None]:
    """The state dockerd leaves (FORWARD policy DROP, bridged frames through iptables),
    made here whether or not dockerd has run, and put back as it was afterwards."""
    policy = _forward_policy()
    bridge_nf = BRIDGE_NF.read_text().strip() if BRIDGE_NF.exists() else None
    try:
        assert _sh("iptables", "-w", "-P", "FORWARD", "DROP").returncode == 0
        if bridge_nf is not None:
            BRIDGE_NF.write_text("1\n")
        yield
    finally:
        _sh("iptables", "-w", "-P", "FORWARD", policy)
        if bridge_nf is not None:
            BRIDGE_NF.write_text(f"{bridge_nf}\n")


def node_ports_from(deployed: Deployed, source: str) -> dict[str, str]:
    """TCP to every other host's node port (7000), from `source`, as the deploy checks it."""
    targets = {
        name: f"{deployed.lab.hosts[name].address}:7000"
        for name in deployed.names
        if name != source
    }
    script = (
        "import json, socket, sys\n"
        "out = {}\n"
        "for name, target in json.loads(sys.argv[1]).items():\n"
        "    host, _, port = target.rpartition(':')\n"
        "    try:\n"
        "        socket.create_connection((host, int(port)), timeout=2).close(); out[name] = 'ok'\n"
        "    except OSError as error:\n"
        "        out[name] = type(error).__name__\n"
        "print(json.dumps(out))\n"
    )
    command = f"python3 -c {shlex.quote(script)} {shlex.quote(json.dumps(targets))}"
    result: dict[str, str] = json.loads(deployed.ssh(source, command))
    return result


def test_the_bridge_carries_the_cluster_under_dockers_firewall(deployed: Deployed) -> None:
    """Once dockerd has run, FORWARD drops by default and bridged frames are filtered: the
    lab's own ACCEPT rules (recorded in lab.json, removed at teardown) keep it working."""
    rules = deployed.lab.created["iptables"]
    assert [rule[0] for rule in rules][:1] == ["FORWARD"], rules
    for chain, *rule in rules:
        assert _sh("iptables", "-w", "-C", chain, *rule).returncode == 0, (chain, rule)
    with dockers_firewall():
        assert _forward_policy() == "DROP"
        for name in deployed.names:
            assert set(node_ports_from(deployed, name).values()) == {"ok"}, name
        wait_for(deployed.healthy, 30, "a healthy cluster under Docker's firewall")
        with deployed.client() as client:
            task_id = client.submit("matmul", {"n": 4}, idempotency_key=str(uuid.uuid4()))
            assert client.wait(task_id, 60).state == api_pb2.SUCCEEDED


def test_a_blocked_pair_is_named_by_the_deploy_check(deployed: Deployed) -> None:
    """Packets dropped between aws-1 and aws-2 (as a firewall would): the deploy fails in
    its reachability check, naming both directions, instead of waiting for a leader."""
    a, b = deployed.lab.hosts["aws-1"].address, deployed.lab.hosts["aws-2"].address
    drop = ["-s", a, "-d", b, "-m", "comment", "--comment", "goml-lab-test", "-j", "DROP"]
    chains = ["FORWARD"] + (
        ["DOCKER-USER"] if _sh("iptables", "-w", "-S", "DOCKER-USER").returncode == 0 else []
    )
    try:
        for chain in chains:
            assert _sh("iptables", "-w", "-I", chain, "1", *drop).returncode == 0
        started = time.monotonic()
        run = deployed.pyinfra(timeout_s=300)
        elapsed = time.monotonic() - started
    finally:
        for chain in chains:
            _sh("iptables", "-w", "-D", chain, *drop)
    print(f"lab: deploy with aws-1 <-> aws-2 blocked failed after {elapsed:.1f} s")
    assert run.returncode != 0
    out = run.stdout
    assert "2 host pair(s) cannot reach the node port over TCP" in out, out[-3000:]
    assert f"aws-1->aws-2 ({b}:7000: timeout)" in out and f"aws-2->aws-1 ({a}:7000: timeout)" in out
    assert "packets are dropped between these hosts" in out
    assert "not healthy after" not in out  # failed on the cause, not on its symptom
    wait_for(deployed.healthy, 60, "the cluster to heal once the pair is unblocked")


def test_rolling_upgrade_loses_no_task(deployed: Deployed) -> None:
    source = snapshot_source(Path(deployed.lab.dir) / "goml-next", version="0.1.1")
    acknowledged: list[str] = []
    errors: list[str] = []
    stop = threading.Event()

    def submit_steadily() -> None:
        with deployed.client(call_timeout_s=1.0, retry_s=20.0) as client:
            while not stop.is_set():
                try:
                    acknowledged.append(
                        client.submit("matmul", {"n": 4}, idempotency_key=str(uuid.uuid4()))
                    )
                except ClientError as error:
                    errors.append(str(error))
                stop.wait(0.2)  # the submit rate, not synchronisation

    submitter = threading.Thread(target=submit_steadily, daemon=True)
    submitter.start()
    started = time.monotonic()
    try:
        upgrade = subprocess.run(
            [
                sys.executable,
                str(PYINFRA_DIR / "rolling_upgrade.py"),
                str(INVENTORY),
                "--data",
                "goml_version=0.1.1",
            ],
            capture_output=True,
            text=True,
            env={
                **os.environ,
                "GOML_LAB_STATE": str(deployed.lab.state_path),
                "GOML_SOURCE_DIR": str(source),
            },
            cwd=REPO,
            timeout=900,
            check=False,
        )
    finally:
        stop.set()
        submitter.join(timeout=30)
    print(
        f"lab: rolling upgrade of 5 hosts in {time.monotonic() - started:.1f} s, {len(acknowledged)} tasks submitted meanwhile"
    )
    assert upgrade.returncode == 0, upgrade.stdout[-6000:]
    # The hosts run 0.1.1 now: later deploys deploy it (not a downgrade of every host).
    deployed.source, deployed.data = source, ("--data", "goml_version=0.1.1")
    assert upgrade.stdout.count("healthy after") == 5
    assert not errors, errors[:5]
    assert len(acknowledged) > 10
    for name in deployed.names:
        version = deployed.ssh(
            name,
            "/opt/goml/venv/bin/python -c 'import importlib.metadata as m; print(m.version(\"goml\"))'",
        )
        assert version == "0.1.1", (name, version)
    with deployed.client(call_timeout_s=2.0, retry_s=30.0) as client:
        deadline = time.monotonic() + 180
        for task_id in acknowledged:
            task = client.wait(task_id, max(1.0, deadline - time.monotonic()))
            assert task.state == api_pb2.SUCCEEDED, task


# ------------------------------------------------------- membership from the inventory


class SubmitLoad:
    """A client submitting tasks throughout (unique idempotency keys under `prefix`),
    recording each acknowledged (key, task id) and each error."""

    def __init__(self, deployed: Deployed, prefix: str) -> None:
        self.deployed = deployed
        self.prefix = prefix
        self.acknowledged: dict[str, str] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.deployed.client(call_timeout_s=1.0, retry_s=20.0) as client:
            n = 0
            while not self._stop.is_set():
                key = f"{self.prefix}-{n}"
                n += 1
                try:
                    self.acknowledged[key] = client.submit("matmul", {"n": 4}, idempotency_key=key)
                except ClientError as error:
                    self.errors.append(f"{key}: {error}")
                self._stop.wait(0.1)  # the submit rate, not synchronisation

    def __enter__(self) -> SubmitLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        assert not self._thread.is_alive()

    def check(self) -> None:
        """Every acknowledged task there and SUCCEEDED; no key became two tasks."""
        assert not self.errors, self.errors[:5]
        assert len(self.acknowledged) > 10, len(self.acknowledged)
        with self.deployed.client(call_timeout_s=2.0, retry_s=30.0) as client:
            deadline = time.monotonic() + 180
            for task_id in self.acknowledged.values():
                task = client.wait(task_id, max(1.0, deadline - time.monotonic()))
                assert task.state == api_pb2.SUCCEEDED, task
            tasks = client.list_tasks(function="matmul", limit=10_000)
        by_key: dict[str, list[str]] = {}
        for task in tasks:
            if task.spec.idempotency_key.startswith(f"{self.prefix}-"):
                by_key.setdefault(task.spec.idempotency_key, []).append(task.id)
        twice = {key: ids for key, ids in by_key.items() if len(ids) > 1}
        assert not twice, twice
        lost = sorted(k for k, i in self.acknowledged.items() if by_key.get(k) != [i])
        assert not lost, lost[:10]


def node_pids(deployed: Deployed, names: tuple[str, ...]) -> dict[str, str]:
    return {n: deployed.ssh(n, "systemctl show -p MainPID --value goml-node") for n in names}


def test_replace_a_host_under_load_from_the_inventory(deployed: Deployed) -> None:
    """aws-3 retired in the inventory, aws-4 (a freshly booted host) added, one deploy,
    a client submitting throughout: aws-4 is provisioned with a certificate from the
    cluster's CA and joins (learner, then voter) before aws-3 is removed, and aws-3's
    services stop only after its removal; no member is restarted, no acknowledged task
    lost, no key applied twice."""
    old, new = "aws-3", "aws-4"
    wait_for(deployed.healthy, 60, "a healthy cluster")
    started = time.monotonic()
    deployed.lab.add_host(new, "aws", "us-east-1")
    print(f"lab: {new} booted in {time.monotonic() - started:.1f} s")
    staying = tuple(n for n in deployed.names if n != old)
    pids = node_pids(deployed, staying)
    started = time.monotonic()
    with SubmitLoad(deployed, f"replace-{uuid.uuid4().hex[:8]}") as load:
        run = deployed.pyinfra(env={"GOML_LAB_OVERRIDES": json.dumps({old: {"goml_retire": True}})})
    print(
        f"lab: replace {old} -> {new} deployed in {time.monotonic() - started:.1f} s, "
        f"{len(load.acknowledged)} tasks submitted meanwhile (load avg {os.getloadavg()[0]:.1f})"
    )
    out = run.stdout
    assert run.returncode == 0, out[-6000:]
    steps = [  # the Operator's line once each step is read back committed, then the stop
        f"add-learner {new}: done",
        f"promote {new}: done",
        f"remove {old}: done",
        "goml-node stopped and disabled (no member any more)",
    ]
    ran = out[out.index("--> Beginning operation run") :]  # not the plan's table
    assert all(step in ran for step in steps), out[-6000:]
    assert [ran.index(step) for step in steps] == sorted(ran.index(step) for step in steps)
    changed = changed_operations(out)
    # On the coordinator, which makes the changes, and on the two hosts whose operations
    # are ordered around them (aws-4 joins, aws-3 stops after).
    assert changed.get(f"goml: membership: add {new}, remove {old}") == 3, changed
    assert changed.get("goml: goml-node stopped and disabled (no member any more)") == 1
    assert changed.get("goml: node config") == 1, changed  # the new host's only
    assert node_pids(deployed, staying) == pids  # no member restarted
    assert "goml: voters " in out

    with deployed.client() as client:
        status = client.status()
    assert sorted(status.voters) == sorted((*staying, new)), status
    assert list(status.learners) == []
    assert old not in {m.id for m in status.members}
    assert deployed.ssh(old, "systemctl is-active goml-node goml-agent", check=False).split() == [
        "inactive",
        "inactive",
    ]
    assert deployed.ssh(old, "systemctl is-enabled goml-node goml-agent", check=False).split() == [
        "disabled",
        "disabled",
    ]
    # Its certificate is issued by the cluster's CA (the one every host trusts).
    ca = deployed.ssh(new, "sha256sum /etc/goml/tls/ca.pem").split()[0]
    assert ca == deployed.ssh("aws-1", "sha256sum /etc/goml/tls/ca.pem").split()[0]
    joined = deployed.ssh(new, "cat /etc/goml/node.yaml")
    assert "join: true" in joined and old in joined  # the members when it joined
    load.check()
    # aws-3 is gone from the inventory and the lab from here on.
    deployed.names = (*staying, new)
    deployed.env["GOML_LAB_SKIP"] = json.dumps([old])
    deployed.lab.stop_host(old)


def test_a_sixth_host_from_the_inventory_becomes_a_voter(
    deployed: Deployed, tmp_path: Path
) -> None:
    """gcp-3 booted and so in the lab inventory: one deploy makes it a voter (status shows
    it), restarting no member; a second deploy changes nothing."""
    new = "gcp-3"
    wait_for(deployed.healthy, 60, "a healthy cluster")
    deployed.lab.add_host(new, "gcp", "us-central1")
    pids = node_pids(deployed, deployed.names)
    started = time.monotonic()
    run = deployed.pyinfra()
    print(f"lab: {new} added in {time.monotonic() - started:.1f} s")
    out = run.stdout
    assert run.returncode == 0, out[-6000:]
    assert "6 members, 6 agents alive" in out, out[-4000:]
    assert changed_operations(out).get(f"goml: membership: add {new}") == 2
    assert node_pids(deployed, deployed.names) == pids
    deployed.names = (*deployed.names, new)
    with deployed.client() as client:
        status = client.status()
    assert sorted(status.voters) == sorted(deployed.names), status
    profile = tmp_path / "profile.json"
    deployed.profile().save(profile)
    shown = subprocess.run(
        [sys.executable, "-m", "goml", "status", "--profile", str(profile)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0, shown.stderr
    voters_line = next(line for line in shown.stdout.splitlines() if line.startswith("voters "))
    assert new in voters_line and "learners -" in voters_line, shown.stdout
    address = deployed.lab.hosts[new].address
    assert any(new in line and address in line for line in shown.stdout.splitlines())

    started = time.monotonic()
    again = deployed.pyinfra()
    print(f"lab: repeat deploy after the membership changes in {time.monotonic() - started:.1f} s")
    assert again.returncode == 0, again.stdout[-4000:]
    assert changed_operations(again.stdout) == {}


def test_host_without_systemd_stops_the_deploy_before_any_change(deployed: Deployed) -> None:
    before = deployed.main_pids()
    plain = deployed.lab.add_host("plain-1", "gcp", "us-central1", systemd=False)
    assert deployed.ssh("plain-1", "test -d /run/systemd/system || echo none") == "none"
    extra = [{"name": "plain-1", "cloud": "gcp", "region": "us-central1", "address": plain.address}]
    run = deployed.pyinfra(env={"GOML_LAB_EXTRA": json.dumps(extra)}, timeout_s=300)
    assert run.returncode != 0
    assert "without systemd as PID 1 (no /run/systemd/system): plain-1" in run.stdout, run.stdout[
        -3000:
    ]
    assert "--> Results:" not in run.stdout
    assert deployed.ssh("plain-1", "test -e /opt/goml || echo untouched") == "untouched"
    assert {k: v for k, v in deployed.main_pids().items() if k[0] != "plain-1"} == before
