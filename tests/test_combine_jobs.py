"""global.combine and per-client global ranks in real jobs (mpiexec + gloo, CPU)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fdlora_cluster.compress import Codec
from fdlora_cluster.state import Layout
from fdlora_cluster.strategies.combine import b_keys, first, rank_of
from fdlora_cluster.transport import HEADER

from conftest import (DEMO, TINY, TINY_ARGS, assert_ok, check_run, checkpointed, job_env, openmpi_missing,
                      openmpi_mpirun, read_metrics, read_summary, run_job, run_launcher, run_ranks, show, write_config)

OPENMPI_SKIP = openmpi_missing()


def saved(run_dir, *where):
    d = run_dir.joinpath("adapters", *where)
    return load_file(d / "adapter_model.safetensors"), json.loads((d / "adapter_config.json").read_text())


@pytest.mark.job
def test_clients_of_ranks_4_and_8_combined_in_the_product_space(tmp_path):
    """fdlora, client 0 at rank 4 and client 1 at rank 8 (under ZeRO-3, its personal adapter at
    rank 4: fusion with r_p != r_g), global.combine = product, Nesterov outer step, int8
    compression: the job ends; each client's saved global adapter has its own rank and is the top
    of the server's (up to int8's rounding); every message to or from a client is its own rank's
    size (encoded, after its first global adapter); the energy a rank-4 client cannot hold is in
    every round's record."""
    cfg = write_config(tmp_path, "demo.yaml", **{
        **TINY, "strategy": "fdlora", "global.combine": "product", "outer.optimizer": "nesterov",
        "federation.compress": "int8",
        "client_overrides.1.lora.global.r": 8, "client_overrides.1.deepspeed.zero_optimization.stage": 3})
    proc, run_dir = run_job(cfg)
    assert_ok(proc)
    check_run(run_dir, [2, 2], zero={0: 2, 1: 3})  # every rank of a client holds the same global adapter
    assert "global ranks per client {0: 4, 1: 8}; global.combine = product: the exact average" in (
        run_dir / "logs" / "rank-0.log").read_text()

    server, server_cfg = saved(run_dir, "global")
    assert rank_of(server) == 8 and server_cfg["r"] == 8 and server_cfg["lora_alpha"] == 16  # alpha / r kept
    own = {}
    for c, r in ((0, 4), (1, 8)):
        own[c], c_cfg = saved(run_dir, f"client-{c}", "global")
        assert rank_of(own[c]) == r and c_cfg["r"] == r and c_cfg["lora_alpha"] == 2 * r
        want = first(server, r)  # the top-r part of the server's final global adapter (B = U S, A = V^T),
        for k in want:  # as the client decodes its int8 stream: rounding of at most ~1/127 of a change
            assert torch.allclose(own[c][k], want[k], atol=0.02 * want[k].abs().max().item()), (c, k)
    fused, fused_cfg = saved(run_dir, "client-1", "fused")
    assert fused_cfg["r"] == 4 + 8  # the exact merge of a rank-4 personal and a rank-8 global adapter

    rounds = [r for r in read_metrics(run_dir) if r["event"] == "round"]
    assert [r["round"] for r in rounds] == [1, 2]
    nbytes = {c: Layout.of(own[c]).nbytes for c in own}
    wire = {c: Layout(Codec("int8", 256).wire_entries(Layout.of(own[c]).entries)).nbytes for c in own}
    assert nbytes[1] == 2 * nbytes[0] and wire[1] > wire[0] and wire[0] < nbytes[0]
    # each client's first global adapter travels whole at its own rank, every later one and every
    # update (a change to what the client holds) encoded at its own rank
    assert rounds[0]["server_bytes_sent"] == sum(HEADER.size + n for n in nbytes.values())
    assert rounds[1]["server_bytes_sent"] == sum(HEADER.size + n for n in wire.values())
    for r in rounds:
        assert r["server_bytes_received"] == sum(HEADER.size + n for n in wire.values()), r
        not_held = r["product_not_held"]
        assert len(not_held) == 2 and not_held[1] == 0.0 and 0.0 <= not_held[0] < 1.0, r
        assert 0.0 <= r["product_cut"] < 1.0 and r["global_change"] > 0, r
    assert rounds[1]["product_not_held"][0] > 0  # after a round of training the rank-8 global has more than 4 directions
    clients = {s["client"]: s for s in read_summary(run_dir)["clients"]}
    assert clients[1]["bytes_total"] > clients[0]["bytes_total"]  # bytes per client follow its rank


