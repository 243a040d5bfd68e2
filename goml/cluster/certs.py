"""Cluster credentials: a CA, one certificate per node, a certificate and a token per
agent, client and admin identity, the tokens file nodes check, and the Raft cluster secret.
`goml certs init DIR` writes them all; `goml certs issue` adds an identity later, and
`goml certs token` rotates, retires and revokes tokens.

Layout of DIR (private files mode 0600):
    ca.pem  ca.key                      the cluster CA
    <node>.pem  <node>.key              one per node (server and client auth: nodes dial
                                        each other); SAN URI goml:node:<node> and the hosts
    client.pem client.key client.token  the default client (goml:client:client)
    admin.pem admin.key admin.token     the default admin (goml:admin:admin)
    agents/<agent>.pem .key .token      one per agent (goml:agent:<agent>)
    clients/<name>.*  admins/<name>.*   further clients and admins
    tokens.txt                          what every node accepts: ROLE NAME sha256:DIGEST
    cluster.secret                      the shared Raft secret (peers prove membership
                                        with it; nodes' forwarding tokens derive from it)

Only node certificates may serve (serverAuth): an agent's or a client's certificate cannot
pass itself off as a node to anyone. Roles and what each may call: `goml.api.auth`.

`TokensFile` is the node side: the table, reloaded when the file changes (or on SIGHUP).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from goml.api.auth import (
    URI_SCHEME,
    Identity,
    Role,
    TokenEntry,
    TokensError,
    TokenTable,
    format_tokens,
    identity_of_uris,
    name_problem,
    parse_tokens,
    token_digest,
)

log = logging.getLogger(__name__)

VALIDITY_DAYS = 825
TOKENS_FILE = "tokens.txt"
SECRET_FILE = "cluster.secret"
DEFAULT_CLIENT = "client"
DEFAULT_ADMIN = "admin"
# Node files live at the top of DIR beside these: a node of such a name would overwrite them.
RESERVED_NODE_NAMES = frozenset({"ca", DEFAULT_CLIENT, DEFAULT_ADMIN})
HOST_LENGTH_MAX = 253  # a DNS name's limit
HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-*")
HOSTS_MAX = 256
IDENTITIES_MAX = 10_000
TOKENS_FILE_BYTES_MAX = 16 << 20
_Stamp = tuple[int, int, int, int, int]  # what stat() says of a file: a change shows here
_SUBDIRECTORY = {Role.AGENT: "agents", Role.CLIENT: "clients", Role.ADMIN: "admins"}


@dataclass(frozen=True)
class Credentials:
    """Paths to one identity's files plus the CA, ready for grpc.ssl_*_credentials."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


@dataclass(frozen=True)
class IdentityFiles:
    """Where an identity's certificate, key and token live in a credentials directory
    (`token` is None for a node: node tokens derive from the cluster secret)."""

    identity: Identity
    cert: Path
    key: Path
    token: Path | None

    def read_token(self) -> str:
        assert self.token is not None, f"{self.identity} has no token file"
        return self.token.read_text().strip()


def identity_files(directory: Path, identity: Identity) -> IdentityFiles:
    """The one rule of where an identity's files are (see the module docstring)."""
    if identity.role is Role.NODE:
        stem = directory / identity.name
        return IdentityFiles(identity, stem.with_suffix(".pem"), stem.with_suffix(".key"), None)
    default = {Role.CLIENT: DEFAULT_CLIENT, Role.ADMIN: DEFAULT_ADMIN}.get(identity.role)
    base = directory if identity.name == default else directory / _SUBDIRECTORY[identity.role]
    return IdentityFiles(
        identity,
        base / f"{identity.name}.pem",
        base / f"{identity.name}.key",
        base / f"{identity.name}.token",
    )


# ------------------------------------------------------------------------------ validation


def check_names(what: str, names: Sequence[str], reserved: frozenset[str] = frozenset()) -> None:
    """Every name valid, none twice, none reserved; else a ValueError naming it."""
    if len(names) > IDENTITIES_MAX:
        raise ValueError(f"{len(names)} {what} names, more than {IDENTITIES_MAX}")
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str):
            raise ValueError(f"{what} name {name!r} is not a string")
        problem = name_problem(name)
        if problem is not None:
            raise ValueError(f"{what} name {name[:80]!r} {problem}")
        if name in reserved:
            raise ValueError(
                f"{what} name {name!r} is reserved (its files would replace "
                f"{name}.pem/{name}.key): choose another"
            )
        if name in seen:
            raise ValueError(f"{what} name {name!r} is given twice")
        seen.add(name)


