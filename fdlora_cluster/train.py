"""The job, top to bottom: topology -> run directory -> roles -> schedule -> results.

    server:  init global -> [ROUND t: send global -> collect -> aggregate] x T -> send final
    client:  plan before the rounds -> [ROUND t: receive -> checkpoint if due -> apply -> run the
             strategy's plan for round t] x T -> receive final -> plan after the rounds -> save

What a client does in a round is the strategy's plan (strategies/plan.py, strategies/methods.py);
`Client.run_steps` executes it. Both schedules are below, each in one function, so the protocol
can be read side by side.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

from .checkpoint import Checkpointer, agree_on_resume, rng_state, set_rng_state
from .compress import Codec
from .config import AdapterConfig, Config
from .data import check_responses_fit, get_tokenizer, load_clients
from .faults import maybe_fail
from .fusion import fused_lora_shape
from .log import FILE_ONLY, RoundProgress, get_logger, human_bytes, privacy_sentence, setup_logging, text_table
from .model import add_adapters, build_base, freeze_a, lora_config, save_adapter
from .state import FUSED, GLOBAL, PERSONAL
from .strategies import Fuse, make_strategy
from .topology import build_topology
from .transport import Counters, Transport
from .waits import yielding_barrier
from .watchdog import start as start_watchdog


@dataclass
class RunDir:
    """The run directory and this rank's metric records (merged at the server at the end)."""

    dir: str
    rank: int
    records: list = field(default_factory=list)
    tracker: object = None  # tracking.Tracker on the server: its round records go to TensorBoard as they come

    def record(self, rec: dict) -> None:
        rec = {"time": time.time(), "rank": self.rank, **rec}
        self.records.append(rec)
        if self.tracker is not None:
            self.tracker.record(rec)
        with open(self._log_path(), "a") as f:
            f.write(json.dumps(rec) + "\n")

    def restore(self, records: list) -> None:
        """The records up to a checkpoint (a resumed job); the rank's log file says the same."""
        self.records = list(records)
        with open(self._log_path(), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.records)

    def _log_path(self) -> str:
        return os.path.join(self.dir, "logs", f"metrics-rank-{self.rank}.jsonl")


def fused_adapter_config(cfg: Config, client: int = 0) -> AdapterConfig:
    r, alpha = fused_lora_shape(cfg.lora.personal, cfg.global_adapter(client), cfg.fusion.merge)
    return AdapterConfig(r=r, alpha=alpha, dropout=0.0, target_modules=list(cfg.lora.personal.target_modules))


def run(cfg: Config, record_payloads: list | None = None, resume: str | None = None):
    """Run the job on this rank. Returns the summary on the server and the Client elsewhere
    (tests inspect its engine); `record_payloads` collects every payload this rank sends.
    `resume`: `auto`, a run directory or a checkpoint directory (checkpoint.find_checkpoint)."""
    topo = build_topology(cfg.client_sizes(), use_gpus=cfg.client_backend() == "nccl", share_gpus=cfg.topology.share_gpus)
    run_dir = RunDir(cfg.output_dir, topo.rank)
    os.makedirs(os.path.join(run_dir.dir, "logs"), exist_ok=True)
    console = topo.is_server or topo.is_leader or cfg.log.followers_on_console
    log = setup_logging(topo.role, topo.rank, os.path.join(run_dir.dir, "logs"), cfg.log.level, console)
    strategy = make_strategy(cfg)
    if topo.is_server:
        log.info(f"fdlora-cluster: strategy {strategy.name}; {topo.plan.describe()}")
        log.info("topology:\n" + topo.table())
        with open(os.path.join(run_dir.dir, "config.yaml"), "w") as f:
            import yaml

            yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    # The server and every leader hold a transport, a non-federated strategy too (`local`): its
    # counters and the tests' payload tap then show that it sent nothing.
    transport = None
    if topo.federation_comm is not None:
        fed = cfg.federation
        codec = None if fed.compress == "none" else Codec(fed.compress, fed.compress_block)
        transport = Transport(topo.federation_comm, topo.plan, record=record_payloads, codec=codec,
                              b_only=cfg.global_.combine == "frozen_a")
    ckpt = Checkpointer(cfg, topo, run_dir.dir)
    agree_on_resume(cfg, topo, resume, ckpt)
    if topo.is_server and resume:
        log.info(f"resuming from {ckpt.resumed} (end of round {ckpt.resumed_round})" if ckpt.resumed
                 else f"--resume {resume}: no checkpoint yet, starting from the beginning")

    if topo.is_server:
        from .tracking import Tracker

        run_dir.tracker = Tracker(cfg, run_dir.dir)
        watch(cfg, topo)  # once the trackers are open (importing them can take long)
        try:
            return finish(cfg, topo, run_dir, server_schedule(cfg, topo, strategy, transport, run_dir, ckpt))
        finally:
            run_dir.tracker.close()
    client = client_schedule(cfg, topo, strategy, transport, run_dir, ckpt)
    finish(cfg, topo, run_dir, None)
    return client


