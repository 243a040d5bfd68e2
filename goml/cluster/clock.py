"""Cluster time: the `now_ms` a leader stamps into commands, immune to wall-clock skew.

Leases, their expiry, agents' timeouts and every task timestamp are decided by the times
leaders stamp into commands. Stamping each leader's wall clock would let one node's
skewed or jumping clock expire every lease at once (a new leader 60 s ahead) or keep
dead leases alive as long (one behind). So a leader stamps cluster time instead:

- It never goes back: a new leader continues from the latest command time it applied,
  advanced by its own monotonic clock since it applied it. That estimate is low by the
  command's replication delay and the election's gap, so leases last slightly longer
  after a failover, never shorter.
- While a node leads, it advances with the node's monotonic clock, and may run faster
  than that toward the node's wall clock by at most SLEW_PER_MILLE (1 %), never
  slower: after a whole-cluster outage timestamps catch up with wall time (an hour in a
  hundred hours), and a leader whose wall clock is wrong shortens a lease by at most
  1 %. A wall clock behind cluster time is ignored.
- The first command of a new cluster takes the first leader's wall clock.

So a lease of L ms lasts between 0.99 L and L plus the failover gap of real time, whatever
any node's wall clock says. Displayed times follow cluster time: they can run behind wall
time after an outage, or ahead by a skew the first leader had, never by more than that.

Sans-IO: fed the node's monotonic and wall clocks and the manifest's latest command time.
"""

from __future__ import annotations

SLEW_PER_MILLE = 10  # cluster time may gain on the monotonic clock this much toward wall


class ClusterClock:
    def __init__(self, latest_command_ms: int | None, now_ms: int) -> None:
        # The latest command time applied here (None: none yet) and when it was seen.
        self._applied_ms = latest_command_ms
        self._applied_at_ms = now_ms
        # While leading: cluster time at monotonic time `_leading_at_ms`.
        self._leading_ms: int | None = None
        self._leading_at_ms = 0
        self._gain_micro_ms = 0  # thousandths of a ms of gain earned and not yet taken

    def applied(self, latest_command_ms: int | None, now_ms: int) -> None:
        """The manifest's latest command time after an apply (it only grows)."""
        if latest_command_ms is None:
            assert self._applied_ms is None, "a manifest's command time never goes away"
            return
        if self._applied_ms is None or latest_command_ms > self._applied_ms:
            self._applied_ms = latest_command_ms
            self._applied_at_ms = now_ms
        assert latest_command_ms <= self._applied_ms, (latest_command_ms, self._applied_ms)

    def estimate_ms(self, now_ms: int, wall_ms: int) -> int:
        """Cluster time as this node can tell without leading (status, a new leader's
        start): the latest command time plus the monotonic time since it was applied."""
        if self._applied_ms is None:
            return wall_ms  # no command yet: the cluster starts on this node's wall clock
        return self._applied_ms + (now_ms - self._applied_at_ms)

    def start_leading(self, now_ms: int, wall_ms: int) -> None:
        self._leading_ms = max(self._applied_ms or 0, self.estimate_ms(now_ms, wall_ms))
        self._leading_at_ms = now_ms
        self._gain_micro_ms = 0

    def stop_leading(self) -> None:
        self._leading_ms = None

    def now_ms(self, now_ms: int, wall_ms: int) -> int:
        """Cluster time at monotonic `now_ms` (non-decreasing while leading)."""
        if self._leading_ms is None:
            return max(self._applied_ms or 0, self.estimate_ms(now_ms, wall_ms))
        elapsed_ms = now_ms - self._leading_at_ms
        assert elapsed_ms >= 0, "monotonic time never goes back"
        ticked_ms = self._leading_ms + elapsed_ms
        behind_ms = wall_ms - ticked_ms
        if behind_ms <= 0:
            self._gain_micro_ms = 0  # the right to gain accrues only while behind wall
            gain_ms = 0
        else:
            # Readings come every few ms: carry the fraction of a ms earned so far.
            self._gain_micro_ms += elapsed_ms * SLEW_PER_MILLE
            gain_ms = min(behind_ms, self._gain_micro_ms // 1000)
            self._gain_micro_ms -= gain_ms * 1000
        # A command of an earlier term applied since we lead may carry a later time.
        self._leading_ms = max(ticked_ms + gain_ms, self._applied_ms or 0)
        self._leading_at_ms = now_ms
        return self._leading_ms