def check_hosts(hosts: Sequence[str]) -> None:
    """Every host an IP address or a DNS name (wildcards allowed); else a ValueError."""
    if len(hosts) > HOSTS_MAX:
        raise ValueError(f"{len(hosts)} hosts, more than {HOSTS_MAX}")
    for host in hosts:
        if not isinstance(host, str) or not host:
            raise ValueError(f"host {host!r}: empty; give a host name or an IP address")
        if len(host) > HOST_LENGTH_MAX:
            raise ValueError(f"host {host[:80]!r}...: longer than {HOST_LENGTH_MAX} characters")
        try:
            ipaddress.ip_address(host)
            continue
        except ValueError:
            pass
        bad = sorted(set(host) - HOST_CHARS)
        labels = host.split(".")
        if bad or any(not label or label[0] == "-" or len(label) > 63 for label in labels):
            raise ValueError(
                f"host {host[:80]!r} is neither an IP address nor a DNS name "
                "(letters, digits, '-', dots between labels)"
            )


# ------------------------------------------------------------------------------ issuing


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start, so the secret is never readable by others, not even briefly.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "goml"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _issue(
    identity: Identity,
    hosts: Sequence[str],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
) -> tuple[bytes, bytes]:
    assert identity.role is Role.NODE or not hosts, "only nodes serve, so only they name hosts"
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    usages = (
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        if identity.role is Role.NODE
        else [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    common_name = identity.name if identity.role is Role.NODE else str(identity)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def _new_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("goml cluster CA"))
        .issuer_name(_name("goml cluster CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return ca_key, ca_cert


def _load_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    for path in (directory / "ca.pem", directory / "ca.key"):
        if not path.is_file():
            raise FileNotFoundError(f"missing {path}: issuing needs the cluster CA")
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / 'ca.key'} is not an EC key as goml writes them")
    return ca_key, ca_cert


def _write_identity(
    files: IdentityFiles,
    hosts: Sequence[str],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
) -> None:
    cert_pem, key_pem = _issue(files.identity, hosts, ca_key, ca_cert)
    files.cert.parent.mkdir(mode=0o700, exist_ok=True)
    files.cert.write_bytes(cert_pem)
    _write_private(files.key, key_pem)


def _new_token(files: IdentityFiles) -> TokenEntry:
    assert files.token is not None
    token = secrets.token_urlsafe(32)
    files.token.parent.mkdir(mode=0o700, exist_ok=True)
    _write_private(files.token, token.encode())
    return TokenEntry(files.identity, token_digest(token))


def init_certs(
    directory: Path,
    nodes: list[str],
    hosts: list[str],
    force: bool = False,
    agents: Sequence[str] = (),
    clients: Sequence[str] = (DEFAULT_CLIENT,),
    admins: Sequence[str] = (DEFAULT_ADMIN,),
) -> None:
    """Create a CA and every credential: a certificate per node (valid for `hosts`, the
    names and addresses clients dial, besides each node's own name), a certificate and a
    token per agent, client and admin, the tokens file and the cluster secret. Names are
    checked first: nothing is written for a bad one."""
    if (directory / "ca.pem").exists() and not force:
        raise FileExistsError(f"{directory / 'ca.pem'} exists: refusing to replace a cluster CA")
    if not nodes:
        raise ValueError("at least one node name is needed")
    check_names("node", nodes, RESERVED_NODE_NAMES)
    check_names("agent", agents)
    check_names("client", clients)
    check_names("admin", admins)
    check_hosts(hosts)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca_key, ca_cert = _new_ca()
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(directory / "ca.key", _key_pem(ca_key))
    for name in nodes:
        node = identity_files(directory, Identity(Role.NODE, name))
        _write_identity(node, [name, *(h for h in hosts if h != name)], ca_key, ca_cert)
    entries: list[TokenEntry] = []
    for role, names in ((Role.CLIENT, clients), (Role.ADMIN, admins), (Role.AGENT, agents)):
        for name in names:
            files = identity_files(directory, Identity(role, name))
            _write_identity(files, (), ca_key, ca_cert)
            entries.append(_new_token(files))
    write_tokens(directory / TOKENS_FILE, entries)
    _write_private(directory / SECRET_FILE, secrets.token_hex(32).encode())


def init_insecure(directory: Path) -> None:
    """Credentials of a plaintext (`insecure: true`) cluster: no CA or certificates, only
    the cluster secret, the default client's and admin's tokens and the tokens file."""
    if (directory / TOKENS_FILE).exists():
        raise FileExistsError(f"{directory / TOKENS_FILE} exists: refusing to replace it")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    entries = [
        _new_token(identity_files(directory, Identity(role, name)))
        for role, name in ((Role.CLIENT, DEFAULT_CLIENT), (Role.ADMIN, DEFAULT_ADMIN))
    ]
    write_tokens(directory / TOKENS_FILE, entries)
    _write_private(directory / SECRET_FILE, secrets.token_hex(32).encode())


def issue_identity(
    directory: Path, identity: Identity, hosts: Sequence[str] = (), certificate: bool = True
) -> IdentityFiles:
    """Add one identity to an existing credentials directory: a certificate signed by its
    CA (unless `certificate` is False: a plaintext cluster) and, except for a node, a
    token whose digest joins the tokens file (running nodes pick it up by themselves)."""
    files = identity_files(directory, identity)
    if identity.role is Role.NODE:
        check_names("node", [identity.name], RESERVED_NODE_NAMES)
        check_hosts(hosts)
    elif hosts:
        raise ValueError(f"{identity} is no node: its certificate names no hosts")
    if not certificate and identity.role is Role.NODE:
        raise ValueError("a node's identity is its certificate")
    for path in (files.cert, files.token) if certificate else (files.token,):
        if path is not None and path.exists():
            raise FileExistsError(f"{path} exists: {identity} is issued already")
    if certificate:
        ca_key, ca_cert = _load_ca(directory)
        node_hosts = [identity.name, *(h for h in hosts if h != identity.name)]
        _write_identity(files, node_hosts if identity.role is Role.NODE else (), ca_key, ca_cert)
    if files.token is not None:
        tokens_path = directory / TOKENS_FILE
        entries = read_tokens(tokens_path)
        write_tokens(tokens_path, [*entries, _new_token(files)])
    return files


def ensure_identity(directory: Path, identity: Identity, certificate: bool) -> IdentityFiles:
    """`identity`'s files, issued first if they are not there yet (idempotent: a local
    cluster started again keeps its agents' credentials, revoked tokens stay revoked)."""
    files = identity_files(directory, identity)
    present = files.cert if certificate else files.token
    assert present is not None
    if present.exists():
        return files
    return issue_identity(directory, identity, certificate=certificate)


# ------------------------------------------------------------------------------ tokens


def read_tokens(path: Path) -> tuple[TokenEntry, ...]:
    """The entries of a tokens file, checked (TokensError names the file and line)."""
    return _read_tokens(path)[1]


def _read_tokens(path: Path) -> tuple[_Stamp, tuple[TokenEntry, ...]]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise TokensError(f"{path}: no such tokens file (run `goml certs init`)") from None
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise TokensError(f"{path}: not a regular file")
        if info.st_mode & 0o022:
            # Whoever may write it may let anyone in.
            raise TokensError(
                f"{path} is writable by group or others (mode {oct(info.st_mode & 0o777)}): "
                "chmod go-w"
            )
        data = handle.read(TOKENS_FILE_BYTES_MAX + 1)
    if len(data) > TOKENS_FILE_BYTES_MAX:
        raise TokensError(f"{path}: larger than {TOKENS_FILE_BYTES_MAX} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TokensError(
            f"{path}: not UTF-8 text ({error.reason} at byte {error.start})"
        ) from None
    return _stamp_of(info), parse_tokens(text, str(path))


def write_tokens(path: Path, entries: Sequence[TokenEntry]) -> None:
    """Replace the tokens file atomically (a node reading it sees the old or the new)."""
    TokenTable(entries)  # refuses one token for two identities before anything is written
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(format_tokens(entries))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o600)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def rotate_token(directory: Path, identity: Identity) -> IdentityFiles:
    """A new token for `identity` in its token file, and its digest in the tokens file;
    the old token stays accepted until `retire_tokens` (so its holder can move over)."""
    files = identity_files(directory, identity)
    if files.token is None:
        raise ValueError(f"{identity}: node tokens derive from the cluster secret")
    tokens_path = directory / TOKENS_FILE
    entries = read_tokens(tokens_path)
    if not any(e.identity == identity for e in entries):
        raise ValueError(f"{identity} has no token in {tokens_path} (revoked, or never issued)")
    write_tokens(tokens_path, [*entries, _new_token(files)])
    return files


def retire_tokens(directory: Path, identity: Identity) -> int:
    """Remove every token of `identity` but the one in its token file; how many went."""
    files = identity_files(directory, identity)
    if files.token is None or not files.token.is_file():
        raise ValueError(f"{identity}: no token file {files.token} to keep")
    current = token_digest(files.read_token())
    tokens_path = directory / TOKENS_FILE
    entries = read_tokens(tokens_path)
    kept = [e for e in entries if e.identity != identity or e.digest == current]
    if not any(e.identity == identity for e in kept):
        raise ValueError(f"{files.token} holds no accepted token of {identity}: nothing to keep")
    write_tokens(tokens_path, kept)
    return len(entries) - len(kept)


def revoke_tokens(directory: Path, identity: Identity) -> int:
    """Remove every token of `identity`: its certificate alone is refused from now on."""
    tokens_path = directory / TOKENS_FILE
    entries = read_tokens(tokens_path)
    kept = [e for e in entries if e.identity != identity]
    write_tokens(tokens_path, kept)
    return len(entries) - len(kept)


def node_token(secret: bytes, cluster_id: str, node_id: str) -> str:
    """The token node `node_id` presents when it forwards a request: keyed by the cluster
    secret, so every node can check it and no client can make one."""
    assert secret, "the cluster secret must not be empty"
    mac = hmac.new(secret, f"goml-forward\0{cluster_id}\0{node_id}".encode(), hashlib.sha256)
    return mac.hexdigest()


def node_entries(secret: bytes, cluster_id: str, nodes: Iterable[str]) -> list[TokenEntry]:
    return [
        TokenEntry(Identity(Role.NODE, n), token_digest(node_token(secret, cluster_id, n)))
        for n in sorted(nodes)
    ]


def _stamp_of(info: os.stat_result) -> _Stamp:
    # ctime too: nobody can set it back, so an in-place edit that restores size and mtime
    # is still seen.
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)


