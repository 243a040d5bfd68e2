"""The `goml` command line. Subcommands import their modules lazily so `goml --help` is fast.

Bad input is the user's, never a traceback: every value is checked where click parses
it (ranges of the wire's types, finite numbers, name sizes), so a wrong one ends in one
line naming the option (`Error: Invalid value for '--priority': ...`) and exit code 2,
as click reports unknown options; failures found later (`_fail`) also exit 2.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from goml.api.auth import Identity
    from goml.client import Client

# Limits of the values the CLI accepts: the protobuf types they travel in
# (proto/goml/proto/api.proto), the manifest's name_bytes_max for names and ids.
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
NAME_BYTES_MAX = 256  # goml.cluster.manifest.DEFAULT_LIMITS.name_bytes_max
# --args-file is read up to this much (goml.api.task_args.ARGS_JSON_MAX; nodes refuse
# args over args_bytes_max, 64 KiB, with a message that says so).
ARGS_FILE_BYTES_MAX = 1 << 20
# Budget of one client operation (--timeout) and of a wait or a watch.
TIMEOUT_S_DEFAULT = 30.0
TIMEOUT_S_MAX = 3600.0
WAIT_S_MAX = 86_400.0
CALL_TIMEOUT_S_MAX = 5.0  # one RPC; --timeout cuts it when smaller
JOBS_MAX = 64
CPU_CORES_MAX = 1_000_000.0  # the wire carries a double; more cores than this is a typo
PROPOSALS_MAX = 1_000_000
SEEDS_MAX = 1_000_000  # seeds of one `raft check`
# What `goml status` says beside a count whose meaning is not plain from its name.
TASK_STATE_NOTES = {
    "PENDING": "waiting for a first lease",
    "FAILED": "an attempt failed (error, timeout, lost agent); waiting for a retry",
    "DEAD": "failed on every attempt",
}
LIST_TASKS_MAX = 1_000_000  # `task list --limit`: above any manifest's tasks_max (paged)

app = typer.Typer(
    help="goml: a fault-tolerant orchestrator for ML and data tasks across clouds.",
    no_args_is_help=True,
    add_completion=False,
    # Plain click output, no rich panels: an error is the one line `Error: ...`, whatever
    # the terminal's width.
    rich_markup_mode=None,
)


def _group(name: str, help: str) -> typer.Typer:
    group = typer.Typer(help=help, no_args_is_help=True, rich_markup_mode=None)
    app.add_typer(group, name=name)
    return group


raft_app = _group("raft", "goml's own Raft core: demo and seeded safety checks.")
certs_app = _group("certs", "Cluster credentials: CA, node and client certificates, secrets.")
cluster_app = _group("cluster", "A real local cluster on loopback.")
node_app = _group("node", "Run one control-plane node.")
agent_app = _group("agent", "Run a node agent.")
sim_app = _group("sim", "The simulator: scenarios on a SimPy model of the cross-cloud network.")
task_app = _group("task", "Inspect and control tasks.")
scenario_app = _group("scenario", "Scenario YAML: validate, JSON Schema.")


# --------------------------------------------------------------------------- checks
# Callbacks click runs on each value; a BadParameter names the option in its message.


def _number(
    low: float, high: float, low_open: bool = False
) -> Callable[[float | None], float | None]:
    """A finite float in [low, high] (or (low, high]); click's FloatRange lets NaN by."""

    def check(value: float | None) -> float | None:
        if value is None:  # an optional option left out
            return value
        above = value > low if low_open else value >= low
        if not (math.isfinite(value) and above and value <= high):
            bracket = "(" if low_open else "["
            raise typer.BadParameter(
                f"{value} is not a finite number in {bracket}{low:g}, {high:g}]"
            )
        return value

    return check


def _integer(low: int, high: int, why: str) -> Callable[[int | None], int | None]:
    """An integer in [low, high]: what the wire's type carries, or a sane bound."""

    def check(value: int | None) -> int | None:
        if value is not None and not low <= value <= high:
            raise typer.BadParameter(f"{value} is outside [{low}, {high}] ({why})")
        return value

    return check


def _name(value: Any) -> Any:
    """A name or id (or each of a list): at most NAME_BYTES_MAX bytes of UTF-8."""
    for item in value if isinstance(value, list | tuple) else [value]:
        if item is None:
            continue
        size_bytes = len(str(item).encode("utf-8", "surrogatepass"))
        if size_bytes > NAME_BYTES_MAX:
            raise typer.BadParameter(
                f"{size_bytes} bytes, more than the {NAME_BYTES_MAX} a name or id may have"
            )
    return value


# A node name: it names files (NAME.pem, NAME.key) and certificate subjects.
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SEED_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


def _node_names(values: list[str]) -> list[str]:
    for value in _name(values):
        if not _NODE_NAME.fullmatch(value):
            raise typer.BadParameter(
                f"{value!r} is not a node name (letters, digits, '_', '.', '-'; "
                "starting with a letter or digit)"
            )
    return values


def _seed_range(value: str) -> str:
    """`LOW-HIGH` or `SEED`, as the Raft harness reads it, at most SEEDS_MAX seeds."""
    match = _SEED_RANGE.fullmatch(value)
    if match is None:
        raise typer.BadParameter(f"{value!r} is not a seed range: use e.g. 1-100 or 7")
    low = int(match.group(1))
    high = int(match.group(2) or low)
    if high < low or high - low + 1 > SEEDS_MAX:
        raise typer.BadParameter(
            f"{value!r}: give LOW-HIGH with LOW <= HIGH, {SEEDS_MAX} seeds at most"
        )
    return value


