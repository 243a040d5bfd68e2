"""Load a scenario YAML file and report every problem as `FILE:LINE: field.path: message`.

The YAML is composed into a node tree first (which keeps line numbers), checked for
duplicate keys (PyYAML silently keeps the last one), constructed into plain data and
validated by pydantic. Each pydantic error location is then walked through the node
tree to find its line. Nothing here lets a traceback reach the user: every failure is
a `ScenarioError` listing all problems found.

Work is bounded before it starts: a file over `FILE_BYTES_MAX` is not parsed; a scan
of the parser's events stops at `DEPTH_MAX` levels of nesting (PyYAML composes
recursively: 500 levels are a RecursionError) or `VALUES_MAX` values, before any tree
is built; and a document whose aliases expand past those limits (a "billion laughs")
or that contains itself is refused before it is constructed and validated.
"""

from __future__ import annotations

import difflib
import functools
import json
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from goml.api.task_args import TaskArgsError, validate_args
from goml.scenario import schema
from goml.scenario.schema import Expectation, Loc, Scenario

Severity = Literal["error", "warning"]

# The shipped scenarios are a few KiB; validating this much takes about a second.
FILE_BYTES_MAX = 1024 * 1024
# Collections (mappings and lists) nested in one another; the deepest shipped scenario
# nests 6 (task args inside a mix inside the workload).
DEPTH_MAX = 32
# Values (scalars and collections) of the document with every alias expanded.
VALUES_MAX = 100_000
# Problems listed for one file: the first ones say what is wrong; thousands say nothing.
PROBLEMS_SHOWN_MAX = 50
# Characters of a value quoted in an error message.
_QUOTED_CHARS_MAX = 40


@dataclass(frozen=True)
class Problem:
    file: str
    line: int | None
    path: str  # dotted field path, e.g. `faults.2.target`; empty for the whole file
    message: str
    column: int | None = None
    severity: Severity = "error"

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        parts = [where]
        if self.path:
            parts.append(self.path)
        parts.append(f"warning: {self.message}" if self.severity == "warning" else self.message)
        return ": ".join(parts)


