"""The one leader-tracking and retry policy of every caller of the control plane: the
Python client (`goml.client`), the agent core (`goml.agent.core`) and the simulator's
client all decide with this code which node to ask and when to ask again.

Sans-IO: no clock, no sleep, no global randomness. Callers pass `now_ms` and a seeded
RNG and carry out the decision (sleep, schedule a timer, give up).

Rules:
- Belief: the node that last answered is the leader; every call goes to the belief. A
  follower that forwarded the call names the leader that served it: the next calls go
  to that leader directly, unless it failed from here within the last
  DIRECT_AFTER_WINDOWS unreachable windows (then the follower that can reach it keeps
  serving: a one-way partition).
- NOT_LEADER naming another known node: follow the hint at once, at most
  `redirects_max` times in a row per operation (two nodes naming each other cannot spin
  a caller); beyond that, for a NOT_LEADER without a usable hint, and for a hint naming a
  node unreachable lately, rotate and back off.
- UNAVAILABLE / DEADLINE: the node is unreachable for `unreachable_ms`; rotate to the next
  node not unreachable lately (only if no other call has moved the belief on already)
  and back off.
- UNAUTHENTICATED: retried with backoff only if `retry_unauthenticated` (a daemon whose
  token may be rotated), else given up at once (a user must fix their credentials).
- INVALID: never retried: the same request is refused again.
- Backoff after the n-th consecutive failure of an operation: a delay drawn in [d/2, d]
  with d = min(backoff_ms_max, backoff_ms_min * 2**(n-1)).
- An operation gives up once `give_up_after_ms` (if set) would pass before its next try;
  each call's deadline is `call_timeout_ms`, cut to what is left of that budget.
- Hedging (`hedge_after_ms`, for idempotent calls only): a call with no answer after
  that long is sent again to `hedge_target`; the first answer wins, and the operation
  fails only when every copy has failed. A call in flight when its path is cut (a
  one-way partition) no longer waits for its deadline; nor for its hedge time once the
  node it waits on has failed from here since it was sent (`stranded`: another call was
  outpaced there or timed out), so the calls caught by a cut wait for the first one's
  lesson, not each for its own. The copy goes to the next node
  not avoided, preferring by failure domain (`domains`, a node's cloud, when known):
  first a node in neither the silent node's domain nor the caller's own
  (`home_domain`), then one in the silent node's domain, then one in the caller's. A
  silent leader is cut off from here, or from the caller's domain (a one-way cut from
  a cloud to the leader): a follower of the caller's own domain is then cut off from it
  too, and would hold the copy until its deadline; one of a third domain reaches the
  leader over other links. Within each of these, a node that failed from here within
  DIRECT_AFTER_WINDOWS unreachable windows comes last (the leader across a cut that
  lasts longer than one window: a copy sent there is lost again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from goml.api.types import ErrorKind

BACKOFF_EXPONENT_MAX = 30  # 2**30 * any sane minimum is beyond any sane maximum
# How long every goml caller avoids a node that timed out or refused its connection
# (a healed partition is tried again after it).
UNREACHABLE_MS = 10_000
# A follower that forwarded names the leader; calls go to it directly only if it has not
# failed from here for this many unreachable windows.
DIRECT_AFTER_WINDOWS = 6


class Rng(Protocol):
    """What the policy needs of `random.Random` (pass a seeded instance)."""

    def random(self) -> float: ...


@dataclass(frozen=True, slots=True)
class RetryConfig:
    nodes: tuple[str, ...]  # control-plane node ids, in rotation order
    call_timeout_ms: int
    redirects_max: int  # NOT_LEADER hints followed in a row without backoff
    backoff_ms_min: int
    backoff_ms_max: int
    give_up_after_ms: int | None  # None: never (a daemon retries for ever)
    retry_unauthenticated: bool
    unreachable_ms: int  # how long a node that timed out or refused is avoided
    hedge_after_ms: int | None  # send a second copy after this long without an answer
    # Each node's failure domain (its cloud), in the order of `nodes`; () when unknown
    # (a profile names addresses only): hedges then take the next node in order.
    domains: tuple[str, ...] = ()
    home_domain: str = ""  # the caller's own failure domain ("" when unknown)

    def __post_init__(self) -> None:
        if not self.nodes or len(set(self.nodes)) != len(self.nodes) or not all(self.nodes):
            raise ValueError(f"retry policy: nodes must be unique and non-empty: {self.nodes}")
        if self.domains and len(self.domains) != len(self.nodes):
            raise ValueError(
                f"retry policy: {len(self.domains)} domains for {len(self.nodes)} nodes"
            )
        for name in ("call_timeout_ms", "backoff_ms_min", "backoff_ms_max", "unreachable_ms"):
            value = getattr(self, name)
            if type(value) is not int or value < 1:
                raise ValueError(f"retry policy: {name} must be an integer >= 1, got {value!r}")
        if type(self.redirects_max) is not int or self.redirects_max < 0:
            raise ValueError(f"retry policy: redirects_max must be >= 0, got {self.redirects_max}")
        if self.backoff_ms_min > self.backoff_ms_max:
            raise ValueError("retry policy: backoff_ms_min > backoff_ms_max")
        if self.give_up_after_ms is not None and self.give_up_after_ms < 1:
            raise ValueError("retry policy: give_up_after_ms must be >= 1 or None")
        if self.hedge_after_ms is not None and not 1 <= self.hedge_after_ms < self.call_timeout_ms:
            raise ValueError("retry policy: hedge_after_ms must be in [1, call_timeout_ms)")


class Attempt:
    """One operation's retry state (a client call, an agent lane, a simulated submit)."""

    __slots__ = ("failures", "redirects", "started_ms")

    def __init__(self, started_ms: int) -> None:
        self.started_ms = started_ms
        self.failures = 0  # consecutive failures: the backoff exponent
        self.redirects = 0  # consecutive NOT_LEADER hints followed without backoff


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after a failed call: retry after `delay_ms` (0: at once), or not."""

    retry: bool
    delay_ms: int
    why: str  # for logs and for the error a caller finally raises

    def __post_init__(self) -> None:
        assert self.delay_ms >= 0
        assert self.retry or self.delay_ms == 0


class RetryPolicy:
    def __init__(self, config: RetryConfig, rng: Rng, start: str) -> None:
        assert start in config.nodes, (start, config.nodes)
        self.config = config
        self._rng = rng
        self._leader = start
        self._unreachable: dict[str, int] = {}  # node -> until when it is avoided
        self._last_failed: dict[str, int] = {}  # node -> when it last timed out or refused

    @property
    def leader(self) -> str:
        """The node every call goes to now."""
        return self._leader

    def call_timeout_ms(self, attempt: Attempt, now_ms: int) -> int:
        """The deadline of the next call of `attempt`: the per-call timeout, cut to the
        operation's remaining budget (at least 1 ms)."""
        timeout = self.config.call_timeout_ms
        if self.config.give_up_after_ms is not None:
            left = attempt.started_ms + self.config.give_up_after_ms - now_ms
            timeout = min(timeout, left)
        return max(1, timeout)

    def succeeded(
        self, attempt: Attempt | None, node: str, now_ms: int, served_by: str = ""
    ) -> None:
        """`node` answered: it leads (or serves), and the operation's streak ends.
        `served_by`: the leader a forwarding follower named ("" when `node` served)."""
        assert node in self.config.nodes, node
        if attempt is not None:
            attempt.failures = 0
            attempt.redirects = 0
        self._unreachable.pop(node, None)
        self._leader = node
        direct = served_by in self.config.nodes and served_by != node
        if direct and not self._failed_lately(served_by, now_ms):
            # Go direct, one hop less; but not to a leader that failed from here lately
            # (a one-way cut: every call in flight would wait for its timeout again).
            self._leader = served_by

    def failed(
        self, attempt: Attempt, node: str, kind: ErrorKind, hint: str, now_ms: int
    ) -> Decision:
        """A call of `attempt` to `node` failed with `kind` (`hint`: the leader a
        NOT_LEADER answer named, "" if none). Updates the belief; says what to do."""
        assert node in self.config.nodes, node
        assert now_ms >= attempt.started_ms
        nodes = self.config.nodes
        match kind:
            case ErrorKind.INVALID:
                return Decision(False, 0, f"{node} refused the request")
            case ErrorKind.UNAUTHENTICATED if not self.config.retry_unauthenticated:
                return Decision(False, 0, f"{node} refused the credentials")
            case ErrorKind.NOT_LEADER if (
                hint in nodes and hint != node and not self._avoided(hint, now_ms)
            ):
                self._leader = hint
                if attempt.redirects < self.config.redirects_max:
                    attempt.redirects += 1
                    return self._bounded(attempt, 0, now_ms, f"{node} is a follower: ask {hint}")
                why = f"{node} is a follower naming {hint}; redirected too often in a row"
            case ErrorKind.NOT_LEADER:
                unknown = f" (unknown leader hint {hint!r})" if hint else ""
                why = f"{node} knows no leader{unknown}"
                self._rotate(node, now_ms)
            case ErrorKind.UNAVAILABLE | ErrorKind.DEADLINE:
                why = f"{node} unreachable ({kind})"
                self._unreachable[node] = now_ms + self.config.unreachable_ms
                self._last_failed[node] = now_ms
                self._rotate(node, now_ms)
            case _:
                assert kind is ErrorKind.UNAUTHENTICATED
                why = f"{node} refused the credentials"
        attempt.redirects = 0
        return self._bounded(attempt, self.backoff_ms(attempt), now_ms, why)

    def backoff_ms(self, attempt: Attempt) -> int:
        """Count one more failure of `attempt` and draw its backoff. `failed` calls this;
        a caller that retries later anyway (a periodic heartbeat refused) may too."""
        config = self.config
        attempt.failures += 1
        exponent = min(attempt.failures - 1, BACKOFF_EXPONENT_MAX)
        ceiling = min(config.backoff_ms_max, config.backoff_ms_min << exponent)
        delay = ceiling // 2 + int(self._rng.random() * (ceiling - ceiling // 2))
        assert ceiling // 2 <= delay <= ceiling, (delay, ceiling)
        return delay

    # ------------------------------------------------------------------ internals

    def _bounded(self, attempt: Attempt, delay_ms: int, now_ms: int, why: str) -> Decision:
        budget = self.config.give_up_after_ms
        if budget is not None and now_ms + delay_ms >= attempt.started_ms + budget:
            return Decision(False, 0, f"gave up after {budget} ms; last: {why}")
        return Decision(True, delay_ms, why)

    def outpaced(self, node: str, now_ms: int) -> None:
        """A copy sent later to another node answered while the one sent to `node` had
        not: `node` is avoided as if it had timed out (the operation's streak is over)."""
        assert node in self.config.nodes, node
        self._unreachable[node] = now_ms + self.config.unreachable_ms
        self._last_failed[node] = now_ms
        if self._leader == node:
            self._rotate(node, now_ms)

    def stranded(self, node: str, sent_ms: int, now_ms: int) -> bool:
        """Whether a call sent to `node` at `sent_ms`, still unanswered, should be hedged
        now rather than at its hedge time: `node` has failed from here since (another
        call timed out there or was outpaced) and is avoided."""
        if self.config.hedge_after_ms is None:
            return False
        last = self._last_failed.get(node)
        return last is not None and last >= sent_ms and self._avoided(node, now_ms)

    def hedge_target(self, primary: str, now_ms: int) -> str | None:
        """Where a hedged copy of a call to `primary` goes: of the nodes not avoided, in
        order after `primary`, the first of the best failure domain (see the module
        docstring); None when hedging is off or there is no such node."""
        config = self.config
        if config.hedge_after_ms is None:
            return None
        nodes = config.nodes
        start = nodes.index(primary)
        best: tuple[tuple[int, bool], str] | None = None
        for k in range(1, len(nodes)):
            node = nodes[(start + k) % len(nodes)]
            if self._avoided(node, now_ms):
                continue
            rank = self._hedge_rank(primary, node, now_ms)
            if best is None or rank < best[0]:
                best = (rank, node)
        return best[1] if best is not None else None

    def _hedge_rank(self, primary: str, node: str, now_ms: int) -> tuple[int, bool]:
        """(domain rank, failed lately). Domain rank 0: a third domain (or domains
        unknown); 1: the silent node's; 2: the caller's. Within a rank, a node that
        failed from here lately comes last even once no longer avoided (a leader across
        a one-way cut that lasts). The domain decides first: a node merely outpaced once
        (slow under load) is marked failed too, and must not push a copy into the
        caller's own, cut-off, domain."""
        config = self.config
        failed = self._failed_lately(node, now_ms)
        if not config.domains:
            return 0, failed
        domain = config.domains[config.nodes.index(node)]
        if config.home_domain and domain == config.home_domain:
            return 2, failed
        if domain == config.domains[config.nodes.index(primary)]:
            return 1, failed
        return 0, failed

    def _failed_lately(self, node: str, now_ms: int) -> bool:
        last = self._last_failed.get(node)
        return (
            last is not None and now_ms - last < self.config.unreachable_ms * DIRECT_AFTER_WINDOWS
        )

    def _avoided(self, node: str, now_ms: int) -> bool:
        until = self._unreachable.get(node)
        return until is not None and now_ms < until

    def _rotate(self, failed: str, now_ms: int) -> None:
        # Only if no other call has moved the belief on already: concurrent calls that
        # fail together would otherwise rotate it off a leader another call found.
        if self._leader != failed:
            return
        nodes = self.config.nodes
        start = nodes.index(failed)
        order = [nodes[(start + k) % len(nodes)] for k in range(1, len(nodes) + 1)]
        usable = [n for n in order if n != failed and not self._avoided(n, now_ms)]
        self._leader = usable[0] if usable else order[0]
