"""The server role (world rank 0): holds the global adapter and the outer optimizer, nothing else.

It never builds the model: it learns the global adapter's layout from the leaders' handshake, and
it never holds a personal adapter, except the one-off `global.init: personal_mean` average that
the paper's Algorithm 1 (line 7) asks for, which is logged as such. Every update is checked before
it is used (`rejection`); a rejected one is left out of that round's average, and a round with
fewer than `federation.min_clients` accepted updates fails the job, is skipped or waits on
(`federation.on_short_round`).
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from .log import get_logger
from .strategies import InOrderSum, UpdateError, check_update, weighted_average
from .state import l2_distance
from .transport import ClientUpdate, GlobalAdapter, Transport


class FederationError(RuntimeError):
    """A round the server cannot complete (too few accepted updates); says which clients and why."""


def rejection(update: ClientUpdate, round: int, reference: dict[str, torch.Tensor],
              max_update_norm: float | None) -> str | None:
    """Why `update` cannot be used in `round` (None: it can). The byte count and layout were
    checked by the transport on receive; here: the round, the sample count, the values, the norm."""
    if update.round != round:
        return f"it is for round {update.round}, not {round}"
    n = update.num_samples
    if not math.isfinite(n) or n <= 0 or n != int(n):
        return f"its sample count {n!r} is not a positive integer"
    try:
        check_update(reference, update.state, client=update.client)  # keys, shapes, dtypes, finite
    except UpdateError as e:
        return str(e).removeprefix(f"client {update.client}: ")
    if max_update_norm is not None:
        norm = l2_distance(update.state, reference)
        if norm > max_update_norm:
            return f"its change has norm {norm:.4g} > federation.max_update_norm = {max_update_norm:g}"
    return None


class Server:
    def __init__(self, cfg, topo, strategy, transport: Transport, run):
        self.cfg, self.topo, self.strategy, self.transport, self.run = cfg, topo, strategy, transport, run
        self.log = get_logger()
        self.clients = topo.plan.clients
        self.global_state: dict[str, torch.Tensor] | None = None
        self.used: list[int] = []  # the clients averaged in the last round (each leader is told)

    def init_global(self) -> None:
        """Every leader's layout (they must agree), then the starting global adapter."""
        self.transport.recv_layouts(self.clients)
        if self.cfg.global_.init == "seed":
            # Every client seeds `global` identically; client 0's leader sends that start once.
            self.global_state = self.transport.recv_init(0)
            self.log.info("global adapter starts from the shared seeded initialisation")
        else:
            personal = [self.transport.recv_init(c) for c in self.clients]
            for c, s in enumerate(personal):
                check_update(personal[0], s, client=c)
            n = len(personal)
            self.global_state = weighted_average(personal, [1.0 / n] * n)
            self.log.info(f"global adapter starts as the mean of {n} personal adapters "
                          "(global.init = personal_mean: each personal adapter was sent to the server once)")
            del personal
        self.transport.post_receives(self.clients)  # updates and byes, from now until each leader's bye

    def resume(self, state: dict) -> None:
        """Go on from a checkpoint: the leaders' layouts are checked as at a start, the global
        adapter and the outer optimizer's state come from the checkpoint."""
        self.transport.recv_layouts(self.clients)
        self.global_state = state["global"]
        self.strategy.outer.load_state_dict(state["outer"])
        self.used = state.get("used", [])  # absent in checkpoints made before it was kept
        self.transport.post_receives(self.clients)

    def state(self) -> dict:
        """What the server carries from round to round (its part of a checkpoint)."""
        return {"global": self.global_state, "outer": self.strategy.outer.state_dict(), "used": list(self.used)}

    def send_round(self, t: int) -> None:
        """Round t starts: the global adapter goes to every leader."""
        self._t0, self._sent = time.perf_counter(), time.monotonic()  # the round's deadline counts from here
        self.transport.new_round()
        # with federation.compress the leaders hold the decoded adapter; so does the server
        self.global_state = self.transport.send_global(GlobalAdapter(t, self.global_state, used=self.used), self.clients)

    def finish_round(self, t: int) -> dict:
        """(clients train) -> collect and check, until every client answered or the round's
        deadline -> aggregate. Returns the round's record.

        Updates are checked and summed as they arrive (`InOrderSum`: in client-id order, holding
        only those that overtook a lower id), so the server never keeps every update at once.
        Fewer than `min_clients` usable updates: `federation.on_short_round` (abort, skip, wait)."""
        fed = self.cfg.federation
        t0, timeout = self._t0, fed.round_timeout_s
        deadline = None if timeout in (None, "auto") else self._sent + timeout
        arrivals: list[float] = []  # seconds from the send to each update of this round (`auto`)
        waited_on = False  # on_short_round = wait: the deadline passed short of min_clients
        before = self.global_state
        total = InOrderSum(self.clients)
        norms: dict[int, float] = {}
        losses: dict[int, float] = {}  # the leaders' mean training loss of the round
        rejected: dict[int, str] = {}
        late: list[dict] = []
        waiting = set(self.clients)
        need = fed.min_clients
        while waiting:
            update = self.transport.next_update(deadline)
            if update is None:  # the deadline passed
                if fed.on_short_round == "wait" and len(total.added) < need:
                    self.log.warning(f"  round {t}: {len(total.added)} usable update(s) at the deadline, federation."
                                     f"min_clients = {need}: waiting on for clients {sorted(waiting)} (on_short_round = wait)")
                    deadline, waited_on = None, True
                    continue
                break
            if isinstance(update, int):
                raise FederationError(f"round {t}: client {update}'s leader said goodbye before the final round")
            if update.round < t:  # sent for an earlier round, after its deadline: recognised, dropped
                late.append({"client": update.client, "round": update.round})
                self.log.warning(f"  round {t}: late update of client {update.client} (round {update.round}) dropped")
                continue
            waiting.discard(update.client)
            arrivals.append(time.monotonic() - self._sent)
            if timeout == "auto" and deadline is None and not waited_on and len(arrivals) == need:
                deadline = self._sent + fed.round_timeout_factor * statistics.median(arrivals)
            reason = rejection(update, t, before, fed.max_update_norm)
            if reason:
                rejected[update.client] = reason
                self.log.warning(f"  round {t}: update of client {update.client} rejected: {reason}")
                total.skip(update.client)
            else:
                norms[update.client] = l2_distance(update.state, before)
                losses[update.client] = update.loss
                total.add(update.client, update.state, self.strategy.weight(update.num_samples))
            del update  # the sum has it now (or holds it until a lower client id is in)
            if waited_on and len(total.added) >= need:
                break  # waited past the deadline for the quorum only
        total.close()
        missing = {c: f"no update within federation.round_timeout_s = {self._timeout_text()}" for c in sorted(waiting)}
        for c, why in missing.items():
            self.log.warning(f"  round {t}: client {c} missing: {why}")
        averaged, skipped = total.added, None
        if len(total.added) < need:
            why = "; ".join(f"client {c}: {r}" for c, r in sorted({**rejected, **missing}.items()))
            short = f"round {t}: {len(total.added)} usable update(s), federation.min_clients = {need} ({why})"
            if fed.on_short_round != "skip":
                raise FederationError(short)
            # the global adapter and the outer optimizer's state stay as they were
            self.log.warning(f"  {short}: round skipped (federation.on_short_round = skip)")
            averaged, skipped = [], short
        else:
            self.global_state = self.strategy.step(before, total)
        self.used = averaged
        rec = {"round": t, "client": None, "event": "round", "seconds": time.perf_counter() - t0,
               **{f"server_{k}": v for k, v in self.transport.round.snapshot().items()},
               "clients": averaged, "rejected": {str(c): r for c, r in rejected.items()},
               "missing": sorted(waiting), "late": late,
               "update_norms": [norms[c] for c in averaged],
               "train_loss": [losses[c] for c in averaged],
               "global_change": l2_distance(self.global_state, before)}
        if skipped:
            rec["skipped"] = skipped
        return rec

    def _timeout_text(self) -> str:
        fed = self.cfg.federation
        if fed.round_timeout_s == "auto":
            return f"auto ({fed.round_timeout_factor:g} x the median time of the first {fed.min_clients} update(s))"
        return f"{fed.round_timeout_s:g} s"

    def send_final(self) -> None:
        """The final global adapter (the leaders answer with their bye: `collect_byes`)."""
        self.global_state = self.transport.send_global(
            GlobalAdapter(self.cfg.train.rounds + 1, self.global_state, final=True, used=self.used), self.clients)

    def collect_byes(self) -> None:
        """Every leader's remaining messages until its bye (a late update still in flight is
        dropped), so that nothing is left unreceived."""
        while self.transport.inbox:
            got = self.transport.next_update(None)
            if not isinstance(got, int):
                self.log.warning(f"  late update of client {got.client} (round {got.round}) dropped after the last round")
        self.transport.flush()  # every leader said bye: it took every global adapter sent to it

    def abort(self, reason: str) -> None:
        """Tell the leaders why the job stops (they wait for a global adapter that will not come)."""
        try:
            self.transport.abort(reason, self.clients)
        except Exception:  # the job is failing already; the server's own error is the one to show
            pass
