"""Control-plane commands: the bytes the Raft log carries to the manifest.

Commands are JSON with sorted keys and no spaces, so equal commands are equal bytes,
and nothing read from the log or the network is ever unpickled (DESIGN.md). Every
replica decodes a committed entry with `decode_command`; the leader runs the same
checks in `encode_command`, so an entry that every replica would refuse is caught
before it is proposed.

Checks here are the ones that need no configuration (types, signs, JSON validity).
Size and count limits live in `ManifestLimits` and are checked by the manifest.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

# Re-exported: commands carry the API's resource value.
from goml.api.types import LEASE_DEPTH_MAX as LEASE_DEPTH_MAX
from goml.api.types import Resources as Resources

# protobuf int64: the gRPC layer must be able to carry every integer we accept.
INT_MAX = 2**63 - 1


class CommandError(ValueError):
    """Bytes or fields that do not form a valid command: the proposer's fault."""


def dumps(value: object) -> str:
    """The one JSON spelling used for commands, digests and snapshots."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _refuse_constant(name: str) -> object:
    raise CommandError(f"{name} is not a JSON number")


# A field with this metadata is left out of `plain` while it holds its default: a field
# added later then leaves every command, digest and snapshot without it as it was.
OMITTED_AT_DEFAULT = "omitted_at_default"
_FIELD_NAMES: dict[type, tuple[str, ...]] = {}
_OMITTED: dict[type, tuple[tuple[str, object], ...]] = {}


# Leaves `plain` returns as they are: checked first, because most values are leaves
# and `is_dataclass` on each was most of a lone submit's encoding time (profiled).
_LEAF_TYPES = frozenset({str, int, float, bool, type(None)})


def plain(value: object) -> object:
    """A frozen dataclass value as JSON-ready dicts and lists, like `dataclasses.asdict`
    but without its deep copies (the values are immutable): commands, digests and
    snapshots are built with it on every proposal and every compaction."""
    kind = type(value)
    if kind in _LEAF_TYPES:
        return value
    names = _FIELD_NAMES.get(kind)
    if names is None:
        if isinstance(value, tuple | list):
            return [plain(item) for item in value]
        if not is_dataclass(value):
            return value
        names = _FIELD_NAMES[type(value)] = tuple(f.name for f in fields(value))
        _OMITTED[type(value)] = tuple(
            (f.name, f.default) for f in fields(value) if f.metadata.get(OMITTED_AT_DEFAULT)
        )
    body = {name: plain(getattr(value, name)) for name in names}
    for name, default in _OMITTED[type(value)]:
        if body[name] == default:
            del body[name]
    return body


def loads(text: str, where: str) -> object:
    """Parse JSON, refusing NaN/Infinity (Python's json accepts them by default)."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise CommandError(f"{where}: not valid JSON: {exc}") from exc


def canonical_json(text: str, where: str) -> str:
    """Re-spell a JSON document canonically, so equal values give equal digests."""
    value = loads(text, where)
    try:
        return dumps(value)
    except (ValueError, RecursionError) as exc:  # e.g. 1e999 parses to inf
        raise CommandError(f"{where}: not representable as JSON: {exc}") from exc


class Fields:
    """Typed, strict reading of one JSON object; unknown keys are an error.

    Strictness catches a proposer and replica that disagree on the format instead of
    letting them silently apply different things.
    """

    def __init__(self, raw: object, where: str) -> None:
        if not isinstance(raw, dict):
            raise CommandError(f"{where}: expected a JSON object, got {type(raw).__name__}")
        self._raw: dict[str, Any] = raw
        self._where = where
        self._used: set[str] = set()

    def has(self, key: str) -> bool:
        """Whether the object holds `key` (for a field that is left out when unset)."""
        return key in self._raw

    def _take(self, key: str) -> object:
        if key not in self._raw:
            raise CommandError(f"{self._where}.{key}: missing")
        self._used.add(key)
        return self._raw[key]

    def _fail(self, key: str, expected: str, value: object) -> CommandError:
        return CommandError(f"{self._where}.{key}: expected {expected}, got {value!r:.80}")

    def integer(self, key: str, minimum: int = 0) -> int:
        value = self._take(key)
        # bool is a subclass of int: `true` must not pass as 1.
        if type(value) is not int or not minimum <= value <= INT_MAX:
            raise self._fail(key, f"an integer in [{minimum}, {INT_MAX}]", value)
        return value

    def optional_integer(self, key: str) -> int | None:
        if self._take(key) is None:
            return None
        return self.integer(key)

    def number(self, key: str) -> float:
        value = self._take(key)
        if type(value) not in (int, float):
            raise self._fail(key, "a number", value)
        assert isinstance(value, int | float)
        if not math.isfinite(value) or value < 0 or value > INT_MAX:
            raise self._fail(key, "a finite number >= 0", value)
        return float(value)

    def flag(self, key: str) -> bool:
        value = self._take(key)
        if type(value) is not bool:
            raise self._fail(key, "true or false", value)
        return value

    def text(self, key: str, empty: bool = False) -> str:
        value = self._take(key)
        if not isinstance(value, str) or (not empty and value == ""):
            raise self._fail(key, "a string" if empty else "a non-empty string", value)
        return value

    def optional_text(self, key: str, empty: bool = True) -> str | None:
        if self._take(key) is None:
            return None
        return self.text(key, empty=empty)

    def items(self, key: str) -> list[object]:
        value = self._take(key)
        if not isinstance(value, list):
            raise self._fail(key, "a list", value)
        return value

    def sub(self, key: str) -> Fields:
        return Fields(self._take(key), f"{self._where}.{key}")

    def optional_sub(self, key: str) -> Fields | None:
        return None if self._take(key) is None else self.sub(key)

    def close(self) -> None:
        unknown = sorted(set(self._raw) - self._used)
        if unknown:
            raise CommandError(f"{self._where}: unknown field(s) {unknown}")


def read_resources(f: Fields) -> Resources:
    resources = Resources(
        cpu=f.number("cpu"), memory_mb=f.integer("memory_mb"), gpu=f.integer("gpu")
    )
    f.close()
    return resources


@dataclass(frozen=True, slots=True)
class ManifestLimits:
    """The manifest's size and count limits (re-exported by goml.cluster.manifest).

    They decide what apply accepts, so they are replicated state: every manifest starts
    from `goml.cluster.manifest.DEFAULT_LIMITS`, a `SetLimits` command changes them, and
    snapshots carry them. A node's configured limits reach the manifest only that way."""

    command_bytes_max: int
    batch_tasks_max: int  # tasks per submit, reports per batch, tasks pruned per PruneTasks
    tasks_max: int  # tasks kept in the manifest, terminal ones included
    agents_max: int
    args_bytes_max: int
    result_bytes_max: int
    error_bytes_max: int
    name_bytes_max: int  # ids, idempotency keys, function names, labels
    lease_tasks_max: int  # per LeaseTasks
    renew_tasks_max: int  # per RenewLeases

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            assert type(value) is int, name
            assert value >= 1, name


def read_limits(f: Fields) -> ManifestLimits:
    limits = ManifestLimits(**{x.name: f.integer(x.name, 1) for x in fields(ManifestLimits)})
    f.close()
    return limits


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """One task of a submit. `cloud`/`region`, when set, restrict it to such agents."""

    idempotency_key: str
    function: str
    args_json: str  # canonical after decoding
    resources: Resources
    priority: int  # higher leases first
    max_attempts: int
    timeout_ms: int
    cloud: str | None
    region: str | None
    # In a fresh process of its own. Written only when true (`plain` leaves a field
    # at its OMITTED_AT_DEFAULT default out), so that commands, digests and snapshots
    # of tasks that are not isolated read byte for byte as before.
    isolated: bool = field(default=False, metadata={OMITTED_AT_DEFAULT: True})


@dataclass(frozen=True, slots=True)
class SubmitTasks:
    now_ms: int
    tasks: tuple[TaskSpec, ...]


@dataclass(frozen=True, slots=True)
class CancelTask:
    now_ms: int
    task_id: str


@dataclass(frozen=True, slots=True)
class RegisterAgent:
    now_ms: int
    agent_id: str
    cloud: str
    region: str
    arch: str
    capacity: Resources
    # The agent may hold leases of up to this many times its capacity: what does not
    # fit runs from its queue as slots free. Written only when not 1, so commands of
    # agents without a queue read byte for byte as before (and replicas of an earlier
    # version, which would refuse the field, never see it: the leader grants a depth
    # only when its node config allows one, `agent_lease_depth_max`).
    lease_depth: int = field(default=1, metadata={OMITTED_AT_DEFAULT: True})


@dataclass(frozen=True, slots=True)
class MarkAgentDown:
    now_ms: int
    agent_id: str


@dataclass(frozen=True, slots=True)
class LeaseTasks:
    """`free` is what the leader believes the agent has free (from its heartbeats)."""

    now_ms: int
    agent_id: str
    lease_ms: int
    max_count: int
    free: Resources


@dataclass(frozen=True, slots=True)
class StartTask:
    now_ms: int
    agent_id: str
    task_id: str
    epoch: int


@dataclass(frozen=True, slots=True)
class ReportResult:
    """Exactly one of `result_json` (success) and `error` (failure) is set."""

    now_ms: int
    agent_id: str
    task_id: str
    epoch: int
    success: bool
    result_json: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class Report:
    """One report of a ReportResults batch; as ReportResult without the time."""

    agent_id: str
    task_id: str
    epoch: int
    success: bool
    result_json: str | None
    error: str | None


@dataclass(frozen=True, slots=True)
class ReportResults:
    """Reports of several attempts (any agents) in one command; each is fenced and
    applied on its own, as if it were a ReportResult of its own."""

    now_ms: int
    reports: tuple[Report, ...]


@dataclass(frozen=True, slots=True)
class StartTasks:
    """Leased tasks an agent's heartbeat shows running, as one command (each a StartTask)."""

    now_ms: int
    agent_id: str
    tasks: tuple[tuple[str, int], ...]  # (task id, epoch)


@dataclass(frozen=True, slots=True)
class ExpireLeases:
    now_ms: int


@dataclass(frozen=True, slots=True)
class RenewLeases:
    now_ms: int
    agent_id: str
    task_ids: tuple[str, ...]
    deadline_ms: int


@dataclass(frozen=True, slots=True)
class PruneTasks:
    """Retention (goml.cluster.duties): remove finished tasks from the front of the order
    they finished in, every one with `finished_seq <= tasks_through_seq` (at most
    `batch_tasks_max` per command), each leaving a tombstone of its idempotency key; and
    drop tombstones with `finished_seq <= tombstones_through_seq` (as many at most).
    Both bounds name a position, not a count: a repeat, or one proposed twice before it
    applied, removes nothing more. 0 = nothing of that kind."""

    now_ms: int
    tasks_through_seq: int
    tombstones_through_seq: int


@dataclass(frozen=True, slots=True)
class AckExport:
    """An operator archived every finished task with `finished_seq <= through_seq`
    (`goml task export --ack`): the export watermark moves there (never back)."""

    now_ms: int
    through_seq: int


@dataclass(frozen=True, slots=True)
class SetLimits:
    """The leader's configured limits, made the manifest's (see ManifestLimits)."""

    now_ms: int
    limits: ManifestLimits


Command = (
    SubmitTasks
    | CancelTask
    | RegisterAgent
    | MarkAgentDown
    | LeaseTasks
    | StartTask
    | ReportResult
    | ExpireLeases
    | RenewLeases
    | ReportResults
    | StartTasks
    | PruneTasks
    | AckExport
    | SetLimits
)


def _task_spec(f: Fields) -> TaskSpec:
    spec = TaskSpec(
        idempotency_key=f.text("idempotency_key"),
        function=f.text("function"),
        args_json=canonical_json(f.text("args_json"), "args_json"),
        resources=read_resources(f.sub("resources")),
        priority=f.integer("priority", minimum=-INT_MAX),
        max_attempts=f.integer("max_attempts", minimum=1),
        timeout_ms=f.integer("timeout_ms", minimum=1),
        cloud=f.optional_text("cloud", empty=False),
        region=f.optional_text("region", empty=False),
        isolated=f.flag("isolated") if f.has("isolated") else False,
    )
    f.close()
    return spec


def _submit(f: Fields) -> SubmitTasks:
    now_ms = f.integer("now_ms")
    items = f.items("tasks")
    if not items:
        raise CommandError("SubmitTasks.tasks: empty batch")
    specs = tuple(_task_spec(Fields(x, f"SubmitTasks.tasks[{i}]")) for i, x in enumerate(items))
    return SubmitTasks(now_ms, specs)


def _report_fields(f: Fields, where: str) -> Report:
    agent_id = f.text("agent_id")
    task_id, epoch, success = f.text("task_id"), f.integer("epoch", 1), f.flag("success")
    result_json, error = f.optional_text("result_json"), f.optional_text("error")
    if success and (result_json is None or error is not None):
        raise CommandError(f"{where}: success needs result_json and no error")
    if not success and (error is None or result_json is not None):
        raise CommandError(f"{where}: failure needs error and no result_json")
    if result_json is not None:
        result_json = canonical_json(result_json, "result_json")
    return Report(agent_id, task_id, epoch, success, result_json, error)


def _report(f: Fields) -> ReportResult:
    now_ms = f.integer("now_ms")
    r = _report_fields(f, "ReportResult")
    return ReportResult(now_ms, r.agent_id, r.task_id, r.epoch, r.success, r.result_json, r.error)


def _report_results(f: Fields) -> ReportResults:
    now_ms = f.integer("now_ms")
    items = f.items("reports")
    if not items:
        raise CommandError("ReportResults.reports: empty batch")
    reports = []
    for i, raw in enumerate(items):
        where = f"ReportResults.reports[{i}]"
        item = Fields(raw, where)
        reports.append(_report_fields(item, where))
        item.close()
    return ReportResults(now_ms, tuple(reports))


def _start_tasks(f: Fields) -> StartTasks:
    now_ms, agent_id = f.integer("now_ms"), f.text("agent_id")
    items = f.items("tasks")
    tasks: list[tuple[str, int]] = []
    for i, raw in enumerate(items):
        if (
            not isinstance(raw, list)
            or len(raw) != 2
            or not isinstance(raw[0], str)
            or not raw[0]
            or type(raw[1]) is not int
            or not 1 <= raw[1] <= INT_MAX
        ):
            raise CommandError(f"StartTasks.tasks[{i}]: expected [task id, epoch >= 1]")
        tasks.append((raw[0], raw[1]))
    if not tasks:
        raise CommandError("StartTasks.tasks: empty batch")
    if len({t for t, _ in tasks}) != len(tasks):
        raise CommandError("StartTasks.tasks: duplicate task id")
    return StartTasks(now_ms, agent_id, tuple(tasks))


def _renew(f: Fields) -> RenewLeases:
    now_ms, agent_id = f.integer("now_ms"), f.text("agent_id")
    task_ids = f.items("task_ids")
    if not task_ids or not all(isinstance(t, str) and t for t in task_ids):
        raise CommandError("RenewLeases.task_ids: expected a non-empty list of task ids")
    if len(set(task_ids)) != len(task_ids):
        raise CommandError("RenewLeases.task_ids: duplicate task id")
    deadline_ms = f.integer("deadline_ms")
    if deadline_ms <= now_ms:
        raise CommandError("RenewLeases: deadline_ms must be after now_ms")
    return RenewLeases(now_ms, agent_id, tuple(str(t) for t in task_ids), deadline_ms)


def _prune(f: Fields) -> PruneTasks:
    command = PruneTasks(
        f.integer("now_ms"), f.integer("tasks_through_seq"), f.integer("tombstones_through_seq")
    )
    if not command.tasks_through_seq and not command.tombstones_through_seq:
        raise CommandError("PruneTasks: nothing to prune (both bounds are 0)")
    return command


def _lease_depth(f: Fields) -> int:
    if not f.has("lease_depth"):
        return 1
    depth = f.integer("lease_depth", 2)  # 1 is written as nothing
    if depth > LEASE_DEPTH_MAX:
        raise CommandError(f"RegisterAgent: lease_depth {depth} > {LEASE_DEPTH_MAX}")
    return depth


_PARSERS: dict[str, Any] = {
    "SubmitTasks": _submit,
    "CancelTask": lambda f: CancelTask(f.integer("now_ms"), f.text("task_id")),
    "RegisterAgent": lambda f: RegisterAgent(
        f.integer("now_ms"),
        f.text("agent_id"),
        f.text("cloud"),
        f.text("region"),
        f.text("arch"),
        read_resources(f.sub("capacity")),
        _lease_depth(f),
    ),
    "MarkAgentDown": lambda f: MarkAgentDown(f.integer("now_ms"), f.text("agent_id")),
    "LeaseTasks": lambda f: LeaseTasks(
        f.integer("now_ms"),
        f.text("agent_id"),
        f.integer("lease_ms", 1),
        f.integer("max_count", 1),
        read_resources(f.sub("free")),
    ),
    "StartTask": lambda f: StartTask(
        f.integer("now_ms"), f.text("agent_id"), f.text("task_id"), f.integer("epoch", 1)
    ),
    "ReportResult": _report,
    "ExpireLeases": lambda f: ExpireLeases(f.integer("now_ms")),
    "RenewLeases": _renew,
    "ReportResults": _report_results,
    "StartTasks": _start_tasks,
    "PruneTasks": _prune,
    "AckExport": lambda f: AckExport(f.integer("now_ms"), f.integer("through_seq", 1)),
    "SetLimits": lambda f: SetLimits(f.integer("now_ms"), read_limits(f.sub("limits"))),
}
_COMMAND_TYPES = (
    SubmitTasks,
    CancelTask,
    RegisterAgent,
    MarkAgentDown,
    LeaseTasks,
    StartTask,
    ReportResult,
    ExpireLeases,
    RenewLeases,
    ReportResults,
    StartTasks,
    PruneTasks,
    AckExport,
    SetLimits,
)
assert {t.__name__ for t in _COMMAND_TYPES} == set(_PARSERS)
COMMAND_TYPE_NAMES = tuple(t.__name__ for t in _COMMAND_TYPES)  # for counters and summaries


@functools.lru_cache(maxsize=4096)
def decode_command(data: bytes) -> Command:
    """Bytes from the log to a command; raises CommandError on anything malformed.

    Cached: the same entry bytes decode to the same immutable command, and the leader
    decodes each command it encodes (to refuse what replicas would), so a replica in
    the same process (tests, the simulator) reuses the work."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CommandError(f"command is not UTF-8: {exc}") from exc
    f = Fields(loads(text, "command"), "command")
    kind = f.text("type")
    parser = _PARSERS.get(kind)
    if parser is None:
        raise CommandError(f"command: unknown type {kind!r}")
    command: Command = parser(f)
    f.close()
    assert isinstance(command, _COMMAND_TYPES)
    return command


def command_type(data: bytes) -> str:
    """The type name of the command in log bytes, without building it: for counting the
    commands a run committed (every replica decoded each in full when it applied it).
    A full decode here missed `decode_command`'s cache on every entry of a long run (a
    run of more entries than the cache holds), most of the summary of a 240 s run."""
    try:
        body = loads(data.decode("utf-8"), "command")
    except UnicodeDecodeError as exc:
        raise CommandError(f"command is not UTF-8: {exc}") from exc
    kind = body.get("type") if isinstance(body, dict) else None
    if not isinstance(kind, str) or kind not in _PARSERS:
        raise CommandError(f"command: unknown type {kind!r}")
    return kind


def encode_command(command: Command) -> bytes:
    """A command to log bytes; raises CommandError if replicas would refuse to decode it."""
    assert isinstance(command, _COMMAND_TYPES), type(command)
    body = plain(command)
    assert isinstance(body, dict)
    assert "type" not in body
    body["type"] = type(command).__name__
    try:
        data = dumps(body).encode("ascii")  # dumps escapes non-ASCII: always ASCII
    except ValueError as exc:  # NaN or infinity in a float field
        raise CommandError(f"{body['type']}: {exc}") from exc
    decode_command(data)  # the same checks every replica runs at apply
    return data