class ScenarioError(Exception):
    """A scenario file that cannot be used; `str()` lists every problem, one a line."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class LoadedScenario:
    scenario: Scenario
    source: Path | str
    warnings: list[Problem] = field(default_factory=list)


def load_scenario(path: str | Path) -> LoadedScenario:
    path = Path(path)
    loaded = load_scenario_text(_read(path), str(path), base=path.parent)
    return LoadedScenario(loaded.scenario, path, loaded.warnings)


def _read(path: Path) -> str:
    try:
        # Read one byte past the limit, never the whole of a huge file (or /dev/zero).
        with path.open("rb") as handle:
            data = handle.read(FILE_BYTES_MAX + 1)
        if len(data) > FILE_BYTES_MAX:
            raise ScenarioError([_too_large(str(path))])
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError([Problem(str(path), None, "", f"cannot read: {exc}")]) from None


def load_scenario_text(
    text: str, source: str = "<string>", base: Path | None = None
) -> LoadedScenario:
    """`base`: where a relative `costs_file` is found (the scenario file's directory;
    else the current directory)."""
    # Characters never outnumber UTF-8 bytes: the cheap test first.
    if len(text) > FILE_BYTES_MAX or len(text.encode("utf-8", "surrogatepass")) > FILE_BYTES_MAX:
        raise ScenarioError([_too_large(source)])
    root, data, problems = _parse(text, source)
    problems += _include_costs(data, root, source, base or Path.cwd())
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        problems += [_from_pydantic(err, root, source) for err in errors[:PROBLEMS_SHOWN_MAX]]
        # File order reads best; the sort is stable so one line keeps pydantic's order.
        problems.sort(key=lambda p: p.line or 0)
        if len(errors) > PROBLEMS_SHOWN_MAX:
            more = len(errors) - PROBLEMS_SHOWN_MAX
            problems.append(Problem(source, None, "", f"... and {more} more problems"))
        raise ScenarioError(problems) from None
    problems += _task_problems(scenario, root, source)
    if problems:
        raise ScenarioError(problems)
    warnings = [
        _at(root, loc, source, msg, severity="warning")
        for loc, msg in schema.scenario_warnings(scenario)
    ]
    return LoadedScenario(scenario, source, warnings)


class _CostsFragment(BaseModel):
    """A calibration file: one `costs:` section (see `schema.Costs`)."""

    model_config = schema.Costs.model_config
    costs: schema.Costs


def _include_costs(data: dict[str, Any], root: yaml.Node, source: str, base: Path) -> list[Problem]:
    """Read `costs_file` into `data["costs"]`, validated on its own so that its problems
    name its own file and lines."""
    name = data.get("costs_file")
    if not isinstance(name, str) or not name:
        return []  # absent, or not a path: the schema says why
    if "costs" in data:
        message = "a scenario takes costs: or costs_file:, not both"
        return [_at(root, ("costs_file",), source, message)]
    path = base / name
    fragment_source = str(path)
    try:
        text = _read(path)
    except ScenarioError as error:  # said at the scenario's line that names the file
        return [_at(root, ("costs_file",), source, f"{p.message}") for p in error.problems]
    fragment_root, fragment, problems = _parse(text, fragment_source)
    try:
        _CostsFragment.model_validate(fragment)
        data["costs"] = fragment["costs"]  # valid: the scenario validates it again
    except ValidationError as exc:
        problems += [
            _from_pydantic(err, fragment_root, fragment_source)
            for err in exc.errors()[:PROBLEMS_SHOWN_MAX]
        ]
    if problems:
        raise ScenarioError(problems)
    return []


def inline_costs(text: str, scenario: Scenario) -> str:
    """The scenario's text with its `costs_file` replaced by the `costs:` it holds, for a
    worker that has the text but not the file (a sweep's). Only for a text that loaded."""
    if scenario.costs_file is None or scenario.costs is None:
        return text
    data = yaml.safe_load(text)
    assert isinstance(data, dict), "a loaded scenario is a mapping"
    data.pop("costs_file")
    data["costs"] = scenario.costs.model_dump(mode="json", exclude_none=True)
    return yaml.safe_dump(data, sort_keys=False)


def _task_problems(scenario: Scenario, root: yaml.Node, source: str) -> list[Problem]:
    """The workload's functions and args, checked by the task library itself, so a
    scenario the simulator accepts is one real agents can run."""
    if scenario.workload is None:
        return []
    problems = []
    for name, mix in scenario.workload.mix.items():
        try:
            validate_args(name, json.dumps(mix.args))
        except TaskArgsError as error:
            problems.append(_at(root, ("workload", "mix", name, "args"), source, str(error)))
    return problems


def _too_large(source: str) -> Problem:
    return Problem(
        source,
        None,
        "",
        f"larger than {FILE_BYTES_MAX} bytes, the limit for a scenario file: not parsed",
    )


# --------------------------------------------------------------------------- YAML


# libyaml parses about 20 times faster than PyYAML's Python parser (1 MiB: 0.5 s, not
# 10 s); construction (SafeConstructor) is Python code in both.
_FastBase: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Loader(_FastBase):  # type: ignore[valid-type,misc]
    """The safe loader, with constructor failures turned into marked YAML errors."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        """PyYAML's scalar constructors raise plain Python errors on explicitly tagged
        nonsense (`!!int abc`: ValueError, `!!bool maybe`: KeyError, `!!timestamp x`:
        AttributeError, an int of 5000 digits: ValueError); give them the node's mark."""
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            value = str(node.value) if isinstance(node, yaml.ScalarNode) else ""
            if len(value) > _QUOTED_CHARS_MAX:
                value = value[:_QUOTED_CHARS_MAX] + "..."
            tag = str(node.tag).removeprefix("tag:yaml.org,2002:")
            why = f": {str(exc)[: _QUOTED_CHARS_MAX * 2]}" if isinstance(exc, ValueError) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"{value!r} is not a valid !!{tag}{why}", node.start_mark
            ) from exc


