"""The server's running sum: the same average as the stacked one, bitwise the same whatever the
arrival order, and it does not keep the updates it has added (no MPI: a scripted transport)."""

import gc
import itertools
import weakref
from types import SimpleNamespace

import pytest
import torch

from fdlora_cluster.config import load_config
from fdlora_cluster.server import Server
from fdlora_cluster.strategies import InOrderSum, UpdateError, make_strategy
from fdlora_cluster.transport import ClientUpdate, Counters

from conftest import CONFIGS

pytestmark = pytest.mark.unit


def states(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"a.lora_A.weight": torch.randn(4, 6, generator=g), "a.lora_B.weight": torch.randn(6, 4, generator=g)}
            for _ in range(n)]


def summed(order, updates, weights, skip=()):
    total = InOrderSum(range(len(updates)))
    for c in order:
        if c in skip:
            total.skip(c)
        else:
            total.add(c, updates[c], weights[c])
    total.close()
    return total


def test_running_sum_is_the_stacked_weighted_average():
    updates, weights = states(5), [10.0, 30.0, 60.0, 7.0, 1.0]
    mean = summed(range(5), updates, weights).mean()
    w = torch.tensor(weights, dtype=torch.float64)
    for k in updates[0]:
        stacked = torch.stack([u[k].double() for u in updates])
        ref = (w.view(-1, 1, 1) * stacked).sum(0) / w.sum()
        assert mean[k].dtype == torch.float32
        torch.testing.assert_close(mean[k].double(), ref, rtol=1e-6, atol=1e-7)


def test_arrival_order_does_not_change_a_bit():
    updates, weights = states(5, seed=1), [3.0, 1.0, 4.0, 1.0, 5.0]
    first = summed(range(5), updates, weights, skip={2}).mean()
    for order in itertools.permutations(range(5)):
        mean = summed(order, updates, weights, skip={2}).mean()
        assert all(torch.equal(mean[k], first[k]) for k in first), order


def test_holds_nothing_in_order_and_what_overtook_a_lower_id_otherwise():
    updates = states(6, seed=2)
    in_order = summed(range(6), updates, [1.0] * 6)
    assert in_order.most_held == 0 and in_order.added == list(range(6))
    reverse = summed(reversed(range(6)), updates, [1.0] * 6)
    assert reverse.most_held == 5  # everything waited for client 0
    total = InOrderSum(range(3))
    total.add(2, updates[2], 1.0)  # client 0 never answers (missing), client 1 is refused
    total.skip(1)
    assert total.held and total.added == []
    total.close()
    assert total.added == [2] and not total.held
    with pytest.raises(ValueError, match="client 2's update was already counted"):
        total.add(2, updates[2], 1.0)


def test_no_usable_update_is_an_error():
    total = InOrderSum([0, 1])
    total.skip(0)
    total.close()
    with pytest.raises(UpdateError, match="no update to average"):
        total.mean()


class ScriptedTransport:
    """Hands the server updates in a fixed order; before each, notes how many of the updates it
    already handed over are still alive somewhere (weak references)."""

    def __init__(self, updates):
        self.queue, self.given, self.alive_before_next = list(updates), [], []
        self.round, self.inbox = Counters(), {}

    def new_round(self):
        self.round = Counters()

    def send_global(self, message, clients):
        return message.state  # what the leaders hold (no compression)

    def next_update(self, deadline):
        gc.collect()
        self.alive_before_next.append(sum(r() is not None for r in self.given))
        if not self.queue:
            return None
        u = self.queue.pop(0)
        self.given.append(weakref.ref(u.state["a.lora_A.weight"]))
        return u


def server_round(order, strategy_name="fedavg", n=6):
    cfg = load_config(CONFIGS / "demo.yaml")
    cfg.strategy = strategy_name
    before = states(1, seed=9)[0]
    ups = states(n, seed=3)
    updates = [ClientUpdate(1, c, float(10 + c), ups[c]) for c in order]
    del ups
    transport = ScriptedTransport(updates)
    del updates
    topo = SimpleNamespace(plan=SimpleNamespace(clients=list(range(n))))
    server = Server(cfg, topo, make_strategy(cfg), transport, run=None)
    server.global_state = before
    server.send_round(1)
    rec = server.finish_round(1)
    return server, transport, rec


def test_server_keeps_no_update_it_has_summed():
    server, transport, rec = server_round(range(6))
    assert rec["clients"] == list(range(6)) and len(rec["update_norms"]) == 6
    assert transport.alive_before_next == [0] * 6  # each update was gone before the next came
    gc.collect()
    assert all(r() is None for r in transport.given)


@pytest.mark.parametrize("strategy", ["fedavg", "diloco", "fdlora"])
def test_server_result_does_not_depend_on_arrival_order(strategy):
    a = server_round([0, 1, 2, 3, 4, 5], strategy)
    b = server_round([5, 3, 1, 0, 4, 2], strategy)
    assert a[2]["clients"] == b[2]["clients"] and a[2]["update_norms"] == b[2]["update_norms"]
    assert all(torch.equal(a[0].global_state[k], b[0].global_state[k]) for k in a[0].global_state)
    assert max(b[1].alive_before_next) <= 3  # 5 and 3 and 1 waited for client 0, no more
