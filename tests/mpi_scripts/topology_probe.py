"""Under mpiexec: build the topology for the given client sizes and write what each rank sees.

    mpiexec -n 5 python topology_probe.py OUT_DIR 2 2
"""

import json
import os
import sys

from fdlora_cluster.topology import build_topology

out, sizes = sys.argv[1], [int(s) for s in sys.argv[2:]]
topo = build_topology(sizes)
info = {"rank": topo.rank, "is_server": topo.is_server, "client": topo.client_id, "is_leader": topo.is_leader,
        "role": topo.role}
if topo.client_comm is not None:
    # the client communicator really connects the client's ranks: sum of their world ranks
    info["client_comm"] = {"rank": topo.client_comm.Get_rank(), "size": topo.client_comm.Get_size(),
                           "rank_sum": topo.client_comm.allreduce(topo.rank)}
if topo.federation_comm is not None:
    info["federation_comm"] = {"rank": topo.federation_comm.Get_rank(), "size": topo.federation_comm.Get_size(),
                               "world_ranks": topo.federation_comm.allgather(topo.rank)}
if topo.is_server:
    info["table"] = topo.table()
with open(os.path.join(out, f"rank-{topo.rank}.json"), "w") as f:
    json.dump(info, f)
