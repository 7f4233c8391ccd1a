"""Real multi-process jobs (mpiexec + gloo, nothing mocked), each under a timeout."""

import json

import pytest
import torch

from fdlora_cluster.config import load_config
from fdlora_cluster.model import add_adapters, adapter_params, build_base
from fdlora_cluster.state import GLOBAL, PERSONAL

from conftest import TINY, assert_ok, mpi_python, read_metrics, read_summary, run_ranks, write_config

pytestmark = pytest.mark.job


@pytest.mark.parametrize("sizes", [[2, 2], [1, 3]])
def test_topology_split(tmp_path, sizes):
    n = 1 + sum(sizes)
    assert_ok(mpi_python(n, "topology_probe.py", tmp_path, *sizes, timeout=120))
    info = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(n)]
    assert info[0]["is_server"] and info[0]["client"] is None and "client_comm" not in info[0]
    start = 1
    leaders = []
    for c, size in enumerate(sizes):
        ranks = list(range(start, start + size))
        for i, r in enumerate(ranks):
            assert info[r]["client"] == c and info[r]["is_leader"] == (i == 0)
            assert info[r]["client_comm"] == {"rank": i, "size": size, "rank_sum": sum(ranks)}
            assert ("federation_comm" in info[r]) == (i == 0)
        leaders.append(ranks[0])
        start += size
    fed = [0] + leaders
    for k, r in enumerate(fed):
        assert info[r]["federation_comm"] == {"rank": k, "size": len(fed), "world_ranks": fed}
    assert "leader" in info[0]["table"] and "client 1" in info[0]["table"]