class TokensFile:
    """A node's tokens: its tokens file plus the nodes' derived tokens. `table()` costs one
    stat(): the file is read again whenever it changed (an atomic replace, an edit in
    place), so an added token works and a removed one is refused from the next call on,
    without a restart. `reload()` re-reads regardless (SIGHUP). A file that fails to
    parse is logged and the previous table kept: a typo must not lock everyone out."""

    def __init__(self, path: Path, derived: Sequence[TokenEntry]) -> None:
        self.path = path
        self._derived = tuple(derived)
        stamp, entries = _read_tokens(path)  # at start, a bad file stops the node
        self._stamp: _Stamp | None = stamp
        self._file_entries = entries
        self._table = TokenTable((*entries, *self._derived))
        self.reloads = 0
        log.info("tokens: %d from %s", len(entries), path)

    def table(self) -> TokenTable:
        try:
            stamp = _stamp_of(os.stat(self.path))
        except OSError as error:
            if self._stamp is not None:
                log.error("tokens: %s: %s; still using the tokens loaded before", self.path, error)
                self._stamp = None
            return self._table
        if stamp != self._stamp:
            self._load(stamp)
        return self._table

    def reload(self) -> None:
        self._load(None)

    def set_derived(self, derived: Sequence[TokenEntry]) -> None:
        """Replace the derived (node) tokens: a membership change added or removed nodes
        that may forward here. The file's entries stay as loaded."""
        derived = tuple(derived)
        if derived == self._derived:
            return
        assert all(e.identity.role is Role.NODE for e in derived), "only node tokens derive"
        self._table = TokenTable((*self._file_entries, *derived))
        self._derived = derived
        log.info("tokens: %d node tokens (the members changed)", len(derived))

    def _load(self, stamp: _Stamp | None) -> None:
        try:
            loaded, entries = _read_tokens(self.path)
            table = TokenTable((*entries, *self._derived))
        except (TokensError, OSError) as error:
            log.error("tokens: %s; still using the %d loaded before", error, len(self._table))
            self._stamp = stamp  # tried again once the file changes again
            return
        self._stamp = loaded
        self._file_entries = entries
        self._table = table
        self.reloads += 1
        log.info("tokens: reloaded %s: %d tokens", self.path, len(entries))


# ------------------------------------------------------------------------------ reading


def certificate_identity(pem: bytes) -> Identity | str:
    """The goml identity a PEM certificate names (its SAN URI), or why there is none."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as error:
        return f"not a PEM certificate ({error})"
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return identity_of_uris(())
    return identity_of_uris(
        u
        for u in san.get_values_for_type(x509.UniformResourceIdentifier)
        if u.startswith(f"{URI_SCHEME}:")
    )


def credentials(directory: Path, identity: str) -> Credentials:
    creds = Credentials(
        directory / "ca.pem", directory / f"{identity}.pem", directory / f"{identity}.key"
    )
    for path in (creds.ca, creds.cert, creds.key):
        if not path.is_file():
            raise FileNotFoundError(f"missing credential file {path} (run `goml certs init`)")
    return creds


def read_secret(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"missing secret file {path} (run `goml certs init`)")
    mode = path.stat().st_mode & 0o077
    if mode:
        raise PermissionError(
            f"{path} is readable by group or others (mode {oct(mode)}): chmod 600"
        )
    value = path.read_text().strip()
    if not value:
        raise ValueError(f"{path} is empty")
    return value
