"""The server role (world rank 0): holds the global adapter and the outer optimizer, nothing else.

It never builds the model: it learns the global adapter's layout from the leaders' handshake, and
it never holds a personal adapter, except the one-off `global.init: personal_mean` average that
the paper's Algorithm 1 (line 7) asks for, which is logged as such. Every update is checked before
it is used (`rejection`); a rejected one is left out of that round's average, and a round with
fewer than `federation.min_clients` accepted updates fails the job, is skipped or waits on
(`federation.on_short_round`). With `privacy`, the round's sum of (clipped) updates gets its
seeded Gaussian noise here before the outer step (dp.py).
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from .dp import PrivacyBudget, add_noise
from .log import get_logger
from .strategies import UpdateError, check_update, weighted_average
from .strategies.combine import (A_SUFFIX, B_SUFFIX, FactorsGap, b_keys, first, held_energy, in_svd_form,
                                 mean_of_products, modules, pad, product_distance, truncate)
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
        # global.combine and per-client ranks (strategies/combine.py): the server's global adapter
        # has the largest client rank; each client gets and sends its own rank's (`sent`)
        self.combine = cfg.global_.combine
        # factors: what product would differ by, logged each round (its sketches drawn once, here)
        self.gap = FactorsGap(seed=cfg.seed) if self.combine == "factors" else None
        self.ranks = dict(zip(self.clients, cfg.global_ranks()))
        self.rank = max(self.ranks.values())
        self.same_ranks = len(set(self.ranks.values())) == 1
        self.sent: dict[int, dict] = {}  # client -> the global adapter it received this round
        self.not_held: dict[int, float] = {}  # product: share of the global adapter a client cannot hold
        self.frozen_a: dict | None = None  # frozen_a: the shared A, saved with the final B
        self.used: list[int] = []  # the clients averaged in the last round (each leader is told)

    def init_global(self) -> None:
        """Every leader's layout (they must agree up to the rank), then the starting global adapter."""
        self.transport.recv_layouts(self.clients)
        if not self.same_ranks:
            how = ("the exact average of their products, each client getting back its own rank's best part"
                   if self.combine == "product" else
                   f"factors zero-padded to rank {self.rank} and averaged separately (HetLoRA's baseline; "
                   "global.combine: product was ahead of it on every setting of docs/RESULTS.md)")
            self.log.info(f"global ranks per client {self.ranks}; global.combine = {self.combine}: {how}")
        if self.cfg.global_.init == "seed":
            # Every client of one rank seeds `global` identically; the (first) client of the largest
            # rank sends that start once (client 0 when ranks are equal).
            start = self.transport.recv_init(self.cfg.global_init_client())
            if self.combine == "frozen_a":
                keep = set(b_keys(start))
                self.frozen_a = {k: v for k, v in start.items() if k not in keep}
                start = {k: v for k, v in start.items() if k in keep}
            elif self.combine == "product":
                start = truncate(in_svd_form(start, self.rank), self.rank, self.cfg.seed)
            self.global_state = start
            self.log.info("global adapter starts from the shared seeded initialisation")
        else:
            personal = [self.transport.recv_init(c) for c in self.clients]
            for c, s in enumerate(personal):
                check_update(personal[0], s, client=c)
            n = len(personal)
            if self.combine == "product":  # the mean of their products, in the server's SVD form
                self.global_state = truncate(mean_of_products(personal, [1.0 / n] * n, self.rank), self.rank,
                                             self.cfg.seed)
            else:
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
        self.frozen_a = state.get("frozen_a")
        self.strategy.outer.load_state_dict(state["outer"])
        if self.budget is not None:
            self.budget.released = state["privacy_released"]
        self.used = state.get("used", [])  # absent in checkpoints made before it was kept
        self.transport.post_receives(self.clients)

    def state(self) -> dict:
        """What the server carries from round to round (its part of a checkpoint)."""
        out = {"global": self.global_state, "outer": self.strategy.outer.state_dict(), "frozen_a": self.frozen_a,
               "used": list(self.used)}
        if self.budget is not None:
            out["privacy_released"] = self.budget.released  # rounds the accountant has counted
        return out

    def send_round(self, t: int) -> None:
        """Round t starts: the global adapter goes to every leader."""
        self._t0, self._sent = time.perf_counter(), time.monotonic()  # the round's deadline counts from here
        self.transport.new_round()
        self._send(GlobalAdapter(t, self.global_state, used=self.used))

    def _send(self, message: GlobalAdapter) -> None:
        """The global adapter to every leader, each at its own rank; `sent` keeps what each holds."""
        if self.combine == "product" or not self.same_ranks:
            # the top-r_k part of the product (B = U S, A = V^T) or the first r_k padded components
            cut = (lambda r: truncate(self.global_state, r, self.cfg.seed)) if self.combine == "product" else (
                lambda r: first(self.global_state, r))
            if self.combine == "product":
                self.not_held = {c: held_energy(self.global_state, r) for c, r in self.ranks.items()}
            if self.same_ranks:  # one adapter for all (federation.compress may encode it)
                one = self.transport.send_global(GlobalAdapter(message.round, cut(self.rank), message.final, used=message.used),
                                                 self.clients)
                self.sent = {c: one for c in self.clients}
            else:
                by_rank = {r: cut(r) for r in sorted(set(self.ranks.values()))}
                # with federation.compress each client holds its own stream's decoding; so does `sent`
                self.sent = self.transport.send_global(message, self.clients,
                                                       states={c: by_rank[self.ranks[c]] for c in self.clients})
            return
        # with federation.compress the leaders hold the decoded adapter; so does the server
        self.global_state = self.transport.send_global(message, self.clients)
        self.sent = {c: self.global_state for c in self.clients}

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
        total = self.strategy.new_sum(self.clients)
        gap = self.gap
        if gap is not None:
            gap.new_round()
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
            reason = rejection(update, t, self.sent[update.client], fed.max_update_norm)
            if reason:
                rejected[update.client] = reason
                self.log.warning(f"  round {t}: update of client {update.client} rejected: {reason}")
                total.skip(update.client)
            else:
                norms[update.client] = l2_distance(update.state, self.sent[update.client])
                losses[update.client] = update.loss
                w = self.strategy.weight(update.num_samples, update.client)
                state = update.state if self.same_ranks or self.combine != "factors" else pad(update.state, self.rank)
                total.add(update.client, state, w)
                if gap is not None:
                    gap.add(state, w)
                del state
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
            # the global adapter, the outer optimizer's state and the privacy budget stay as they were
            self.log.warning(f"  {short}: round skipped (federation.on_short_round = skip)")
            averaged, skipped = [], short
        privacy, combined = {}, {}
        if not skipped:
            if self.budget is not None:
                # client-level DP (dp.py): one Gaussian draw on the sum of the clipped updates (uniform
                # weights: the sum of the states is n * before + the sum of the changes), seeded by
                # (seed, round) so a resumed job adds the same noise; counted before it is released
                p = self.cfg.privacy
                eps = self.budget.spend()
                add_noise(total.sum, p.noise_multiplier * p.clip_norm, self.cfg.seed, t)
                privacy = {"privacy_epsilon": eps, "privacy_delta": p.delta, "noise_std": p.noise_multiplier * p.clip_norm}
            self.global_state = self.strategy.step(before, total, self.sent)
            if self.combine == "product":
                combined = {"product_not_held": [self.not_held[c] for c in self.clients],
                            "product_cut": self.strategy.last_info["cut"], "product_lost": self.strategy.last_info["lost"]}
            elif gap is not None:
                combined = {"factors_gap": gap.relative(total.mean())}
        self.used = averaged
        rec = {"round": t, "client": None, "event": "round", "seconds": time.perf_counter() - t0, **combined,
               **{f"server_{k}": v for k, v in self.transport.round.snapshot().items()},
               "clients": averaged, "rejected": {str(c): r for c, r in rejected.items()},
               "missing": sorted(waiting), "late": late,
               "update_norms": [norms[c] for c in averaged],
               "train_loss": [losses[c] for c in averaged],
               "global_change": self.change(before), **privacy}
        if skipped:
            rec["skipped"] = skipped
        return rec

    def _timeout_text(self) -> str:
        fed = self.cfg.federation
        if fed.round_timeout_s == "auto":
            return f"auto ({fed.round_timeout_factor:g} x the median time of the first {fed.min_clients} update(s))"
        return f"{fed.round_timeout_s:g} s"

    def change(self, before: dict) -> float:
        """||global - before||: of the factors, or under product of the product B A (its factors'
        basis turns from round to round)."""
        if self.combine != "product":
            return l2_distance(self.global_state, before)
        return product_distance(self.global_state, before)

    def send_final(self) -> None:
        """The final global adapter (the leaders answer with their bye: `collect_byes`)."""
        self._send(GlobalAdapter(self.cfg.train.rounds + 1, self.global_state, final=True, used=self.used))

    def final_adapter(self) -> dict:
        """The global adapter to save: the whole adapter (frozen_a: the shared A with the final B),
        at the largest client rank."""
        state = self.global_state
        if self.frozen_a is not None:
            merged = {**self.frozen_a, **state}
            state = {k: merged[k] for m in modules(merged) for k in (m + A_SUFFIX, m + B_SUFFIX)}
        return state

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
