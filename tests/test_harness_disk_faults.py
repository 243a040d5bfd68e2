"""The seeded Raft harness with disk faults (goml.raft.harness): writes refused by a full
disk (the runtime stops; nothing of that Ready is stored or sent) and writes that stall
(nothing of that node moves meanwhile). The 1000-seed sweep is tests/test_raft_harness.py;
here: the faults happen, they have teeth (a runtime that sends what it failed to store
is caught), and the seeds that once failed stay fixed."""

from __future__ import annotations

import pytest

from goml.raft import harness
from goml.raft.checker import SafetyViolation
from goml.raft.harness import Cluster, run_seed
from goml.raft.replica import ReplicaReady
from goml.raft.types import NodeId


def test_disk_faults_happen_and_nothing_acknowledged_is_lost() -> None:
    refused = stalled = 0
    for seed in range(1, 11):
        result = run_seed(seed)  # raises SafetyViolation on a lost acknowledgement
        assert result.acknowledged > 0
        refused += result.disk_full
        stalled += result.stalls
    assert refused > 0 and stalled > 0, (refused, stalled)


# Seeds where a leader whose write stalled came back still leading an old term, lacking
# what a newer term had committed meanwhile (as Raft allows): the checker used to call
# that a leader-completeness violation.
@pytest.mark.parametrize("seed", [168, 274, 618, 797, 933, 934])
def test_a_stale_leader_after_a_stall_is_no_violation(seed: int) -> None:
    assert run_seed(seed).acknowledged > 0  # raises SafetyViolation on a violation


def test_a_runtime_that_sends_what_it_failed_to_store_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A mutant runtime: when the disk refuses a write, it sends that Ready's messages
    anyway (a vote or an append acknowledgement that was never made durable)."""
    refuse = Cluster._drain

    def drain(self: Cluster, node_id: NodeId) -> None:
        replica = self.nodes[node_id].replica
        assert replica is not None
        taken: list[ReplicaReady] = []
        original = replica.ready

        def ready() -> ReplicaReady:
            taken.append(original())
            return taken[-1]

        replica.ready = ready  # type: ignore[method-assign]
        refused_before = self.disk_full
        try:
            refuse(self, node_id)
        finally:
            replica.ready = original  # type: ignore[method-assign]
        if self.disk_full > refused_before:  # the last Ready taken was refused: leak it
            for message in taken[-1].messages:
                self._send(message)

    monkeypatch.setattr(harness.Cluster, "_drain", drain)
    failures = 0
    for seed in range(1, 61):
        try:
            run_seed(seed)
        except SafetyViolation:
            failures += 1
    assert failures > 0, "refused writes that leak their messages must break a seed"
