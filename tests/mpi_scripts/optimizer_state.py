"""Under mpiexec: run a config through the real trainer, then dump each client rank's inner
optimizer state per parameter group, read straight from DeepSpeed's own attributes.

    mpiexec -n 3 python optimizer_state.py CONFIG OUT_DIR

Writes `optimizer-state-rank-<r>.json`: {"stage", "groups": {group index: [step count of every
state tensor of that group]}}.
"""

import json
import os
import sys

import torch

from fdlora_cluster.config import load_config
from fdlora_cluster.train import run

cfg_path, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
result = run(load_config(cfg_path))
rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
if not isinstance(result, dict):  # a client rank
    engine = result.engine
    zero = engine.optimizer
    inner = zero
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    # where each stage keeps the tensors its inner optimizer steps (see DeepSpeed's stage3.py and
    # stage_1_and_2.py); read here independently of the engine's own helper
    if engine.zero_stage == 3:
        keyed = [(g, zero.fp32_partitioned_groups_flat[s]) for s, g in zero.sub_group_to_group_id.items()]
    elif engine.zero_stage in (1, 2):
        keyed = list(enumerate(zero.single_partition_of_fp32_groups))
    else:
        keyed = [(g, p) for g, group in enumerate(inner.param_groups) for p in group["params"]]
    groups: dict[int, list] = {}
    for g, t in keyed:
        st = inner.state.get(t, {})
        step = st.get("step", 0)
        groups.setdefault(g, []).append(float(step.item() if torch.is_tensor(step) else step))
    with open(os.path.join(out, f"optimizer-state-rank-{rank}.json"), "w") as f:
        json.dump({"stage": engine.zero_stage, "groups": groups}, f)