def _prescan(text: str, source: str) -> None:
    """Walk the parser's events (iterative, no tree) and stop at the first collection
    nested DEPTH_MAX deep or at the value past VALUES_MAX, before anything recursive
    (the composer: 500 levels are a RecursionError) or large is built."""
    loader = _Loader(text)
    depth = 0
    values = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
                depth += 1
                if depth > DEPTH_MAX:
                    raise _limit(source, event, f"nested more than {DEPTH_MAX} levels deep")
            elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
                depth -= 1
                assert depth >= 0, "the parser balances starts and ends"
                continue
            if isinstance(event, yaml.NodeEvent):
                values += 1
                if values > VALUES_MAX:
                    raise _limit(source, event, f"more than {VALUES_MAX} values")
    except yaml.MarkedYAMLError as exc:
        # libyaml 0.2.6 and later have their own nesting limit, which its scanner can
        # reach (on a flow collection) before the parser hands us the 33rd start event.
        if "nesting depth" not in str(exc.problem):
            raise
        line = exc.problem_mark.line + 1 if exc.problem_mark else None
        what = f"nested more than {DEPTH_MAX} levels deep (the limit for a scenario file)"
        raise ScenarioError([Problem(source, line, "", what)]) from exc
    finally:
        loader.dispose()


def _limit(source: str, event: yaml.Event, what: str) -> ScenarioError:
    line = event.start_mark.line + 1 if event.start_mark else None
    return ScenarioError([Problem(source, line, "", f"{what} (the limit for a scenario file)")])


