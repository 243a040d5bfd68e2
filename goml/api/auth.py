"""Who may call what: roles, identities, the tokens table, and the admission of one call.

Pure (no grpc, no files, no clock): the gRPC layer (`goml.cluster.service`) hands `admit`
what the transport knows of a call (the peer certificate's goml identities, the bearer
token, the forwarding metadata) and the decoded request; `admit` answers with the
identity the request runs as, or the ApiError that refuses it. This module is the one
place that says which role may call which method (`PERMISSIONS`).

Identities are ROLE:NAME. Roles:
- client: Submit, Get, List, Watch, Cancel, Status.
- admin: everything a client may, plus the admin operations (`ADMIN_METHODS`: membership
  changes, acknowledging an export).
- agent: Register, Heartbeat, Lease, Report, and only as itself: every agent request's
  `agent_id` must be the caller's name, so one agent can never register, lease or report
  as another.
- node: a control-plane node. It may call nothing in its own name; a follower forwards a
  request it admitted to the leader, naming the original caller, and the leader admits
  that request again as the original caller's (so a forwarded call is authorised exactly
  as a direct one). Only a node may forward.

Two factors. With TLS the identity is the client certificate's (one SAN URI
`goml:ROLE:NAME`, issued by `goml certs`), and the bearer token must be one listed for that
same identity: a stolen token without the key, or a key without its token, is refused, and
removing an identity's tokens locks out its certificate too. Without TLS (`insecure: true`,
local development only) the token alone names the caller: it protects against nobody who
can read the traffic (the token travels in plaintext), and nothing proves a node is the
node it claims to be.

Tokens table (each node's tokens file; `goml certs` writes it), one entry a line:

    # ROLE NAME sha256:HEX-DIGEST-OF-THE-TOKEN
    agent agent-1 sha256:5d41402abc4b2a76b9719d911017c592...
    agent agent-1 sha256:7c211433f02071597741e6ff5a8ea34...   <- a second one: rotation

A name may have several tokens, so a new one is added, handed out, and the old one removed
without downtime. Only digests are stored: a tokens file is no credential. Node tokens are
not listed: the runtime derives them from the cluster secret.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from goml.api.types import (
    ApiError,
    ApiRequest,
    ErrorCode,
    HeartbeatRequest,
    LeaseRequest,
    Method,
    RegisterRequest,
    ReportRequest,
)

# Metadata a forwarding node adds: its own node id, and the caller it admitted.
FORWARDED_BY_KEY = "x-goml-forwarded-by"
FORWARDED_FOR_KEY = "x-goml-forwarded-for"
AUTHORIZATION_KEY = "authorization"
URI_SCHEME = "goml"

NAME_LENGTH_MAX = 64
# A name also names files (NAME.pem, NAME.key, NAME.token): no path separators, no leading
# dot or dash (hidden files, options), ASCII only so it reads the same everywhere.
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
TOKEN_BYTES_MAX = 512
TOKEN_LINES_MAX = 100_000
DIGEST_PREFIX = "sha256:"
DIGEST_HEX_LENGTH = 64
HEX_CHARS = frozenset("0123456789abcdef")


class Role(enum.StrEnum):
    CLIENT = "client"
    ADMIN = "admin"
    AGENT = "agent"
    NODE = "node"


CLIENT_METHODS = frozenset(
    {Method.SUBMIT, Method.GET, Method.LIST, Method.WATCH, Method.CANCEL, Method.STATUS}
)
AGENT_METHODS = frozenset({Method.REGISTER, Method.HEARTBEAT, Method.LEASE, Method.REPORT})
# Membership and retention: moving the export watermark lets retention prune.
ADMIN_METHODS: frozenset[Method] = frozenset({Method.ACK_EXPORT, Method.CHANGE_MEMBERSHIP})
# The table: which role may call which method. Nothing else in goml decides it.
PERMISSIONS: dict[Role, frozenset[Method]] = {
    Role.CLIENT: CLIENT_METHODS,
    Role.ADMIN: CLIENT_METHODS | ADMIN_METHODS,
    Role.AGENT: AGENT_METHODS,
    Role.NODE: frozenset(),  # a node only forwards what it admitted for someone else
}
assert set(PERMISSIONS) == set(Role)
assert set().union(*PERMISSIONS.values()) == set(Method), "every method is someone's"
assert not CLIENT_METHODS & AGENT_METHODS
# The agent requests, all of which name the agent they act for.
AgentRequestTypes = (RegisterRequest, HeartbeatRequest, LeaseRequest, ReportRequest)


class TokensError(ValueError):
    """A tokens file that cannot be read as a table; the message names file and line."""


def name_problem(name: str) -> str | None:
    """Why `name` cannot be an identity's (or a node's) name, or None if it can."""
    if not name:
        return "is empty"
    if len(name) > NAME_LENGTH_MAX:
        return f"has {len(name)} characters, more than {NAME_LENGTH_MAX}"
    bad = sorted(set(name) - NAME_CHARS)
    if bad:
        shown = ", ".join(repr(c) for c in bad[:5])
        return f"contains {shown}: use ASCII letters, digits, '_', '.' and '-'"
    if name[0] in "_.-":
        return "must start with a letter or a digit"
    return None


@dataclass(frozen=True, slots=True, order=True)
class Identity:
    role: Role
    name: str

    def __post_init__(self) -> None:
        assert isinstance(self.role, Role), self.role
        problem = name_problem(self.name)
        assert problem is None, f"identity name {self.name!r} {problem}"

    def __str__(self) -> str:
        return f"{self.role}:{self.name}"

    @property
    def uri(self) -> str:
        """The SAN URI of this identity's certificate."""
        return f"{URI_SCHEME}:{self.role}:{self.name}"


