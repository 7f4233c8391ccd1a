"""Server math against numpy and torch.optim references; update checks."""

import numpy as np
import pytest
import torch

from fdlora_cluster.config import load_config
from fdlora_cluster.state import pseudo_gradient
from fdlora_cluster.strategies import (STRATEGIES, OuterOptimizer, UpdateError, check_update, client_weights,
                                       make_strategy, weighted_average)

from conftest import CONFIGS

pytestmark = pytest.mark.unit


def states(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"a.lora_A.weight": torch.randn(4, 6, generator=g), "a.lora_B.weight": torch.randn(6, 4, generator=g)}
            for _ in range(n)]


def test_weighted_average_matches_numpy():
    s = states(3)
    w = client_weights([10, 30, 60], "samples")
    out = weighted_average(s, w)
    for k in s[0]:
        ref = sum(wi * si[k].numpy().astype(np.float64) for wi, si in zip(w, s))
        np.testing.assert_allclose(out[k].numpy(), ref, rtol=1e-6)
    assert client_weights([10, 30], "uniform") == [0.5, 0.5]


def test_sgd_lr1_is_plain_average():
    before = states(1, seed=1)[0]
    after = states(2, seed=2)
    avg = weighted_average(after, [0.25, 0.75])
    new = OuterOptimizer("sgd", 1.0).step(before, pseudo_gradient(before, avg))
    for k in before:
        torch.testing.assert_close(new[k], avg[k], rtol=0, atol=1e-6)


def test_nesterov_matches_torch_sgd_over_two_steps():
    before = states(1, seed=3)[0]
    opt = OuterOptimizer("nesterov", 0.7, momentum=0.9)
    ref = {k: torch.nn.Parameter(v.clone().double()) for k, v in before.items()}
    torch_opt = torch.optim.SGD(list(ref.values()), lr=0.7, momentum=0.9, nesterov=True)
    cur = before
    for step in range(2):
        delta = pseudo_gradient(cur, states(1, seed=10 + step)[0])
        cur = opt.step(cur, delta)
        for k, p in ref.items():
            p.grad = delta[k].clone()
        torch_opt.step()
        for k in ref:
            torch.testing.assert_close(cur[k].double(), ref[k].detach(), rtol=1e-6, atol=1e-6)


def test_adam_matches_torch_adam():
    before = states(1, seed=4)[0]
    opt = OuterOptimizer("adam", 0.01, betas=(0.9, 0.99), eps=1e-8)
    ref = {k: torch.nn.Parameter(v.clone().double()) for k, v in before.items()}
    torch_opt = torch.optim.Adam(list(ref.values()), lr=0.01, betas=(0.9, 0.99), eps=1e-8)
    cur = before
    for step in range(3):
        delta = pseudo_gradient(cur, states(1, seed=20 + step)[0])
        cur = opt.step(cur, delta)
        for k, p in ref.items():
            p.grad = delta[k].clone()
        torch_opt.step()
    for k in ref:
        torch.testing.assert_close(cur[k].double(), ref[k].detach(), rtol=1e-5, atol=1e-6)


def test_check_update_names_client_and_key():
    ref = states(1)[0]
    bad = {k: v.clone() for k, v in ref.items()}
    bad["a.lora_B.weight"][0, 0] = float("nan")
    with pytest.raises(UpdateError, match=r"client 2: a.lora_B.weight has non-finite values"):
        check_update(ref, bad, client=2)
    with pytest.raises(UpdateError, match=r"client 1: a.lora_A.weight is \(3, 6\)"):
        check_update(ref, {**ref, "a.lora_A.weight": torch.zeros(3, 6)}, client=1)
    with pytest.raises(UpdateError, match=r"client 0: update keys differ.*missing \['a.lora_B.weight'\]"):
        check_update(ref, {"a.lora_A.weight": ref["a.lora_A.weight"]}, client=0)


def test_every_strategy_builds_and_documents_itself():
    cfg = load_config(CONFIGS / "demo.yaml")
    for name in STRATEGIES:
        cfg.strategy = name
        s = make_strategy(cfg)
        assert s.name == name and s.__doc__ and len(s.describe()) > 10
    cfg.strategy = "local"
    assert not make_strategy(cfg).federated


@pytest.mark.parametrize("name", ["sgd", "nesterov", "adam"])
def test_outer_state_survives_a_checkpoint_bitwise(name, tmp_path):
    """What checkpoint.py stores (`state_dict`, through torch.save) continues exactly where it stopped."""
    before = states(1, seed=5)[0]
    deltas = [states(1, seed=30 + i)[0] for i in range(4)]
    going = OuterOptimizer(name, 0.1)
    cur = before
    for d in deltas[:2]:
        cur = going.step(cur, d)
    torch.save(going.state_dict(), tmp_path / "outer.pt")
    resumed = OuterOptimizer(name, 0.1)
    resumed.load_state_dict(torch.load(tmp_path / "outer.pt", weights_only=False))
    a = b = cur
    third = None
    for d in deltas[2:]:
        a, b = going.step(a, d), resumed.step(b, d)
        third = third or a
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = OuterOptimizer(name, 0.1).step(cur, deltas[2])  # no momentum buffers, no moments
    assert all(torch.equal(fresh[k], third[k]) for k in fresh) == (name == "sgd")


def test_nesterov_momentum_warmup_ramps_the_momentum_and_survives_a_checkpoint(tmp_path):
    """outer.momentum_warmup = W: momentum m * t / W at step t (0 first), then m. On a constant
    pseudo-gradient g (lr 1, m 0.9, W 2) the steps are g (no momentum: torch keeps no buffer), then
    g + 0.45 g (the buffer starts as g), then g + 0.9 (0.9 g + g), against 1.9 g, 2.71 g, 3.44 g
    without the warm-up."""
    p = {"w": torch.zeros(3, dtype=torch.float64)}
    g = {"w": torch.ones(3, dtype=torch.float64)}
    opt = OuterOptimizer("nesterov", 1.0, momentum=0.9, warmup=2)
    moved = []
    cur = p
    for _ in range(3):
        new = opt.step(cur, g)
        moved.append(float((cur["w"] - new["w"])[0]))
        cur = new
    assert moved == pytest.approx([1.0, 1.45, 1.0 + 0.9 * 1.9])
    plain = OuterOptimizer("nesterov", 1.0, momentum=0.9).step(p, g)
    assert float(plain["w"][0]) == pytest.approx(-1.9)  # torch's first Nesterov step: g + m g
    # the step count travels with the checkpointed state, so a resumed warm-up goes on where it was
    resumed = OuterOptimizer("nesterov", 1.0, momentum=0.9, warmup=2)
    torch.save(opt.state_dict(), tmp_path / "outer.pt")
    resumed.load_state_dict(torch.load(tmp_path / "outer.pt", weights_only=False))
    a, b = opt.step(cur, g), resumed.step(cur, g)
    assert resumed.steps == opt.steps == 4 and torch.equal(a["w"], b["w"])
