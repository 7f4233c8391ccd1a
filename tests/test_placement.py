"""GPU placement (topology.place_gpus): a pure function of hosts, ranks and the GPUs each rank sees.

The layouts of hostfiles/ and the one-GPU workstation, without a GPU: what LOCAL_RANK, set_device
and NCCL's device_id get on every rank, and the layouts that must be refused at start.
"""

import pytest

from fdlora_cluster.topology import RankPlan, TopologyError, host_local_indices, place_gpus

pytestmark = pytest.mark.unit


def gpus(n):
    return [str(i) for i in range(n)]


def layout(plan, hosts_slots, n_gpus):
    """hosts and visible-GPU lists for ranks filling `hosts_slots` [(host, slots), ...] in order."""
    hosts = [h for h, slots in hosts_slots for _ in range(slots)]
    assert len(hosts) == plan.world_size
    return hosts, [[] if r == 0 else gpus(n_gpus) for r in range(plan.world_size)]


def test_two_nodes_eight_gpus_hostfile():
    # hostfiles/2nodes-8gpus: clients [5, 5, 5] over node1 slots=8, node2 slots=8
    plan = RankPlan((5, 5, 5))
    hosts, vis = layout(plan, [("node1", 8), ("node2", 8)], 8)
    assert place_gpus(plan, hosts, vis) == [None, 0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5, 6, 7]


def test_localhost_5_on_cpu_and_on_4_gpus():
    # hostfiles/localhost-5: the demo (2 clients x 2 ranks) on one host
    plan = RankPlan((2, 2))
    hosts, vis = layout(plan, [("localhost", 5)], 4)
    assert place_gpus(plan, hosts, vis) == [None, 0, 1, 2, 3]
    assert host_local_indices(plan, hosts) == [None, 0, 1, 2, 3]  # LOCAL_RANK on CPU


def test_netns_2hosts_client_spanning_hosts():
    # hostfiles/netns-2hosts with clients [3, 2]: client 0 spans node-a and node-b
    plan = RankPlan((3, 2))
    hosts, vis = layout(plan, [("node-a", 3), ("node-b", 3)], 4)
    assert place_gpus(plan, hosts, vis) == [None, 0, 1, 0, 1, 2]


def test_one_gpu_workstation_refuses_sharing_unless_asked():
    plan = RankPlan((1, 1))
    hosts, vis = layout(plan, [("ws", 3)], 1)
    with pytest.raises(TopologyError, match=r"host ws has 1 GPU\(s\) \(ids 0\), and ranks 1 \(client 0\), "
                                            r"2 \(client 1\) would share GPU 0.*topology.share_gpus: true"):
        place_gpus(plan, hosts, vis)
    assert place_gpus(plan, hosts, vis, share_gpus=True) == [None, 0, 0]


def test_ranks_of_one_client_never_share_a_gpu():
    plan = RankPlan((2, 2))  # the demo on one GPU: client 0's ranks 1 and 2 would both be on GPU 0
    hosts, vis = layout(plan, [("ws", 5)], 1)
    for share in (False, True):
        with pytest.raises(TopologyError, match=r"host ws has 1 GPU\(s\).*ranks 1,2 of client 0 would share GPU 0: "
                                                r"NCCL refuses"):
            place_gpus(plan, hosts, vis, share_gpus=share)
    # two GPUs: each client's two ranks on distinct GPUs, the clients sharing them when allowed
    hosts, vis = layout(plan, [("ws", 5)], 2)
    assert place_gpus(plan, hosts, vis, share_gpus=True) == [None, 0, 1, 0, 1]
    with pytest.raises(TopologyError, match="share_gpus"):
        place_gpus(plan, hosts, vis)


def test_launcher_binding_each_rank_to_its_own_gpu():
    # srun --gpus-per-task=1: every task sees one GPU (its own CUDA_VISIBLE_DEVICES), index 0 for each
    plan = RankPlan((2, 2))
    hosts = ["n1"] * 5
    vis = [[], ["0"], ["1"], ["2"], ["3"]]
    assert place_gpus(plan, hosts, vis) == [None, 0, 0, 0, 0]
    # ... unless the launcher gave two ranks of one client the same GPU
    with pytest.raises(TopologyError, match="ranks 1,2 of client 0 would share GPU 5"):
        place_gpus(plan, hosts, [[], ["5"], ["5"], ["6"], ["7"]])


def test_a_client_rank_without_a_gpu_is_refused():
    plan = RankPlan((1, 1))
    with pytest.raises(TopologyError, match="rank 2 \\(client 1\\) on host b sees no GPU"):
        place_gpus(plan, ["a", "a", "b"], [[], ["0"], []])
