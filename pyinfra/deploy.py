"""Deploy a goml cluster with pyinfra:  pyinfra INVENTORY pyinfra/deploy.py

Pre-flight (before any operation is planned, so nothing changes on any host when it
fails): the inventory is validated (goml_inventory.plan_cluster), every host must be
reachable and run systemd as PID 1, and the wheelhouse for each host's architecture and
Python is built locally. Then, per host: a service user, data and config directories,
an offline virtualenv install of goml==VERSION from the uploaded wheelhouse, node and
agent configs rendered from the inventory, certificates and secrets (mode 0600, never
logged; each agent its own certificate and token, so it can act only as itself; nodes get
the tokens file), systemd units (Restart=on-failure), restarts only where something changed, and
membership changes when the inventory changed, and a verification: leader elected,
every control node a voter, every agent registered and alive, and the latency of every
pair of hosts measured against the bounds.

Membership follows the inventory (the members are read from the running cluster, never
from a local file): a control host new in the inventory gets a node certificate from
the cluster's CA and a join config (join: true, the current members as its peers), is
started, then added as a learner and promoted once caught up; a host marked
goml_retire (or a member no inventory host names any more) is removed from the cluster
after the additions, and only then are a retired host's services stopped and
disabled. The steps are goml.cluster.membership's Operator (`goml node add/remove`),
driven from this machine with the admin credentials of the state directory: it needs
to reach the nodes' gRPC port. A deployed node keeps the peers of its first config, so
no member is rewritten or restarted by a change of the others.

Optional data (`--data key=value` or the inventory):
    goml_state_dir   where the cluster's credentials are kept locally (default
                     pyinfra/.state/<cluster id>)
    goml_build_dir   local wheel cache (default pyinfra/.build)
    goml_verify      false skips the health and latency check (default true)
    goml_verify_timeout_s   how long the check waits for a healthy cluster (default 90)
    goml_join_wait_s        how long a new node may take to catch up before its promotion
                            (default 120)
    goml_membership_timeout_s   the deadline of each other membership step (default 60)
"""

from __future__ import annotations

import io
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import goml_build
import goml_inventory as gi
import yaml
from pyinfra.api.exceptions import PyinfraError
from pyinfra.facts.files import Directory
from pyinfra.facts.pip import PipPackages
from pyinfra.facts.server import Arch, Command
from pyinfra.operations import files, pip, python, server, systemd

from goml.client import Client, ClientError, Profile
from goml.cluster.membership import Members, MembershipError, Operator, members_of
from pyinfra import host, inventory, logger, state

HERE = Path(__file__).resolve().parent
USER = "goml"
OPT = "/opt/goml"
VENV = f"{OPT}/venv"
WHEELHOUSE = f"{OPT}/wheelhouse"
PROBE = f"{OPT}/probe.py"
DATA_DIR = "/var/lib/goml"
RAFT_DIR = f"{DATA_DIR}/raft"
ETC = "/etc/goml"
TLS = f"{ETC}/tls"
SYSTEM_PYTHON = "/usr/bin/python3"
# A member this close to the leader's commit index has caught up (submits keep flowing).
CATCH_UP_SLACK_ENTRIES = 100
UNREADABLE = "goml-deploy: unreadable"
# Empty when there is none; never taken for "none" when it cannot be read.
NODE_CONFIG_COMMAND = (
    f"test -e {ETC}/node.yaml && {{ cat {ETC}/node.yaml 2>/dev/null || echo '{UNREADABLE}'; }}"
    " || true"
)
MEMBERS_READ_TIMEOUT_S = 20.0
PY_VERSION_COMMAND = (
    f"test -x {SYSTEM_PYTHON} && {SYSTEM_PYTHON} -c "
    "'import sys; print(\"%d.%d\" % sys.version_info[:2])' || echo missing"
)


