"""Faults combined (issue 20 item 7): a seeded chaos schedule (fdlora_cluster/faults.py `chaos`) of
slow, late, non-finite and dropped updates and a short round, at random rounds and clients over
22 rounds, with a SIGKILL and `--resume auto` in the middle; the job finishes and every round's
record is the one the schedule predicts. The schedule's own rules are unit tests here too."""

import ast
import re
import time

import pytest
import torch

from fdlora_cluster.checkpoint import complete_checkpoints
from fdlora_cluster.faults import KINDS, UNUSABLE, chaos

from conftest import TINY, assert_ok, check_run, read_metrics, read_summary, run_ranks, write_config
from test_jobs import load_saved

SEED, ROUNDS, CLIENTS, TIMEOUT, MIN_CLIENTS = 0, 22, 4, 5, 2
# One-rank clients, one inner step a round: a round's compute is well under the 5 s deadline (the
# first round, and the first after the resume, took 3.9 s and 5.8 s with the load average at 19),
# so the waits the record shows are the faults' (late and dropped updates wait out the deadline).
# int8 compression: a rejected or dropped update's rounding error must be dropped with it, or the
# client's later updates would all be rejected and the records would not match the schedule.
CHAOS_JOB = {**TINY, "strategy": "fedavg", "topology.clients": [1] * CLIENTS, "train.rounds": ROUNDS,
             "train.inner_steps": 1, "train.personal_steps": 1, "data.rows_per_client": 40,
             "checkpoint.every": 1, "federation.round_timeout_s": TIMEOUT, "federation.min_clients": MIN_CLIENTS,
             "federation.on_short_round": "skip", "federation.compress": "int8"}
LEADERS = [1 + c for c in range(CLIENTS)]  # world rank of each client's leader (rank 0 is the server)


def announced(out: str) -> set[tuple[str, int, int]]:
    """(kind, client or rank, round) of every `injected fault: ...` line (faults.fault)."""
    got = set()
    for what, where in re.findall(r"injected fault: (\w+) at (\{[^}]*\})", out):
        at = ast.literal_eval(where)
        got.add((what, at.get("client", at.get("rank")), at["round"]))
    return got


def as_announced(faults) -> set[tuple[str, int, int]]:
    return {("slow" if f.kind == "late" else f.kind, f.client, f.round) for f in faults}


@pytest.mark.job
def test_a_seeded_chaos_job_with_a_kill_and_resume_finishes_with_every_round_as_injected(tmp_path):
    plan = chaos(SEED, ROUNDS, CLIENTS, TIMEOUT, MIN_CLIENTS)
    K = plan.kill_round
    cfg = write_config(tmp_path, **CHAOS_JOB)
    started = time.time()
    killed = run_ranks(1 + CLIENTS, ["run", str(cfg)], env={"FDLORA_FAULT": plan.spec(LEADERS)})
    first = killed.stdout + killed.stderr
    assert killed.returncode != 0, f"the injected SIGKILL did not end the job\n{first[-3000:]}"
    assert ("kill", LEADERS[plan.kill_client], K) in announced(first), first[-3000:]
    resumed = run_ranks(1 + CLIENTS, ["run", str(cfg), "--resume", "auto"],
                        env={"FDLORA_FAULT": plan.spec(LEADERS, kill=False)})
    assert_ok(resumed)
    out = resumed.stdout + resumed.stderr
    assert f"(end of round {K - 1})" in out and "resuming from" in out, out[-3000:]
    took = time.time() - started

    # every fault was injected, once, in the job that ran its round
    before = {f for f in plan.faults if f.round < K}
    assert {a for a in announced(first) if a[0] != "kill" and a[2] < K} == as_announced(before)
    assert announced(out) == as_announced(set(plan.faults) - before), out[-3000:]

    run = tmp_path / "run"
    rounds = {m["round"]: m for m in read_metrics(run) if m["event"] == "round"}
    assert sorted(rounds) == list(range(1, ROUNDS + 1))
    for t, want in plan.expected().items():
        rec = rounds[t]
        got = {"clients": rec["clients"], "missing": rec["missing"], "rejected": sorted(map(int, rec["rejected"])),
               "late": sorted((x["client"], x["round"]) for x in rec["late"]), "skipped": "skipped" in rec}
        assert got == want, f"round {t}: {got} != {want}\nschedule: {plan.faults}"
        assert all("non-finite" in why for why in rec["rejected"].values()), rec["rejected"]
        if want["missing"]:  # a late or dropped update: the round waited out its deadline, no longer
            assert TIMEOUT <= rec["seconds"] < TIMEOUT + 2.5, (t, rec["seconds"])
        slow = [f.seconds for f in plan.faults if f.round == t and f.kind == "slow"]
        assert rec["seconds"] >= max(slow, default=0), (t, rec["seconds"])
        assert (rec["global_change"] == 0) == want["skipped"], (t, rec["global_change"])

    console = first + out  # each fault is named on the console in the round it shows
    for f in plan.faults:
        says = {"late": f"round {f.round + 1}: late update of client {f.client} (round {f.round}) dropped",
                "drop": f"round {f.round}: client {f.client} missing: no update within federation.round_timeout_s = {TIMEOUT} s",
                "nan_update": f"round {f.round}: update of client {f.client} rejected: "}.get(f.kind)
        assert says is None or says in console, says
    for t in plan.skips:
        assert re.search(rf"round {t}: {MIN_CLIENTS - 1} usable update\(s\), federation.min_clients = {MIN_CLIENTS} \(.*\): round skipped "
                         r"\(federation.on_short_round = skip\)", console), t

    summary = read_summary(run)
    assert summary["rounds_skipped"] == list(plan.skips)
    expected = plan.expected()
    assert {s["client"]: s["rounds_missed"] for s in summary["clients"]} == {
        c: [t for t in range(1, ROUNDS + 1) if c not in expected[t]["clients"]] for c in range(CLIENTS)}
    check_run(run, [1] * CLIENTS)  # every client's ranks held the same global adapter every round
    assert [k for k, _ in complete_checkpoints(str(run))] == [ROUNDS - 1, ROUNDS]
    saved = [p.parent for p in (run / "adapters").rglob("adapter_config.json")]
    assert len(saved) > CLIENTS, saved  # the global adapter and every client's
    for path in saved:
        for key, value in load_saved(path).items():
            assert torch.isfinite(value).all(), f"{path}: {key} is not finite"
    print(f"chaos job: {took:.0f} s (killed + resumed)")


