"""Options every goml gRPC channel uses: the client's, the agents', a follower's
forwarding channel and the Raft peers'.

gRPC's own reconnect backoff starts at 1 s and grows 1.6x per failure up to 120 s. A node
that was down, or not yet listening when a channel first tried it, then stays
"connection refused" on that channel for seconds to minutes after it is back: calls fail
at once with the old error, without a new connection attempt. goml's callers already
decide when to try again (goml.api.retry; the Raft core's heartbeats), so the channel
only has to reconnect soon and at a bounded pace.
"""

from __future__ import annotations

RECONNECT_BACKOFF_MS_MIN = 100
RECONNECT_BACKOFF_MS_MAX = 500
# Until a channel's next reconnect attempt, its calls fail at once with its last
# connection failure: a "connection refused" can be this old (the backoff's maximum, its
# 20 % jitter, and a margin) while the node has been up all along.
FAILURE_STALE_MS_MAX = RECONNECT_BACKOFF_MS_MAX * 6 // 5 + 100


def reconnect_options() -> list[tuple[str, int]]:
    return [
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS_MIN),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_MS_MIN),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS_MAX),
    ]