ProfileOption = typer.Option(
    None,
    "--profile",
    help="Client profile JSON (default: ~/.config/goml/profile.json or $GOML_PROFILE).",
)
TimeoutOption = typer.Option(
    TIMEOUT_S_DEFAULT,
    "--timeout",
    metavar="SECONDS",
    callback=_number(0.0, TIMEOUT_S_MAX, low_open=True),
    help="Budget of the whole operation: how long to keep trying the cluster's nodes "
    "(through a failover) before giving up.",
)
SeedOption = typer.Option(
    None,
    callback=_integer(INT64_MIN, INT64_MAX, "an int64"),
    help="Seed (default: the scenario's).",
)


@raft_app.command("check")
def raft_check(
    seeds: str = typer.Option(
        "1-100", callback=_seed_range, help="Seed range to run, e.g. 1-1000."
    ),
    seed: int | None = typer.Option(
        None, callback=_integer(INT64_MIN, INT64_MAX, "an int64"), help="Replay exactly one seed."
    ),
) -> None:
    """Run the seeded in-process cluster harness (faults, crashes, partitions) and check
    Raft's safety properties; a failing seed prints the command that replays it."""
    from goml.raft import harness

    argv = ["--seed", str(seed)] if seed is not None else ["--seeds", seeds]
    raise typer.Exit(harness.main(argv))


@raft_app.command("demo")
def raft_demo(
    nodes: int = typer.Option(3, min=1, max=7, help="Number of Raft nodes."),
    proposals: int = typer.Option(
        200,
        callback=_integer(1, PROPOSALS_MAX, "proposals"),
        help="Proposals before and after the failover.",
    ),
) -> None:
    """Start a real Raft cluster on loopback (gRPC, SQLite, fsync), kill its leader and
    show the failover."""
    import tempfile
    from pathlib import Path

    from goml.raft import demo

    with tempfile.TemporaryDirectory(prefix="goml-raft-demo-") as data_dir:
        raise typer.Exit(demo.main(nodes=nodes, proposals=proposals, data_dir=Path(data_dir)))


def _fail(message: str) -> typer.Exit:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    return typer.Exit(2)


def _quiet_grpc() -> None:
    """gRPC core logs every failed TLS handshake at INFO on stderr, around the one line
    a client command prints about it. Keep its errors only (a GRPC_VERBOSITY the user
    set wins). Call before anything imports grpc: it reads the variable on import."""
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")


def _client(profile: Path | None, timeout_s: float) -> Client:
    from goml.client import Client, Profile

    assert 0 < timeout_s <= TIMEOUT_S_MAX, timeout_s
    try:
        return Client(
            Profile.load(profile),
            call_timeout_s=min(CALL_TIMEOUT_S_MAX, timeout_s),
            retry_s=timeout_s,
        )
    except (OSError, ValueError) as error:  # no profile, a bad one, unreadable TLS files
        raise _fail(str(error)) from None


@certs_app.command("init")
def certs_init(
    directory: Path = typer.Argument(..., help="Where to write the CA, certificates and secrets."),
    nodes: list[str] = typer.Option(
        ..., "--node", callback=_node_names, help="A node name (repeat for each node)."
    ),
    hosts: list[str] = typer.Option(
        ["127.0.0.1", "localhost"],
        "--host",
        help="A host name or IP the node certificates are valid for.",
    ),
    force: bool = typer.Option(False, help="Replace an existing CA."),
    agents: list[str] = typer.Option(
        [], "--agent", callback=_name, help="An agent id (repeat for each agent)."
    ),
) -> None:
    """Create a cluster CA, a certificate per node, a certificate and token per agent (its
    identity: it may act only as itself), a client and an admin identity, the tokens file
    nodes check and the Raft cluster secret (private files are mode 0600)."""
    from goml.cluster.certs import init_certs

    try:
        init_certs(directory, nodes, hosts, force=force, agents=agents)
    except (FileExistsError, ValueError) as error:
        raise _fail(str(error)) from None
    typer.echo(
        f"wrote CA, {len(nodes)} node and {len(agents)} agent certificate(s), client and "
        f"admin identities, tokens.txt and secrets to {directory}"
    )


def _identity(value: str) -> Identity:
    """ROLE:NAME (agent:agent-1, client:alice, admin:ops) as an Identity."""
    from goml.api.auth import Role, parse_identity

    parsed = parse_identity(value)
    if isinstance(parsed, str):
        raise _fail(f"IDENTITY: {parsed}")
    if parsed.role is Role.NODE:
        raise _fail("IDENTITY: node certificates come from `goml certs init`")
    return parsed


@certs_app.command("issue")
def certs_issue(
    directory: Path = typer.Argument(..., help="The credentials directory (holds the CA)."),
    identity: str = typer.Argument(
        ..., callback=_name, help="ROLE:NAME, e.g. agent:gpu-7, client:alice, admin:ops."
    ),
) -> None:
    """Issue one more identity: a certificate signed by the cluster CA and a token, whose
    digest joins tokens.txt (running nodes using that file accept it at once)."""
    from goml.cluster.certs import issue_identity

    try:
        files = issue_identity(directory, _identity(identity))
    except (OSError, ValueError) as error:
        raise _fail(str(error)) from None
    typer.echo(f"issued {identity}: {files.cert}, {files.key}, {files.token}")


