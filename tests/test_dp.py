"""Client-level differential privacy on the global adapter (`privacy:`, fdlora_cluster/dp.py):
the clip is exact, the noise is seeded per round, epsilon is dp-accounting's own for the rounds
released, bad privacy configs name the key; and one real fdlora job (2 clients x 2 ranks) whose
updates on the wire are clipped, whose records and summary carry the accountant's epsilon, whose
personal adapter and fusion stay outside the mechanism, and which a resume ends bit-identical
(the noise is a function of the seed and the round)."""

import json
import math

import dp_accounting
import pytest
import torch

from fdlora_cluster import dp
from fdlora_cluster.config import ConfigError, check_environment, load_config
from fdlora_cluster.state import GLOBAL, PERSONAL, l2_distance
from fdlora_cluster.transport import HEADER

from conftest import CONFIGS, TINY, assert_ok, read_metrics, read_summary, run_ranks, tapped_run, write_config
from test_jobs import load_saved
from test_privacy import tensors_bytes
from test_resume import KILLED_IN, assert_same_end, copy_up_to


def accountants_epsilon(sigma: float, rounds: int, delta: float, accountant: str) -> float:
    """dp-accounting called directly: `rounds` Gaussian mechanisms of noise multiplier sigma."""
    acc = dp_accounting.rdp.RdpAccountant() if accountant == "rdp" else dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(sigma), rounds)
    return acc.get_epsilon(delta)


# ------------------------------------------------------------------ unit


