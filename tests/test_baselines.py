"""FedDPA and Ditto as pure pieces: the instance-wise weight against a hand computation, the Ditto
proximal gradient and update, what each strategy schedules, and their config checks."""

import math

import numpy as np
import pytest
import torch

from fdlora_cluster.config import ConfigError, load_config
from fdlora_cluster.engine import proximal_term
from fdlora_cluster.evaluation import instance_global_weights, reference_sample
from fdlora_cluster.state import GLOBAL, PERSONAL

from one_rank import OneRank
from conftest import CONFIGS, write_config

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- FedDPA's instance-wise weight


def test_instance_weight_is_max_weight_times_mean_cosine_by_hand():
    # test row 0 = (1, 0); training rows (1, 0), (0, 2), (1, 1), (-3, 0)
    test = torch.tensor([[1.0, 0.0], [0.0, 5.0]])
    train = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [-3.0, 0.0]])
    sample = np.array([[0, 1, 2], [1, 2, 3]])
    w = instance_global_weights(test, train, sample, max_global_weight=0.5)
    # row 0: cos = 1, 0, 1/sqrt(2) -> mean (1 + 0.70711) / 3;  row 1: cos = 1, 1/sqrt(2), 0
    s = 1 / math.sqrt(2)
    assert w.tolist() == pytest.approx([0.5 * (1 + 0 + s) / 3, 0.5 * (1 + s + 0) / 3], abs=1e-12)
    # the scale is a plain factor, and cosine ignores each vector's length
    w1 = instance_global_weights(test * 7, train * 3, sample, max_global_weight=1.0)
    torch.testing.assert_close(w1, 2 * w)


def test_instance_weight_is_high_for_a_row_like_the_training_rows():
    g = torch.Generator().manual_seed(0)
    center = torch.randn(16, generator=g)
    train = center + 0.1 * torch.randn(20, 16, generator=g)
    like, unlike = center + 0.1 * torch.randn(16, generator=g), -center
    sample = reference_sample(20, 2, 5, seed=0, client=0)
    w = instance_global_weights(torch.stack([like, unlike]), train, sample, 0.5)
    assert 0.45 < w[0] <= 0.5 and w[1] < -0.45


def test_reference_sample_is_seeded_distinct_and_bounded():
    a = reference_sample(30, 10, 5, seed=3, client=1)
    assert a.shape == (10, 5) and (a >= 0).all() and (a < 30).all()
    assert all(len(set(row)) == 5 for row in a)
    np.testing.assert_array_equal(a, reference_sample(30, 10, 5, seed=3, client=1))
    assert not np.array_equal(a, reference_sample(30, 10, 5, seed=3, client=2))
    assert reference_sample(3, 4, 5, seed=0, client=0).shape == (4, 3)  # fewer rows than k: all of them


# ---------------------------------------------------------------- Ditto's proximal term


def test_ditto_proximal_gradient_and_sgd_step_match_the_paper():
    g = torch.Generator().manual_seed(1)
    v = {"l.lora_A.weight": torch.randn(4, 6, generator=g), "l.lora_B.weight": torch.randn(6, 4, generator=g)}
    w = {k: torch.randn(t.shape, generator=g) for k, t in v.items()}
    lam, lr = 0.7, 0.1
    params = {k: t.clone().requires_grad_(True) for k, t in v.items()}
    term = proximal_term(params, w, lam)
    assert float(term.detach()) == pytest.approx(lam / 2 * sum(float(((v[k] - w[k]) ** 2).sum()) for k in v), rel=1e-6)
    term.backward()
    for k in v:  # d/dv (lambda/2)||v - w||^2 = lambda (v - w)
        torch.testing.assert_close(params[k].grad, lam * (v[k] - w[k]))
    # Ditto's update with a zero task gradient: v <- v - lr * lambda * (v - w), a pull towards w
    for k in v:
        stepped = v[k] - lr * params[k].grad
        assert float(torch.linalg.norm(stepped - w[k])) == pytest.approx((1 - lr * lam) * float(torch.linalg.norm(v[k] - w[k])), rel=1e-5)


# ---------------------------------------------------------------- what each strategy schedules


def cfg_for(name, tmp_path, **sets):
    return load_config(write_config(tmp_path, f"{name}.yaml", **sets))


# ---------------------------------------------------------------- config checks