@certs_app.command("token")
def certs_token(
    action: str = typer.Argument(
        ...,
        metavar="rotate|retire|revoke",
        help="rotate: a new token, the old one still accepted; retire: drop all but the one "
        "in its token file; revoke: drop them all (its certificate alone is refused).",
    ),
    directory: Path = typer.Argument(..., help="The credentials directory."),
    identity: str = typer.Argument(..., callback=_name, help="ROLE:NAME."),
) -> None:
    """Rotate or revoke tokens without downtime: nodes reread tokens.txt when it changes
    (or on SIGHUP); agents reread their token file. Copy tokens.txt to nodes elsewhere."""
    from goml.cluster.certs import retire_tokens, revoke_tokens, rotate_token

    who = _identity(identity)
    try:
        if action == "rotate":
            files = rotate_token(directory, who)
            typer.echo(f"new token for {identity} in {files.token}; the old one still works")
        elif action == "retire":
            typer.echo(f"retired {retire_tokens(directory, who)} older token(s) of {identity}")
        elif action == "revoke":
            typer.echo(f"revoked {revoke_tokens(directory, who)} token(s) of {identity}")
        else:
            raise _fail(f"unknown action {action!r}: use rotate, retire or revoke")
    except (OSError, ValueError) as error:
        raise _fail(str(error)) from None


@node_app.command("run")
def node_run(config: Path = typer.Option(..., "--config", help="Node config YAML.")) -> None:
    """Run one control-plane node in the foreground (SIGTERM/Ctrl-C stops it cleanly)."""
    from goml.cluster.config import ConfigError
    from goml.cluster.daemon import run
    from goml.raft.sqlite_store import StoreCorrupted, StoreLocked

    try:
        code = run(config)  # 1: its loop failed (logged); a supervisor starts it again
    except (
        ConfigError,
        StoreCorrupted,
        StoreLocked,
        FileNotFoundError,
        PermissionError,
        OSError,
    ) as error:
        raise _fail(str(error)) from None
    raise typer.Exit(code)


# ------------------------------------------------------------------- membership

AddressOption = typer.Option(
    ..., "--address", help="HOST:PORT the new node listens on (its peers and clients dial it)."
)
TemplateOption = typer.Option(
    None,
    "--template",
    help="A member's node config: the new node's config is written from it (same cluster, "
    "secret, tokens, timing) and its certificate issued from the CA beside it.",
)
WaitOption = typer.Option(
    120.0,
    "--wait",
    metavar="SECONDS",
    callback=_number(0.0, TIMEOUT_S_MAX, low_open=True),
    help="How long the leader waits for the new learner to catch up before promoting it.",
)


def _operator(profile: Path | None, timeout_s: float) -> Any:
    from goml.client import Profile
    from goml.cluster.membership import Operator

    try:
        loaded = Profile.load(profile)
    except (OSError, ValueError) as error:
        raise _fail(str(error)) from None
    return Operator(loaded, timeout_s, say=typer.echo)


def _prepare_joiner(
    operator: Any,
    name: str,
    address: str,
    template: Path,
    config_out: Path | None,
    data_dir: Path | None,
    certs: Path | None,
    hosts: list[str],
) -> Path:
    """Certificate and config of a node about to join (see goml.cluster.membership)."""
    from goml.cluster.config import ConfigError, load_node_config
    from goml.cluster.membership import prepare_node

    try:
        base = load_node_config(template)
        if certs is None and base.tls is not None:
            certs = base.tls.ca.parent
        members = operator.members()
        path = prepare_node(
            certs or template.parent,
            base,
            name,
            address,
            data_dir or base.data_dir.parent / name,
            config_out or template.parent / f"{name}.yaml",
            members.addresses,
            hosts,
        )
    except (ConfigError, OSError, ValueError) as error:
        raise _fail(str(error)) from None
    typer.echo(f"wrote {path}; start the node with: goml node run --config {path}")
    return path


def _profile_nodes(profile: Path | None, add: dict[str, str], drop: str = "") -> None:
    """Keep the profile that made the change pointing at the members."""
    from dataclasses import replace

    from goml.client import Profile, default_profile_path

    path = profile or default_profile_path()
    loaded = Profile.load(path)
    nodes = {**loaded.nodes, **add}
    nodes.pop(drop, None)
    if nodes and nodes != loaded.nodes:
        replace(loaded, nodes=nodes).save(path)


@node_app.command("add")
def node_add(
    name: str = typer.Argument(..., help="The new node's name."),
    address: str = AddressOption,
    template: Path | None = TemplateOption,
    config_out: Path | None = typer.Option(None, help="Where to write its config."),
    data_dir: Path | None = typer.Option(None, help="Its data directory."),
    certs: Path | None = typer.Option(None, help="Credentials directory (holds the CA)."),
    hosts: list[str] = typer.Option([], "--host", help="More hosts its certificate names."),
    prepare_only: bool = typer.Option(
        False, help="Only issue the certificate and write the config (with --template)."
    ),
    wait_s: float = WaitOption,
    profile: Path | None = ProfileOption,
    timeout_s: float = TimeoutOption,
) -> None:
    """Add a control-plane node with no downtime: (with --template) issue its certificate
    and write its config, add it as a learner, promote it to voter once it caught up.
    Start the node (goml node run) before or while this waits. Needs an admin profile."""
    _quiet_grpc()
    _node_names([name])
    from goml.cluster.membership import MembershipError

    operator = _operator(profile, timeout_s)
    try:
        if template is not None:
            _prepare_joiner(operator, name, address, template, config_out, data_dir, certs, hosts)
        elif prepare_only:
            raise _fail("--prepare-only needs --template")
        if prepare_only:
            return
        operator.add(name, address, wait_s)
    except MembershipError as error:
        raise _fail(str(error)) from None
    _profile_nodes(profile, {name: address})