def watch(cfg, topo) -> None:
    """This rank's hang watchdog (federation.hang_timeout_s; watchdog.py), naming it by role: on the
    server once its trackers are open, on a client once its model is built (long imports and loads
    are not watched)."""
    from .log import console_err

    role = "server" if topo.is_server else f"client {topo.client_id} {'leader' if topo.is_leader else 'follower'}"
    start_watchdog(cfg.federation.hang_timeout_s, f"rank {topo.rank}: {role}", console_err(), topo.world.Abort)


def server_schedule(cfg, topo, strategy, transport, run_dir, ckpt) -> dict:
    from .server import Server

    log = get_logger()
    first_round = ckpt.resumed_round + 1

    def save(k: int, **more) -> None:
        """The server's part of the checkpoint at the end of round k (the clients write theirs)."""
        ckpt.write(k, {"server.pt": {"round": k, "records": run_dir.records, "rng": rng_state(), **more}})

    resumed = ckpt.load("server.pt") if ckpt.resumed else None
    if resumed:
        run_dir.restore(resumed["records"])
        set_rng_state(resumed["rng"])
    if not strategy.federated:
        log.info(f"strategy {strategy.name}: no federation; clients train on their own")
        for k in range(first_round, cfg.train.rounds + 1):  # the clients' checkpoints are collective
            if ckpt.due(k):
                save(k)
        ckpt.close()  # the last checkpoint is written before the job ends (and its failure fails it)
        return {"bytes_total": transport.total.snapshot()}
    server = Server(cfg, topo, strategy, transport, run_dir)

    def before_send() -> dict:
        """The server at the end of a round, before the next global adapter goes out (a resumed
        job sends it again): the global adapter as the outer step made it (with compression the
        leaders get a decoded one), the outer state, the byte counters, the compression state."""
        return {**server.state(), "bytes": transport.total.snapshot(), "codec": transport.codec_state()}

    def checkpoint(k: int, state: dict) -> None:
        """The server's part of the checkpoint of round k, before the global adapter of round k + 1
        goes out; each client writes its part when it receives that global adapter (when it has
        finished round k; a late client later), and nobody waits for anybody: the last rank to
        write its part completes the checkpoint (Checkpointer.write)."""
        if ckpt.due(k):
            save(k, **state)

    if resumed:
        server.resume(resumed)
        transport.total = Counters(**resumed["bytes"])
        transport.load_codec_state(resumed.get("codec"))  # absent in checkpoints made before it was kept
    else:
        server.init_global()
    progress = RoundProgress(cfg.train.rounds, first_round - 1, cfg.log.progress)
    try:
        for t in range(first_round, cfg.train.rounds + 1):
            maybe_fail(topo.rank, t)
            try:
                checkpoint(t - 1, before_send())
                server.send_round(t)
                rec = server.finish_round(t)
            except Exception as e:
                server.abort(f"{type(e).__name__}: {e}")
                raise
            run_dir.record(rec)
            moved = rec["server_bytes_sent"] + rec["server_bytes_received"]
            loss = mean_loss(rec["train_loss"])
            progress.round_done(
                f"[ROUND {t}/{cfg.train.rounds}] {progress_bar(t, cfg.train.rounds)} "
                f"{'SKIPPED, ' if 'skipped' in rec else ''}aggregated {len(rec['clients'])} updates in "
                f"{rec['seconds']:.2f}s; client loss {loss}; sent {rec['server_bytes_sent']} B, received "
                f"{rec['server_bytes_received']} B; global moved {rec['global_change']:.4g}",
                f"{len(rec['clients'])} updates, loss {loss}, {rec['seconds']:.2f} s, {human_bytes(moved)}, "
                f"global moved {rec['global_change']:.3g}")
    finally:
        progress.close()
    checkpoint(cfg.train.rounds, before_send())
    server.send_final()
    server.collect_byes()
    ckpt.close()  # the last checkpoint is written before the job ends (and its failure fails it)
    final = server.final_adapter()  # at the largest client rank (client_overrides.<i>.lora.global.r)
    save_adapter(os.path.join(run_dir.dir, "adapters", GLOBAL), final,
                 lora_config(cfg.global_adapter(cfg.global_init_client())), cfg.model.path)
    return {"bytes_total": transport.total.snapshot()}


