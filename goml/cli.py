"""The `goml` command line. Subcommands import their modules lazily so `goml --help` is fast."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from goml.client import Client

app = typer.Typer(
    help="goml: a fault-tolerant orchestrator for ML and data tasks across clouds.",
    no_args_is_help=True,
    add_completion=False,
)
raft_app = typer.Typer(
    help="goml's own Raft core: demo and seeded safety checks.", no_args_is_help=True
)
app.add_typer(raft_app, name="raft")
certs_app = typer.Typer(
    help="Cluster credentials: CA, node and client certificates, secrets.", no_args_is_help=True
)
app.add_typer(certs_app, name="certs")
cluster_app = typer.Typer(help="A real local cluster on loopback.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
node_app = typer.Typer(help="Run one control-plane node.", no_args_is_help=True)
app.add_typer(node_app, name="node")
agent_app = typer.Typer(help="Run a node agent.", no_args_is_help=True)
app.add_typer(agent_app, name="agent")
sim_app = typer.Typer(
    help="The simulator: scenarios on a SimPy model of the cross-cloud network.",
    no_args_is_help=True,
)
app.add_typer(sim_app, name="sim")
task_app = typer.Typer(help="Inspect and control tasks.", no_args_is_help=True)
app.add_typer(task_app, name="task")

ProfileOption = typer.Option(
    None,
    "--profile",
    help="Client profile JSON (default: ~/.config/goml/profile.json or $GOML_PROFILE).",
)


def _mount_scenario() -> None:
    from goml.scenario.cli import scenario_app

    app.add_typer(scenario_app, name="scenario", help="Scenario YAML: validate, JSON Schema.")


_mount_scenario()


@raft_app.command("check")
def raft_check(
    seeds: str = typer.Option("1-100", help="Seed range to run, e.g. 1-1000."),
    seed: int | None = typer.Option(None, help="Replay exactly one seed."),
) -> None:
    """Run the seeded in-process cluster harness (faults, crashes, partitions) and check
    Raft's safety properties; a failing seed prints the command that replays it."""
    from goml.raft import harness

    argv = ["--seed", str(seed)] if seed is not None else ["--seeds", seeds]
    raise typer.Exit(harness.main(argv))