def _bool(value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


def _preflight() -> dict[str, Any]:
    """Validate everything once per run (deploy.py is executed once per host)."""
    with goml_build.PREFLIGHT_LOCK:
        return _preflight_locked()


def _preflight_locked() -> dict[str, Any]:
    cached: dict[str, Any] | None = getattr(state, "_goml_preflight", None)
    if cached is not None:
        return cached
    try:
        plan = gi.plan_cluster([(h.name, h.data.dict()) for h in inventory])
        for warning in plan.warnings:
            logger.warning(f"goml inventory: {warning}")
        wanted = [h.name for h in inventory if state.is_host_in_limit(h)]  # honours --limit
        limit = None if len(wanted) == len(list(inventory)) else set(wanted)
        retired = {r.host for r in plan.retired}
        active = sorted(h.name for h in inventory.get_active_hosts())
        # A retired host may be gone already: nothing to check there, nothing to stop.
        gi.check_reachable([w for w in wanted if w not in retired], active)
        targets = [inventory.get_host(name) for name in active if name not in retired]
        gi.check_systemd(
            {h.name: bool(h.get_fact(Directory, path="/run/systemd/system")) for h in targets}
        )
        platforms: dict[str, tuple[str, str]] = {}
        for h in targets:
            version = (h.get_fact(Command, command=PY_VERSION_COMMAND) or "").strip()
            if version == "missing" or not version:
                raise gi.InventoryError(
                    f"host {h.name}: no {SYSTEM_PYTHON} (install python3 and python3-venv); "
                    "nothing was changed on any host"
                )
            platforms[h.name] = (str(h.get_fact(Arch)).strip(), version)
        # The peers and join of each deployed node's config, kept as they are.
        kept = {}
        for h in targets:
            spec = plan.by_host(h.name)
            text = h.get_fact(Command, command=NODE_CONFIG_COMMAND)
            if text and text.strip() == UNREADABLE:
                raise gi.InventoryError(
                    f"host {h.name}: {ETC}/node.yaml exists but cannot be read (connect as "
                    "root or set _sudo); nothing was changed on any host"
                )
            found = gi.kept_membership(text, spec.node)
            if found is not None:
                kept[h.name] = found
    except gi.InventoryError as error:
        raise PyinfraError(str(error)) from None
    data = host.data
    settings = plan.settings
    build_dir = Path(data.get("goml_build_dir") or goml_build.DEFAULT_BUILD_DIR)
    state_dir = Path(data.get("goml_state_dir") or HERE / ".state" / settings["goml_cluster_id"])
    # Deployed before: a host has a node config, or (a --limit run sees only some hosts)
    # the cluster's CA exists.
    deployed_before = bool(kept) or (limit is not None and (state_dir / "certs/ca.pem").exists())
    try:
        wheelhouses = {
            name: goml_build.wheelhouse(build_dir, settings["goml_version"], arch, version)
            for name, (arch, version) in platforms.items()
        }
        certs = goml_build.credentials(
            state_dir,
            tuple(n.node for n in plan.control),
            tuple(sorted({n.address for n in plan.nodes})),
            tuple(n.agent_id for n in plan.agents),
            node_addresses=tuple((n.node, n.address) for n in plan.control),
            retired=tuple(r.node for r in plan.retired),
        )
    except goml_build.BuildError as error:
        raise PyinfraError(f"goml build: {error}") from None
    members = None
    membership = gi.MembershipPlan()
    if deployed_before:
        members, why = _running_members(certs, plan, kept)
        joiners = [n.host for n in plan.control if n.host in platforms and n.host not in kept]
        if members is None and (joiners or plan.retired):
            raise PyinfraError(
                f"goml: cannot read the running cluster's members ({why}), needed to join "
                f"{', '.join(joiners) or 'no host'} and remove retired hosts; nothing was "
                "changed on any host (this machine must reach the nodes' port)"
            )
        if members is None:
            logger.warning(f"goml: running cluster's members not read ({why}): no changes")
        else:
            try:
                membership = gi.plan_membership(plan, members.voters, members.learners, limit)
            except gi.InventoryError as error:
                raise PyinfraError(str(error)) from None
            if not membership.empty:
                logger.info(f"goml: membership changes planned: {membership.describe()}")
    # Makes the membership changes and checks the cluster: a control host if there is one.
    staying = [name for name in active if name not in retired]
    control_hosts = {n.host for n in plan.control}
    coordinator = next(
        (name for name in staying if name in control_hosts), staying[0] if staying else active[0]
    )
    result = {
        "plan": plan,
        "wheelhouses": wheelhouses,
        "certs": certs,
        "platforms": platforms,
        "latency": {},
        "active": active,
        "coordinator": coordinator,
        "limited": limit is not None,
        "kept": kept,
        "members": members,
        "membership": membership,
        "removed": set(),
    }
    state._goml_preflight = result  # type: ignore[attr-defined]
    return result


def _admin_profile(certs: Path, nodes: dict[str, str], role: str = "admin") -> Profile:
    """A profile with the state directory's default admin (or client) credentials."""
    return Profile(
        nodes=nodes,
        token=(certs / f"{role}.token").read_text().strip(),
        ca=certs / "ca.pem",
        cert=certs / f"{role}.pem",
        key=certs / f"{role}.key",
    )


def _running_members(
    certs: Path, plan: gi.ClusterPlan, kept: dict[str, tuple[dict[str, str], bool]]
) -> tuple[Members | None, str]:
    """The members as the running cluster's leader reports them (status, the client
    identity), asking every address the inventory and the deployed configs name."""
    nodes = dict(plan.peers())
    for peers, _ in kept.values():
        nodes = {**peers, **nodes}
    try:
        profile = _admin_profile(certs, nodes, role="client")
        with Client(profile, call_timeout_s=2.0, retry_s=MEMBERS_READ_TIMEOUT_S) as client:
            return members_of(client.status()), ""
    except (ClientError, OSError, ValueError) as error:
        return None, str(error)


PRE = _preflight()
PLAN: gi.ClusterPlan = PRE["plan"]
MEMBERSHIP: gi.MembershipPlan = PRE["membership"]
RETIRED = PLAN.retired_host(host.name)
ME = PLAN.by_host(host.name) if RETIRED is None else None
SETTINGS = PLAN.settings
CERTS: Path = PRE["certs"]
VERSION = str(SETTINGS["goml_version"])


def node_membership(me: gi.NodeSpec) -> tuple[dict[str, str], bool]:
    """(peers, join) of this host's node config: a deployed node keeps its own; a node
    new to a running cluster joins it (the current members are whom it asks first, it
    learns its configuration from the leader); the nodes of a new cluster bootstrap it
    with the inventory's control nodes as its voters."""
    kept: tuple[dict[str, str], bool] | None = PRE["kept"].get(host.name)
    if kept is not None:
        return kept
    members: Members | None = PRE["members"]
    if members is None:
        return PLAN.peers(), False
    others = {k: v for k, v in members.addresses.items() if k != me.node}
    return {**others, me.node: me.endpoint}, True


def node_config() -> str:
    assert ME is not None
    peers, join = node_membership(ME)
    return yaml.safe_dump(
        {
            "node_id": ME.node,
            "listen": ME.endpoint,
            "metrics_listen": f"{ME.address}:{ME.metrics_port}",
            "data_dir": RAFT_DIR,
            "peers": peers,
            **({"join": True} if join else {}),
            "cluster_id": SETTINGS["goml_cluster_id"],
            "tls": {"ca": f"{TLS}/ca.pem", "cert": f"{TLS}/node.pem", "key": f"{TLS}/node.key"},
            "secret_file": f"{TLS}/cluster.secret",
            "tokens_file": f"{TLS}/tokens.txt",
            "raft": {
                "election_timeout_ms_min": SETTINGS["goml_election_timeout_ms_min"],
                "election_timeout_ms_max": SETTINGS["goml_election_timeout_ms_max"],
                "heartbeat_interval_ms": SETTINGS["goml_heartbeat_interval_ms"],
            },
            "agent_lease_depth_max": SETTINGS["goml_agent_lease_depth_max"],
        },
        sort_keys=False,
    )


def agent_config() -> str:
    assert ME is not None
    return yaml.safe_dump(
        {
            "agent_id": ME.agent_id,
            "cloud": ME.cloud,
            "region": ME.region,
            "capacity": {"cpu": ME.capacity_cpu, "memory_mb": ME.capacity_memory_mb, "gpu": 0},
            "control_plane": PLAN.peers(),
            "token_file": f"{TLS}/agent.token",
            "tls": {
                "ca_file": f"{TLS}/ca.pem",
                "cert_file": f"{TLS}/agent.pem",
                "key_file": f"{TLS}/agent.key",
            },
            "heartbeat_interval_ms": SETTINGS["goml_agent_heartbeat_interval_ms"],
        },
        sort_keys=False,
    )


def profile() -> str:
    return json.dumps(
        {
            "nodes": PLAN.peers(),
            "token": (CERTS / "client.token").read_text().strip(),
            "ca": f"{TLS}/ca.pem",
            "cert": f"{TLS}/client.pem",
            "key": f"{TLS}/client.key",
            "insecure": False,
        },
        indent=2,
    )


def _private(name: str, src: Path, dest: str) -> Any:
    # files.put logs the file names only, never the contents.
    return files.put(name=name, src=str(src), dest=dest, user=USER, group=USER, mode="600")


def _private_reread(name: str, src: Path, dest: str) -> Any:
    """A private file a running service rereads when it changes (tokens): uploaded beside
    it, then renamed over it, so no reader sees it half written. files.put writes in
    place, and a node that read tokens.txt mid-upload (a new agent's token added by a
    membership change) refused a client's valid token."""
    staged = f"{dest}.staged"
    put = _private(name, src, staged)
    server.shell(
        name=f"{name} (renamed into place)",
        commands=[f"cp -p {staged} {dest}.tmp && mv -f {dest}.tmp {dest}"],
        _if=put.did_change,
    )
    return put


def _any_changed(ops: list[Any]) -> Any:
    return lambda: any(op.did_change() for op in ops)


# Every host but a retired one: provisioned, configured, its services running.
if ME is not None:
    # ------------------------------------------------------------------ user and directories

    server.group(name="goml: service group", group=USER, system=True)
    server.user(
        name="goml: service user",
        user=USER,
        group=USER,
        home=DATA_DIR,
        shell="/usr/sbin/nologin",
        system=True,
        ensure_home=False,
    )
    for path, owner, mode in (
        (DATA_DIR, USER, "700"),
        (RAFT_DIR, USER, "700"),
        (ETC, "root", "750"),
        (TLS, "root", "750"),
        (OPT, "root", "755"),
        (WHEELHOUSE, "root", "755"),
    ):
        files.directory(
            name=f"goml: directory {path}", path=path, user=owner, group=USER, mode=mode
        )

    # ------------------------------------------------------------------ offline install

    for wheel in PRE["wheelhouses"][host.name]:
        files.put(
            name=f"goml: wheel {wheel.name}",
            src=str(wheel),
            dest=f"{WHEELHOUSE}/{wheel.name}",
            mode="644",
        )
    pip.venv(name="goml: virtualenv (system Python)", path=VENV, python=SYSTEM_PYTHON)
    # Upgrading in place under running services would let their child processes import a
    # half-replaced package (task processes die): stop them first; the restarts below start
    # them on the new version.
    installed = (
        host.get_fact(PipPackages, pip=f"{VENV}/bin/pip") if ME.is_agent or ME.is_control else {}
    )
    installed_goml = (installed or {}).get("goml")
    if installed_goml and VERSION not in installed_goml:
        for service in ("goml-agent", "goml-node"):
            if (service == "goml-agent" and ME.is_agent) or (
                service == "goml-node" and ME.is_control
            ):
                systemd.service(
                    name=f"goml: stop {service} for the upgrade {'/'.join(installed_goml)} -> {VERSION}",
                    service=service,
                    running=False,
                )
    package = pip.packages(
        name=f"goml: install goml=={VERSION} from the wheelhouse",
        packages=[f"goml=={VERSION}"],
        virtualenv=VENV,
        extra_install_args=f"--no-index --find-links {WHEELHOUSE}",
    )
    files.put(name="goml: health probe", src=str(HERE / "files" / "goml_probe.py"), dest=PROBE)

    # ------------------------------------------------------------------ credentials and configs

    ca = files.put(
        name="goml: cluster CA", src=str(CERTS / "ca.pem"), dest=f"{TLS}/ca.pem", mode="644"
    )
    client_creds = [
        files.put(
            name="goml: client certificate",
            src=str(CERTS / "client.pem"),
            dest=f"{TLS}/client.pem",
            mode="644",
        ),
        _private("goml: client key", CERTS / "client.key", f"{TLS}/client.key"),
        _private("goml: client token", CERTS / "client.token", f"{TLS}/client.token"),
    ]
    files.put(
        name="goml: client profile (for health checks)",
        src=io.StringIO(profile()),
        dest=f"{ETC}/profile.json",
        user="root",
        group="root",
        mode="600",
    )

    node_inputs: list[Any] = []
    agent_inputs: list[Any] = []
    if ME.is_control:
        # Not an input of the node's restart: a running node rereads it when it changes, so a
        # token rotated or revoked by a new deploy takes effect with no restart.
        _private_reread("goml: accepted tokens", CERTS / "tokens.txt", f"{TLS}/tokens.txt")
        node_inputs = [
            package,
            ca,
            *client_creds,
            files.put(
                name="goml: node certificate",
                src=str(CERTS / f"{ME.node}.pem"),
                dest=f"{TLS}/node.pem",
                mode="644",
            ),
            _private("goml: node key", CERTS / f"{ME.node}.key", f"{TLS}/node.key"),
            _private("goml: cluster secret", CERTS / "cluster.secret", f"{TLS}/cluster.secret"),
            files.put(
                name="goml: node config",
                src=io.StringIO(node_config()),
                dest=f"{ETC}/node.yaml",
                user="root",
                group=USER,
                mode="640",
            ),
        ]
    if ME.is_agent:
        # This host's agent identity: its certificate and token name ME.agent_id only. The
        # token is no restart input: the agent rereads it, so a rotation stops no task.
        from goml.api.auth import Identity, Role
        from goml.cluster.certs import identity_files

        own = identity_files(CERTS, Identity(Role.AGENT, ME.agent_id))
        assert own.token is not None
        _private_reread("goml: agent token", own.token, f"{TLS}/agent.token")
        agent_inputs = [
            package,
            ca,
            files.put(
                name="goml: agent certificate",
                src=str(own.cert),
                dest=f"{TLS}/agent.pem",
                mode="644",
            ),
            _private("goml: agent key", own.key, f"{TLS}/agent.key"),
            files.put(
                name="goml: agent config",
                src=io.StringIO(agent_config()),
                dest=f"{ETC}/agent.yaml",
                user="root",
                group=USER,
                mode="640",
            ),
        ]

    # ------------------------------------------------------------------ systemd units

    units = []
    if ME.is_control:
        node_unit = files.template(
            name="goml: unit goml-node.service",
            src=str(HERE / "templates" / "goml-node.service.j2"),
            dest="/etc/systemd/system/goml-node.service",
            mode="644",
            node=ME.node,
            service_user=USER,
            venv=VENV,
            config=f"{ETC}/node.yaml",
            data_dir=DATA_DIR,
        )
        units.append(node_unit)
        node_inputs.append(node_unit)
    if ME.is_agent:
        agent_unit = files.template(
            name="goml: unit goml-agent.service",
            src=str(HERE / "templates" / "goml-agent.service.j2"),
            dest="/etc/systemd/system/goml-agent.service",
            mode="644",
            agent=ME.agent_id,
            service_user=USER,
            venv=VENV,
            config=f"{ETC}/agent.yaml",
            control=ME.is_control,
        )
        units.append(agent_unit)
        agent_inputs.append(agent_unit)

    systemd.daemon_reload(name="goml: systemd daemon-reload", _if=_any_changed(units))
    for service, inputs in (("goml-node", node_inputs), ("goml-agent", agent_inputs)):
        if not inputs:
            continue
        systemd.service(
            name=f"goml: restart {service} (its inputs changed)",
            service=service,
            running=True,
            restarted=True,
            _if=_any_changed(inputs),
        )
        systemd.service(
            name=f"goml: {service} running and enabled",
            service=service,
            running=True,
            enabled=True,
        )


# ------------------------------------------------------------------ membership
# After a new node runs (waiting to be added) and before a retired host's services stop.
# pyinfra orders operations only along each host's own sequence (a DAG of them), not by
# their place in this file: so the one membership operation is put on the coordinator,
# which makes the changes, and on every host whose operations must come before or after
# them (the new control hosts, the hosts that stop a service), where it does nothing.


def change_membership() -> None:
    """The planned changes, one at a time, by goml.cluster.membership's Operator (the
    steps of `goml node add` and `goml node remove`): additions first, then removals."""
    if host.name != PRE["coordinator"]:
        return  # a host that only waits for the coordinator's changes (see above)
    certs: Path = PRE["certs"]
    members: Members | None = PRE["members"]
    nodes = {**(members.addresses if members else {}), **PLAN.peers()}
    timeout_s = float(host.data.get("goml_membership_timeout_s") or 60)
    wait_s = float(host.data.get("goml_join_wait_s") or 120)
    operator = Operator(
        _admin_profile(certs, nodes), timeout_s, say=lambda line: logger.info(f"goml: {line}")
    )
    try:
        for spec in MEMBERSHIP.add:
            operator.add(spec.node, spec.endpoint, wait_s)
        for name in MEMBERSHIP.remove:
            operator.remove(name)
            PRE["removed"].add(name)
    except MembershipError as error:
        raise PyinfraError(f"goml membership: {error}") from None
    for name in MEMBERSHIP.unmanaged:
        logger.warning(
            f"goml: {name} is no member any more; no inventory host names it, so its "
            "services were not stopped here: stop them, or delete the machine"
        )


def _removed(node: str) -> Any:
    return lambda: node in PRE["removed"]


# A retired host, once its node is no member (removed now or before): services stopped
# and disabled. A host that is no control node any more stops its goml-node likewise.
stop_node, stop_services = "", ()
if RETIRED is not None:
    stop_node, stop_services = RETIRED.node, ("goml-agent", "goml-node")
elif ME is not None and not ME.is_control and ME.node in MEMBERSHIP.remove:
    stop_node, stop_services = ME.node, ("goml-node",)
joining = ME is not None and ME in MEMBERSHIP.add
if not MEMBERSHIP.empty and (host.name == PRE["coordinator"] or joining or stop_services):
    python.call(name=f"goml: membership: {MEMBERSHIP.describe()}", function=change_membership)
if stop_services:
    now: Members | None = PRE["members"]
    gone = now is not None and stop_node not in (*now.voters, *now.learners)
    for service in stop_services:
        systemd.service(
            name=f"goml: {service} stopped and disabled (no member any more)",
            service=service,
            running=False,
            enabled=False,
            # Only once the removal committed: a failed one leaves it running.
            _if=(lambda: True) if gone else _removed(stop_node),
        )

# ------------------------------------------------------------------ verification


def _probe(target_host: Any, with_status: bool, targets: list[str]) -> dict[str, Any]:
    command = f"{VENV}/bin/python {PROBE}"
    if with_status:
        command += f" --profile {ETC}/profile.json"
    if targets:
        command += " --latency " + " ".join(shlex.quote(t) for t in targets)
    ok, output = target_host.run_shell_command(command=command)
    if not ok:
        raise PyinfraError(f"goml probe failed on {target_host.name}: {output.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(output.stdout.strip().splitlines()[-1])
    return result


# TCP to every other host's node port, from a host: "ok", "refused" (the host answers,
# nothing listens) or "timeout" (something drops the packets: a firewall, a security group,
# an iptables FORWARD policy of DROP on a bridge). Refusals and timeouts are retried until
# the deadline: a node that systemd just (re)started may not listen yet.
REACH_DEADLINE_S = 15.0
REACH_SCRIPT = """
import json, socket, sys, time
targets, deadline = json.loads(sys.argv[1]), time.monotonic() + float(sys.argv[2])
state = {t: "timeout" for t in targets}
while True:
    for target in [t for t in targets if state[t] != "ok"]:
        host, _, port = target.rpartition(":")
        try:
            socket.create_connection((host, int(port)), timeout=1.0).close()
            state[target] = "ok"
        except ConnectionRefusedError:
            state[target] = "refused"
        except OSError:
            state[target] = "timeout"
    if all(v == "ok" for v in state.values()) or time.monotonic() > deadline:
        break
    time.sleep(0.2)
print(json.dumps(state))
"""


def _reachability(targets: dict[str, str]) -> dict[str, str]:
    """host name -> "ok" | "refused" | "timeout" for each HOST:PORT in `targets`."""
    if not targets:
        return {}
    command = (
        f"{SYSTEM_PYTHON} -c {shlex.quote(REACH_SCRIPT)} "
        f"{shlex.quote(json.dumps(sorted(targets.values())))} {REACH_DEADLINE_S}"
    )
    ok, output = host.run_shell_command(command=command)
    if not ok:
        raise PyinfraError(
            f"goml reachability check failed on {host.name}: {output.stderr[-2000:]}"
        )
    state: dict[str, str] = json.loads(output.stdout.strip().splitlines()[-1])
    return {name: state[target] for name, target in targets.items()}


def measure_latency() -> None:
    assert ME is not None
    port = int(host.data.get("goml_probe_port") or 22)
    others = [n for n in PLAN.nodes if n.host != ME.host]
    PRE.setdefault("reach", {})[ME.host] = _reachability(
        {n.host: n.endpoint for n in PLAN.control if n.host != ME.host}
    )
    result = _probe(host, False, [f"{n.address}:{port}" for n in others])
    PRE["latency"][ME.host] = {n.host: result["latency_ms"][f"{n.address}:{port}"] for n in others}


def check_reachability() -> None:
    """Every host reaches every node's port: else fail now, naming the pairs, instead of
    waiting for a leader that cannot be elected."""
    reach: dict[str, dict[str, str]] = PRE.get("reach", {})
    by_host = {n.host: n for n in PLAN.nodes}
    blocked = [
        f"{a}->{b} ({by_host[b].endpoint}: {state})"
        for a in sorted(reach)
        for b, state in sorted(reach[a].items())
        if state != "ok"
    ]
    if not blocked:
        return
    timeouts = any(line.endswith("timeout)") for line in blocked)
    hint = (
        "packets are dropped between these hosts: a firewall or security group, or on one "
        "machine a bridge whose forwarding iptables drops (Docker sets the FORWARD policy "
        "to DROP; the lab adds ACCEPT rules for its bridge, see pyinfra/lab.py)"
        if timeouts
        else "the hosts answer but nothing listens: is goml-node running there?"
    )
    raise PyinfraError(
        f"goml: {len(blocked)} host pair(s) cannot reach the node port over TCP: "
        f"{'; '.join(blocked)}. {hint}"
    )


def _healthy(status: dict[str, Any] | None) -> list[str]:
    if status is None:
        return ["no status"]
    problems = []
    if not status["leader"]:
        problems.append("no leader")
    reachable = {m["id"] for m in status["members"] if m["reachable"] or m["role"] == "leader"}
    missing = sorted({n.node for n in PLAN.control} - reachable)
    if missing:
        problems.append(f"members not reachable: {', '.join(missing)}")
    voters = set(status["voters"])
    not_voters = sorted({n.node for n in PLAN.control} - voters)
    if not_voters:
        problems.append(f"control nodes that are no voters: {', '.join(not_voters)}")
    # A --limit run leaves the others' changes to a full run.
    extra = sorted((voters | set(status["learners"])) - {n.node for n in PLAN.control})
    if extra and not PRE["limited"]:
        problems.append(f"members no inventory control host names: {', '.join(extra)}")
    behind = sorted(
        m["id"]
        for m in status["members"]
        if status["commit_index"] - m["commit_index"] > CATCH_UP_SLACK_ENTRIES
    )
    if behind:
        problems.append(f"members behind the leader: {', '.join(behind)}")
    alive = {a["id"] for a in status["agents"] if a["state"] == "ALIVE"}
    absent = sorted({n.agent_id for n in PLAN.agents} - alive)
    if absent:
        problems.append(f"agents not registered or not alive: {', '.join(absent)}")
    return problems


def verify_cluster() -> None:
    check_reachability()
    timeout_s = float(host.data.get("goml_verify_timeout_s") or 90)
    deadline = time.monotonic() + timeout_s
    while True:
        result = _probe(host, True, [])
        problems = [result["error"]] if result["error"] else _healthy(result["status"])
        if not problems:
            break
        if time.monotonic() > deadline:
            raise PyinfraError(
                f"goml cluster not healthy after {timeout_s:g} s: {'; '.join(problems)}"
            )
        time.sleep(0.5)  # polling interval of a condition with a deadline
    status = result["status"]
    lines = [
        f"goml: leader {status['leader']} (term {status['term']}), "
        f"{len(status['members'])} members, "
        f"{sum(a['state'] == 'ALIVE' for a in status['agents'])} agents alive",
        f"goml: voters {', '.join(status['voters'])}; learners "
        f"{', '.join(status['learners']) or '-'}",
    ]
    by_host = {n.host: n for n in PLAN.nodes}
    measured = PRE["latency"]
    names = [n.host for n in PLAN.nodes if n.host in measured]
    violations = []
    width = max(len(n) for n in names) if names else 4
    lines.append("goml: TCP round trip in ms (row: from, column: to; bound in brackets)")
    lines.append(" " * (width + 2) + "  ".join(f"{n:>{max(width, 12)}}" for n in names))
    for a in names:
        cells = []
        for b in names:
            if a == b:
                cells.append(f"{'-':>{max(width, 12)}}")
                continue
            value = measured[a].get(b)
            bound = gi.latency_bound_ms(by_host[a], by_host[b])
            if value is None or value >= bound:
                violations.append(f"{a}->{b}: {value} ms (bound {bound:g} ms)")
            text = "unreachable" if value is None else f"{value:.2f} [<{bound:g}]"
            cells.append(f"{text:>{max(width, 12)}}")
        lines.append(f"{a:<{width}}  " + "  ".join(cells))
    for line in lines:
        logger.info(line)
    if violations:
        raise PyinfraError("goml latency bounds violated: " + "; ".join(violations))


if ME is not None and _bool(host.data.get("goml_verify"), True):
    python.call(name="goml: measure latency to every other host", function=measure_latency)
    if host.name == PRE["coordinator"]:
        python.call(name="goml: verify (leader, agents, latency bounds)", function=verify_cluster)