def mean_loss(losses: list[float]) -> str:
    """The mean of the round's client training losses, for the progress line ('-' when none trained)."""
    known = [x for x in losses if not math.isnan(x)]
    return f"{sum(known) / len(known):.4f}" if known else "-"


def progress_bar(done: int, total: int, width: int = 20) -> str:
    filled = round(width * done / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def build_client(cfg, topo, strategy, transport, run_dir, inner_steps: int):
    """This rank's client: its data, the base with both adapters (and the fused slot when the
    strategy fuses), the DeepSpeed engine over the client's ranks, and the Client around it."""
    from .client import Client
    from .engine import ClientEngine

    tok = get_tokenizer(cfg.model.path)
    data = load_clients(cfg.data, topo.plan.num_clients, cfg.seed, announce=topo.client_id == 0)[topo.client_id]
    check_responses_fit(tok, data, cfg.train.max_seq_len)
    base = build_base(cfg.model, cfg.seed, vocab_size=tok.vocab_size, dtype=cfg.base_dtype(topo.client_id))
    adapters = {PERSONAL: cfg.lora.personal, GLOBAL: cfg.global_adapter(topo.client_id)}
    if any(isinstance(step, Fuse) for step in strategy.after_rounds(inner_steps)):
        adapters[FUSED] = fused_adapter_config(cfg, topo.client_id)
    model = add_adapters(base, adapters, cfg.seed, trainable=(PERSONAL, GLOBAL))
    if cfg.global_.combine == "frozen_a":
        freeze_a(model, GLOBAL)  # FFA-LoRA: A keeps its seeded init, out of the optimizer
    engine = ClientEngine(cfg, topo, model, tok, data)
    return Client(cfg, topo, strategy, engine, transport, run_dir), adapters.get(FUSED)


def client_schedule(cfg, topo, strategy, transport, run_dir, ckpt):
    log = get_logger()
    K = cfg.inner_steps(topo.client_id)
    client, fused_config = build_client(cfg, topo, strategy, transport, run_dir, K)
    watch(cfg, topo)  # from here on (the model is built), no progress for hang_timeout_s ends the job
    engine, data = client.engine, client.engine.data
    if topo.is_leader:
        log.info(f"client {topo.client_id}: {len(data.train)} train / {len(data.fewshot)} few-shot / "
                 f"{len(data.test)} test rows; ZeRO stage {engine.zero_stage}; K = {K}")

    # Before the rounds (the personal stage, joining the federation). A resumed client restores
    # its state at the end of the checkpoint's round instead; the server then resends that
    # round's global adapter.
    if ckpt.resumed:
        client.resume(ckpt)
    else:
        for _, stats in client.run_steps(strategy.before_rounds(K), 0, "[personal stage] "):
            if topo.is_leader:
                log.info(f"personal stage: {trained(stats)}")

    # The rounds. A federated client follows the server's round numbers: one that fell behind
    # (federation.round_timeout_s) goes on from the newest global adapter, skipping rounds.
    # The checkpoint of round k is written at its end: once the next (or the final) global
    # adapter has arrived, before it is applied.
    rounds, t = RoundsSummary(), ckpt.resumed_round
    while True:
        if strategy.federated:
            # the leader's transport at the end of the round: what its checkpoint keeps
            counters, codec = (transport.total.snapshot(), transport.codec_state()) if transport else (None, None)
            message = client.receive_global()
            if ckpt.due(message.round - 1):
                client.checkpoint(ckpt, message.round - 1, counters, codec)
            t = client.apply_global(message)  # None: the final global adapter arrived
        else:
            if ckpt.due(t):
                client.checkpoint(ckpt, t, None, None)
            t = t + 1 if t < cfg.train.rounds else None
        if t is None:
            break
        maybe_fail(topo.rank, t, settle=lambda: ckpt.wait_complete(t - 1))
        for adapter, stats in client.run_round(t, strategy.round_plan(t, K, client.first)):
            rounds.add(adapter, t, stats)
    if topo.is_leader and rounds.trained:
        log.info(rounds.line())

    # After the rounds (FedDPA-F's personal training, fusion, evaluation), then the adapters on disk.
    for _, stats in client.run_steps(strategy.after_rounds(K), cfg.train.rounds + 1, "[after the rounds] "):
        if topo.is_leader:
            log.info(f"personal training after the rounds: {trained(stats)}")
    client.save(fused_config)
    client.summary = {"client": topo.client_id, "method": strategy.name, "ranks": topo.client_size,
                      "train_rows": len(data.train), "fewshot_rows": len(data.fewshot), "test_rows": len(data.test),
                      "zero_stage": engine.zero_stage, "inner_steps": K, "metrics": client.results,
                      "optimizer_steps": optimizer_steps(run_dir.records, topo.client_id)}
    if client.fusion_weights:
        client.summary["fusion_weights"] = {"personal": client.fusion_weights[0], "global": client.fusion_weights[1]}
    if client.fusion_choice:
        client.summary["fusion"] = client.fusion_choice
    if client.instance_weights:
        client.summary["instance_global_weight"] = client.instance_weights
    if transport is not None:
        client.summary["bytes"] = transport.total.snapshot()
    run_dir.summary = client.summary if topo.is_leader else None
    ckpt.close()  # the last checkpoint, written while the client fused and evaluated, is on disk
    return client


def optimizer_steps(records: list, client: int) -> dict:
    """The optimizer steps each of the client's adapters took in the whole run, from its `train`
    records (a resumed job restores them, so it counts what an uninterrupted one does). The
    fused adapter takes none (it is a weighted sum of the other two). Comparisons of methods read
    it: a method that wins with more steps has not won on method alone."""
    steps = {PERSONAL: 0, GLOBAL: 0}
    for r in records:
        if r.get("event") == "train" and r.get("client") == client:
            steps[r["adapter"]] += int(r["steps"])
    return steps


def trained(stats: dict) -> str:
    """One training phase in a few words: `100 steps in 12.3s, mean loss 0.0912`."""
    loss = "-" if stats["loss"] is None else f"{stats['loss']:.4f}"
    return f"{stats['steps']} steps in {stats['seconds']:.1f}s, mean loss {loss}"


class RoundsSummary:
    """A leader's rounds, for its console: one line per round and adapter in the rank's log file
    (FILE_ONLY), and one line for all of them when they are over."""

    def __init__(self):
        self.trained: dict[str, list[tuple[int, dict]]] = {}

    def add(self, adapter: str, t: int, stats: dict) -> None:
        self.trained.setdefault(adapter, []).append((t, stats))
        get_logger().info(f"[round {t}] {adapter}: {trained(stats)}", extra=FILE_ONLY)

    def line(self) -> str:
        """`rounds 1-10: global loss 0.2880 (round 1) -> 0.0247 (round 10), 100 steps in 4.1s`."""
        loss = lambda st: "-" if st["loss"] is None else f"{st['loss']:.4f}"
        parts, done_rounds = [], set()
        for adapter, done in self.trained.items():
            (t0, first), (t1, last) = done[0], done[-1]
            done_rounds |= {t for t, _ in done}
            parts.append(f"{adapter} loss {loss(first)} (round {t0}) -> {loss(last)} (round {t1}), "
                         f"{sum(st['steps'] for _, st in done)} steps in {sum(st['seconds'] for _, st in done):.1f}s")
        return f"rounds {min(done_rounds)}-{max(done_rounds)}: " + "; ".join(parts)


def finish(cfg, topo, run_dir, server_summary) -> dict | None:
    """Gather every rank's records and the leaders' summaries at the server; write the results."""
    yielding_barrier(topo.world)  # the server waits here, asleep, while the clients fuse and evaluate
    records = topo.world.gather(run_dir.records, root=0)
    summaries = topo.world.gather(getattr(run_dir, "summary", None), root=0)
    if not topo.is_server:
        return None
    recs = sorted((r for rs in records for r in rs),
                  key=lambda r: (r["round"] if r["round"] is not None else 10**9, -1 if r["client"] is None else r["client"], r["time"]))
    with open(os.path.join(run_dir.dir, "metrics.jsonl"), "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    rounds = [r for r in recs if r["event"] == "round"]
    clients = [s for s in summaries if s]
    per_round_bytes = (sum(r["server_bytes_sent"] + r["server_bytes_received"] for r in rounds) / len(rounds)) if rounds else 0
    per_round_seconds = (sum(r["seconds"] for r in rounds) / len(rounds)) if rounds else None
    for s in clients:
        # everything this client's leader sent and received (start-up and final global included) / rounds
        b = s.pop("bytes", None)
        s["bytes_total"] = (b["bytes_sent"] + b["bytes_received"]) if b else 0
        s["bytes_per_round"] = s["bytes_total"] / max(1, cfg.train.rounds)
        s["seconds_per_round"] = per_round_seconds
        # rounds this client's update was not averaged in: missing (round_timeout_s), rejected, or skipped
        s["rounds_missed"] = [r["round"] for r in rounds if s["client"] in r.get("missing", [])
                              or str(s["client"]) in r.get("rejected", {}) or "skipped" in r]
    summary = {"strategy": cfg.strategy, "rounds": cfg.train.rounds, "world_size": topo.plan.world_size,
               "bytes_per_round": per_round_bytes, "seconds_per_round": per_round_seconds,
               "rounds_skipped": [r["round"] for r in rounds if "skipped" in r],  # federation.on_short_round = skip
               "server": server_summary, "clients": clients}
    if cfg.privacy is not None:
        summary["privacy"] = privacy_summary(cfg, rounds)
    with open(os.path.join(run_dir.dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if run_dir.tracker is not None:  # the clients' records arrive here (the server's went out live)
        for r in recs:
            if r["client"] is not None:
                run_dir.tracker.record(r)
        run_dir.tracker.summary(summary)
    get_logger().info("results per client:\n" + results_table(summary)
                      + ("\n" + privacy_sentence(summary["privacy"]) if summary.get("privacy") else ""))
    return summary


def privacy_summary(cfg, rounds: list[dict]) -> dict:
    """summary.json's `privacy`: epsilon after the last released round (the server's round records)."""
    p = cfg.privacy
    released = [r["privacy_epsilon"] for r in rounds if "privacy_epsilon" in r]
    return {"epsilon": released[-1] if released else 0.0, "delta": p.delta, "rounds": len(released),
            "clip_norm": p.clip_norm, "noise_multiplier": p.noise_multiplier, "accountant": p.accountant,
            "target_epsilon": p.target_epsilon}


def results_table(summary: dict) -> str:
    """The per-client table: one row per client and evaluated adapter."""
    # eval.generate's columns only when a client has them, so the labelled demo's table stays as it was
    gen = [k for k in ("exact_match", "rouge_l") if any(k in m for s in summary["clients"] for m in s["metrics"].values())]
    head = ("client", "ranks", "method", "adapter", "accuracy", *gen, "loss", "rows")
    rows = []
    for s in summary["clients"]:
        for adapter, m in s["metrics"].items():
            scores = [f"{m[k]:.3f}" if k in m else "-" for k in ("accuracy", *gen)]
            rows.append((str(s["client"]), str(s["ranks"]), s["method"], adapter, *scores, f"{m['loss']:.4f}", str(m["rows"])))
    return text_table(head, rows)