@raft_app.command("demo")
def raft_demo(
    nodes: int = typer.Option(3, min=1, max=7, help="Number of Raft nodes."),
    proposals: int = typer.Option(200, min=1, help="Proposals before and after the failover."),
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


def _client(profile: Path | None) -> Client:
    from goml.client import Client, Profile

    try:
        return Client(Profile.load(profile))
    except (FileNotFoundError, ValueError) as error:
        raise _fail(str(error)) from None


@certs_app.command("init")
def certs_init(
    directory: Path = typer.Argument(..., help="Where to write the CA, certificates and secrets."),
    nodes: list[str] = typer.Option(..., "--node", help="A node name (repeat for each node)."),
    hosts: list[str] = typer.Option(
        ["127.0.0.1", "localhost"],
        "--host",
        help="A host name or IP the node certificates are valid for.",
    ),
    force: bool = typer.Option(False, help="Replace an existing CA."),
) -> None:
    """Create a cluster CA, a certificate per node, a client certificate, the Raft cluster
    secret and a client token (private files are mode 0600)."""
    from goml.cluster.certs import init_certs

    try:
        init_certs(directory, nodes, hosts, force=force)
    except (FileExistsError, ValueError) as error:
        raise _fail(str(error)) from None
    typer.echo(
        f"wrote CA, {len(nodes)} node certificate(s), client certificate and secrets to {directory}"
    )


@node_app.command("run")
def node_run(config: Path = typer.Option(..., "--config", help="Node config YAML.")) -> None:
    """Run one control-plane node in the foreground (SIGTERM/Ctrl-C stops it cleanly)."""
    from goml.cluster.config import ConfigError
    from goml.cluster.daemon import run
    from goml.raft.sqlite_store import StoreCorrupted, StoreLocked

    try:
        run(config)
    except (
        ConfigError,
        StoreCorrupted,
        StoreLocked,
        FileNotFoundError,
        PermissionError,
        OSError,
    ) as error:
        raise _fail(str(error)) from None


def _reference_scenario() -> Path:
    """The embedded reference scenario (scenarios/steady.yaml in a checkout links to it)."""
    from importlib.resources import files

    return Path(str(files("goml.scenario") / "reference.yaml"))


@sim_app.command("run")
def sim_run(
    scenario: Path | None = typer.Argument(
        None, help="Scenario YAML (default: the embedded reference scenario)."
    ),
    seed: int | None = typer.Option(None, help="Seed (default: the scenario's)."),
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
    jobs: int = typer.Option(2, "-j", "--jobs", min=1, help="Parallel processes."),
    out: Path | None = typer.Option(None, help="Write every seed's summary here."),
) -> None:
    """Run many seeds in parallel, aggregate the distributions, list failing seeds
    with the exact command that replays each."""
    from goml.sim.runner import parse_seeds, sweep_command

    try:
        seed_list = parse_seeds(seeds)
    except ValueError as error:
        raise _fail(str(error)) from None
    raise typer.Exit(sweep_command(scenario, seed_list, jobs, out))


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
    seed: int | None = typer.Option(None, help="Seed (default: the scenario's)."),
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
) -> None:
    """Run a scenario on a real local cluster (nodes and agents as processes, TLS on, a
    Toxiproxy proxy on every link): plays the faults and the workload, checks every store
    for lost or duplicated tasks, writes the report next to the simulator's prediction,
    exits non-zero when an expectation fails."""
    from goml.chaos.runner import run_command as chaos_command

    raise typer.Exit(chaos_command(scenario, seed, out, as_json, toxiproxy_bin, toxiproxy_url))


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
    foreground; Ctrl-C stops it. Leaves a client profile so `goml status` and
    `goml submit` work with no flags."""
    import signal
    import time

    from goml.cluster import local

    try:
        layout = local.prepare(data_dir, nodes, insecure)
    except (ValueError, FileExistsError) as error:
        raise _fail(str(error)) from None
    extra = local.agent_processes(layout, agents)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    with local.running_cluster(layout, extra) as processes:
        try:
            leader = local.wait_for_leader(layout.profile, timeout_s=30)
        except TimeoutError as error:
            raise _fail(f"{error}; see the logs in {layout.data_dir / 'logs'}") from None
        profile_path = local.publish_profile(layout)
        typer.echo(f"goml cluster up: {nodes} node(s), {agents} agent(s), leader {leader}")
        for name, address in sorted(layout.profile.nodes.items()):
            typer.echo(f"  {name}  {address}")
        typer.echo(f"data in {layout.data_dir}; client profile {profile_path}")
        typer.echo("try: goml status   |   goml submit matmul --args '{\"n\": 64}' --wait")
        typer.echo("Ctrl-C stops the cluster.")
        while not stop:
            for process in processes:
                if process.popen.poll() is not None:
                    typer.secho(
                        f"{process.name} exited with {process.popen.returncode}; see {process.log_path}",
                        fg=typer.colors.YELLOW,
                        err=True,
                    )
                    processes.remove(process)
                    break
            time.sleep(0.2)  # the foreground loop waits for Ctrl-C
        typer.echo("stopping...")
    typer.echo("stopped")


@app.command("status")
def status(profile: Path | None = ProfileOption) -> None:
    """Members, leader, term, lag, agents and tasks by state."""
    from rich.console import Console
    from rich.table import Table

    from goml.client import ClientError

    with _client(profile) as client:
        try:
            response = client.status()
        except ClientError as error:
            raise _fail(str(error)) from None
    console = Console()
    console.print(
        f"leader [bold]{response.leader_id or '-'}[/bold]  term {response.term}  commit {response.commit_index}"
    )
    members = Table("member", "address", "role", "match/commit", "lag", "reachable")
    for m in response.members:
        lag = max(0, response.commit_index - m.commit_index)
        members.add_row(
            m.id, m.address, m.role, str(m.commit_index), str(lag), "yes" if m.reachable else "no"
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
    tasks = Table("task state", "count")
    for state, count in sorted(response.tasks_by_state.items()):
        tasks.add_row(state, str(count))
    console.print(tasks)


@app.command("submit")
def submit(
    function: str = typer.Argument(..., help="A registered task function, e.g. matmul."),
    args: str = typer.Option("{}", "--args", help="Arguments as JSON."),
    wait: bool = typer.Option(False, "--wait", help="Wait for the result and print it."),
    cpu: float = typer.Option(1.0, help="CPU cores the task needs."),
    memory_mb: int = typer.Option(256, help="Memory the task needs."),
    gpu: int = typer.Option(0, help="GPUs the task needs."),
    priority: int = typer.Option(0),
    max_attempts: int = typer.Option(3, min=1),
    timeout_ms: int = typer.Option(60_000, min=1),
    key: str | None = typer.Option(None, "--key", help="Idempotency key (default: random)."),
    wait_s: float = typer.Option(120.0, help="How long --wait waits."),
    profile: Path | None = ProfileOption,
) -> None:
    """Submit one task; prints its id (and, with --wait, its result)."""
    import json

    from goml.client import ClientError

    try:
        parsed = json.loads(args)
    except json.JSONDecodeError as error:
        raise _fail(f"--args is not JSON: {error}") from None
    with _client(profile) as client:
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
            )
            typer.echo(task_id)
            if wait:
                task = client.wait(task_id, wait_s)
                _print_task(task)
                if task.state != 4:  # SUCCEEDED
                    raise typer.Exit(1)
        except (ClientError, TimeoutError) as error:
            raise _fail(str(error)) from None


def _print_task(task: object) -> None:
    from google.protobuf.json_format import MessageToDict

    from goml.proto import api_pb2

    assert isinstance(task, api_pb2.Task)
    body = MessageToDict(task, preserving_proto_field_name=True)
    typer.echo(json.dumps(body, indent=2))


@task_app.command("get")
def task_get(task_id: str, profile: Path | None = ProfileOption) -> None:
    """Show one task."""
    from goml.client import ClientError

    with _client(profile) as client:
        try:
            _print_task(client.get(task_id))
        except ClientError as error:
            raise _fail(str(error)) from None


@task_app.command("list")
def task_list(
    state: str = typer.Option("", help="PENDING, LEASED, RUNNING, SUCCEEDED, DEAD or CANCELLED."),
    function: str = typer.Option(""),
    agent: str = typer.Option(""),
    limit: int = typer.Option(100, min=1),
    profile: Path | None = ProfileOption,
) -> None:
    """List tasks, newest filters first."""
    from goml.client import ClientError
    from goml.proto import api_pb2

    try:
        state_value = (
            api_pb2.TaskState.Value(state.upper()) if state else api_pb2.TASK_STATE_UNSPECIFIED
        )
    except ValueError:
        raise _fail(f"unknown state {state!r}") from None
    with _client(profile) as client:
        try:
            tasks = client.list_tasks(state_value, function, agent, limit)
        except ClientError as error:
            raise _fail(str(error)) from None
    for t in tasks:
        typer.echo(
            f"{t.id}  {api_pb2.TaskState.Name(t.state):9}  {t.spec.function:14} attempts={t.attempts} agent={t.agent_id or '-'}"
        )


@task_app.command("watch")
def task_watch(
    task_ids: list[str] = typer.Argument(None),
    seconds: float = typer.Option(60.0),
    profile: Path | None = ProfileOption,
) -> None:
    """Stream state changes of the given tasks (or all) for a while."""
    from goml.client import ClientError
    from goml.proto import api_pb2

    with _client(profile) as client:
        try:
            for event in client.watch(task_ids or [], seconds):
                typer.echo(
                    f"{event.raft_index}  {event.task.id}  {api_pb2.TaskState.Name(event.task.state)}"
                )
        except ClientError as error:
            raise _fail(str(error)) from None


@task_app.command("cancel")
def task_cancel(task_id: str, profile: Path | None = ProfileOption) -> None:
    """Cancel a task that has not finished."""
    from goml.client import ClientError

    with _client(profile) as client:
        try:
            _print_task(client.cancel(task_id))
        except ClientError as error:
            raise _fail(str(error)) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