@pytest.mark.job
def test_frozen_a_sends_b_alone_and_keeps_the_seeded_a(tmp_path):
    """global.combine = frozen_a on one-rank clients: every update and global after the start-up
    carries B alone (half the adapter), the global adapter still moves, and its saved A is the
    seeded A the start-up message carried; global.aggregation = steps with clients of different K."""
    cfg = write_config(tmp_path, "demo.yaml", **{
        **TINY, "strategy": "fedavg", "topology.clients": [1, 1], "global.combine": "frozen_a",
        "global.aggregation": "steps", "client_overrides.1.inner_steps": 3})
    proc, run_dir = run_job(cfg)
    assert_ok(proc)
    check_run(run_dir, [1, 1])
    server, _ = saved(run_dir, "global")
    whole = Layout.of(server)
    b_only = whole.only(b_keys(server))
    assert 2 * b_only.nbytes == whole.nbytes
    rounds = [r for r in read_metrics(run_dir) if r["event"] == "round"]
    for r in rounds:
        assert r["server_bytes_received"] == 2 * (HEADER.size + b_only.nbytes), r
        assert r["server_bytes_sent"] == 2 * (HEADER.size + b_only.nbytes), r
        assert r["global_change"] > 0 and "factors_gap" not in r, r
    # A never trained: the saved A is the seeded one (model.add_adapters' seed for `global`)
    from fdlora_cluster.config import load_config
    from fdlora_cluster.data import get_tokenizer
    from fdlora_cluster.model import adapter_params, add_adapters, build_base

    c = load_config(cfg)
    base = build_base(c.model.model_copy(update={"pretrained": None}), c.seed, vocab_size=get_tokenizer(None).vocab_size)
    model = add_adapters(base, {"personal": c.lora.personal, "global": c.global_adapter(0)}, c.seed)
    seeded = adapter_params(model, "global")
    a_keys = [k for k, _, _ in whole.entries if k.endswith(".lora_A.weight")]
    assert a_keys and all(torch.equal(server[k], seeded[k].detach()) for k in a_keys)
    assert any(float(server[k].abs().sum()) > 0 for k in b_keys(server))  # B trained (it starts at zero)


@pytest.mark.job
def test_factors_log_how_far_they_are_from_the_product(finished_run):
    """The suite's finished run (fdlora, global.combine = factors): every round records the
    relative gap ||(sum p B)(sum p A) - sum p B A|| / ||sum p B A|| (the tiny model: exact)."""
    assert_ok(finished_run.proc)
    rounds = [r for r in read_metrics(finished_run.dir) if r["event"] == "round"]
    assert rounds and all(0 < r["factors_gap"] < 1 for r in rounds), [r.get("factors_gap") for r in rounds]


@pytest.mark.job
def test_product_with_two_ranks_resumes_bit_identical(tmp_path):
    """global.combine = product, clients of ranks 4 and 8, Nesterov, int8 compression: the server's
    residual and momentum (products in factored form) and each client's compression stream
    (reference, error feedback) are in the checkpoints, so a copy of the run cut back to its
    round-2 checkpoint and resumed ends bit-identical to the uninterrupted run."""
    from test_resume import KILLED_IN, assert_same_end, copy_up_to

    sets = {**checkpointed("fedavg", 2), "global.combine": "product", "outer.optimizer": "nesterov",
            "outer.lr": 0.7, "client_overrides.1.lora.global.r": 8, "federation.compress": "int8"}
    (tmp_path / "whole").mkdir()
    config = write_config(tmp_path / "whole", **sets)
    assert_ok(run_ranks(4, ["run", str(config)]))
    whole = tmp_path / "whole" / "run"
    k = KILLED_IN - 1
    run = copy_up_to(whole, k, tmp_path / "run")
    resumed = run_ranks(4, ["run", str(config), "--resume", str(run / "checkpoints" / f"round-{k:05d}")])
    assert_ok(resumed)
    assert_same_end(whole, run)
    assert {"global", "client-0/global", "client-1/global"} <= {
        str(p.parent.relative_to(run / "adapters")) for p in (run / "adapters").rglob("adapter_config.json")}


@pytest.mark.launcher
@pytest.mark.skipif(OPENMPI_SKIP is not None, reason=OPENMPI_SKIP or "")
def test_ranks_4_and_8_under_openmpi(tmp_path):
    """The same product job as above, started by `fdlora-cluster launch --mpiexec <Open MPI's
    mpirun>`: it ends, and each client's saved global adapter has its own rank."""
    run = tmp_path / "run"
    cmd = [job_env()["FDLORA"], "launch", "--mpiexec", openmpi_mpirun(), DEMO, "--output", str(run), *TINY_ARGS,
           "--set", "global.combine=product", "--set", "client_overrides.1.lora.global.r=8"]
    p = run_launcher(cmd, job_env())
    assert p.returncode == 0, show(p)
    assert f"+ {openmpi_mpirun()} -n 5 " in p.stdout, show(p)
    check_run(run, [2, 2])
    assert [rank_of(saved(run, f"client-{c}", "global")[0]) for c in (0, 1)] == [4, 8]
    assert all(len(r["product_not_held"]) == 2 for r in read_metrics(run) if r["event"] == "round")
