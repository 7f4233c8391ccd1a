"""Under mpiexec: run a config through the real trainer (run() writes the run directory as
`fdlora-cluster run` does) and dump what ClientEngine.evaluate returned on this rank.

    mpiexec -n 4 python eval_every_rank.py CONFIG OUT_DIR

Writes `eval-rank-<r>.json` on client ranks: [[active adapter, the returned metrics], ...] in call
order, so a test can check that every rank of a client got the same numbers.
"""

import json
import os
import sys

from fdlora_cluster.config import load_config
from fdlora_cluster.engine import ClientEngine
from fdlora_cluster.train import run

cfg_path, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
returned = []
_evaluate = ClientEngine.evaluate


def recording_evaluate(self, rows, active, *args, **kwargs):
    result = _evaluate(self, rows, active, *args, **kwargs)
    returned.append([active, result])
    return result


ClientEngine.evaluate = recording_evaluate
result = run(load_config(cfg_path))
if not isinstance(result, dict):  # a client rank: result is the Client
    rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    with open(os.path.join(out, f"eval-rank-{rank}.json"), "w") as f:
        json.dump(returned, f)