@node_app.command("remove")
def node_remove(
    name: str = typer.Argument(..., help="The node to remove (a voter or a learner)."),
    profile: Path | None = ProfileOption,
    timeout_s: float = TimeoutOption,
) -> None:
    """Remove a control-plane node (the leader too: it hands over and steps down once its
    removal commits). Stop its process afterwards. Needs an admin profile."""
    _quiet_grpc()
    from goml.cluster.membership import MembershipError

    try:
        _operator(profile, timeout_s).remove(name)
    except MembershipError as error:
        raise _fail(str(error)) from None
    typer.echo(f"{name} is no member any more: stop its process")
    _profile_nodes(profile, {}, drop=name)


@node_app.command("replace")
def node_replace(
    old: str = typer.Argument(..., help="The node to replace (it may be dead)."),
    new: str = typer.Argument(..., help="The new node's name."),
    address: str = AddressOption,
    template: Path | None = TemplateOption,
    config_out: Path | None = typer.Option(None, help="Where to write the new node's config."),
    data_dir: Path | None = typer.Option(None, help="The new node's data directory."),
    certs: Path | None = typer.Option(None, help="Credentials directory (holds the CA)."),
    hosts: list[str] = typer.Option([], "--host", help="More hosts its certificate names."),
    wait_s: float = WaitOption,
    profile: Path | None = ProfileOption,
    timeout_s: float = TimeoutOption,
) -> None:
    """Replace OLD by NEW: add NEW (learner, then voter), then remove OLD. Adding first
    never lowers how many failures the cluster survives. Needs an admin profile."""
    _quiet_grpc()
    _node_names([old, new])
    from goml.cluster.membership import MembershipError

    operator = _operator(profile, timeout_s)
    try:
        if template is not None:
            _prepare_joiner(operator, new, address, template, config_out, data_dir, certs, hosts)
        operator.replace(old, new, address, wait_s)
    except MembershipError as error:
        raise _fail(str(error)) from None
    typer.echo(f"{old} is no member any more: stop its process")
    _profile_nodes(profile, {new: address}, drop=old)


def _reference_scenario() -> Path:
    """The embedded reference scenario (scenarios/steady.yaml in a checkout links to it)."""
    from importlib.resources import files

    return Path(str(files("goml.scenario") / "reference.yaml"))


@sim_app.command("run")
def sim_run(
    scenario: Path | None = typer.Argument(
        None, help="Scenario YAML (default: the embedded reference scenario)."
    ),
    seed: int | None = SeedOption,
    out: Path | None = typer.Option(None, help="Report directory (default: reports/NAME-seedN)."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON summary."),
) -> None:
    """Run a scenario in the simulator: prints a summary, writes summary.json and
    report.html, exits non-zero when an expectation fails."""
    from goml.sim.runner import run_command

    raise typer.Exit(run_command(scenario or _reference_scenario(), seed, out, as_json))


@sim_app.command("sweep")
def sim_sweep(
    scenario: Path = typer.Argument(..., help="Scenario YAML."),
    seeds: str = typer.Option("1-20", help="Seeds, e.g. 1-1000 or 3,7,10-20."),
    jobs: int = typer.Option(
        2,
        "-j",
        "--jobs",
        callback=_integer(1, JOBS_MAX, "parallel processes"),
        help="Parallel processes of the local executor.",
    ),
    out: Path = typer.Option(
        Path("reports"),
        help="Directory of sweep-NAME.jsonl (every seed's summary, a line each, written "
        "as it finishes) and sweep-NAME.html (the sweep's report).",
    ),
    executor: str = typer.Option(
        "local",
        metavar="local|dask://HOST:PORT",
        help="Where the seeds run: local processes (-j), or an existing Dask distributed "
        "cluster through its scheduler (pip install 'goml[dask]'; start its workers "
        "with --nthreads 1, a seed is one core's work).",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Keep the seeds already in OUT/sweep-NAME.jsonl and run only the others "
        "(after Ctrl-C or a lost machine); without it the file starts over.",
    ),
) -> None:
    """Run many seeds in parallel, aggregate the distributions, list failing seeds
    with the exact command that replays each."""
    from goml.sim.runner import parse_seeds
    from goml.sim.sweep import parse_executor, sweep_command

    try:
        seed_list = parse_seeds(seeds)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="'--seeds'") from None
    try:
        parse_executor(executor)
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="'--executor'") from None
    raise typer.Exit(sweep_command(scenario, seed_list, jobs, out, executor, resume))


chaos_app = typer.Typer(
    help="Chaos on real processes: the scenario YAML, real nodes and agents, Toxiproxy on every link.",
    no_args_is_help=True,
)
app.add_typer(chaos_app, name="chaos")


