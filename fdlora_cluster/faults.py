"""Test-only fault injection (env FDLORA_FAULT), so that the failure paths are tested by real jobs.

    FDLORA_FAULT="raise@rank=3,round=2"          that rank raises at the start of round 2
    FDLORA_FAULT="kill@rank=2,round=1"           that rank SIGKILLs itself (once the checkpoint it
                                                 wrote at the round's start is complete)
    FDLORA_FAULT="exit@rank=4,round=1"           that rank calls sys.exit(0) mid-job
    FDLORA_FAULT="nan_update@client=1,round=2"   client 1's leader sends non-finite weights
    FDLORA_FAULT="nan_samples@client=1,round=2"  client 1's leader sends a NaN sample count
    FDLORA_FAULT="slow@client=1,round=2,seconds=12"  client 1's leader sends its update 12 s late
    FDLORA_FAULT="hang@rank=2,round=2"           that rank stops making progress, alive (watchdog.py)
    FDLORA_FAULT="drop@client=1,round=2"         client 1's leader does not send its round-2 update

Several faults are separated by ";". Each prints `injected fault: ...` with the time on stderr
before it acts. Unset (every real run), `fault()` returns None at once.

`chaos(seed, ...)` draws a seeded schedule of the client faults above at random rounds and clients
(slow but in time, late past the deadline, non-finite, dropped, and short rounds to skip, with a
kill in the middle); `Chaos.spec()` is its FDLORA_FAULT and `Chaos.expected()` what each round's
record must then show (tests/test_chaos.py, bench/chaos.py).
"""

from __future__ import annotations

import os
import random
import sys
import time
from dataclasses import dataclass

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


# ---------------------------------------------------------------- the seeded chaos schedule

# The kinds a chaos schedule draws: `slow` sends within the deadline (counted), `late` past it
# (missing, then recognised as late in the next round), `nan_update` is rejected, `drop` never sent
# (missing, never late). A `skip` round has one usable update fewer than min_clients (nan_update on
# the others), so with on_short_round = skip it is skipped.
KINDS = ("slow", "late", "nan_update", "drop")
UNUSABLE = ("late", "nan_update", "drop")  # a fault that keeps the update out of its round


@dataclass(frozen=True)
class Injected:
    kind: str  # one of KINDS
    client: int
    round: int
    seconds: int = 0  # slow, late: how long the leader waits before it sends

    def spec(self) -> str:
        if self.kind in ("slow", "late"):
            return f"slow@client={self.client},round={self.round},seconds={self.seconds}"
        return f"{self.kind}@client={self.client},round={self.round}"


@dataclass(frozen=True)
class Chaos:
    """A drawn schedule (`chaos`): the faults, the short rounds (`skips`), and the round at whose
    start client `kill_client`'s leader is SIGKILLed (after its checkpoint of the round before)."""
    clients: int
    rounds: int
    faults: tuple[Injected, ...]
    skips: tuple[int, ...]
    kill_round: int
    kill_client: int

    def spec(self, leaders: list[int], kill: bool = True) -> str:
        """FDLORA_FAULT for the job (`leaders`: each client's leader rank); `kill=False` for the
        resumed job, which must not be killed again at the same round."""
        items = [f.spec() for f in self.faults]
        if kill:
            items.append(f"kill@rank={leaders[self.kill_client]},round={self.kill_round}")
        return ";".join(items)

    def expected(self) -> dict[int, dict]:
        """What each round's server record must show: `clients` averaged, `missing`, `rejected`
        (client ids), `late` ((client, round) pairs recognised in that round), `skipped`."""
        out = {}
        for t in range(1, self.rounds + 1):
            here = {f.client: f for f in self.faults if f.round == t}
            out_of = {c for c, f in here.items() if f.kind in UNUSABLE}
            skipped = t in self.skips
            out[t] = {"clients": [] if skipped else [c for c in range(self.clients) if c not in out_of],
                      "missing": sorted(c for c, f in here.items() if f.kind in ("late", "drop")),
                      "rejected": sorted(c for c, f in here.items() if f.kind == "nan_update"),
                      "late": sorted((f.client, f.round) for f in self.faults if f.kind == "late" and f.round == t - 1),
                      "skipped": skipped}
        return out


def chaos(seed: int, rounds: int, clients: int, timeout_s: int, min_clients: int,
          per_kind: int = 2, skips: int = 1) -> Chaos:
    """A seeded schedule (the same for the same arguments) of `per_kind` faults of each kind and
    `skips` short rounds, at random rounds and clients, that a job with round_timeout_s =
    `timeout_s`, min_clients and on_short_round = skip survives with every round's record known
    in advance (`Chaos.expected`):

    - no fault in round 1 (every client's first update sets the pace), in the last round (a late
      update would arrive after it, in no round's record) nor in the two rounds around the kill
      (the kill at the start of round K, after the checkpoint of round K - 1: a late update of
      round K - 1 would be lost with the killed job);
    - a round keeps at least min_clients usable updates, except a skip round, which has one fewer
      (its faults are nan_update: they cost no waiting);
    - `late` waits timeout_s + 1 s: past the deadline, but its client still takes the next round's
      global adapter and is in time for that round (in which it has no fault), where its late
      update is recognised; `slow` waits timeout_s / 4 s (at least 1): within the deadline."""
    if clients - min_clients < 1:
        raise ValueError(f"chaos: {clients} clients with min_clients = {min_clients} survive no fault; "
                         "need min_clients < clients")
    if timeout_s < 2:
        raise ValueError(f"chaos: round_timeout_s = {timeout_s}: need 2 s or more (a slow update must fit within it)")
    kill_round = rounds // 2 + 1
    free = [t for t in range(2, rounds) if t not in (kill_round - 1, kill_round)]
    need = skips + per_kind * len(KINDS)
    if len(free) < skips + 2 * per_kind or rounds < 6:
        raise ValueError(f"chaos: {rounds} rounds are too few for {need} faults and a kill; use 20 or more")
    rng = random.Random(seed)
    skip_rounds = sorted(rng.sample(free, skips))
    taken: dict[tuple[int, int], str] = {}  # (client, round) -> kind
    faults = []
    for t in skip_rounds:
        for c in sorted(rng.sample(range(clients), clients - min_clients + 1)):
            taken[c, t] = "nan_update"
            faults.append(Injected("nan_update", c, t))

    def fits(kind: str, c: int, t: int) -> bool:
        if t in skip_rounds or (c, t) in taken or taken.get((c, t - 1)) == "late":
            return False  # a late client's next round is kept clean: it must be in time there
        if kind == "late" and (c, t + 1) in taken:
            return False
        unusable = sum(1 for (_, r), k in taken.items() if r == t and k in UNUSABLE)
        return kind not in UNUSABLE or unusable + 1 <= clients - min_clients

    seconds = {"slow": max(1, timeout_s // 4), "late": timeout_s + 1}
    for kind in KINDS:
        for _ in range(per_kind):
            places = [(c, t) for t in free for c in range(clients) if fits(kind, c, t)]
            if not places:
                raise ValueError(f"chaos: no room left for another {kind} fault in {rounds} rounds x {clients} clients")
            c, t = rng.choice(places)
            taken[c, t] = kind
            faults.append(Injected(kind, c, t, seconds.get(kind, 0)))
    faults.sort(key=lambda f: (f.round, f.client))
    return Chaos(clients, rounds, tuple(faults), tuple(skip_rounds), kill_round, rng.randrange(clients))
