"""Cluster credentials: a CA, one certificate per node, a client certificate, the Raft
cluster secret and a client token. `goml certs init DIR` writes them all.

Layout of DIR (private files mode 0600):
    ca.pem  ca.key             the cluster CA
    <node>.pem  <node>.key     one per node (server and client auth: nodes dial each other)
    client.pem  client.key     for agents and clients
    cluster.secret             the shared Raft secret (peers prove membership with it)
    client.token               the bearer token clients and agents present
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY_DAYS = 825


@dataclass(frozen=True)
class Credentials:
    """Paths to one identity's files plus the CA, ready for grpc.ssl_*_credentials."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


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
    common_name: str,
    hosts: list[str],
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
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
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def init_certs(directory: Path, nodes: list[str], hosts: list[str], force: bool = False) -> None:
    """Create a CA and every credential for `nodes`; `hosts` are the names and addresses
    the node certificates are valid for (SANs), besides each node's own name."""
    if (directory / "ca.pem").exists() and not force:
        raise FileExistsError(f"{directory / 'ca.pem'} exists: refusing to replace a cluster CA")
    if not nodes:
        raise ValueError("at least one node name is needed")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
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
    (directory / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(directory / "ca.key", _key_pem(ca_key))
    for name in [*nodes, "client"]:
        cert_pem, key_pem = _issue(name, [name, *hosts], ca_key, ca_cert)
        (directory / f"{name}.pem").write_bytes(cert_pem)
        _write_private(directory / f"{name}.key", key_pem)
    _write_private(directory / "cluster.secret", secrets.token_hex(32).encode())
    _write_private(directory / "client.token", secrets.token_urlsafe(32).encode())


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
