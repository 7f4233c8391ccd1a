"""Waits that yield the CPU: every wait on a peer in this package goes through `wait_for`.

MPI's blocking calls spin under MPICH for as long as they wait (a rank waiting a whole round
burns a core; BENCHMARKS, "Waiting ranks"). `wait_for` tests a non-blocking request (or any
`ready()`) with a growing sleep in between and an optional deadline, and beats the hang watchdog
while it waits; `yielding_barrier` is MPI_Ibarrier waited for that way.
"""

from __future__ import annotations

import time

from .watchdog import beat

# The sleep between two tests of a pending MPI request: from 0.1 ms, doubled after each miss, up to
# 16 ms. A message is then seen at most ~16 ms after it lands (once per round, not per step), and a
# rank that waits a whole round wakes ~60 times a second instead of spinning on a core.
POLL_FIRST_S = 1e-4
POLL_MOST_S = 0.016


def wait_for(ready, deadline: float | None = None) -> bool:
    """Call `ready()` until it returns True (then True) or `deadline` (time.monotonic()) passes
    (then False), sleeping between calls with a backoff that starts again at every call."""
    delay = POLL_FIRST_S
    while not ready():
        beat()  # waiting on a peer is not a hang (watchdog.py); the peer's own watchdog names it
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(delay, left))
        else:
            time.sleep(delay)
        delay = min(2 * delay, POLL_MOST_S)
    return True


def yielding_barrier(comm) -> None:
    """A barrier on `comm` whose wait sleeps (MPI_Ibarrier + wait_for), for ranks that may wait long:
    a follower for its leader's global adapter, the server for the clients' final phases."""
    request = comm.Ibarrier()
    wait_for(request.Test)