@chaos_app.command("run")
def chaos_run(
    scenario: Path = typer.Argument(
        ..., help="Scenario YAML (e.g. scenarios/chaos/leader-crash.yaml)."
    ),
    seed: int | None = SeedOption,
    out: Path | None = typer.Option(
        None, help="Report directory (default: reports/chaos-NAME-seedN)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON summary."),
    toxiproxy_bin: Path | None = typer.Option(
        None,
        "--toxiproxy-bin",
        help="toxiproxy-server binary (default: PATH, cache, or built with Go).",
    ),
    toxiproxy_url: str | None = typer.Option(
        None,
        "--toxiproxy-url",
        help="Use this running Toxiproxy server, e.g. http://127.0.0.1:8474.",
    ),
    runtime: str = typer.Option(
        "processes",
        "--runtime",
        help="Where nodes and agents run: processes (on loopback) or containers (one "
        "Docker container each, on a network the run makes; images from `nox -s image`).",
    ),
) -> None:
    """Run a scenario on a real local cluster (nodes and agents as processes or
    containers, TLS on, a Toxiproxy proxy on every link): plays the faults and the
    workload, checks every store for lost or duplicated tasks, writes the report next to
    the simulator's prediction, exits non-zero when an expectation fails."""
    from goml.chaos.runner import RUNTIMES
    from goml.chaos.runner import run_command as chaos_command

    if runtime not in RUNTIMES:
        raise typer.BadParameter(
            f"{runtime!r}: expected one of {', '.join(RUNTIMES)}", param_hint="'--runtime'"
        )
    raise typer.Exit(
        chaos_command(scenario, seed, out, as_json, toxiproxy_bin, toxiproxy_url, runtime)
    )


@chaos_app.command("calibrate")
def chaos_calibrate(
    out: Path = typer.Option(
        Path("calibration.yaml"), "--out", help="The calibration file to write."
    ),
    data_dir: Path = typer.Option(
        Path(tempfile.gettempdir()),
        "--data-dir",
        help="Directory on the disk whose fsync is measured (where nodes keep their data).",
    ),
    fsync_samples: int = typer.Option(300, min=10, max=100_000, help="Durable writes timed."),
    hop_samples: int = typer.Option(
        300,
        min=10,
        max=100_000,
        help="Raft messages timed (with --profile: Status calls and submits made).",
    ),
    dispatch_samples: int = typer.Option(50, min=5, max=10_000, help="Agent tasks timed."),
    via_toxiproxy: bool = typer.Option(
        True,
        "--toxiproxy/--no-toxiproxy",
        help="Measure the hop through a Toxiproxy proxy, as `goml chaos run` links are "
        "(when toxiproxy-server is found; `python -m goml.chaos.server` gets it).",
    ),
    core_only: bool = typer.Option(
        False,
        "--core-only",
        help="Charge the node core's own time per input, not a real node process's CPU.",
    ),
    profile: Path | None = typer.Option(
        None,
        "--profile",
        help="Measure a deployed cluster instead, through this client profile (with --metrics).",
    ),
    metrics: list[str] = typer.Option(
        [],
        "--metrics",
        help="With --profile: a node's Prometheus endpoint, http://HOST:PORT (every node, "
        "repeat the option).",
    ),
) -> None:
    """Measure what goml's real components cost on this machine (the SQLite store's
    fsync, a Raft hop with mutual TLS, a real node process's CPU per input, an agent's task
    dispatch) and write them as a `costs:` section; a scenario uses the file with
    `costs_file: PATH` (relative to the scenario), and the simulator then charges them.
    With --profile and --metrics: the same costs of a cluster deployed elsewhere, read
    from its nodes' metrics while this command submits to it (nothing is started there)."""
    from goml.chaos.calibrate import calibrate

    if profile is not None or metrics:
        _calibrate_deployed(out, profile, metrics, hop_samples)
        return
    if not data_dir.is_dir():
        raise typer.BadParameter(f"{data_dir}: not a directory", param_hint="'--data-dir'")
    calibrate(
        out,
        data_dir,
        fsync_samples,
        hop_samples,
        dispatch_samples,
        typer.echo,
        via_toxiproxy,
        process_cpu=not core_only,
    )
    typer.echo(f"wrote {out} (use it with `costs_file: {out}` in a scenario)")


def _calibrate_deployed(
    out: Path, profile_path: Path | None, metrics: list[str], calls: int
) -> None:
    from goml.chaos.calibrate_deployed import CalibrationError, calibrate_deployed
    from goml.client import Profile

    if profile_path is None or not metrics:
        raise typer.BadParameter(
            "a deployed cluster needs both --profile FILE and --metrics URL (one per node)",
            param_hint="'--profile'/'--metrics'",
        )
    try:
        profile = Profile.load(profile_path)
    except (OSError, ValueError) as error:
        raise typer.BadParameter(f"{profile_path}: {error}", param_hint="'--profile'") from error
    try:
        calibrate_deployed(out, profile, metrics, calls, typer.echo)
    except CalibrationError as error:
        typer.echo(f"goml chaos calibrate: {error}", err=True)
        raise typer.Exit(2) from error
    typer.echo(f"wrote {out} (use it with `costs_file: {out}` in a scenario)")


