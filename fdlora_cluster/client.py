"""The client role: every rank of one client, around its ClientEngine.

`run_steps` executes the plans a strategy writes (strategies/plan.py): each step maps to one
method here (Train -> ClientEngine.train, SendUpdate -> send_update, Copy, JoinFederation -> join,
Fuse -> fuse, Evaluate -> evaluate). Only the leader talks to the server (through the transport);
it then broadcasts what it got to the client's other ranks over the client's own
torch.distributed world. The personal adapter and the data stay here.
"""

from __future__ import annotations

import os
import time
from typing import NamedTuple

import torch

from .checkpoint import rng_state, set_rng_state
from .dp import clip
from .engine import ClientEngine
from .faults import fault
from .fusion import fuse, modules_of, per_adapter, search_weights, weight_groups
from .log import FILE_ONLY, get_logger
from .model import adapter_scaling, lora_config, save_adapter
from .state import FUSED, GLOBAL, PERSONAL, Layout, digest
from .strategies.combine import b_keys
from .strategies.plan import Copy, Evaluate, Fuse, JoinFederation, SendUpdate, Step, Train
from .transport import ClientUpdate, Counters, Transport
from .waits import yielding_barrier

class Received(NamedTuple):
    """A global adapter as every rank of the client learns it (the state on the leader only)."""

    round: int  # train.rounds + 1 for the final one
    final: bool
    skipped: list
    state: dict | None


