"""Under mpiexec: run a config through the real trainer and record, on client ranks, what every
training phase did (for FedDPA and Ditto).

    mpiexec -n N python probe_personal.py CONFIG OUT_DIR

ClientEngine.train is wrapped (not replaced): for every call it records, in order, the adapter
trained, the round, digests of both adapters before and after, and at the phase's first forward
the adapters active with their scaling, and which adapters' weights the loss has a gradient for
(autograd.grad with allow_unused, before DeepSpeed's backward); with a proximal anchor, the
distance of the trained adapter to it before and after. Writes `phases-rank-<r>.json`,
plus the final adapters (`adapters-rank-<r>.pt`).
"""

import json
import os
import sys

import torch

from fdlora_cluster.config import load_config
from fdlora_cluster.engine import ClientEngine
from fdlora_cluster.model import _lora_layers, adapter_params
from fdlora_cluster.state import GLOBAL, PERSONAL, digest
from fdlora_cluster.train import run

cfg_path, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
cfg = load_config(cfg_path)
phases = []
round_start = {}  # round -> the global adapter at the round's first training phase: as received
_train = ClientEngine.train


def probed_train(self, name, steps, round, *args, **kwargs):
    rec = {"adapter": name, "round": round, "steps": steps,
           "before": {a: digest(self.read(a)) for a in (PERSONAL, GLOBAL)}}
    if round not in round_start:
        round_start[round] = self.read(GLOBAL)
    # the trainer passes an anchor only when it pulls to it (prox_mu > 0); measure the distance to
    # the round's received global adapter with lambda = 0 too, to compare
    anchor = kwargs.get("prox_to")
    if anchor is None:
        anchor = round_start[round]

    def distance_to_anchor():  # ||trained adapter - the round's received global||, Ditto's pull
        state = self.read(name)
        return float(sum(((state[k].double() - anchor[k].double()) ** 2).sum() for k in state) ** 0.5)

    if anchor is not None:
        rec["anchor_distance_before"] = distance_to_anchor()
    params = {a: list(adapter_params(self.model, a).values()) for a in (PERSONAL, GLOBAL)}

    def first_forward(module, args, kwargs_, output):
        if "active" in rec or output.loss is None:
            return
        _, layer = next(iter(_lora_layers(self.model)))
        rec["active"] = sorted(layer.active_adapters)
        rec["scaling"] = {a: float(layer.scaling[a]) for a in rec["active"]}
        grads = {a: torch.autograd.grad(output.loss, ps, retain_graph=True, allow_unused=True) for a, ps in params.items()}
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
    return stats


ClientEngine.train = probed_train
result = run(cfg)
rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
if not isinstance(result, dict):  # a client rank: result is the Client
    engine = result.engine
    with open(os.path.join(out, f"phases-rank-{rank}.json"), "w") as f:
            json.dump({"client": result.id, "phases": phases}, f)
    torch.save({a: engine.read(a) for a in (PERSONAL, GLOBAL)}, os.path.join(out, f"adapters-rank-{rank}.pt"))