def parse_identity(text: str) -> Identity | str:
    """`ROLE:NAME` as an Identity, or why it is not one."""
    role, sep, name = text.partition(":")
    if not sep:
        return f"{text[:80]!r} is not ROLE:NAME"
    if role not in Role.__members__.values():
        return f"unknown role {role[:20]!r} (roles: {', '.join(Role)})"
    problem = name_problem(name)
    if problem is not None:
        return f"name {name[:80]!r} {problem}"
    return Identity(Role(role), name)


def identity_of_uris(uris: Iterable[str]) -> Identity | str:
    """The goml identity among a certificate's SAN URIs, or why there is none: exactly one
    `goml:` URI must be there (two would make the certificate's role ambiguous)."""
    ours = [u for u in uris if u.startswith(f"{URI_SCHEME}:")]
    if not ours:
        return (
            "the client certificate names no goml identity (a SAN URI goml:ROLE:NAME): "
            "issue one with `goml certs init` or `goml certs issue`"
        )
    if len(ours) > 1:
        return f"the client certificate names {len(ours)} goml identities; it may name one"
    parsed = parse_identity(ours[0].removeprefix(f"{URI_SCHEME}:"))
    if isinstance(parsed, str):
        return f"the client certificate's identity {ours[0][:100]!r}: {parsed}"
    return parsed


# ------------------------------------------------------------------------------ tokens


def token_digest(token: str) -> str:
    """What a tokens file stores for `token`. Tokens are random (32 bytes from the OS), so
    a plain SHA-256 is enough: there is nothing to brute-force a slow hash against."""
    return DIGEST_PREFIX + hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenEntry:
    identity: Identity
    digest: str

    def __post_init__(self) -> None:
        assert self.digest.startswith(DIGEST_PREFIX), self.digest
        assert len(self.digest) == len(DIGEST_PREFIX) + DIGEST_HEX_LENGTH, self.digest


class TokenTable:
    """The tokens a node accepts, by digest. Several tokens may name one identity (a
    rotation in progress); one token never names two."""

    def __init__(self, entries: Iterable[TokenEntry]) -> None:
        self.entries = tuple(entries)
        self._by_digest: dict[str, Identity] = {}
        for entry in self.entries:
            known = self._by_digest.setdefault(entry.digest, entry.identity)
            if known != entry.identity:
                raise TokensError(f"one token listed for both {known} and {entry.identity}")

    def identify(self, token: str) -> Identity | None:
        # A dict lookup by digest: timing reveals at most something about a digest,
        # which gives no token back.
        return self._by_digest.get(token_digest(token))

    def of(self, identity: Identity) -> tuple[TokenEntry, ...]:
        return tuple(e for e in self.entries if e.identity == identity)

    def __len__(self) -> int:
        return len(self.entries)


def parse_tokens(text: str, source: str) -> tuple[TokenEntry, ...]:
    """The entries of a tokens file (format in the module docstring). Node entries are
    refused: node tokens come from the cluster secret. Errors name `source` and the line."""
    entries: list[TokenEntry] = []
    seen: dict[str, int] = {}
    lines = text.splitlines()
    if len(lines) > TOKEN_LINES_MAX:
        raise TokensError(f"{source}: {len(lines)} lines, more than {TOKEN_LINES_MAX}")
    for number, raw in enumerate(lines, start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}:{number}"
        fields = line.split()
        if len(fields) != 3:
            raise TokensError(
                f"{where}: expected 'ROLE NAME sha256:DIGEST', got {len(fields)} field(s)"
            )
        role, name, digest = fields
        parsed = parse_identity(f"{role}:{name}")
        if isinstance(parsed, str):
            raise TokensError(f"{where}: {parsed}")
        if parsed.role is Role.NODE:
            raise TokensError(f"{where}: node tokens come from the cluster secret, not this file")
        hex_part = digest.removeprefix(DIGEST_PREFIX)
        if (
            not digest.startswith(DIGEST_PREFIX)
            or len(hex_part) != DIGEST_HEX_LENGTH
            or set(hex_part) - HEX_CHARS
        ):
            raise TokensError(
                f"{where}: the digest must be 'sha256:' and 64 lowercase hex digits "
                "(the token itself never goes into this file)"
            )
        if digest in seen:
            raise TokensError(f"{where}: the same token digest as line {seen[digest]}")
        seen[digest] = number
        entries.append(TokenEntry(parsed, digest))
    return tuple(entries)