def _parse(text: str, source: str) -> tuple[yaml.MappingNode, dict[str, Any], list[Problem]]:
    """Root node, plain data, and duplicate-key problems (found before construction,
    which flattens `<<` merge keys into what would look like duplicates)."""
    loader = _Loader(text)
    try:
        _prescan(text, source)
        root = loader.get_single_node()
        if root is None:
            raise ScenarioError(
                [Problem(source, 1, "", "empty file: expected a mapping of scenario fields")]
            )
        if not isinstance(root, yaml.MappingNode):
            kind = "a list" if isinstance(root, yaml.SequenceNode) else "a single value"
            raise ScenarioError(
                [
                    Problem(
                        source,
                        root.start_mark.line + 1,
                        "",
                        f"the top level must be a mapping of scenario fields, not {kind}",
                    )
                ]
            )
        _check_expansion(root, source)
        problems = _duplicate_keys(root, source)
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        raise ScenarioError([_from_yaml_error(exc, source)]) from None
    except yaml.YAMLError as exc:  # unmarked errors (rare): still no traceback
        raise ScenarioError([Problem(source, None, "", f"invalid YAML: {exc}")]) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ScenarioError([Problem(source, 1, "", "the top level must be a mapping")])
    # Top-level `x-...` keys are free-form (as in docker compose): a place for YAML
    # anchors shared by several sections, e.g. `x-mix: &mix {...}`.
    data = {k: v for k, v in data.items() if not (isinstance(k, str) and k.startswith("x-"))}
    return root, data, problems


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: yaml.Node, source: str) -> None:
    """Refuse what pydantic and the simulator would choke on once aliases are expanded:
    more than VALUES_MAX values, more than DEPTH_MAX levels, a collection that contains
    itself (`&a [*a]`). One iterative pass, each node visited once (an alias is its
    anchor's node, so its size is memoised)."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()  # the current node's ancestors: a cycle closes on one
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        line = node.start_mark.line + 1
        if finished:
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            open_nodes.discard(key)
            if size[key] > VALUES_MAX:
                raise ScenarioError(
                    [
                        Problem(
                            source,
                            line,
                            "",
                            f"more than {VALUES_MAX} values once its aliases are expanded "
                            "(the limit for a scenario file)",
                        )
                    ]
                )
            if depth[key] > DEPTH_MAX:
                raise ScenarioError(
                    [
                        Problem(
                            source,
                            line,
                            "",
                            f"aliases nest this more than {DEPTH_MAX} levels deep "
                            "(the limit for a scenario file)",
                        )
                    ]
                )
            continue
        if key in size:
            continue
        if key in open_nodes:
            raise ScenarioError(
                [Problem(source, line, "", "an alias refers to a collection that contains it")]
            )
        if isinstance(node, yaml.ScalarNode):
            size[key], depth[key] = 1, 0
            continue
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((kid, False) for kid in reversed(_children(node)))
    assert not open_nodes, "every collection opened was finished"
    assert id(root) in size


def _from_yaml_error(exc: yaml.MarkedYAMLError, source: str) -> Problem:
    mark = exc.problem_mark or exc.context_mark
    message = exc.problem or "invalid YAML"
    if exc.context:
        context_line = f" at line {exc.context_mark.line + 1}" if exc.context_mark else ""
        message = f"{message} ({exc.context}{context_line})"
    return Problem(
        source,
        mark.line + 1 if mark else None,
        "",
        f"invalid YAML: {message}",
        column=mark.column + 1 if mark else None,
    )


def _duplicate_keys(root: yaml.Node, source: str) -> list[Problem]:
    """PyYAML keeps the last of two equal keys; a repeated key is almost always a slip."""
    problems: list[Problem] = []
    seen_nodes: set[int] = set()

    def walk(node: yaml.Node, path: list[str]) -> None:
        if id(node) in seen_nodes:  # aliases share nodes; visit each once
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                name = str(key.value)
                if isinstance(key, yaml.ScalarNode) and name != "<<":
                    line = key.start_mark.line + 1
                    if name in first:
                        problems.append(
                            Problem(
                                source,
                                line,
                                ".".join([*path, name]),
                                f"duplicate key (first at line {first[name]})",
                            )
                        )
                    else:
                        first[name] = line
                walk(value, [*path, name])
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, [*path, str(i)])

    walk(root, [])
    return problems


# --------------------------------------------------------------------------- locations


def _at(
    root: yaml.Node,
    loc: Loc,
    source: str,
    message: str,
    missing: bool = False,
    severity: Severity = "error",
) -> Problem:
    line, path = _locate(root, loc, missing)
    return Problem(source, line, ".".join(path), message, severity=severity)


def _locate(root: yaml.Node, loc: Loc, missing: bool) -> tuple[int, list[str]]:
    """Line of the YAML node at `loc` (or of its nearest present ancestor) and the
    field path without pydantic's union tags (e.g. the `crash` in
    `faults.0.crash.target`)."""
    node: yaml.Node | None = root
    line = root.start_mark.line + 1
    path: list[str] = []
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, yaml.MappingNode):
            found = _lookup(node, part)
            if found is not None:
                key, node = found
                line = key.start_mark.line + 1
                path.append(str(part))
                continue
            if _is_union_tag(node, part) and not (last and missing):
                continue
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
            path.append(str(part))
            continue
        elif _looks_like_tag(part) and not (last and missing):
            continue
        # Absent from the file (a missing field, or a default): keep the
        # nearest line found and name the full path.
        node = None
        path.append(str(part))
    return line, path


def _lookup(node: yaml.MappingNode, part: int | str) -> tuple[yaml.Node, yaml.Node] | None:
    for key, value in node.value:
        if isinstance(key, yaml.ScalarNode) and key.value == str(part):
            return key, value
    return None


def _is_union_tag(node: yaml.MappingNode, part: int | str) -> bool:
    kind = _lookup(node, "kind")
    if kind is not None and isinstance(kind[1], yaml.ScalarNode) and kind[1].value == part:
        return True
    return _looks_like_tag(part)


# The members of pydantic's JsonValue union (task args), as they appear in locations.
_JSON_VALUE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict"})


def _looks_like_tag(part: int | str) -> bool:
    # pydantic names union members it cannot tag by `kind` after their type, e.g.
    # `list[str]`, `function-after[...]`, `NormalLink`, `float` (in task args); field
    # names are snake_case words that are none of these.
    return isinstance(part, str) and (
        "[" in part
        or "-" in part
        or (part[:1].isupper() and part.isidentifier())
        or part in _JSON_VALUE_TAGS
    )


def _from_pydantic(err: ErrorDetails, root: yaml.Node, source: str) -> Problem:
    loc: Loc = tuple(err["loc"])
    kind = err["type"]
    message = err["msg"]
    missing = kind == "missing"
    if kind == "union_tag_invalid":
        # Point at the `kind:` line itself.
        loc = (*loc, "kind")
        ctx = err.get("ctx", {})
        message = f"unknown kind '{ctx.get('tag')}' (expected one of {ctx.get('expected_tags')})"
    elif kind == "union_tag_not_found":
        loc, missing = (*loc, "kind"), True
        message = "Field required (it selects which other fields apply)"
    elif kind == "extra_forbidden" and loc:
        message = f"unknown field '{loc[-1]}'" + _suggestion(str(loc[-1]))
    elif kind == "value_error":
        message = message.removeprefix("Value error, ")
    return _at(root, loc, source, message, missing=missing)


def _suggestion(name: str) -> str:
    close = difflib.get_close_matches(name, _all_field_names(), n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


@functools.cache
def _all_field_names() -> list[str]:
    names: set[str] = set()
    for obj in vars(schema).values():
        if isinstance(obj, type) and issubclass(obj, BaseModel):
            for fname, finfo in obj.model_fields.items():
                names.add(finfo.alias or fname)
    return sorted(names)


# --------------------------------------------------------------------------- expectations

_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">=": operator.ge,
    ">": operator.gt,
}


@dataclass(frozen=True)
class Verdict:
    metric: str
    op: str
    bound: float
    value: float | None  # None when the summary lacks the metric or holds no number
    passed: bool
    note: str = ""  # why there is no value, when there is none

    def __str__(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        shown = f"{self.value:g}" if self.value is not None else self.note
        return f"{status} {self.metric} {self.op} {self.bound:g} (got {shown})"


def evaluate_expectations(
    expectations: Iterable[Expectation], summary: dict[str, Any]
) -> list[Verdict]:
    """Judge each expectation against a run summary; a missing or non-numeric metric
    fails with a note saying so (an unmeasured promise is not a kept promise).

    One exception: a quantile of a distribution that holds no samples (`count` 0), such
    as `failover_s.p99` in a run where the fault never hit the leader, passes with a
    note saying there was nothing to judge. Scenarios that need the event to happen
    say so with an expectation on the count (e.g. `failover_s.count == 2`)."""
    verdicts: list[Verdict] = []
    for e in expectations:
        value, note = _lookup_metric(summary, e.metric)
        passed = value is not None and _COMPARE[e.op](value, e.value)
        if value is None and _no_samples(summary, e.metric):
            passed, note = True, "no samples (count 0): nothing to judge"
        verdicts.append(Verdict(e.metric, e.op, e.value, value, passed, note))
    return verdicts


def _no_samples(summary: dict[str, Any], metric: str) -> bool:
    head, _, last = metric.rpartition(".")
    if not head or last not in ("p50", "p99", "max"):
        return False
    count, _ = _lookup_metric(summary, f"{head}.count")
    return count == 0


def _lookup_metric(summary: dict[str, Any], metric: str) -> tuple[float | None, str]:
    current: Any = summary
    for part in metric.split("."):
        if not isinstance(current, dict) or part not in current:
            return None, "missing from the summary"
        current = current[part]
    if current is None:
        return None, "null in the summary (nothing measured)"
    # bool is an int in Python; a true/false metric compared with numbers is a mistake.
    if isinstance(current, bool) or not isinstance(current, int | float):
        return None, f"not a number: {current!r}"
    return float(current), ""
