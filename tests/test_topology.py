"""The rank plan: server, contiguous client blocks, leaders, federation ranks."""

import pytest

from fdlora_cluster.topology import RankPlan, TopologyError

pytestmark = pytest.mark.unit


def test_even_plan():
    p = RankPlan((2, 2))
    assert p.world_size == 5
    assert p.client_ranks(0) == [1, 2] and p.client_ranks(1) == [3, 4]
    assert [p.leader(c) for c in range(2)] == [1, 3]
    assert p.federation_ranks() == [0, 1, 3]
    assert [p.client_of(r) for r in range(5)] == [None, 0, 0, 1, 1]
    assert p.describe() == "world=5: server [0]; client 0 [1,2] leader 1; client 1 [3,4] leader 3; federation [0,1,3]"


def test_uneven_plan():
    p = RankPlan((1, 3))
    assert p.client_ranks(0) == [1] and p.client_ranks(1) == [2, 3, 4]
    assert p.federation_ranks() == [0, 1, 2]
    with pytest.raises(TopologyError, match="outside the world of 5 ranks"):
        p.client_of(5)