@agent_app.command("run")
def agent_run(config: Path = typer.Option(..., "--config", help="Agent config YAML.")) -> None:
    """Run a node agent in the foreground: register, heartbeat, lease, run tasks in child
    processes, report results (SIGTERM/Ctrl-C stops it)."""
    from goml.agent.runtime import main as agent_main

    raise typer.Exit(agent_main(str(config)))


@cluster_app.command("up")
def cluster_up(
    nodes: int = typer.Option(3, min=1, max=7, help="Control-plane nodes."),
    agents: int = typer.Option(0, min=0, max=16, help="Local agents started beside the nodes."),
    data_dir: Path = typer.Option(Path("goml-data"), help="Certificates, configs, stores, logs."),
    insecure: bool = typer.Option(
        False, "--insecure", help="Plaintext gRPC (local development only)."
    ),
) -> None:
    """Start a real local cluster (separate processes on loopback, TLS on) in the
    foreground and supervise it: a node or agent that dies is restarted with a backoff
    (given up on after 5 crashes in 2 minutes); Ctrl-C or SIGTERM stops every process it
    started. Leaves a client profile so `goml status` and `goml submit` work with no
    flags."""
    from goml.cluster import local
    from goml.cluster.config import ConfigError
    from goml.cluster.supervise import DEFAULT_POLICY

    try:
        layout = local.prepare(data_dir, nodes, insecure)
        extra = local.agent_processes(layout, agents)  # issues each agent's identity
    except (ValueError, OSError, ConfigError) as error:  # e.g. a data dir from before
        raise _fail(str(error)) from None

    def say(line: str) -> None:
        typer.secho(line, fg=typer.colors.YELLOW, err=True)

    def announce(leader: str) -> None:
        profile_path = local.publish_profile(layout)
        typer.echo(f"goml cluster up: {nodes} node(s), {agents} agent(s), leader {leader}")
        for name, address in sorted(layout.profile.nodes.items()):
            typer.echo(f"  {name}  {address}")
        typer.echo(f"data in {layout.data_dir}; client profile {profile_path}")
        typer.echo(f"logs in {layout.data_dir / 'logs'}, PIDs in {layout.data_dir / 'run'}")
        typer.echo("try: goml status   |   goml submit matmul --args '{\"n\": 64}' --wait")
        typer.echo("Ctrl-C stops the cluster.")

    code = local.cluster_up(layout, extra, DEFAULT_POLICY, say, announce, leader_timeout_s=30)
    if code == 0:
        typer.echo("stopped")
    raise typer.Exit(code)


@app.command("status")
def status(profile: Path | None = ProfileOption, timeout_s: float = TimeoutOption) -> None:
    """Members, leader, term, lag, agents and tasks by state."""
    _quiet_grpc()
    from rich.console import Console
    from rich.table import Table

    from goml.client import ClientError

    with _client(profile, timeout_s) as client:
        try:
            response = client.status()
        except ClientError as error:
            raise _fail(str(error)) from None
    console = Console()
    console.print(
        f"leader [bold]{response.leader_id or '-'}[/bold]  term {response.term}  commit {response.commit_index}"
    )
    pending = "" if response.membership_index <= response.commit_index else " (not committed)"
    console.print(
        f"voters {', '.join(response.voters) or '-'}  learners "
        f"{', '.join(response.learners) or '-'}  configuration at index "
        f"{response.membership_index}{pending}"
    )
    members = Table("member", "address", "role", "match/commit", "lag", "reachable", "caught up")
    for m in response.members:
        lag = max(0, response.commit_index - m.commit_index)
        members.add_row(
            m.id,
            m.address,
            m.role,
            str(m.commit_index),
            str(lag),
            "yes" if m.reachable else "no",
            "yes" if m.caught_up else "no",
        )
    console.print(members)
    agents = Table(
        "agent", "cloud/region", "arch", "cpu", "memory MB", "gpu", "state", "heartbeat age"
    )
    for a in response.agents:
        age = f"{a.last_heartbeat_age_ms} ms" if a.last_heartbeat_age_ms >= 0 else "-"
        agents.add_row(
            a.id,
            f"{a.cloud}/{a.region}",
            a.arch,
            f"{a.capacity.cpu:g}",
            str(a.capacity.memory_mb),
            str(a.capacity.gpu),
            a.state,
            age,
        )
    console.print(agents)
    from goml.proto import api_pb2

    # Every state of the API in lifecycle order, zeros too (the node sends them all);
    # anything else a newer node sends comes after.
    order = [name for name, _ in api_pb2.TaskState.items() if name != "TASK_STATE_UNSPECIFIED"]
    counts = dict(response.tasks_by_state)
    tasks = Table("task state", "count", "")
    for state in [*order, *sorted(set(counts) - set(order))]:
        note = TASK_STATE_NOTES.get(state, "")
        tasks.add_row(state, str(counts.get(state, 0)), note)
    console.print(tasks)


