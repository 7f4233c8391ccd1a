"""Under mpiexec: the real entry point, `fdlora-cluster run CONFIG ARGS...` (cli.main), tapped; then
dump what the tests inspect.

    mpiexec -n 5 python inspect_run.py CONFIG OUT_DIR [run arguments...]

The taps wrap (never replace) the trainer's own code, and go in once cmd_run has sent the rank's
output to its log file (log.capture_output), just before it imports the trainer, so the console
is the entry point's own. Writes, per rank:
- every message the transport sent (`payloads-rank-<r>.pt`, the payload tap, train.run's
  record_payloads);
- on client leaders, the personal adapter's start and every value its own training gave it
  (`personal-rank-<r>.pt`; values copied from the global adapter, Ditto's start and the
  personal <- global sync, are not the client's to hide);
- on client ranks: which rows every evaluation and fusion-search call was given
  (`fusion-rows-rank-<r>.json`); the logits of a fixed probe batch with each adapter active
  (`logits-rank-<r>.pt`); what every training phase did (`phases-rank-<r>.json`: the adapter
  trained, the round, digests of both adapters before and after, at the phase's first forward the
  active adapters with their scaling and which adapters the loss has a gradient for (autograd.grad
  with allow_unused, before DeepSpeed's backward), with a proximal anchor the trained adapter's
  distance to it before and after); and the final adapters (`adapters-rank-<r>.pt`).
"""

import json
import os
import sys

import torch

import fdlora_cluster.log as fdlog

cfg_path, out, run_args = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(out, exist_ok=True)

seen_rows = []  # (kind of call, active adapters, ids of the rows): "eval" (evaluate) or "search" (score_rows)
personal_values = []  # on a client's rank 0: the personal adapter's start and every value its training made
phases = []  # every ClientEngine.train call on this rank
round_start = {}  # round -> the global adapter at the round's first training phase: as received