class Client:
    def __init__(self, cfg, topo, strategy, engine: ClientEngine, transport: Transport | None, run):
        self.cfg, self.topo, self.strategy, self.engine, self.transport, self.run = (
            cfg, topo, strategy, engine, transport, run)
        self.id = topo.client_id
        self.is_leader = topo.is_leader
        self.log = get_logger()
        full = engine.read(GLOBAL)
        self.layout = Layout.of(full)  # the handshake's: the whole global adapter
        # global.combine = frozen_a: A never changes, so B alone travels and A is put back on receipt
        self.frozen_a = ({k: v for k, v in full.items() if k not in set(b_keys(full))}
                         if cfg.global_.combine == "frozen_a" else None)
        self.message_layout = self.layout.only(b_keys(full)) if self.frozen_a is not None else self.layout
        self.fusion_weights: tuple[float, float] | None = None  # set by `fuse` (means over modules)
        self.fusion_choice: dict | None = None  # set by a searching `fuse`: how the weights were chosen
        self.chosen_weights = None  # (groups, 2) of the last `fuse`, which Fuse("chosen") merges again
        self.first = True  # no round has run yet in this job (Ditto's start); kept in checkpoints
        self.results: dict = {}  # adapter -> test metrics, set by `evaluate`
        self.instance_weights: dict | None = None  # FedDPA's dynamic per-row global weights (stats)
        self.round_global: dict | None = None  # privacy: the global adapter received this round (leader)

    def record(self, event: str, round: int | None, **fields) -> None:
        if self.is_leader:
            self.run.record({"round": round, "client": self.id, "event": event, **fields})

    # ---------------------------------------------------------------- the plan

    def run_steps(self, steps: list[Step], round: int, tag: str) -> list[tuple[str, dict]]:
        """Run a strategy's steps in order; returns (adapter, stats) for each Train. The global
        adapter as the client holds it before the first step is read only when a step needs it (a
        proximal anchor)."""
        anchor = self.engine.read(GLOBAL) if any(isinstance(s, Train) and s.prox_mu > 0 for s in steps) else None
        trained, global_loss = [], None
        for step in steps:
            if isinstance(step, Train):
                stats = self.engine.train(step.adapter, step.steps, round=round, prox_to=anchor, prox_mu=step.prox_mu,
                                          tag=tag, frozen_active=step.frozen or None, weight=step.weight,
                                          fewshot=step.fewshot)
                self.record("train", round, adapter=step.adapter, **stats, **({"fewshot": True} if step.fewshot else {}))
                trained.append((step.adapter, stats))
                if step.adapter == GLOBAL:
                    global_loss = stats["loss"]
            elif isinstance(step, SendUpdate):
                self.send_update(round, global_loss)
            elif isinstance(step, Copy):
                self.copy(step, round)
            elif isinstance(step, JoinFederation):
                self.join()
            elif isinstance(step, Fuse):
                self.fuse(step.mode)
            elif isinstance(step, Evaluate):
                self.evaluate(step)
            else:
                raise TypeError(f"unknown plan step {step!r}")
        return trained

    def run_round(self, t: int, plan: list[Step]) -> list[tuple[str, dict]]:
        trained = self.run_steps(plan, t, f"[round {t}] ")
        self.first = False
        return trained

    def copy(self, step: Copy, round: int) -> None:
        self.engine.write(step.dst, self.engine.read(step.src))
        self.record(step.event, round, source=step.src)
        if self.is_leader:
            self.log.info(f"  {step.dst} adapter overwritten with the {step.src} one ({step.event})", extra=FILE_ONLY)

    # ---------------------------------------------------------------- federation

    def send_layout(self) -> None:
        """A resumed client: the layout handshake only (the server has the global adapter). The
        byte counters then go back to the checkpoint's, so a resumed job counts what an
        uninterrupted one does."""
        if self.is_leader:
            self.transport.send_layout(self.layout)
            self.transport.total = Counters(**self._resumed_counters)
            self.transport.load_codec_state(self._resumed_codec)

    def join(self) -> None:
        """Tell the server the global adapter's layout (every leader: the server checks they agree),
        and the start it cannot compute itself."""
        start = self.engine.read(GLOBAL) if self.cfg.global_.init == "seed" else self.engine.read(PERSONAL)
        if not self.is_leader:
            return
        self.transport.send_layout(self.layout)
        if self.cfg.global_.init == "seed" and self.id == self.cfg.global_init_client():
            self.transport.send_init(self.id, start)
        if self.cfg.global_.init == "personal_mean":
            self.log.info("sending the stage-1 personal adapter to the server once (global.init = personal_mean)")
            self.transport.send_init(self.id, start)

    def receive_global(self):
        """The newest global adapter the server sent: its round, whether it is the final one, and
        on the leader its state (apply it with `apply_global`)."""
        message = self.transport.recv_newest_global() if self.is_leader else None
        yielding_barrier(self.topo.client_comm)  # followers wait here, asleep, not spinning in MPI's bcast
        round, final, skipped = self.topo.client_comm.bcast(
            (message.round, message.final, message.skipped) if self.is_leader else None, root=0)
        if skipped and self.is_leader:
            self.log.warning(f"  client {self.id} fell behind: skipped the global adapters of rounds {skipped}")
        return Received(round, final, skipped, message.state if self.is_leader else None)

    def apply_global(self, message: Received) -> int | None:
        """Write the received global adapter on every rank of the client. Returns its round, or None
        when it is the final one (after which the leader says goodbye to the server)."""
        round, final, skipped = message.round, message.final, message.skipped
        state = self.engine.broadcast_from_leader(message.state, self.message_layout)
        if self.frozen_a is not None:
            state = {k: state[k] if k in state else self.frozen_a[k] for k, _, _ in self.layout.entries}
        self.engine.write(GLOBAL, state)
        if self.cfg.privacy is not None and self.is_leader:  # what send_update clips the change against
            self.round_global = {k: v.detach().clone() for k, v in message.state.items()}
        # Proof of synchrony (log.digests): every rank's digest of what it now holds, at the leader.
        proof = {}
        if self.cfg.log.digests == "every" or (final and self.cfg.log.digests == "final"):
            proof["digests"] = self.topo.client_comm.gather(digest(self.engine.read(GLOBAL)), root=0)
        self.record("global_received", round, skipped=skipped, **proof)
        if final:
            if self.is_leader:
                self.transport.send_bye(self.id)
            return None
        return round

    def send_update(self, round: int, loss: float | None) -> None:
        """The round's global adapter to the server (collective under ZeRO-3), with its weight and
        the leader's mean training loss of the round (`loss`, None when no step was taken). With
        `privacy` the change to the round's received global is clipped to privacy.clip_norm first."""
        state = self.engine.read(GLOBAL)
        if self.frozen_a is not None:
            state = {k: state[k] for k, _, _ in self.message_layout.entries}
        if self.is_leader:
            if self.cfg.privacy is not None:  # client-level DP: the change leaves clipped (fdlora_cluster/dp.py)
                C = self.cfg.privacy.clip_norm
                state, norm = clip(state, self.round_global, C)
                self.record("update_clip", round, norm=norm, clip_norm=C, clipped=norm > C)
            update = ClientUpdate(round, self.id, float(len(self.engine.data.train)), state,
                                  float("nan") if loss is None else float(loss))
            what, args = fault(("nan_update", "nan_samples", "slow", "drop"), client=self.id, round=round)  # tests only
            if what == "drop":  # the update is lost: the server must go on without it
                return
            if what == "slow":
                time.sleep(args["seconds"])
            if what == "nan_update":
                update.state = {k: torch.full_like(v, float("nan")) for k, v in state.items()}
            elif what == "nan_samples":
                update.num_samples = float("nan")
            self.transport.send_update(update)

    # ---------------------------------------------------------------- checkpoints

    def checkpoint(self, ckpt, k: int, counters: dict | None, codec: dict | None) -> None:
        """This client's part of the checkpoint at the end of round k (collective over the client's
        ranks only: the server and the other clients write theirs when they get there).
        `counters`, `codec`: the leader's byte counters and compression state at the end of round k
        (before the next global arrived)."""
        personal, glob = self.engine.read(PERSONAL), self.engine.read(GLOBAL)  # collective under ZeRO-3
        rel = f"client-{self.id}"
        ds_rel = os.path.join(rel, "deepspeed")
        # DeepSpeed's state dicts, kept, not written (each rank lists its own: no barrier needed)
        states, written = self.engine.save_engine(os.path.join(ckpt.partial(k), ds_rel))
        files = {os.path.join(ds_rel, p): s for p, s in states.items()}
        files[f"{rel}/rank-{self.topo.local_rank_in_client}.pt"] = {"rng": rng_state(), **self.engine.state()}
        if self.is_leader:
            files[f"{rel}/leader.pt"] = {
                "round": k, "personal": personal, "global": glob, "first": self.first, "records": self.run.records,
                "bytes": counters, "codec": codec}
        done = (lambda: self.log.info(f"  checkpoint of round {k} written", extra=FILE_ONLY)) if self.is_leader else None
        ckpt.write(k, files, [os.path.join(ds_rel, p) for p in written], done)

    def resume(self, ckpt) -> None:
        """Restore this client from `ckpt.resumed`, then redo the layout handshake (the server has
        the global adapter)."""
        rel = f"client-{self.id}"
        self.engine.load_engine(os.path.join(ckpt.resumed, rel, "deepspeed"))
        mine = ckpt.load(f"{rel}/rank-{self.topo.local_rank_in_client}.pt")
        leader = ckpt.load(f"{rel}/leader.pt")
        # exact fp32 adapters over whatever DeepSpeed restored (they are the same values; this also
        # refreshes the optimizer's masters through the one write path)
        self.engine.write(PERSONAL, leader["personal"])
        self.engine.write(GLOBAL, leader["global"])
        self.engine.load_state(mine)
        if self.is_leader:
            self.run.restore(leader["records"])
            self._resumed_counters = leader["bytes"]
            self._resumed_codec = leader.get("codec")  # absent in checkpoints made before it was kept
            self.log.info(f"client {self.id}: resumed from {ckpt.resumed} (end of round {leader['round']})")
        set_rng_state(mine["rng"])
        self.first = leader["first"]
        if self.strategy.federated:
            self.send_layout()

    # ---------------------------------------------------------------- fusion

    def fusion_rows(self):
        d = self.engine.data
        if self.cfg.fusion.rows == "heldout":
            return d.fewshot
        return d.train[: max(1, self.cfg.data.fewshot_rows)]

    def headline_candidates(self) -> list[str]:
        """The label set the headline accuracy (eval.headline) scores among."""
        d = self.engine.data
        return d.candidates_all if self.cfg.eval.headline == "accuracy_all" else d.candidates

    def fuse(self, mode: str) -> None:
        """Choose the fusion weights (`search`, `fixed`, or `chosen`: the last choice again), merge the
        adapters into the `fused` one with them, and record how they were chosen."""
        f = self.cfg.fusion
        started = time.monotonic()  # the records' `seconds`: the fusion's cost against the rounds' (issue 18)
        personal, glob = self.engine.read(PERSONAL), self.engine.read(GLOBAL)
        groups = weight_groups(modules_of(personal), f.granularity)
        if mode == "chosen":  # after fold-back: the search's weights, over the personal adapter as it is now
            self.merge_fused(personal, glob, groups, self.chosen_weights)
            self.record("fused_again", None, w_personal=self.fusion_weights[0], w_global=self.fusion_weights[1],
                        seconds=time.monotonic() - started)
            if self.is_leader:
                self.log.info("fused adapter merged again with the chosen weights, after the personal adapter's "
                              "fold-back steps")
            return
        if mode == "search":
            weights, result = self.search_fusion_weights(personal, glob, groups)
        else:
            weights, result = [list(f.fixed_weights)] * len(groups), None
        self.chosen_weights = weights
        w_p, w_g = self.merge_fused(personal, glob, groups, weights)
        mean_p, mean_g = sum(w_p.values()) / len(w_p), sum(w_g.values()) / len(w_g)
        self.fusion_weights = (mean_p, mean_g)
        extra = {}
        if result is not None:
            extra = {"objective": result.objective, "loss": result.loss, "accuracy": result.accuracy,
                     "chosen_by": result.chosen_by, "cv": result.cv, "search_objective": f.objective,
                     "data_objective": result.data_objective, "center": result.center.tolist(),
                     "left_anchors": result.left_anchors, "evaluations": result.evaluations}
            # the summary's part of that record (same key names)
            self.fusion_choice = {k: extra[k] for k in ("chosen_by", "left_anchors", "search_objective",
                                                        "data_objective", "evaluations")}
        by_group = {g: [float(x) for x in w] for g, w in zip(groups, weights)}
        self.record("fusion", None, w_personal=mean_p, w_global=mean_g, weights=by_group, merge=f.merge,
                    rows=f.rows, granularity=f.granularity, seconds=time.monotonic() - started, **extra)
        if self.is_leader:
            how = (f" chosen by {result.chosen_by}, few-shot {f.objective} objective {result.objective:.4f} "
                   f"after {result.evaluations} evaluations" if result else "")
            self.log.info(f"fusion weights w_personal={mean_p:.3f} w_global={mean_g:.3f} "
                          f"(merge {f.merge}, {len(groups)} weight group(s) by {f.granularity}){how}")

    def merge_fused(self, personal: dict, glob: dict, groups: list, weights) -> tuple[dict, dict]:
        """Write personal and global, merged with (w_p, w_g) per weight group, into the `fused` slot;
        returns the per-module weights."""
        w_p, w_g = per_adapter(weights, groups)
        s_p, s_g = adapter_scaling(self.engine.model, PERSONAL), adapter_scaling(self.engine.model, GLOBAL)
        self.engine.write(FUSED, fuse(personal, glob, w_p, w_g, s_p, s_g, self.cfg.fusion.merge))
        return w_p, w_g

    def search_fusion_weights(self, personal: dict, glob: dict, groups: list):
        """The leader searches the weights on the few-shot rows; the client's other ranks score each
        candidate with it (the leader broadcasts it). Returns (weights, the leader's SearchResult or None).

        Every candidate is scored as the adapter that would be saved: with merge `exact`, both
        adapters active and each module's contribution scaled by its weight, which computes the
        saved adapter's function; with merge `params`, whose A/B products have cross terms no
        scaling reproduces, the candidate is merged and written into the `fused` slot, and that
        adapter alone is scored."""
        f = self.cfg.fusion
        rows = self.fusion_rows()
        if not rows:
            raise ValueError(f"client {self.id}: the fusion search needs few-shot rows; set data.fewshot_rows > 0")
        cands = self.headline_candidates() if f.objective != "loss" else None
        cands = cands or None  # `candidates` without any: every row counts its token loss
        if f.objective in ("accuracy", "mix") and not cands:
            raise ValueError(f"client {self.id}: fusion.objective = {f.objective!r} scores accuracy, but this "
                             "client's rows have no candidate responses (labelled rows with few distinct "
                             "responses); use fusion.objective: loss")
        comm = self.topo.client_comm

        def score(w):
            if f.merge == "exact":
                w_p, w_g = per_adapter(w, groups)
                return self.engine.score_rows(rows, [PERSONAL, GLOBAL], {PERSONAL: w_p, GLOBAL: w_g}, cands)
            self.merge_fused(personal, glob, groups, w)
            return self.engine.score_rows(rows, FUSED, None, cands)

        if not self.is_leader:
            while (w := comm.bcast(None, root=0)) is not None:
                score(w)
            return comm.bcast(None, root=0), None

        def score_everywhere(w):
            comm.bcast(w, root=0)  # followers score the leader's candidate with it
            return score(w)

        result = search_weights(score_everywhere, len(groups), f.optimizer, f.budget, f.bounds, f.l1,
                                seed=self.cfg.seed * 1009 + self.id, objective=f.objective,
                                mix=f.mix, folds=f.folds, margin=f.margin, refit=f.fold_search == "refit",
                                progress=self.fusion_progress(len(groups)))
        comm.bcast(None, root=0)  # the search is over
        for c in result.curve:
            self.record("fusion_step", None, **c)
        return comm.bcast(result.weights, root=0), result

    def fusion_progress(self, n_groups: int, console_every_s: float = 30.0):
        """The leader's progress line while the search runs: evaluations done (distinct weights scored,
        each a pass over the search rows) of at most how many, and the best objective so far, about
        ten times per search in the log file, and on the console at most every `console_every_s`
        seconds, so a long fusion says what it is doing and a short one adds no lines (issue 18)."""
        from .fusion import most_evaluations

        f = self.cfg.fusion
        most = most_evaluations(f.budget, n_groups, f.folds, f.fold_search == "refit")
        every = max(1, most // 10)
        said, shown = [0], [time.monotonic()]

        def progress(done: int, best: float) -> None:
            if done >= said[0] + every or done == most:
                said[0] = done
                now = time.monotonic()
                on_console = now - shown[0] >= console_every_s
                if on_console:
                    shown[0] = now
                self.log.info(f"fusion: {done}/{most} evaluations, best objective so far {best:.4f}",
                              extra=None if on_console else FILE_ONLY)
        return progress

    # ---------------------------------------------------------------- evaluation and saving

    def evaluate(self, step: Evaluate) -> None:
        d = self.engine.data
        for name in step.adapters:
            started = time.monotonic()
            self.results[name] = self.engine.evaluate(d.test, name, candidates=d.candidates,
                                                      candidates_all=d.candidates_all)
            self.record("eval", None, adapter=name, split="test", seconds=time.monotonic() - started,
                        **self.results[name])
        if step.instance_weighted:
            self.results[FUSED], self.instance_weights = self.evaluate_instance_weighted()

    def evaluate_instance_weighted(self) -> tuple[dict, dict]:
        """FedDPA's test-time evaluation: both adapters, a global weight per test row (evaluation.py).
        Returns the metrics and the weights' mean / min / max."""
        from .evaluation import dynamic_weights, evaluate_instance_weighted

        d, cfg = self.engine.data, self.cfg
        w_g = dynamic_weights(self.engine, d.test, d.train, cfg.feddpa, cfg.seed, self.id)
        out = evaluate_instance_weighted(self.engine, d.test, w_g, candidates=d.candidates)
        if d.candidates:  # accuracy among every client's labels too, as ClientEngine.evaluate reports
            same = list(d.candidates_all) == list(d.candidates)
            out["accuracy_all"] = out["accuracy"] if same else evaluate_instance_weighted(
                self.engine, d.test, w_g, candidates=d.candidates_all, generate=False)["accuracy"]
        stats = {"mean": float(w_g.mean()), "min": float(w_g.min()), "max": float(w_g.max())}
        self.record("eval", None, adapter=FUSED, split="test", global_weight=stats, **out)
        if self.is_leader:
            self.log.info(f"instance-wise global weight over {len(w_g)} test rows: mean {stats['mean']:.3f} "
                          f"(min {stats['min']:.3f}, max {stats['max']:.3f}); local weight = 1 - it")
        return out, stats

    def save(self, fused_config) -> None:
        """adapters/client-<i>/{personal,fused}/ in PEFT format (written by the leader); and
        client-<i>/global/ when clients' global ranks differ: the final global adapter at this
        client's own rank (adapters/global/ is the server's, at the largest rank)."""
        root = os.path.join(self.run.dir, "adapters", f"client-{self.id}")
        base_name = self.cfg.model.path
        states = {PERSONAL: self.engine.read(PERSONAL)}
        if self.fusion_weights is not None:
            states[FUSED] = self.engine.read(FUSED)
        own_rank = len(set(self.cfg.global_ranks())) > 1 and self.strategy.federated
        if own_rank:
            states[GLOBAL] = self.engine.read(GLOBAL)
        if self.is_leader:
            save_adapter(os.path.join(root, PERSONAL), states[PERSONAL], lora_config(self.cfg.lora.personal), base_name)
            if own_rank:
                save_adapter(os.path.join(root, GLOBAL), states[GLOBAL],
                             lora_config(self.cfg.global_adapter(self.id)), base_name)
            if FUSED in states:
                save_adapter(os.path.join(root, FUSED), states[FUSED], lora_config(fused_config), base_name)