@app.command("submit")
def submit(
    function: str = typer.Argument(
        ..., metavar="FUNCTION", callback=_name, help="A registered task function, e.g. matmul."
    ),
    args: str | None = typer.Option(
        None, "--args", help="Arguments as a JSON object (default: {}), e.g. '{\"n\": 64}'."
    ),
    args_file: Path | None = typer.Option(
        None,
        "--args-file",
        metavar="PATH",
        help=f"Read the arguments (a JSON object) from PATH, '-' for stdin; at most "
        f"{ARGS_FILE_BYTES_MAX} bytes (for args too large for a command line).",
    ),
    wait: bool = typer.Option(False, "--wait", help="Wait for the result and print it."),
    cpu: float = typer.Option(
        1.0, callback=_number(0.0, CPU_CORES_MAX), help="CPU cores the task needs."
    ),
    memory_mb: int = typer.Option(
        256, callback=_integer(0, INT64_MAX, "an int64 >= 0"), help="Memory the task needs."
    ),
    gpu: int = typer.Option(
        0, callback=_integer(0, INT64_MAX, "an int64 >= 0"), help="GPUs the task needs."
    ),
    priority: int = typer.Option(0, callback=_integer(INT32_MIN, INT32_MAX, "an int32")),
    max_attempts: int = typer.Option(3, callback=_integer(1, INT32_MAX, "an int32 >= 1")),
    timeout_ms: int = typer.Option(60_000, callback=_integer(1, INT64_MAX, "an int64 >= 1")),
    key: str | None = typer.Option(
        None, "--key", callback=_name, help="Idempotency key (default: random)."
    ),
    wait_s: float = typer.Option(
        120.0, callback=_number(0.0, WAIT_S_MAX, low_open=True), help="How long --wait waits."
    ),
    isolated: bool = typer.Option(
        False,
        "--isolated",
        help="Run it in a fresh process of its own instead of an agent's warm worker "
        "(slower to start; nothing it leaves in the process outlives it).",
    ),
    profile: Path | None = ProfileOption,
    timeout_s: float = TimeoutOption,
) -> None:
    """Submit one task; prints its id (and, with --wait, its result)."""
    _quiet_grpc()
    from goml.client import ClientError

    parsed = _task_args(args, args_file)
    with _client(profile, timeout_s) as client:
        try:
            task_id = client.submit(
                function,
                parsed,
                cpu=cpu,
                memory_mb=memory_mb,
                gpu=gpu,
                priority=priority,
                max_attempts=max_attempts,
                timeout_ms=timeout_ms,
                idempotency_key=key,
                isolated=isolated,
            )
            typer.echo(task_id)
            if wait:
                task = client.wait(task_id, wait_s)
                _print_task(task)
                if task.state != 4:  # SUCCEEDED
                    raise typer.Exit(1)
        except (ClientError, TimeoutError) as error:
            raise _fail(str(error)) from None


def _task_args(args: str | None, args_file: Path | None) -> dict[str, Any]:
    """The task's arguments from --args or --args-file: a JSON object, or exit 2."""
    if args is not None and args_file is not None:
        raise _fail("give --args or --args-file, not both")
    option = "--args-file" if args_file is not None else "--args"
    if args_file is None:
        text = args if args is not None else "{}"
    else:
        try:
            if str(args_file) == "-":
                data = sys.stdin.buffer.read(ARGS_FILE_BYTES_MAX + 1)
            else:
                with args_file.open("rb") as handle:
                    data = handle.read(ARGS_FILE_BYTES_MAX + 1)
            if len(data) > ARGS_FILE_BYTES_MAX:
                raise _fail(f"--args-file: more than {ARGS_FILE_BYTES_MAX} bytes")
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise _fail(f"--args-file: cannot read {args_file}: {error}") from None

    def refuse_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        parsed = json.loads(text, parse_constant=refuse_constant)
    except ValueError as error:  # JSONDecodeError included
        raise _fail(f"{option} is not JSON: {error}") from None
    except RecursionError:
        raise _fail(f"{option}: nested too deeply") from None
    if not isinstance(parsed, dict):
        kind = "null" if parsed is None else type(parsed).__name__
        raise _fail(f"{option} must be a JSON object of arguments, not {kind}")
    return parsed


def _print_task(task: object) -> None:
    from google.protobuf.json_format import MessageToDict

    from goml.proto import api_pb2

    assert isinstance(task, api_pb2.Task)
    body = MessageToDict(task, preserving_proto_field_name=True)
    typer.echo(json.dumps(body, indent=2))


TaskIdArgument = typer.Argument(
    ..., metavar="TASK_ID", callback=_name, help="A task id, e.g. t-12-0."
)


@task_app.command("get")
def task_get(
    task_id: str = TaskIdArgument,
    profile: Path | None = ProfileOption,
    timeout_s: float = TimeoutOption,
) -> None:
    """Show one task."""
    _quiet_grpc()
    from goml.client import ClientError

    with _client(profile, timeout_s) as client:
        try:
            _print_task(client.get(task_id))
        except ClientError as error:
            raise _fail(str(error)) from None


@task_app.command("list")
def task_list(
    state: str = typer.Option("", help="PENDING, LEASED, RUNNING, SUCCEEDED, DEAD or CANCELLED."),
    function: str = typer.Option("", callback=_name),
    agent: str = typer.Option("", callback=_name),
    limit: int = typer.Option(
        100,
        callback=_integer(1, LIST_TASKS_MAX, "tasks to list"),
        help="At most this many (paged: any number up to the manifest's size).",
    ),
    newest_first: bool = typer.Option(
        False, "--newest-first", help="Newest submitted first (default: oldest first)."
    ),
    profile: Path | None = ProfileOption,
    timeout_s: float = TimeoutOption,
) -> None:
    """List tasks in submit order, oldest (or with --newest-first, newest) first."""
    _quiet_grpc()
    from goml.client import ClientError
    from goml.proto import api_pb2

    try:
        state_value = (
            api_pb2.TaskState.Value(state.upper()) if state else api_pb2.TASK_STATE_UNSPECIFIED
        )
    except ValueError:
        raise _fail(f"--state: unknown state {state!r}") from None
    with _client(profile, timeout_s) as client:
        try:
            tasks = client.list_tasks(state_value, function, agent, limit, newest_first)
        except ClientError as error:
            raise _fail(str(error)) from None
    for t in tasks:
        typer.echo(
            f"{t.id}  {api_pb2.TaskState.Name(t.state):9}  {t.spec.function:14} attempts={t.attempts} agent={t.agent_id or '-'}"
        )