# ------------------------------------------------------------------ the schedule (unit)


@pytest.mark.unit
def test_the_chaos_schedule_is_a_function_of_its_seed():
    assert chaos(3, 22, 4, 4, 2) == chaos(3, 22, 4, 4, 2)
    assert len({chaos(s, 22, 4, 4, 2).faults for s in range(20)}) > 15  # the seed moves the faults


@pytest.mark.unit
@pytest.mark.parametrize("rounds, clients, min_clients", [(22, 4, 2), (30, 3, 1), (24, 6, 4)])
def test_the_chaos_schedule_keeps_its_rules_for_every_seed(rounds, clients, min_clients):
    timeout = 4
    for seed in range(200):
        plan = chaos(seed, rounds, clients, timeout, min_clients)
        K = plan.kill_round
        kinds = [f.kind for f in plan.faults]
        skip_nans = len(plan.skips) * (clients - min_clients + 1)
        assert {k: kinds.count(k) for k in KINDS} == {"slow": 2, "late": 2, "drop": 2, "nan_update": 2 + skip_nans}
        assert 2 <= K <= rounds - 1 and 0 <= plan.kill_client < clients
        assert len({(f.client, f.round) for f in plan.faults}) == len(plan.faults)  # one fault per place
        for f in plan.faults:
            assert f.round not in (1, rounds, K - 1, K), f
            assert 0 <= f.client < clients
            if f.kind == "late":  # past the deadline; its client is clean, and in time, in the next round
                assert f.seconds > timeout and not [g for g in plan.faults if (g.client, g.round) == (f.client, f.round + 1)]
            if f.kind == "slow":
                assert 0 < f.seconds < timeout
        expected = plan.expected()
        for t, want in expected.items():
            out = [f for f in plan.faults if f.round == t and f.kind in UNUSABLE]
            if t in plan.skips:  # one usable update fewer than min_clients: skipped
                assert want["skipped"] and clients - len(out) == min_clients - 1
            else:
                assert len(want["clients"]) >= min_clients and clients - len(out) == len(want["clients"])
        late = sorted((f.client, f.round) for f in plan.faults if f.kind == "late")
        assert sorted(p for w in expected.values() for p in w["late"]) == late


@pytest.mark.unit
def test_the_chaos_schedule_spec_is_what_the_faults_parse():
    from fdlora_cluster.faults import _parse

    plan = chaos(0, 22, 4, 4, 2)
    parsed = _parse(plan.spec([1, 2, 3, 4]))
    assert parsed[-1] == ("kill", {"rank": plan.kill_client + 1, "round": plan.kill_round})
    assert len(parsed) == len(plan.faults) + 1
    for (what, where), f in zip(parsed, plan.faults):
        assert what == ("slow" if f.kind == "late" else f.kind)
        assert where["client"] == f.client and where["round"] == f.round
        assert where.get("seconds", 0) == f.seconds
    assert "kill" not in plan.spec([1, 2, 3, 4], kill=False)


@pytest.mark.unit
@pytest.mark.parametrize("args, says", [((0, 8, 4, 4, 2), "too few"), ((0, 22, 2, 4, 2), "min_clients < clients")])
def test_a_chaos_schedule_that_cannot_be_survived_is_refused(args, says):
    with pytest.raises(ValueError, match=says):
        chaos(*args)