def format_tokens(entries: Sequence[TokenEntry]) -> str:
    """A tokens file holding `entries`, in order (parse_tokens reads it back)."""
    lines = ["# goml tokens: ROLE NAME sha256:DIGEST (digests only; see goml/api/auth.py)"]
    lines += [f"{e.identity.role} {e.identity.name} {e.digest}" for e in entries]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ admission


@dataclass(frozen=True, slots=True)
class CallCredentials:
    """What the transport knows of one call. `tls`: the channel is mutual TLS, and
    `peer_uris` are the client certificate's SAN URIs; `token`: the bearer token (None:
    no authorization header); `forwarded_by`/`forwarded_for`: the forwarding metadata as
    sent (None: absent)."""

    tls: bool
    peer_uris: tuple[str, ...]
    token: str | None
    forwarded_by: str | None = None
    forwarded_for: str | None = None

    def __post_init__(self) -> None:
        assert self.tls or not self.peer_uris, "a plaintext channel carries no certificate"


@dataclass(frozen=True, slots=True)
class Admission:
    """An admitted call: `caller` presented the credentials, the request runs as `acting`
    (the same, unless a node forwarded it for `acting`)."""

    caller: Identity
    acting: Identity

    @property
    def forwarded(self) -> bool:
        return self.caller != self.acting


def bearer(value: str) -> str:
    """The token of an `authorization` header value (`Bearer TOKEN`, or a bare token)."""
    return value.removeprefix("Bearer ").strip()


def authenticate(call: CallCredentials, tokens: TokenTable) -> Identity | ApiError:
    """Who presented these credentials: the token's identity, which under TLS must also be
    the certificate's."""
    if call.token is None:
        return ApiError(
            ErrorCode.UNAUTHENTICATED, "missing token: send 'authorization: Bearer <token>'"
        )
    if len(call.token) > TOKEN_BYTES_MAX:
        return ApiError(ErrorCode.UNAUTHENTICATED, f"wrong token: over {TOKEN_BYTES_MAX} bytes")
    certified: Identity | None = None
    if call.tls:
        found = identity_of_uris(call.peer_uris)
        if isinstance(found, str):
            return ApiError(ErrorCode.UNAUTHENTICATED, found)
        certified = found
    holder = tokens.identify(call.token)
    if holder is None:
        return ApiError(
            ErrorCode.UNAUTHENTICATED,
            "wrong token: not in this node's tokens file (revoked, or rotated out?)",
        )
    if certified is not None and holder != certified:
        return ApiError(
            ErrorCode.UNAUTHENTICATED,
            f"the token is not one of {certified}'s, whose certificate this is",
        )
    return holder


def authorize(identity: Identity, method: Method, request: ApiRequest) -> ApiError | None:
    """Whether `identity` may make `request` (a `method` call); None when it may."""
    if method not in PERMISSIONS[identity.role]:
        return ApiError(
            ErrorCode.PERMISSION_DENIED,
            f"role {identity.role} may not call {method} ({identity})",
        )
    if isinstance(request, AgentRequestTypes):
        assert method in AGENT_METHODS, (method, type(request).__name__)
        if request.agent_id != identity.name:
            return ApiError(
                ErrorCode.PERMISSION_DENIED,
                f"role {identity.role} {identity.name!r} may not act for agent "
                f"{request.agent_id[:NAME_LENGTH_MAX]!r} ({method})",
            )
    return None


def admit(
    call: CallCredentials, method: Method, request: ApiRequest, tokens: TokenTable
) -> Admission | ApiError:
    """Authenticate the caller, resolve a forwarded call to its original caller, and
    authorise `request` for whoever it runs as."""
    caller = authenticate(call, tokens)
    if isinstance(caller, ApiError):
        return caller
    acting = caller
    if call.forwarded_by is not None or call.forwarded_for is not None:
        # Only a node forwards, in its own name, for a caller it names: so no client can
        # pass itself off as a forwarding node, nor a node as another node.
        if caller.role is not Role.NODE:
            return ApiError(
                ErrorCode.PERMISSION_DENIED,
                f"role {caller.role} may not forward requests ({caller}): "
                f"{FORWARDED_BY_KEY} is for control-plane nodes",
            )
        if call.forwarded_by != caller.name:
            return ApiError(
                ErrorCode.PERMISSION_DENIED,
                f"node {caller.name} may forward only in its own name, "
                f"not as {str(call.forwarded_by)[:NAME_LENGTH_MAX]!r}",
            )
        if call.forwarded_for is None:
            return ApiError(
                ErrorCode.PERMISSION_DENIED,
                f"node {caller.name} forwarded a request without {FORWARDED_FOR_KEY}",
            )
        original = parse_identity(call.forwarded_for)
        if isinstance(original, str):
            return ApiError(ErrorCode.PERMISSION_DENIED, f"{FORWARDED_FOR_KEY}: {original}")
        acting = original
    refused = authorize(acting, method, request)
    if refused is not None:
        return refused
    return Admission(caller, acting)