@pytest.mark.parametrize("sets, message", [
    ({"strategy": "ditto", "ditto.lambda": -1}, r"ditto.lambda = -1.0 must be >= 0"),
    ({"strategy": "ditto", "lora.personal.r": 8},
     r"strategy ditto pulls .* need the same r, alpha and target_modules \(now r 8 vs 4"),
    ({"strategy": "ditto", "deepspeed.zero_optimization.stage": 3},
     r"strategy ditto adds a proximal term .* client 0 has zero_optimization.stage = 3"),
    ({"feddpa.variant": "X"}, r"feddpa.variant = 'X' is not valid; expected one of 'T', 'F'"),
    ({"feddpa.weighting": "learned"}, r"feddpa.weighting = 'learned' is not valid; expected one of 'dynamic', 'fixed'"),
    ({"feddpa.representation": "first"}, r"feddpa.representation = 'first' is not valid; expected one of 'last', 'mean'"),
    ({"feddpa.local_weight": 1.5}, r"feddpa.local_weight = 1.5 must be in \[0, 1\]"),
    ({"feddpa.max_global_weight": 0}, r"feddpa.max_global_weight = 0.0 must be in \(0, 1\]"),
    ({"feddpa.reference_rows": 0}, r"feddpa.reference_rows = 0 must be >= 1"),
    ({"feddpa.finetune_steps": -2}, r"feddpa.finetune_steps = -2 must be >= 0"),
    ({"feddpa.typo": 1}, r"unknown key 'feddpa.typo'; allowed keys at feddpa: .*local_weight"),
])
def test_feddpa_and_ditto_config_errors(tmp_path, sets, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write_config(tmp_path, "feddpa.yaml", **sets))


def test_shipped_configs_load():
    assert load_config(CONFIGS / "ditto.yaml").ditto.lam == 1.0
    assert load_config(CONFIGS / "feddpa.yaml").feddpa.variant == "T"
    assert load_config(CONFIGS / "feddpa_f.yaml").feddpa.variant == "F"


# ---------------------------------------------------------------- the model-level mechanisms, in process


@pytest.fixture(scope="module")
def one_rank():
    return OneRank(seed=5, scale=0.2)


def test_row_weights_score_each_row_as_the_fixed_scales_would(one_rank):
    from fdlora_cluster.evaluation import evaluate_instance_weighted

    e, d = one_rank, one_rank.data
    rows = d.test[:5]
    w = torch.tensor([0.0, 0.5, 1.0, 0.2, -0.3], dtype=torch.float64)
    batched = evaluate_instance_weighted(e, rows, w, candidates=d.candidates)
    # one row at a time with the per-call scales of ClientEngine.evaluate (scales multiply alpha/r)
    singles = [e.evaluate([r], [PERSONAL, GLOBAL], {PERSONAL: 1 - float(wi), GLOBAL: float(wi)}, d.candidates)
               for r, wi in zip(rows, w)]
    for r, wi, s in zip(rows, w, singles):
        alone = evaluate_instance_weighted(e, [r], wi.reshape(1), candidates=d.candidates)
        assert alone["loss"] == pytest.approx(s["loss"], rel=1e-5) and alone["accuracy"] == s["accuracy"]
    tokens = [len(e.tok.encode(r.response)) + 1 for r in rows]  # response + eos are the scored tokens
    expected = sum(s["loss"] * t for s, t in zip(singles, tokens)) / sum(tokens)
    assert batched["loss"] == pytest.approx(expected, rel=1e-5)
    assert batched["accuracy"] == pytest.approx(sum(s["accuracy"] for s in singles) / len(rows))
    # and the weights matter: all-global differs from all-local
    g = evaluate_instance_weighted(e, rows, torch.ones(5, dtype=torch.float64))
    p = evaluate_instance_weighted(e, rows, torch.zeros(5, dtype=torch.float64))
    assert abs(g["loss"] - p["loss"]) > 1e-4


def test_representations_use_the_local_adapter_and_the_last_prompt_token(one_rank):
    from fdlora_cluster.evaluation import representations
    from fdlora_cluster.model import set_active

    e, rows = one_rank, one_rank.data.test[:3]
    reps = representations(e, rows, PERSONAL, "last")
    set_active(e.model, PERSONAL)
    with torch.no_grad():
        for i, r in enumerate(rows):
            ids = torch.tensor([e.tok.encode(r.prompt)[-e.cfg.train.max_seq_len:]])
            h = e.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
            torch.testing.assert_close(reps[i], h.float(), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(reps, representations(e, rows, GLOBAL, "last"))


def test_frozen_branch_adds_its_output_but_takes_no_gradient(one_rank):
    from fdlora_cluster.engine import frozen_branches
    from fdlora_cluster.model import adapter_params, set_active

    e = one_rank
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    set_active(e.model, [PERSONAL, GLOBAL], {PERSONAL: 0.5, GLOBAL: 0.5})
    hooks = frozen_branches(e.model, [GLOBAL])
    try:
        e.model.zero_grad(set_to_none=True)
        out = e.model(input_ids=ids, labels=ids)
        out.loss.backward()
        frozen_logits = out.logits.detach()
    finally:
        for h in hooks:
            h.remove()
    assert all(p.grad is None for p in adapter_params(e.model, GLOBAL).values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter_params(e.model, PERSONAL).values())
    with torch.no_grad():
        same = e.model(input_ids=ids).logits  # the same mix without the hooks: the forward is unchanged
        set_active(e.model, PERSONAL, {PERSONAL: 0.5})
        alone = e.model(input_ids=ids).logits
    torch.testing.assert_close(frozen_logits, same)
    assert not torch.allclose(frozen_logits, alone)  # the global adapter is really in the forward