def install_taps() -> None:
    from fdlora_cluster import train
    from fdlora_cluster.engine import ClientEngine
    from fdlora_cluster.model import _lora_layers, adapter_params
    from fdlora_cluster.state import GLOBAL, PERSONAL, digest

    _evaluate, _score_rows = ClientEngine.evaluate, ClientEngine.score_rows
    _init, _train, _run = ClientEngine.__init__, ClientEngine.train, train.run

    def active_list(active):
        return list(active) if not isinstance(active, str) else [active]

    def recording_evaluate(self, rows, active, *args, **kwargs):
        seen_rows.append(("eval", active_list(active), {id(r) for r in rows}))
        return _evaluate(self, rows, active, *args, **kwargs)

    def recording_score_rows(self, rows, active, *args, **kwargs):
        seen_rows.append(("search", active_list(active), {id(r) for r in rows}))
        return _score_rows(self, rows, active, *args, **kwargs)

    def recording_init(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        value = self.read(PERSONAL)  # the start, before anything writes it (every rank: ZeRO-3 gathers)
        if self.local_rank == 0:
            personal_values.append(value)

    def recording_train(self, name, steps, round, *args, **kwargs):
        if round not in round_start:
            round_start[round] = self.read(GLOBAL)
        rec = {"adapter": name, "round": round, "steps": steps,
               "before": {a: digest(self.read(a)) for a in (PERSONAL, GLOBAL)}}
        # the trainer passes an anchor only when it pulls to it (prox_mu > 0); measure the distance
        # to the round's received global adapter (read at the round's first phase) with lambda = 0 too
        anchor = kwargs.get("prox_to")
        if anchor is None:
            anchor = round_start[round]

        def distance_to_anchor():  # ||trained adapter - the round's received global||, Ditto's pull
            state = self.read(name)
            return float(sum(((state[k].double() - anchor[k].double()) ** 2).sum() for k in state) ** 0.5)

        if anchor is not None:
            rec["anchor_distance_before"] = distance_to_anchor()
        params = {a: list(adapter_params(self.model, a).values()) for a in (PERSONAL, GLOBAL)}

        def first_forward(module, args_, kwargs_, output):
            if "active" in rec or output.loss is None:
                return
            _, layer = next(iter(_lora_layers(self.model)))
            rec["active"] = sorted(layer.active_adapters)
            rec["scaling"] = {a: float(layer.scaling[a]) for a in rec["active"]}
            grads = {a: torch.autograd.grad(output.loss, ps, retain_graph=True, allow_unused=True)
                     for a, ps in params.items()}
            rec["has_grad"] = {a: any(g is not None and bool(g.abs().sum() > 0) for g in gs) for a, gs in grads.items()}

        handle = self.model.register_forward_hook(first_forward, with_kwargs=True)
        try:
            stats = _train(self, name, steps, round, *args, **kwargs)
        finally:
            handle.remove()
        rec["after"] = {a: digest(self.read(a)) for a in (PERSONAL, GLOBAL)}
        if anchor is not None:
            rec["anchor_distance_after"] = distance_to_anchor()
        phases.append(rec)
        if name == PERSONAL:  # every rank trains, so every rank takes part in the read
            value = self.read(PERSONAL)
            if self.local_rank == 0:
                personal_values.append(value)
        return stats

    def tapped_run(cfg, resume=None):
        payloads: list = []
        result = _run(cfg, record_payloads=payloads, resume=resume)
        dump(cfg, result, payloads)
        return result

    ClientEngine.evaluate, ClientEngine.score_rows = recording_evaluate, recording_score_rows
    ClientEngine.__init__, ClientEngine.train = recording_init, recording_train
    train.run = tapped_run


def dump(cfg, result, payloads) -> None:
    from mpi4py import MPI

    from fdlora_cluster.data import Example, collate
    from fdlora_cluster.model import set_active
    from fdlora_cluster.state import GLOBAL, PERSONAL

    rank = MPI.COMM_WORLD.Get_rank()
    torch.save(payloads, os.path.join(out, f"payloads-rank-{rank}.pt"))
    if personal_values:
        torch.save(personal_values, os.path.join(out, f"personal-rank-{rank}.pt"))
    if isinstance(result, dict):  # the server: result is the summary
        return
    client = result
    engine = client.engine
    data = engine.data
    ids = {split: {id(r) for r in getattr(data, split)} for split in ("train", "fewshot", "test")}
    search = [rows for kind, active, rows in seen_rows if kind == "search"]
    audit = {"search_calls": len(search),
             "search_rows": sorted({s for rows in search for s in ({k for k, v in ids.items() if rows & v})}),
             "search_touches_test": any(rows & ids["test"] for rows in search),
             "test_eval_calls": sum(1 for kind, active, rows in seen_rows if kind == "eval" and rows == ids["test"]),
             "other_eval_calls": sum(1 for kind, active, rows in seen_rows if kind == "eval" and rows != ids["test"])}
    with open(os.path.join(out, f"fusion-rows-rank-{rank}.json"), "w") as f:
        json.dump(audit, f)
    with open(os.path.join(out, f"phases-rank-{rank}.json"), "w") as f:
        json.dump({"client": client.id, "phases": phases}, f)
    torch.save({a: engine.read(a) for a in (PERSONAL, GLOBAL)}, os.path.join(out, f"adapters-rank-{rank}.pt"))
    probe = [Example("log: disk user retry kernel =>", " normal"), Example("log: panic cache sync read =>", " abnormal")]
    batch = collate(engine.tok, probe, cfg.train.max_seq_len)
    logits = {}
    engine.engine.eval()
    with torch.no_grad():
        for name in ("personal", "global") + (("fused",) if client.fusion_weights is not None else ()):
            set_active(engine.model, name)
            logits[name] = engine.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    torch.save({"client": client.id, "logits": logits, "batch": batch}, os.path.join(out, f"logits-rank-{rank}.pt"))


_capture = fdlog.capture_output


def capture_then_tap(log_path: str) -> None:
    _capture(log_path)
    install_taps()


fdlog.capture_output = capture_then_tap
from fdlora_cluster.cli import main  # noqa: E402

sys.exit(main(["run", cfg_path, *run_args]))
