"""Under mpiexec: run a config through the real trainer, then dump what the tests inspect.

    mpiexec -n 5 python inspect_run.py CONFIG OUT_DIR

Writes, per rank: every message the transport sent (`payloads-rank-<r>.pt`, the payload tap), on
client leaders the personal adapter's start and every value its own training gave it
(`personal-rank-<r>.pt`; values copied from the global adapter, Ditto's start and the
personal <- global sync, are not the client's to hide), and on client ranks the logits of a fixed probe batch with each adapter
active (`logits-rank-<r>.pt`).
"""

import os
import sys

import torch

from fdlora_cluster.config import load_config
from fdlora_cluster.data import Example, collate
from fdlora_cluster.train import run

cfg_path, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
cfg = load_config(cfg_path)

# Instrument (not mock) the one evaluation path: remember which rows every call was given.
from fdlora_cluster.engine import ClientEngine

seen_rows = []  # (kind of call, active adapters, ids of the rows): "eval" (evaluate) or "search" (score_rows)
_evaluate, _score_rows = ClientEngine.evaluate, ClientEngine.score_rows


def recording_evaluate(self, rows, active, *args, **kwargs):
    seen_rows.append(("eval", list(active) if not isinstance(active, str) else [active], {id(r) for r in rows}))
    return _evaluate(self, rows, active, *args, **kwargs)


def recording_score_rows(self, rows, active, *args, **kwargs):
    seen_rows.append(("search", list(active) if not isinstance(active, str) else [active], {id(r) for r in rows}))
    return _score_rows(self, rows, active, *args, **kwargs)


ClientEngine.evaluate = recording_evaluate
ClientEngine.score_rows = recording_score_rows

from fdlora_cluster.state import PERSONAL

personal_values = []  # on a client's rank 0: the personal adapter's start and every value its training made
_init, _train = ClientEngine.__init__, ClientEngine.train


def recording_init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    value = self.read(PERSONAL)  # the start, before anything writes it (every rank: ZeRO-3 gathers)
    if self.local_rank == 0:
        personal_values.append(value)


def recording_train(self, name, *args, **kwargs):
    out = _train(self, name, *args, **kwargs)
    if name == PERSONAL:  # every rank trains, so every rank takes part in the read
        value = self.read(PERSONAL)
        if self.local_rank == 0:
            personal_values.append(value)
    return out


ClientEngine.__init__ = recording_init
ClientEngine.train = recording_train
payloads: list = []
result = run(cfg, record_payloads=payloads)
rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
torch.save(payloads, os.path.join(out, f"payloads-rank-{rank}.pt"))
if personal_values:
    torch.save(personal_values, os.path.join(out, f"personal-rank-{rank}.pt"))

if not isinstance(result, dict):  # a client rank: result is the Client
    from fdlora_cluster.model import set_active

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
    import json

    with open(os.path.join(out, f"fusion-rows-rank-{rank}.json"), "w") as f:
        json.dump(audit, f)
    probe = [Example("log: disk user retry kernel =>", " normal"), Example("log: panic cache sync read =>", " abnormal")]
    batch = collate(engine.tok, probe, cfg.train.max_seq_len)
    logits = {}
    engine.engine.eval()
    with torch.no_grad():
        for name in ("personal", "global") + (("fused",) if client.fusion_weights is not None else ()):
            set_active(engine.model, name)
            logits[name] = engine.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    torch.save({"client": client.id, "logits": logits, "batch": batch}, os.path.join(out, f"logits-rank-{rank}.pt"))
