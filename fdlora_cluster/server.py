"""The server role (world rank 0): holds the global adapter and the outer optimizer, nothing else.

It never builds the model: it learns the global adapter's layout from the leaders' handshake, and
it never holds a personal adapter, except the one-off `global.init: personal_mean` average that
the paper's Algorithm 1 (line 7) asks for, which is logged as such. Every update is checked before
it is used (`rejection`); a rejected one is left out of that round's average, and a round with
fewer than `federation.min_clients` accepted updates fails the job. With `privacy`, the round's
sum of (clipped) updates gets its seeded Gaussian noise here before the outer step (dp.py).
"""

from __future__ import annotations

import math
import time

import torch

from .dp import PrivacyBudget, add_noise
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
        p = cfg.privacy
        self.budget = None if p is None else PrivacyBudget(p.noise_multiplier, p.delta, p.accountant, p.target_epsilon)

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
        if self.budget is not None:
            self.budget.released = state["privacy_released"]
        self.transport.post_receives(self.clients)

    def state(self) -> dict:
        """What the server carries from round to round (its part of a checkpoint)."""
        out = {"global": self.global_state, "outer": self.strategy.outer.state_dict()}
        if self.budget is not None:
            out["privacy_released"] = self.budget.released  # rounds the accountant has counted
        return out

    def send_round(self, t: int) -> None:
        """Round t starts: the global adapter goes to every leader."""
        self._t0 = time.perf_counter()
        self.transport.new_round()
        # with federation.compress the leaders hold the decoded adapter; so does the server
        self.global_state = self.transport.send_global(GlobalAdapter(t, self.global_state), self.clients)

    def finish_round(self, t: int) -> dict:
        """(clients train) -> collect and check, until every client answered or the round's
        deadline -> aggregate. Returns the round's record.

        Updates are checked and summed as they arrive (`InOrderSum`: in client-id order, holding
        only those that overtook a lower id), so the server never keeps every update at once."""
        fed = self.cfg.federation
        t0 = self._t0
        deadline = None if fed.round_timeout_s is None else time.monotonic() + fed.round_timeout_s
        before = self.global_state
        total = InOrderSum(self.clients)
        norms: dict[int, float] = {}
        losses: dict[int, float] = {}  # the leaders' mean training loss of the round
        rejected: dict[int, str] = {}
        late: list[dict] = []
        waiting = set(self.clients)
        while waiting:
            update = self.transport.next_update(deadline)
            if update is None:
                break  # the deadline passed
            if isinstance(update, int):
                raise FederationError(f"round {t}: client {update}'s leader said goodbye before the final round")
            if update.round < t:  # sent for an earlier round, after its deadline: recognised, dropped
                late.append({"client": update.client, "round": update.round})
                self.log.warning(f"  round {t}: late update of client {update.client} (round {update.round}) dropped")
                continue
            waiting.discard(update.client)
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
        total.close()
        missing = {c: f"no update within federation.round_timeout_s = {fed.round_timeout_s:g} s" for c in sorted(waiting)}
        for c, why in missing.items():
            self.log.warning(f"  round {t}: client {c} missing: {why}")
        need = fed.min_clients
        if len(total.added) < need:
            why = "; ".join(f"client {c}: {r}" for c, r in sorted({**rejected, **missing}.items()))
            raise FederationError(f"round {t}: {len(total.added)} usable update(s), federation.min_clients = {need} ({why})")
        privacy = {}
        if self.budget is not None:
            # client-level DP (dp.py): one Gaussian draw on the sum of the clipped updates (uniform
            # weights: the sum of the states is n * before + the sum of the changes), seeded by
            # (seed, round) so a resumed job adds the same noise; counted before it is released
            p = self.cfg.privacy
            eps = self.budget.spend()
            add_noise(total.sum, p.noise_multiplier * p.clip_norm, self.cfg.seed, t)
            privacy = {"privacy_epsilon": eps, "privacy_delta": p.delta, "noise_std": p.noise_multiplier * p.clip_norm}
        self.global_state = self.strategy.step(before, total)
        return {"round": t, "client": None, "event": "round", "seconds": time.perf_counter() - t0,
                **{f"server_{k}": v for k, v in self.transport.round.snapshot().items()},
                "clients": total.added, "rejected": {str(c): r for c, r in rejected.items()},
                "missing": sorted(waiting), "late": late,
                "update_norms": [norms[c] for c in total.added],
                "train_loss": [losses[c] for c in total.added],
                "global_change": l2_distance(self.global_state, before), **privacy}

    def send_final(self) -> None:
        """The final global adapter (the leaders answer with their bye: `collect_byes`)."""
        self.global_state = self.transport.send_global(
            GlobalAdapter(self.cfg.train.rounds + 1, self.global_state, final=True), self.clients)

    def collect_byes(self) -> None:
        """Every leader's remaining messages until its bye (a late update still in flight is
        dropped), so that nothing is left unreceived."""
        while self.transport.inbox:
            got = self.transport.next_update(None)
            if not isinstance(got, int):
                self.log.warning(f"  late update of client {got.client} (round {got.round}) dropped after the last round")

    def abort(self, reason: str) -> None:
        """Tell the leaders why the job stops (they wait for a global adapter that will not come)."""
        try:
            self.transport.abort(reason, self.clients)
        except Exception:  # the job is failing already; the server's own error is the one to show
            pass
