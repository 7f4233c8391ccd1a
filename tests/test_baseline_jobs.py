"""FedDPA (-T, -F) and Ditto in real short jobs (mpiexec + gloo): what each trains, when, with
which adapters in the forward, and what moves (tests/mpi_scripts/inspect_run.py records it).
The jobs are each strategy's one tapped run (conftest.strategy_run: 3 rounds, one-rank clients;
FedDPA-T with local_weight 0.3, Ditto with lambda 50 and 4 personal steps a round), shared with
the strategy's result and privacy tests; Ditto's lambda 0 run is this file's own."""

import json

import pytest
import torch

from fdlora_cluster.state import GLOBAL, PERSONAL

from conftest import STRATEGY_RUN, read_metrics, read_summary

pytestmark = pytest.mark.job


SCALE = 8 / 4  # demo.yaml: lora alpha 8, r 4 for both adapters


def probe(strategy_run, name: str, **sets):
    run = strategy_run(name, **sets)
    out, run_dir = run.out, run.dir
    phases = {c: json.loads((out / f"phases-rank-{r}.json").read_text())["phases"] for c, r in ((0, 1), (1, 2))}
    received = {(m["client"], m["round"]): m["digests"][0] for m in read_metrics(run_dir) if m["event"] == "global_received"}
    return phases, received, run_dir, out


def check_global_phase(p):
    assert p["active"] == [GLOBAL] and p["has_grad"] == {PERSONAL: False, GLOBAL: True}
    assert p["before"][PERSONAL] == p["after"][PERSONAL] and p["before"][GLOBAL] != p["after"][GLOBAL]


def check_local_with_global_active(p, local_weight):
    # both adapters in the forward, weighted local_weight / 1 - local_weight on top of alpha / r ...
    assert p["active"] == [GLOBAL, PERSONAL]
    assert p["scaling"] == pytest.approx({PERSONAL: SCALE * local_weight, GLOBAL: SCALE * (1 - local_weight)})
    # ... the loss reaches only the local adapter, and only it moves
    assert p["has_grad"] == {PERSONAL: True, GLOBAL: False}
    assert p["before"][GLOBAL] == p["after"][GLOBAL] and p["before"][PERSONAL] != p["after"][PERSONAL]


def test_feddpa_T_trains_local_each_round_with_the_received_global_active(strategy_run):
    phases, received, run_dir, _ = probe(strategy_run, "feddpa")  # feddpa.local_weight 0.3 (STRATEGY_SETS)
    for c, ps in phases.items():
        # round 1: the global adapter only; rounds 2 and 3: local (with global active) first, then global
        assert [(p["round"], p["adapter"]) for p in ps] == [
            (1, GLOBAL), (2, PERSONAL), (2, GLOBAL), (3, PERSONAL), (3, GLOBAL)]
        for p in ps:
            if p["adapter"] == GLOBAL:
                check_global_phase(p)
            else:
                check_local_with_global_active(p, 0.3)
                # the active global adapter is the server's aggregate this client just received
                assert p["before"][GLOBAL] == received[(c, p["round"])]
    summary = read_summary(run_dir)
    for c in summary["clients"]:
        assert set(c["metrics"]) == {PERSONAL, GLOBAL, "fused"}
        w = c["instance_global_weight"]
        assert -0.5 <= w["min"] <= w["mean"] <= w["max"] <= 0.5  # max_global_weight x a mean cosine
        assert 0.0 <= c["metrics"]["fused"]["accuracy"] <= 1.0
        assert not (run_dir / "adapters" / f"client-{c['client']}" / "fused").exists()  # no single fused adapter
    weights = [m for m in read_metrics(run_dir) if m["event"] == "eval" and m.get("adapter") == "fused"]
    assert {m["client"] for m in weights} == {0, 1} and all("global_weight" in m for m in weights)


def test_feddpa_F_trains_local_once_after_the_rounds_with_the_final_global_active(strategy_run):
    phases, received, run_dir, _ = probe(strategy_run, "feddpa_f")
    K = STRATEGY_RUN["train.inner_steps"]
    for c, ps in phases.items():
        assert [(p["round"], p["adapter"]) for p in ps] == [(1, GLOBAL), (2, GLOBAL), (3, GLOBAL), (4, PERSONAL)]
        for p in ps[:-1]:
            check_global_phase(p)
        last = ps[-1]
        check_local_with_global_active(last, 0.5)
        assert last["steps"] == 2 * K  # (rounds - 1) x K, the local steps -T takes
        assert last["before"][GLOBAL] == received[(c, 4)]  # the final global adapter
    assert all(set(c["metrics"]) == {PERSONAL, GLOBAL, "fused"} for c in read_summary(run_dir)["clients"])


def test_ditto_pulls_the_personal_adapter_to_the_global_one(strategy_run):
    far, _, _, far_out = probe(strategy_run, "ditto", **{"ditto.lambda": 0.0})
    near, received, run_dir, near_out = probe(strategy_run, "ditto")  # lambda 50 (STRATEGY_SETS)
    rounds = STRATEGY_RUN["train.rounds"]
    for c in (0, 1):
        ps = near[c]
        # each round: the global adapter (FedAvg), then the personal one, alone in the forward
        assert [(p["round"], p["adapter"]) for p in ps] == [(t, a) for t in range(1, rounds + 1) for a in (GLOBAL, PERSONAL)]
        for p in ps:
            if p["adapter"] == GLOBAL:
                check_global_phase(p)
            else:
                assert p["active"] == [PERSONAL] and p["has_grad"] == {PERSONAL: True, GLOBAL: False}
                assert p["before"][GLOBAL] == p["after"][GLOBAL]
        # v starts as the first global adapter received
        assert ps[1]["before"][PERSONAL] == received[(c, 1)] and ps[1]["anchor_distance_before"] == 0.0
        # lambda pulls v to the round's global adapter: with lambda 0 it drifts off freely
        for r in range(1, 2 * rounds, 2):  # each round's personal phase
            assert near[c][r]["anchor_distance_after"] < 0.5 * far[c][r]["anchor_distance_after"], (c, r)
    # the global adapter trains as in FedAvg: lambda does not touch it
    for r in (1, 2):
        a, b = torch.load(near_out / f"adapters-rank-{r}.pt"), torch.load(far_out / f"adapters-rank-{r}.pt")
        assert all(torch.equal(a[GLOBAL][k], b[GLOBAL][k]) for k in a[GLOBAL])
        assert not all(torch.equal(a[PERSONAL][k], b[PERSONAL][k]) for k in a[PERSONAL])
    summary = read_summary(run_dir)
    assert all(set(c["metrics"]) == {PERSONAL, GLOBAL} for c in summary["clients"])
    assert any(m["event"] == "personal_init" for m in read_metrics(run_dir))
