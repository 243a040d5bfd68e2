"""A local lab of five systemd hosts for the real deploy (root only).

Each host is a systemd-nspawn container booted with systemd as PID 1 and a real sshd,
from one overlayfs copy of a cached Debian bookworm root file system, inside its own
network namespace joined to a bridge by a veth pair (10.200.0.0/24). Taking a host's veth
down cuts it off. Everything the lab creates is recorded in DIR/lab.json (process ids,
mounts, namespaces, links, firewall rules) and torn down from there.

Docker and the lab on one machine: once dockerd has run, the iptables FORWARD policy is
DROP, and with br_netfilter's net.bridge.bridge-nf-call-iptables = 1 the frames bridged
between two lab hosts go through FORWARD too, so the bridge carries nothing between them.
The lab therefore inserts ACCEPT rules for its own bridge (in FORWARD, and in DOCKER-USER,
Docker's chain for rules of its users, when that exists) and deletes exactly those at
teardown. They are added whether or not Docker has run yet: dockerd started after the
lab puts its own rules in front and changes the policy, but never removes ours, so the
lab keeps working in either order. Nothing else of the firewall or sysctls is changed.

    python pyinfra/lab.py up   [--dir DIR]   boot the hosts, print the inventory command
    python pyinfra/lab.py add NAME [--cloud C --region R] [--dir DIR]
                                             one more host (a sixth, or a replacement);
                                             the lab inventory includes it from then on
    python pyinfra/lab.py down [--dir DIR]   tear down what `up` (and `add`) created

A host added later costs one more overlay and namespace and a boot (about 3 s): no
debootstrap, nothing the first five do not share.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

CACHE = Path(os.environ.get("GOML_LAB_CACHE", "/var/cache/goml-lab"))
ROOTFS = CACHE / "rootfs-bookworm"
READY = ".goml-lab-ready"
PACKAGES = "systemd,systemd-sysv,dbus,python3,python3-venv,openssh-server,iproute2"
DEFAULT_DIR = Path("/var/lib/goml-lab")
BRIDGE = "gomllab0"
BRIDGE_ADDRESS = "10.200.0.1"
PREFIX = "gomllab"
# name, cloud, region: the reference topology (all amd64 in the lab)
HOSTS = (
    ("aws-1", "aws", "us-east-1"),
    ("aws-2", "aws", "us-east-1"),
    ("aws-3", "aws", "us-east-1"),
    ("gcp-1", "gcp", "us-central1"),
    ("gcp-2", "gcp", "us-central1"),
)
HOSTS_MAX = 200  # 10.200.0.11 onwards, within the /24
BOOT_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0


class LabError(RuntimeError):
    pass


def run(*command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if check and result.returncode != 0:
        raise LabError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def unavailable_reason() -> str | None:
    """Why the lab cannot run here (None when it can); installs missing tools via apt."""
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, overlay mounts, systemd-nspawn)"
    if sys.platform != "linux":
        return "the lab needs Linux"
    missing = [t for t in ("systemd-nspawn", "debootstrap", "iptables") if shutil.which(t) is None]
    needed = {"systemd-nspawn", "iptables"} | (
        set() if ROOTFS.joinpath(READY).exists() else {"debootstrap"}
    )
    missing = [t for t in missing if t in needed]
    if missing:
        if shutil.which("apt-get") is None:
            return f"{', '.join(missing)} missing and no apt-get to install it"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env, check=False)
        result = subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends"]
            + [{"systemd-nspawn": "systemd-container"}.get(t, t) for t in missing],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        if result.returncode != 0:
            return f"{', '.join(missing)} missing and apt-get could not install it: {result.stderr[-500:]}"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    result = run("ip", "netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"cannot create network namespaces: {result.stderr.strip()}"
    run("ip", "netns", "del", probe, check=False)
    return None


def debian_mirror() -> str:
    """The Debian mirror apt already uses (deb822 or one-line sources)."""
    paths = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            for word in words:
                if word.startswith("http") and word.rstrip("/").endswith("/debian"):
                    return word
    return "http://deb.debian.org/debian"


def ensure_rootfs() -> Path:
    """The cached root file system, built once with debootstrap (about 2-3 minutes)."""
    if (ROOTFS / READY).is_file():
        return ROOTFS
    partial = CACHE / "rootfs-bookworm.partial"
    shutil.rmtree(partial, ignore_errors=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    run(
        "debootstrap",
        "--variant=minbase",
        f"--include={PACKAGES}",
        "bookworm",
        str(partial),
        debian_mirror(),
    )
    sshd = partial / "etc/ssh/sshd_config.d/goml-lab.conf"
    sshd.write_text("PermitRootLogin prohibit-password\nUseDNS no\nPasswordAuthentication no\n")
    (partial / "etc/machine-id").write_text("")  # each host gets its own at first boot
    (partial / READY).write_text("bookworm minbase\n")
    shutil.rmtree(ROOTFS, ignore_errors=True)
    partial.rename(ROOTFS)
    return ROOTFS


@dataclass
class LabHost:
    name: str
    cloud: str
    region: str
    address: str
    netns: str
    veth: str
    machine: str
    root: str
    pid: int = 0

    @property
    def dir(self) -> Path:
        return Path(self.root).parent


def _ssh_keypair(directory: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    path = directory / "id_ed25519"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
        )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    (directory / "id_ed25519.pub").write_bytes(public + b" goml-lab\n")
    return path


def _wait_for(condition: Any, timeout_s: float, what: str, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise LabError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)  # polling interval of a condition with a deadline


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child of ours counts as gone.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


class Lab:
    """Five booted hosts; `up()` then `down()` (down is safe to call on partial state)."""

    def __init__(self, directory: Path = DEFAULT_DIR) -> None:
        self.dir = directory.resolve()
        self.state_path = self.dir / "lab.json"
        self.hosts: dict[str, LabHost] = {}
        self.created: dict[str, list[Any]] = {
            "bridge": [],
            "netns": [],
            "mounts": [],
            "iptables": [],  # [chain, *rule] as inserted
        }
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self.key = self.dir / "id_ed25519"

    # -------------------------------------------------------------- state file

    def _save(self) -> None:
        body = {
            "dir": str(self.dir),
            "key": str(self.key),
            "known_hosts": str(self.dir / "known_hosts"),
            "hosts": [asdict(h) for h in self.hosts.values()],
            "created": self.created,
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=2))
        tmp.replace(self.state_path)

    @classmethod
    def load(cls, directory: Path = DEFAULT_DIR) -> Lab:
        lab = cls(directory)
        body = json.loads(lab.state_path.read_text())
        lab.hosts = {h["name"]: LabHost(**h) for h in body["hosts"]}
        lab.created = body["created"]
        return lab

    # -------------------------------------------------------------- up

    def up(self) -> None:
        if self.state_path.exists():
            raise LabError(
                f"{self.state_path} exists: a lab may still be running; "
                f"run `python pyinfra/lab.py down --dir {self.dir}` first"
            )
        if Path(f"/sys/class/net/{BRIDGE}").exists():
            raise LabError(f"bridge {BRIDGE} exists: another lab is running on this machine")
        ensure_rootfs()  # before anything is created: the first run debootstraps
        self.dir.mkdir(parents=True, exist_ok=True)
        self._save()
        _ssh_keypair(self.dir)
        public_key = (self.dir / "id_ed25519.pub").read_text()
        (self.dir / "known_hosts").write_text("")
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        self.created["bridge"].append(BRIDGE)
        self._save()
        run("ip", "addr", "add", f"{BRIDGE_ADDRESS}/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        self._accept_bridge_traffic()
        for name, cloud, region in HOSTS:
            self._create_host(name, cloud, region, public_key)
        for host in self.hosts.values():
            self.boot(host.name)
        for host in self.hosts.values():
            self.wait_ssh(host.name)

    def _create_host(self, name: str, cloud: str, region: str, public_key: str) -> LabHost:
        rootfs = ensure_rootfs()
        if name in self.hosts:
            raise LabError(f"the lab has a host {name} already")
        # Addresses are never reused: a replacement host gets a fresh one.
        index = len(self.hosts)
        if index > HOSTS_MAX:
            raise LabError(f"the lab holds at most {HOSTS_MAX + 1} hosts")
        host = LabHost(
            name=name,
            cloud=cloud,
            region=region,
            address=f"10.200.0.{11 + index}",
            netns=f"{PREFIX}-{name}",
            veth=f"glv-{name}",
            machine=f"{PREFIX}-{name}",
            root=str(self.dir / name / "root"),
        )
        self.hosts[name] = host
        run("ip", "netns", "add", host.netns)
        self.created["netns"].append(host.netns)
        self._save()
        run(
            "ip", "link", "add", host.veth, "type", "veth",
            "peer", "name", "eth0", "netns", host.netns,
        )  # fmt: skip
        run("ip", "link", "set", host.veth, "master", BRIDGE, "up")
        run("ip", "-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        run("ip", "-n", host.netns, "link", "set", "eth0", "up")
        run("ip", "-n", host.netns, "link", "set", "lo", "up")
        for sub in ("upper", "work", "root"):
            (host.dir / sub).mkdir(parents=True, exist_ok=True)
        run(
            "mount",
            "-t",
            "overlay",
            "overlay",
            "-o",
            f"lowerdir={rootfs},upperdir={host.dir / 'upper'},workdir={host.dir / 'work'}",
            host.root,
        )
        self.created["mounts"].append(host.root)
        self._save()
        root = Path(host.root)
        (root / "etc/hostname").write_text(f"{name}\n")
        (root / "etc/hosts").write_text(
            "127.0.0.1 localhost\n"
            + "".join(f"{h.address} {h.name}\n" for h in self.hosts.values())
        )
        ssh_dir = root / "root/.ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(public_key)
        os.chmod(ssh_dir / "authorized_keys", 0o600)
        return host

    def add_host(self, name: str, cloud: str, region: str, systemd: bool = True) -> LabHost:
        """One more host; systemd=False runs sshd as PID 1 instead (a host without systemd)."""
        host = self._create_host(name, cloud, region, (self.dir / "id_ed25519.pub").read_text())
        self.boot(name, systemd=systemd)
        self.wait_ssh(name)
        return host

    def boot(self, name: str, systemd: bool = True) -> None:
        host = self.hosts[name]
        log = open(host.dir / "console.log", "ab")  # noqa: SIM115 - handed to the child
        process = subprocess.Popen(
            [
                "systemd-nspawn",
                "-D",
                host.root,
                "-M",
                host.machine,
                *(["-b"] if systemd else []),
                "--register=no",
                "--keep-unit",
                f"--network-namespace-path=/run/netns/{host.netns}",
                "--console=passive",
                *(
                    []
                    if systemd
                    else ["/bin/sh", "-c", "mkdir -p /run/sshd && exec /usr/sbin/sshd -D -e"]
                ),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self._procs[name] = process
        host.pid = process.pid
        self._save()

    def wait_ssh(self, name: str, timeout_s: float = BOOT_TIMEOUT_S) -> None:
        host = self.hosts[name]

        def banner() -> bool:
            process = self._procs.get(name)
            if process is not None and process.poll() is not None:
                tail = (host.dir / "console.log").read_text(errors="replace")[-2000:]
                raise LabError(f"{name}: systemd-nspawn exited ({process.returncode}):\n{tail}")
            try:
                with socket.create_connection((host.address, 22), timeout=1.0) as sock:
                    sock.settimeout(2.0)
                    return sock.recv(64).startswith(b"SSH-")
            except OSError:
                return False

        _wait_for(banner, timeout_s, f"sshd on {name} ({host.address})")

    def _accept_bridge_traffic(self) -> None:
        """ACCEPT what the bridge forwards between its own ports, ahead of any DROP
        (see the module's docstring: Docker's FORWARD policy)."""
        rule = [
            *("-i", BRIDGE, "-o", BRIDGE),
            *("-m", "comment", "--comment", f"goml-lab {self.dir}"),
            *("-j", "ACCEPT"),
        ]
        chains = ["FORWARD"]
        if run("iptables", "-w", "-S", "DOCKER-USER", check=False).returncode == 0:
            chains.append("DOCKER-USER")
        for chain in chains:
            run("iptables", "-w", "-I", chain, "1", *rule)
            self.created.setdefault("iptables", []).append([chain, *rule])
            self._save()

    def _delete_rules(self, problems: list[str]) -> None:
        for entry in list(self.created.get("iptables", [])):
            chain, *rule = entry
            if run("iptables", "-w", "-C", chain, *rule, check=False).returncode == 0:
                result = run("iptables", "-w", "-D", chain, *rule, check=False)
                if result.returncode != 0:
                    problems.append(
                        f"iptables -D {chain} {' '.join(rule)}: {result.stderr.strip()}"
                    )
                    continue
            self.created["iptables"].remove(entry)

    # -------------------------------------------------------------- faults

    def link(self, name: str, up: bool) -> None:
        run("ip", "link", "set", self.hosts[name].veth, "up" if up else "down")

    def stop_host(self, name: str, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Stop one container by its systemd-nspawn PID (SIGTERM asks systemd to power
        off; SIGKILL after the deadline)."""
        host = self.hosts[name]
        if not host.pid or not _pid_alive(host.pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(host.pid, signal.SIGTERM)
        try:
            self._wait_exit(name, timeout_s)
        except LabError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(host.pid, signal.SIGKILL)
            self._wait_exit(name, 10.0)

    def _wait_exit(self, name: str, timeout_s: float) -> None:
        host = self.hosts[name]
        process = self._procs.get(name)
        if process is not None:
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise LabError(f"{name}: systemd-nspawn {host.pid} still running") from None
        else:
            _wait_for(lambda: not _pid_alive(host.pid), timeout_s, f"{name} to stop")

    def reboot(self, name: str, ssh_command: Any) -> None:
        """`systemctl reboot` inside the host; the container exits, we boot it again."""
        ssh_command(name, "systemctl reboot", check=False)
        self._wait_exit(name, STOP_TIMEOUT_S)
        self.boot(name)
        self.wait_ssh(name)

    # -------------------------------------------------------------- down

    def down(self) -> list[str]:
        """Tear down everything recorded, in reverse; returns the problems met (if any)."""
        problems: list[str] = []
        for name in list(self.hosts):
            try:
                self.stop_host(name)
            except (LabError, OSError) as error:
                problems.append(str(error))
        for mount in reversed(self.created.get("mounts", [])):
            if os.path.ismount(mount):
                result = run("umount", mount, check=False)
                if result.returncode != 0:
                    problems.append(f"umount {mount}: {result.stderr.strip()}")
                    continue
            self.created["mounts"].remove(mount)
        for netns in reversed(self.created.get("netns", [])):
            host = next((h for h in self.hosts.values() if h.netns == netns), None)
            if host is not None:
                run("ip", "link", "del", host.veth, check=False)
            if Path(f"/run/netns/{netns}").exists():
                result = run("ip", "netns", "del", netns, check=False)
                if result.returncode != 0:
                    problems.append(f"ip netns del {netns}: {result.stderr.strip()}")
                    continue
            self.created["netns"].remove(netns)
        for bridge in self.created.get("bridge", []):
            if Path(f"/sys/class/net/{bridge}").exists():
                run("ip", "link", "del", bridge, check=False)
        self.created["bridge"] = []
        self._delete_rules(problems)
        if not problems and self.dir.is_dir():
            for host in self.hosts.values():
                if not os.path.ismount(host.root):
                    shutil.rmtree(host.dir, ignore_errors=True)
            self.state_path.unlink(missing_ok=True)
        else:
            self._save()
        return problems


@contextlib.contextmanager
def running_lab(directory: Path = DEFAULT_DIR) -> Iterator[Lab]:
    lab = Lab(directory)
    try:
        lab.up()
        yield lab
    finally:
        problems = lab.down()
        if problems:
            print("lab teardown problems:\n  " + "\n  ".join(problems), file=sys.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["up", "add", "down", "rootfs"])
    parser.add_argument("name", nargs="?", help="add: the new host's name")
    parser.add_argument("--cloud", default="aws", help="add: its cloud (default aws)")
    parser.add_argument("--region", default="us-east-1", help="add: its region")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    args = parser.parse_args()
    if args.action == "add" and not args.name:
        parser.error("add needs the new host's NAME")
    reason = unavailable_reason()
    if reason:
        print(f"the lab cannot run here: {reason}", file=sys.stderr)
        return 2
    if args.action == "rootfs":
        print(ensure_rootfs())
        return 0
    if args.action == "up":
        lab = Lab(args.dir)
        try:
            lab.up()
        except BaseException:
            lab.down()
            raise
        print(f"lab up: {', '.join(f'{h.name}={h.address}' for h in lab.hosts.values())}")
        print(
            f"deploy: GOML_LAB_STATE={lab.state_path} pyinfra -y pyinfra/inventories/lab.py "
            "pyinfra/deploy.py"
        )
        return 0
    if args.action == "add":
        added = Lab.load(args.dir).add_host(args.name, args.cloud, args.region)
        print(f"lab: {added.name}={added.address} up; the lab inventory includes it now")
        return 0
    problems = Lab.load(args.dir).down()
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