def test_wrong_world_size_is_refused_with_the_needed_count(tmp_path):
    cfg = write_config(tmp_path, **TINY)
    proc = run_ranks(3, ["run", str(cfg)], timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    # printed once (by rank 0), not once per rank, and without a traceback
    assert out.count("needs 1 server + (2 + 2) client ranks = 5 ranks, but the job has WORLD_SIZE(3)") == 1, out
    assert "Traceback" not in out, out


def test_config_error_in_run_exits_2_with_the_key(tmp_path):
    cfg = write_config(tmp_path, **TINY)
    proc = run_ranks(2, ["run", str(cfg), "--set", "train.bogus=1"], timeout=60)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("unknown key 'train.bogus'") == 1  # printed once, not per rank


def test_what_the_client_ranks_lack_is_said_once_before_they_start(tmp_path):
    """config.check_environment runs on each rank for its role: the clients' part (nevergrad's
    registry here) on the client ranks, the errors gathered and said once by rank 0."""
    cfg = write_config(tmp_path, **TINY, **{"strategy": "fdlora", "fusion.optimizer": "NoSuchOpt"})
    proc = run_ranks(3, ["run", str(cfg)], timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and out.count("fusion.optimizer = 'NoSuchOpt' is not a nevergrad optimizer") == 1, out
    assert "Traceback" not in out, out


def fresh_adapters(cfg):
    from fdlora_cluster.data import get_tokenizer

    base = build_base(cfg.model, cfg.seed, vocab_size=get_tokenizer(None).vocab_size)
    model = add_adapters(base, {PERSONAL: cfg.lora.personal, GLOBAL: cfg.lora.global_}, cfg.seed)
    return {n: {k: p.detach().clone() for k, p in adapter_params(model, n).items()} for n in (PERSONAL, GLOBAL)}


def load_saved(path):
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.mark.parametrize("stage", [2, 3])
def test_rounds_keep_global_identical_on_all_ranks(whole_run, stage):
    """fedavg's checkpointed run (conftest.whole_run: a one-rank and a two-rank client, 3 rounds),
    the one test_resume.py resumes."""
    run_dir, cfg_path = whole_run("fedavg", stage)
    cfg = load_config(cfg_path)
    sizes = cfg.client_sizes()
    assert max(sizes) >= 2, sizes  # a client of several ranks, or "every rank equal" proves little
    received = [m for m in read_metrics(run_dir) if m["event"] == "global_received"]
    rounds = cfg.train.rounds
    assert sorted({m["round"] for m in received}) == list(range(1, rounds + 2))
    by_round = {}
    for m in received:
        # every rank of the client holds the same global adapter
        assert len(m["digests"]) == sizes[m["client"]] and len(set(m["digests"])) == 1, m
        by_round.setdefault(m["round"], set()).update(m["digests"])
    for t, d in by_round.items():
        assert len(d) == 1, f"round {t}: clients hold different global adapters {d}"
    assert by_round[1] != by_round[rounds + 1], "the global adapter did not change over the rounds"
    # The personal adapter was never trained by fedavg: it must still be its seeded start, bit for bit,
    # although it sat in the optimizer (lr 0, no gradient) through every global step.
    start = fresh_adapters(cfg)
    for c in range(2):
        saved = load_saved(run_dir / "adapters" / f"client-{c}" / "personal")
        for k, v in start[PERSONAL].items():
            assert torch.equal(saved[k], v), f"client {c}: personal {k} moved"
    glob = load_saved(run_dir / "adapters" / "global")
    assert any(not torch.equal(glob[k], v) for k, v in start[GLOBAL].items())
    summary = read_summary(run_dir)
    assert [c["zero_stage"] for c in summary["clients"]] == [stage, stage]
    rounds_m = [m for m in read_metrics(run_dir) if m["event"] == "round"]
    assert len(rounds_m) == rounds and all(m["server_bytes_sent"] > 0 and m["seconds"] > 0 for m in rounds_m)


def test_personal_never_travels_and_saved_adapters_reload(finished_run):
    """fdlora trains the personal adapter; no payload on the federation communicator may carry it,
    and every saved adapter reloads with plain PEFT to the trainer's own logits. The suite's shared
    finished run (conftest.finished_run: 2 clients x 2 ranks, a Nesterov outer step)."""
    assert_ok(finished_run.proc)
    cfg, out, run_dir = finished_run.cfg, finished_run.out, finished_run.dir
    personal = {c: load_saved(run_dir / "adapters" / f"client-{c}" / "personal") for c in range(2)}
    start = fresh_adapters(cfg)[PERSONAL]
    kinds = set()
    n_payloads = 0
    for r in range(5):
        for kind, dest, state, _, _ in torch.load(out / f"payloads-rank-{r}.pt"):
            if state is None:  # layout, bye
                continue
            kinds.add(kind)
            n_payloads += 1
            for k, v in state.items():
                for c in range(2):
                    for ref in (personal[c].get(k), start.get(k)):
                        assert ref is None or not torch.equal(v, ref) or not v.any(), f"rank {r} sent personal {k}"
    assert kinds == {"init", "global", "final", "update"} and n_payloads > 0  # init: client 0 sends the seeded start
    # trained personal differs from its start (so the check above had something to catch)
    assert any(not torch.equal(personal[0][k], start[k]) for k in start)

    from peft import PeftModel

    from fdlora_cluster.data import get_tokenizer

    for leader, c in ((1, 0), (3, 1)):
        dumped = torch.load(out / f"logits-rank-{leader}.pt")
        assert dumped["client"] == c
        for name, path in ((GLOBAL, run_dir / "adapters" / "global"),
                           (PERSONAL, run_dir / "adapters" / f"client-{c}" / "personal"),
                           ("fused", run_dir / "adapters" / f"client-{c}" / "fused")):
            base = build_base(cfg.model, cfg.seed, vocab_size=get_tokenizer(None).vocab_size)
            model = PeftModel.from_pretrained(base, str(path)).eval()
            with torch.no_grad():
                logits = model(input_ids=dumped["batch"]["input_ids"],
                               attention_mask=dumped["batch"]["attention_mask"]).logits.float()
            torch.testing.assert_close(logits, dumped["logits"][name], rtol=1e-4, atol=1e-4,
                                       msg=f"client {c} {name}: reloaded adapter gives other logits")


def test_a_missing_pretrained_base_is_said_once_before_the_job_starts(tmp_path):
    """Every client rank finds the missing pretrained base before the trainer starts (cli's checks
    before start; the server would otherwise wait on them): the job ends with exit status 2 and the
    cause said once. A rank failing later is test_failures.py's."""
    import time

    cfg = write_config(tmp_path, **TINY, **{"model.pretrained": str(tmp_path / "no-such-base")})
    t0 = time.monotonic()
    proc = run_ranks(5, ["run", str(cfg)], timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    # found before the trainer starts, by every client rank, and said once
    assert out.count("no model.safetensors there; run `fdlora-cluster pretrain CONFIG` first") == 1, out
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert time.monotonic() - t0 < 90


def test_bad_data_ends_the_job_with_the_message_and_no_traceback(tmp_path):
    """A response longer than train.max_seq_len is found on every client rank at start, before
    DeepSpeed; the job ends non-zero with the DataError's message (a user error, so no traceback),
    said once per client (rank 0 prints what the ranks found), not by each of its ranks."""
    cfg = write_config(tmp_path, **TINY, **{"train.max_seq_len": 6})
    proc = run_ranks(5, ["run", str(cfg)], timeout=120)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    for c in (0, 1):
        assert out.count(f"data error: client {c}: a ") == 1, out
    assert out.count("does not fit train.max_seq_len = 6") == 2, out
    assert "Traceback" not in out, out
