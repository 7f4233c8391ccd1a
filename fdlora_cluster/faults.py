"""Test-only fault injection (env FDLORA_FAULT), so that the failure paths are tested by real jobs.

    FDLORA_FAULT="raise@rank=3,round=2"          that rank raises at the start of round 2
    FDLORA_FAULT="kill@rank=2,round=1"           that rank SIGKILLs itself (once the checkpoint it
                                                 wrote at the round's start is complete)
    FDLORA_FAULT="exit@rank=4,round=1"           that rank calls sys.exit(0) mid-job
    FDLORA_FAULT="nan_update@client=1,round=2"   client 1's leader sends non-finite weights
    FDLORA_FAULT="nan_samples@client=1,round=2"  client 1's leader sends a NaN sample count
    FDLORA_FAULT="slow@client=1,round=2,seconds=12"  client 1's leader sends its update 12 s late
    FDLORA_FAULT="hang@rank=2,round=2"           that rank stops making progress, alive (watchdog.py)

Several faults are separated by ";". Each prints `injected fault: ...` with the time on stderr
before it acts. Unset (every real run), `fault()` returns None at once.
"""

from __future__ import annotations

import os
import sys
import time

ENV = "FDLORA_FAULT"


def _parse(spec: str) -> list[tuple[str, dict[str, int]]]:
    out = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        what, _, where = item.partition("@")
        out.append((what, {k: int(v) for k, v in (kv.split("=") for kv in where.split(",") if kv)}))
    return out


def fault(kinds: tuple[str, ...], **at: int) -> tuple[str | None, dict[str, int]]:
    """The injected fault of one of `kinds` whose place matches `at` (e.g. rank=3, round=2), announced,
    with its settings (the keys that are not places, e.g. seconds); (None, {}) when there is none."""
    spec = os.environ.get(ENV)
    if not spec:
        return None, {}
    for what, where in _parse(spec):
        if what in kinds and all(at[k] == v for k, v in where.items() if k in at) and set(at) <= set(where):
            from .log import console_err  # the console, also when the rank's stderr goes to its log file

            print(f"injected fault: {what} at {at} (time {time.time():.3f})", file=console_err(), flush=True)
            return what, where
    return None, {}


def maybe_fail(rank: int, round: int, settle=None) -> None:
    """The process faults (raise, kill, exit, hang) a test asked for at the start of `round`.
    `settle()`, before a kill: wait until the checkpoint this rank wrote at the round's start is
    complete (the other ranks write theirs without waiting for each other, so a test that kills a
    rank there knows which checkpoint a resume finds)."""
    what, _ = fault(("raise", "kill", "exit", "hang"), rank=rank, round=round)
    if what == "kill" and settle is not None:
        settle()
    if what == "hang":
        while True:  # alive, not progressing: as a deadlock in a library would leave a rank
            time.sleep(3600)
    if what == "raise":
        raise RuntimeError(f"injected fault on rank {rank} in round {round}")
    if what == "kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    if what == "exit":
        sys.exit(0)