@task_app.command("export")
def task_export(
    out: Path | None = typer.Option(
        None, "--out", help="Write here (a new file; default: stdout). Needed with --ack."
    ),
    since: int | None = typer.Option(
        None,
        "--since",
        metavar="FINISHED_SEQ",
        callback=_integer(0, INT64_MAX, "a finished_seq, as an export reports it"),
        help="Only tasks that finished after this one (default: the export watermark "
        "with --ack, else the oldest kept).",
    ),
    ack: bool = typer.Option(
        False,
        "--ack",
        help="Once the file is on disk, tell the cluster these tasks are archived (an "
        "admin's call; with retention.require_export only archived tasks are pruned).",
    ),
    profile: Path | None = ProfileOption,
    timeout_s: float = TimeoutOption,
) -> None:
    """Write finished tasks (SUCCEEDED, DEAD, CANCELLED) as JSON lines in the order they
    finished, for an archive before retention prunes them; a summary goes to stderr."""
    _quiet_grpc()
    from goml.client import ClientError
    from goml.export import ExportError, export_finished

    with _client(profile, timeout_s) as client:
        try:
            summary = export_finished(client, out, since, ack)
        except (ClientError, ExportError, OSError) as error:
            raise _fail(str(error)) from None
    where = str(out) if out is not None else "stdout"
    typer.echo(
        f"exported {summary.tasks} finished task(s), finished_seq "
        f"{summary.since_seq + 1}..{summary.through_seq}, to {where}; export watermark "
        f"{summary.watermark_seq}; next: --since {summary.through_seq}",
        err=True,
    )
    if summary.gap:
        typer.secho(
            f"warning: finished_seq {summary.since_seq + 1}..{summary.pruned_through_seq} "
            "were pruned before this export read them: they are not in it",
            fg=typer.colors.YELLOW,
            err=True,
        )


@task_app.command("watch")
def task_watch(
    task_ids: list[str] = typer.Argument(
        None, metavar="TASK_ID", callback=_name, help="Task ids (default: all)."
    ),
    seconds: float = typer.Option(
        60.0, callback=_number(0.0, WAIT_S_MAX, low_open=True), help="How long to watch."
    ),
    profile: Path | None = ProfileOption,
    timeout_s: float = TimeoutOption,
) -> None:
    """Stream state changes of the given tasks for a while; with no TASK_ID, of every
    task (as `kubectl get --watch` does: naming none asks for all). A node that cannot
    be reached is replaced by another; when none can be, the error names them. What
    was watched and how many events came is said on stderr, also when none did."""
    _quiet_grpc()
    from goml.client import ClientError
    from goml.proto import api_pb2

    what = f"{len(task_ids)} task(s)" if task_ids else "every task"
    # On stderr, so stdout keeps only events: an idle watch still says what it did.
    typer.echo(f"watching {what} for {seconds:g} s (Ctrl-C stops)", err=True)
    events = 0
    with _client(profile, timeout_s) as client:
        try:
            for event in client.watch(task_ids or [], seconds):
                events += 1
                typer.echo(
                    f"{event.raft_index}  {event.task.id}  {api_pb2.TaskState.Name(event.task.state)}"
                )
        except ClientError as error:
            raise _fail(str(error)) from None
    typer.echo(f"watch ended after {seconds:g} s: {events} event(s)", err=True)


@task_app.command("cancel")
def task_cancel(
    task_id: str = TaskIdArgument,
    profile: Path | None = ProfileOption,
    timeout_s: float = TimeoutOption,
) -> None:
    """Cancel a task that has not finished."""
    _quiet_grpc()
    from goml.client import ClientError

    with _client(profile, timeout_s) as client:
        try:
            _print_task(client.cancel(task_id))
        except ClientError as error:
            raise _fail(str(error)) from None


@scenario_app.command("validate")
def scenario_validate(
    files: list[Path] = typer.Argument(..., help="Scenario YAML files to check."),
) -> None:
    """Print `FILE: ok` (and any warnings) or every problem as FILE:LINE: field: message;
    exit code 2 if any file has a problem."""
    from goml.scenario.loader import ScenarioError, load_scenario

    failed = False
    for path in files:
        try:
            loaded = load_scenario(path)
        except ScenarioError as exc:
            failed = True
            typer.echo(str(exc), err=True)
            continue
        typer.echo(f"{path}: ok")
        for warning in loaded.warnings:
            typer.echo(str(warning))
    if failed:
        raise typer.Exit(2)


@scenario_app.command("schema")
def scenario_schema() -> None:
    """Print the JSON Schema of scenario files (for editors)."""
    from goml.scenario.schema import json_schema

    typer.echo(json.dumps(json_schema(), indent=2))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
