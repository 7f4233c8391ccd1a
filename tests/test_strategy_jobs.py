"""Every strategy runs a short real job; FedAvg's server reproduces a numpy average of the sent
updates; fusion stays off the test split (and, by default, off the training rows).

Each strategy's job is its one tapped run (conftest.strategy_run), which test_privacy.py and
test_baseline_jobs.py read too."""

import json

import numpy as np
import pytest
import torch

from fdlora_cluster.state import GLOBAL, PERSONAL

from conftest import STRATEGIES, read_metrics, read_summary
from test_jobs import load_saved

pytestmark = pytest.mark.job


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_runs(strategy_run, name):
    run_dir = strategy_run(name).dir
    summary = read_summary(run_dir)
    metrics = read_metrics(run_dir)
    expected = {"fdlora": {PERSONAL, GLOBAL, "fused"}, "fdlora_paper": {PERSONAL, GLOBAL, "fused"},
                "feddpa": {PERSONAL, GLOBAL, "fused"}, "feddpa_f": {PERSONAL, GLOBAL, "fused"},
                "ditto": {PERSONAL, GLOBAL}, "local": {PERSONAL}}.get(name, {GLOBAL})
    for c in summary["clients"]:
        assert set(c["metrics"]) == expected
        for m in c["metrics"].values():
            assert 0.0 <= m["accuracy"] <= 1.0 and m["loss"] > 0
        assert c["seconds_per_round"] is None or c["seconds_per_round"] > 0
    if name == "local":
        assert summary["bytes_per_round"] == 0 and all(c["bytes_total"] == 0 for c in summary["clients"])
        assert not [m for m in metrics if m["event"] in ("round", "global_received")]
        assert not (run_dir / "adapters" / GLOBAL).exists()
    else:
        assert summary["bytes_per_round"] > 0 and all(c["bytes_per_round"] > 0 for c in summary["clients"])
        assert (run_dir / "adapters" / GLOBAL / "adapter_model.safetensors").exists()
    # log.digests: every rank's digest of the global adapter, every round / the final one / never
    rounds, mode = strategy_run(name).cfg.train.rounds, strategy_run(name).cfg.log.digests
    received = [m for m in metrics if m["event"] == "global_received"]
    assert len(received) == (0 if name == "local" else 2 * (rounds + 1))
    digested = sorted({m["round"] for m in received if "digests" in m})
    assert digested == {"every": list(range(1, rounds + 2)), "final": [rounds + 1], "off": []}[mode if received else "off"]
    if name.startswith("fdlora"):
        steps = [m for m in metrics if m["event"] == "fusion_step"]
        # per client: the 3 anchors, then max(budget - 3, 4 per weight pair) = 4 asks in the search
        # (fusion.search_evaluations; budget 4 gives 1, one pair 4); the 4 folds choose among those
        # (fold_search: pool), with no evaluation of their own
        assert len(steps) == 2 * (3 + 4) and {m["client"] for m in steps} == {0, 1}
        assert {m["phase"] for m in steps} == {"anchor", "search"}
        for c in summary["clients"]:
            assert set(c["fusion_weights"]) == {"personal", "global"}
        assert (run_dir / "adapters" / "client-1" / "fused" / "adapter_config.json").exists()
    if name == "fdlora_paper":
        log = (run_dir / "logs" / "rank-0.log").read_text()
        assert "mean of 2 personal adapters" in log and "sent to the server once" in log
    if name.startswith("feddpa"):  # instance-wise weights (test_baseline_jobs.py checks the phases)
        assert all(-0.5 <= c["instance_global_weight"]["mean"] <= 0.5 for c in summary["clients"])


def test_fedavg_server_is_the_weighted_average_of_sent_updates(strategy_run):
    run = strategy_run("fedavg")
    rounds = run.cfg.train.rounds
    updates = {}
    for leader in (1, 2):
        sent = [(s, n) for kind, dest, s, n, _ in torch.load(run.out / f"payloads-rank-{leader}.pt") if kind == "update"]
        assert len(sent) == rounds  # one per round
        updates[leader] = sent[-1]
    final = load_saved(run.dir / "adapters" / GLOBAL)
    counts = np.array([updates[r][1] for r in (1, 2)])
    assert (counts > 0).all(), counts
    w = counts / counts.sum()
    for k, v in final.items():
        ref = sum(wi * updates[r][0][k].numpy().astype(np.float64) for wi, r in zip(w, (1, 2)))
        np.testing.assert_allclose(v.numpy(), ref, rtol=1e-6, atol=1e-7)


# fdlora.yaml searches the held-out few-shot rows (fusion.rows: heldout), fdlora_paper.yaml the
# training rows (rows: train)
@pytest.mark.parametrize("name, rows", [("fdlora", "heldout"), ("fdlora_paper", "train")])
def test_fusion_reads_only_its_rows(strategy_run, name, rows):
    run = strategy_run(name)
    assert run.cfg.fusion.rows == rows
    for r in (1, 2):
        audit = json.loads((run.out / f"fusion-rows-rank-{r}.json").read_text())
        # the three anchors, then max(budget - 3, 4 per weight pair) = 4 more candidates in the search
        # (fewer when it re-asks a point already scored); the folds choose among them (fold_search: pool)
        assert 3 <= audit["search_calls"] <= 3 + 4
        assert audit["other_eval_calls"] == 0
        assert not audit["search_touches_test"]
        assert audit["search_rows"] == (["fewshot"] if rows == "heldout" else ["train"])
        assert audit["test_eval_calls"] == 3  # personal, global, fused on the test split, once each