def state(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.lora_A": torch.randn(4, 8, generator=g) * scale, "a.lora_B": torch.randn(8, 4, generator=g) * scale}


@pytest.mark.unit
def test_clip_brings_a_large_change_to_exactly_clip_norm_and_leaves_a_small_one_alone():
    ref = state(0)
    far = {k: v + d for (k, v), d in zip(ref.items(), state(1, 3.0).values())}
    norm = l2_distance(far, ref)
    assert norm > 1.0
    clipped, before = dp.clip(far, ref, 1.0)
    assert before == pytest.approx(norm, rel=1e-12)
    assert l2_distance(clipped, ref) == pytest.approx(1.0, rel=1e-6)
    # the direction is kept: the clipped change is the change scaled
    for k in ref:
        assert torch.allclose(clipped[k] - ref[k], (far[k] - ref[k]) / norm, atol=1e-6)
    near = {k: v + 1e-3 * d for (k, v), d in zip(ref.items(), state(2).values())}
    same, small = dp.clip(near, ref, 1.0)
    assert small < 1.0 and same is near  # below the bound: untouched, bit for bit


@pytest.mark.unit
def test_noise_is_a_function_of_seed_and_round_with_the_configured_std():
    def noised(seed, round):
        total = {"x": torch.zeros(200_000, dtype=torch.float64)}
        dp.add_noise(total, 0.5, seed, round)
        return total["x"]

    a = noised(0, 1)
    assert torch.equal(a, noised(0, 1))
    assert not torch.equal(a, noised(0, 2)) and not torch.equal(a, noised(1, 1))
    assert float(a.std()) == pytest.approx(0.5, rel=0.01) and abs(float(a.mean())) < 0.01


@pytest.mark.unit
@pytest.mark.parametrize("accountant, sigma, rounds", [("rdp", 1.0, 1), ("rdp", 1.3, 3), ("rdp", 4.0, 20),
                                                       ("pld", 1.3, 3)])  # pld: seconds a call
def test_epsilon_is_the_accountants_own(accountant, sigma, rounds):
    eps = dp.epsilon(sigma, rounds, 1e-5, accountant)
    assert eps == accountants_epsilon(sigma, rounds, 1e-5, accountant)
    assert dp.epsilon(sigma, 0, 1e-5, accountant) == 0.0
    assert dp.epsilon(sigma, rounds + 1, 1e-5, accountant) > eps  # more rounds, more loss


@pytest.mark.unit
def test_noise_for_epsilon_meets_the_target_and_the_budget_stops_before_passing_it():
    sigma = dp.noise_for_epsilon(4.0, 10, 1e-5)
    assert 3.99 < accountants_epsilon(sigma, 10, 1e-5, "rdp") <= 4.0
    budget = dp.PrivacyBudget(sigma, 1e-5, "rdp", target_epsilon=4.0)
    spent = [budget.spend() for _ in range(10)]
    assert spent == [accountants_epsilon(sigma, t, 1e-5, "rdp") for t in range(1, 11)]
    with pytest.raises(dp.BudgetExceeded, match=r"round 11 would bring epsilon to .* > privacy.target_epsilon = 4"):
        budget.spend()
    assert budget.released == 10


PRIVACY = {"clip_norm": 0.05, "noise_multiplier": 1.0, "delta": 1e-4}


def load(**sets):
    over = [f"{k}={json.dumps(v)}" for k, v in {"global.aggregation": "uniform", "privacy": PRIVACY, **sets}.items()]
    cfg = load_config(CONFIGS / "demo.yaml", over)
    check_environment(cfg, "demo.yaml", roles=("server",))
    return cfg


@pytest.mark.unit
@pytest.mark.parametrize("sets, match", [
    ({"privacy": {**PRIVACY, "clip_norm": 0}}, r"privacy.clip_norm = 0.0 must be > 0"),
    ({"privacy": {**PRIVACY, "delta": 1.0}}, r"privacy.delta = 1.0 must be in \(0, 1\)"),
    ({"privacy": {**PRIVACY, "delta": "1e-x"}}, r"privacy.delta = '1e-x' is not valid"),
    ({"privacy": {**PRIVACY, "noise_multiplier": -1}}, r"privacy.noise_multiplier = -1.0 must be > 0"),
    ({"privacy": {**PRIVACY, "accountant": "moments"}}, r"privacy.accountant = 'moments' .* 'rdp', 'pld'"),
    ({"privacy": {"clip_norm": 1.0}}, r"privacy.noise_multiplier .* Field required"),
    ({"privacy": {**PRIVACY, "epsilon": 3}}, r"privacy.epsilon"),
    ({"strategy": "local"}, r"strategy local sends none"),
    ({"global.aggregation": "samples"}, r"set global.aggregation: uniform \(now 'samples'\)"),
    ({"global.init": "personal_mean"}, r"global.init = personal_mean sends each stage-1 personal adapter"),
    ({"federation.compress": "int8"}, r"federation.compress = 'int8' .* no longer bounded by privacy.clip_norm"),
    ({"global.combine": "product"}, r"global.combine = product sums the clients' factor pairs"),
    # demo: 10 rounds at sigma 1 reach epsilon ~16 (rdp, delta 1e-4)
    ({"privacy": {**PRIVACY, "target_epsilon": 5.0}},
     r"train.rounds = 10 with noise_multiplier 1 reach epsilon 1\d.\d+ at delta 0.0001 \(rdp accountant\), over "
     r"privacy.target_epsilon = 5; raise privacy.noise_multiplier or lower train.rounds"),
])
def test_privacy_config_errors_name_the_key(sets, match):
    with pytest.raises(ConfigError, match=match):
        load(**sets)


@pytest.mark.unit
def test_privacy_within_its_target_loads_and_off_by_default():
    assert load_config(CONFIGS / "demo.yaml").privacy is None
    cfg = load(privacy={**PRIVACY, "target_epsilon": 20.0})
    assert cfg.privacy.target_epsilon == 20.0 and cfg.privacy.accountant == "rdp"


@pytest.mark.unit
def test_check_prints_the_epsilon_of_the_configured_rounds_and_refuses_past_the_target(capsys):
    from fdlora_cluster.cli import main

    demo = str(CONFIGS / "demo.yaml")
    sets = ["--set", "global.aggregation=uniform", "--set", "privacy={clip_norm: 0.5, noise_multiplier: 2.02, delta: 1e-5}"]
    assert main(["check", demo, *sets]) == 0
    eps = accountants_epsilon(2.02, 10, 1e-5, "rdp")
    assert f"privacy: clip_norm 0.5, noise multiplier 2.02: epsilon {eps:.4g} at delta 1e-05 after 10 rounds" \
        in capsys.readouterr().out
    assert main(["check", demo, *sets, "--set", "privacy.target_epsilon=7.5"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and f"reach epsilon {eps:.4g}" in err and "privacy.target_epsilon = 7.5" in err, (out, err)


# ------------------------------------------------------------------ one real job


ROUNDS = 3
DP_RUN = {**TINY, "strategy": "fdlora", "train.rounds": ROUNDS, "global.aggregation": "uniform",
          "checkpoint.every": 1, "privacy": {**PRIVACY, "target_epsilon": 30.0}}


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    where = tmp_path_factory.mktemp("dp")
    config = write_config(where, "demo.yaml", **DP_RUN)
    proc = tapped_run(config, 5, where / "inspect")
    assert_ok(proc)
    return where, config


@pytest.mark.job
def test_dp_job_clips_updates_reports_the_accountants_epsilon_and_keeps_personal_and_fusion_outside(dp_run):
    where, config = dp_run
    run, out = where / "run", where / "inspect"
    cfg = load_config(config)
    C, sigma = PRIVACY["clip_norm"], PRIVACY["noise_multiplier"]
    recs = read_metrics(run)

    # epsilon per round and at the end: the accountant's own for the rounds released
    rounds = [r for r in recs if r["event"] == "round"]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))
    for r in rounds:
        assert r["privacy_epsilon"] == accountants_epsilon(sigma, r["round"], 1e-4, "rdp"), r
        assert r["noise_std"] == sigma * C
        assert all(n <= C * (1 + 1e-5) for n in r["update_norms"]), r  # the server saw clipped changes
    summary = read_summary(run)
    assert summary["privacy"]["epsilon"] == accountants_epsilon(sigma, ROUNDS, 1e-4, "rdp")
    assert summary["privacy"]["rounds"] == ROUNDS and summary["privacy"]["delta"] == 1e-4
    assert "client-level DP on the global adapter: epsilon = " in (run / "logs" / "rank-0.log").read_text()

    # each leader's pre-clip norm, and on the wire the change to the round's global: min(norm, C)
    clips = {(r["client"], r["round"]): r for r in recs if r["event"] == "update_clip"}
    assert sorted(clips) == [(c, t) for c in (0, 1) for t in range(1, ROUNDS + 1)]
    assert any(r["clipped"] for r in clips.values()), "no update was over clip_norm: the check proves nothing"
    server = torch.load(out / "payloads-rank-0.pt")
    for client, leader in ((0, 1), (1, 3)):
        # the globals the server sent this client's leader (federation rank client + 1), by round
        sent = {HEADER.unpack(w[:HEADER.size])[1]: s for kind, dest, s, n, w in server
                if kind == "global" and dest == client + 1}
        updates = [(HEADER.unpack(w[:HEADER.size])[1], s) for kind, dest, s, n, w
                   in torch.load(out / f"payloads-rank-{leader}.pt") if kind == "update"]
        assert [t for t, _ in updates] == list(range(1, ROUNDS + 1))
        for t, s in updates:
            norm = clips[(client, t)]["norm"]
            assert l2_distance(s, sent[t]) == pytest.approx(min(norm, C), rel=1e-5), (client, t)

        # outside the mechanism: no message carries a personal value; the client fused its own
        # personal adapter with the (noised) global the server saved, on its own rows
        personal = tensors_bytes(torch.load(out / f"personal-rank-{leader}.pt"))
        assert personal
        for kind, dest, s, n, wire in torch.load(out / f"payloads-rank-{leader}.pt"):
            assert not any(p in wire for p in personal), kind
        held = torch.load(out / f"adapters-rank-{leader}.pt")
        saved = load_saved(run / "adapters" / GLOBAL)
        assert all(torch.equal(held[GLOBAL][k], saved[k]) for k in saved)
        assert not any(torch.equal(held[PERSONAL][k], saved[k]) for k in saved)
    fusion = [r for r in recs if r["event"] == "fusion"]
    assert sorted(r["client"] for r in fusion) == [0, 1]
    assert {a for c in summary["clients"] for a in c["metrics"]} == {PERSONAL, GLOBAL, "fused"}
    assert cfg.privacy.clip_norm == C


@pytest.mark.job
def test_dp_job_resumed_from_round_k_ends_bit_identical(dp_run, tmp_path):
    """The noise of round t is drawn from (seed, t) and the accountant's count is in the
    checkpoint, so the resumed job adds the same noise and reports the same epsilon."""
    where, config = dp_run
    k = KILLED_IN - 1
    run = copy_up_to(where / "run", k, tmp_path / "run")
    resumed = run_ranks(5, ["run", str(config), "--resume", str(run / "checkpoints" / f"round-{k:05d}")])
    assert_ok(resumed)
    assert_same_end(where / "run", run)
    assert read_summary(run)["privacy"] == read_summary(where / "run")["privacy"]
    assert not math.isnan(read_summary(run)["privacy"]["epsilon"])
