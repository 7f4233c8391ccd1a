"""global.combine's math (strategies/combine.py) against dense references on small shapes."""

import pytest
import torch

from fdlora_cluster.config import ConfigError, load_config
from fdlora_cluster.state import Layout
from fdlora_cluster.strategies import make_strategy
from fdlora_cluster.strategies.combine import (FactorsGap, ProductOuter, ProductSum, dense, first, held_energy,
                                               in_svd_form, mean_of_products, pad, product_distance, rank_of,
                                               svd_of_sum, svd_of_sums, truncate)

from conftest import CONFIGS

pytestmark = pytest.mark.unit

M, N = 12, 10  # a module's out x in features
MODS = ("layer.0.q_proj", "layer.0.v_proj")


def lora(r: int, seed: int, dtype=torch.float64) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in MODS:
        out[f"{m}.lora_A.weight"] = torch.randn(r, N, generator=g, dtype=dtype)
        out[f"{m}.lora_B.weight"] = torch.randn(M, r, generator=g, dtype=dtype)
    return out


def close(a: dict, b: dict, tol=1e-9) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=tol), (k, float((a[k] - b[k]).abs().max()))


def test_svd_of_sum_is_the_dense_weighted_sum_of_products():
    states, p = [lora(2, 1), lora(4, 2), lora(3, 3)], [0.5, 0.3, 0.2]
    for m in MODS:
        u, s, v = svd_of_sum([(w, st[f"{m}.lora_B.weight"], st[f"{m}.lora_A.weight"]) for w, st in zip(p, states)])
        want = sum(w * dense(st)[m] for w, st in zip(p, states))
        assert torch.allclose(u @ torch.diag(s) @ v.T, want, atol=1e-10)
        assert torch.all(s[:-1] >= s[1:])  # largest first


def test_product_distance_is_the_dense_distance_of_the_products():
    """The server's global_change under product: adapters of different ranks and bases, compared
    by their products B A, module by module."""
    x, y = lora(3, 4), lora(5, 5)
    want = sum(float(((dense(x)[m] - dense(y)[m]) ** 2).sum()) for m in MODS) ** 0.5
    assert product_distance(x, y) == pytest.approx(want, rel=1e-10)
    assert product_distance(x, x) == pytest.approx(0.0, abs=1e-10)


def test_svd_of_sums_batches_by_shape_and_forms_only_the_kept_columns():
    """Modules of two stack shapes (3 and 5 columns, 6 x 7 and 12 x 10) in one call: each result is
    its own sum's SVD, `keep` columns of U and V, all of S; float32 factors are worked in float32."""
    g = torch.Generator().manual_seed(11)
    shapes = [(12, 10, 3), (6, 7, 5), (12, 10, 3), (6, 7, 5), (12, 10, 3)]
    sums = [[(0.5, torch.randn(m, q - 1, generator=g, dtype=torch.float64), torch.randn(q - 1, n, generator=g, dtype=torch.float64)),
             (-2.0, torch.randn(m, 1, generator=g, dtype=torch.float64), torch.randn(1, n, generator=g, dtype=torch.float64))]
            for m, n, q in shapes]
    for (m, n, q), terms, (u, s, v) in zip(shapes, sums, svd_of_sums(sums, keep=2)):
        want = sum(c * b @ a for c, b, a in terms)
        assert u.shape == (m, 2) and v.shape == (n, 2) and s.shape == (q,)
        assert torch.allclose(s, torch.linalg.svdvals(want)[:q], atol=1e-10)
        assert torch.allclose(u @ torch.diag(s[:2]) @ v.T, _best(want, 2), atol=1e-10)  # Eckart-Young
    low = [[(c, b.float(), a.float()) for c, b, a in terms] for terms in sums]
    for terms, (u, s, v) in zip(sums, svd_of_sums(low)):
        want = sum(c * b @ a for c, b, a in terms)
        assert u.dtype == torch.float32
        assert torch.allclose((u @ torch.diag(s) @ v.T).double(), want, atol=1e-5 * float(want.abs().max()))


def _best(x: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(x)
    return u[:, :r] @ torch.diag(s[:r]) @ vh[:r]


def test_a_float32_product_step_is_the_float64_one_to_float32_precision():
    """The server's adapters are float32: ProductOuter then works in float32 (`work_dtype`), and stays
    within 1e-5 (relative) of the same step in float64, with the same energies."""
    ranks, weights = [2, 4, 4], [1.0, 2.0, 3.0]
    g64 = in_svd_form(lora(4, 60), rank=4)
    updates = [{k: v + 0.1 * lora(r, 61 + i)[k] for k, v in truncate(g64, r).items()} for i, r in enumerate(ranks)]
    outs = {}
    for dt in (torch.float64, torch.float32):
        g = {k: v.to(dt) for k, v in g64.items()}
        sent = {k: truncate(g, r) for k, r in enumerate(ranks)}
        ups = [{k: v.to(dt) for k, v in u.items()} for u in updates]
        outs[dt] = ProductOuter("nesterov", 0.7, 0.9, rank=3).step(g, sent, sum_of(ups, weights))
    (new64, info64), (new32, info32) = outs[torch.float64], outs[torch.float32]
    assert all(v.dtype == torch.float32 for v in new32.values())
    for m in MODS:
        ref = dense(new64)[m]
        assert float((dense(new32)[m] - ref).norm() / ref.norm()) < 1e-5
    assert info32["cut"] == pytest.approx(info64["cut"], rel=1e-4) and info32["lost"] == pytest.approx(info64["lost"], rel=1e-3)


def test_truncate_is_the_best_rank_r_part_and_reports_what_it_cannot_hold():
    g = in_svd_form(lora(6, 4), rank=6)
    close(dense(g), dense(lora(6, 4)))  # the same product, as B = U S, A = V^T
    t = truncate(g, 3)
    assert rank_of(t) == 3
    for m in MODS:
        full = dense(g)[m]
        u, s, vh = torch.linalg.svd(full)
        best = u[:, :3] @ torch.diag(s[:3]) @ vh[:3]
        assert torch.allclose(dense(t)[m], best, atol=1e-9)  # Eckart-Young: the best rank-3 approximation
    s2 = [torch.linalg.svdvals(dense(g)[m]) ** 2 for m in MODS]
    want = sum(float(x[3:].sum()) for x in s2) / sum(float(x.sum()) for x in s2)
    assert held_energy(g, 3) == pytest.approx(want, rel=1e-9)
    assert held_energy(g, 6) == pytest.approx(0.0, abs=1e-12)


def test_a_client_above_the_global_rank_gets_zero_b_and_orthonormal_a_rows():
    g = in_svd_form(lora(2, 5), rank=2)
    t = truncate(g, 5, seed=3)
    assert rank_of(t) == 5
    close(dense(t), dense(g))  # nothing added to the product
    for m in MODS:
        a = t[f"{m}.lora_A.weight"]
        assert torch.allclose(a @ a.T, torch.eye(5, dtype=a.dtype), atol=1e-10)  # trainable, not degenerate
    close(truncate(g, 5, seed=3), t, tol=0)  # seeded: every resume gets the same rows


def test_mean_of_products_is_the_dense_mean():
    states = [lora(3, 50), lora(3, 51)]
    g = mean_of_products(states, [0.5, 0.5], rank=6)
    for m in MODS:
        assert torch.allclose(dense(g)[m], 0.5 * (dense(states[0])[m] + dense(states[1])[m]), atol=1e-10)
    assert rank_of(mean_of_products(states, [0.5, 0.5], rank=2)) == 2


def test_zero_padding_is_hetlora():
    s = lora(2, 6)
    p = pad(s, 4)
    assert rank_of(p) == 4
    close(dense(p), dense(s))
    close(first(p, 2), s, tol=0)


def sum_of(updates, weights):
    total = ProductSum(range(len(updates)))
    for i, (u, w) in enumerate(zip(updates, weights)):
        total.add(i, u, w)
    total.close()
    return total


def dense_reference(g, sent, updates, weights, name, lr, mu, rounds_buf=None):
    """torch.optim.SGD on the dense product, as DiLoCo runs it: the parameter is dW = B A."""
    out, bufs = {}, {}
    p = [w / sum(weights) for w in weights]
    for m in MODS:
        param = torch.nn.Parameter(dense(g)[m].clone())
        opt = torch.optim.SGD([param], lr=lr, momentum=mu if name == "nesterov" else 0.0, nesterov=name == "nesterov")
        if rounds_buf:
            opt.state[param]["momentum_buffer"] = rounds_buf[m].clone()
        param.grad = sum(pk * (dense(sent[k])[m] - dense(u)[m]) for k, (pk, u) in enumerate(zip(p, updates)))
        opt.step()
        out[m] = param.detach()
        if name == "nesterov":
            bufs[m] = opt.state[param]["momentum_buffer"]
    return out, bufs


@pytest.mark.parametrize("name", ["sgd", "nesterov"])
@pytest.mark.parametrize("held", ["slices", "other"])
def test_product_outer_step_equals_a_dense_reference_over_two_rounds(name, held):
    """Clients of ranks 2, 3 and 5 around a global adapter of rank 5 (big enough that no cut drops
    anything): two outer steps, sgd and Nesterov, equal torch.optim.SGD on the dense products.
    `slices`: each client held the first r_k components (folded into one term); `other`: what
    they held differs a little (as a compressed message would), the general sum."""
    ranks, weights, lr, mu = [2, 3, 5], [3.0, 1.0, 2.0], 0.7, 0.9
    outer = ProductOuter(name, lr, mu, rank=M)  # rank >= min(m, n): exact
    g = in_svd_form(lora(5, 7), rank=M)
    ref_g, ref_buf = dense(g), None
    for t in range(2):
        sent = {k: truncate(g, r) for k, r in enumerate(ranks)}
        if held == "other":
            sent = {k: {key: v + 1e-3 * lora(r, 99 + k)[key] for key, v in st.items()} for k, (r, st) in
                    enumerate(zip(ranks, sent.values()))}
        updates = [{key: v + 0.1 * lora(r, 10 * t + k)[key] for key, v in sent[k].items()} for k, r in enumerate(ranks)]
        ref_g, ref_buf = dense_reference(g, sent, updates, weights, name, lr, mu, ref_buf)
        g, info = outer.step(g, sent, sum_of(updates, weights))
        for m in MODS:
            assert torch.allclose(dense(g)[m], ref_g[m], atol=1e-9), (t, m)
        assert info["cut"] == pytest.approx(0.0, abs=1e-20) and info["lost"] == pytest.approx(0.0, abs=1e-20)


def test_product_sgd_lr1_is_the_exact_average_of_products_plus_what_truncation_dropped():
    ranks, weights = [2, 4], [1.0, 3.0]
    g = in_svd_form(lora(4, 8), rank=4)
    sent = {k: truncate(g, r) for k, r in enumerate(ranks)}
    updates = [lora(r, 20 + k) for k, r in enumerate(ranks)]
    new, info = ProductOuter("sgd", 1.0, rank=M).step(g, sent, sum_of(updates, weights))
    p = [0.25, 0.75]
    for m in MODS:
        exact = sum(pk * dense(u)[m] for pk, u in zip(p, updates))
        kept = sum(pk * (dense(g)[m] - dense(sent[k])[m]) for k, pk in enumerate(p))
        assert torch.allclose(dense(new)[m], exact + kept, atol=1e-10)
    assert info["cut"] == pytest.approx(0.0, abs=1e-20)


def test_a_cut_global_adapter_keeps_what_it_drops_for_the_next_round():
    """rank 2 global, two rank-2 clients: the average of their products has rank 4; the cut keeps
    the top 2 and the residual holds the rest, so global + residual is still the exact average."""
    weights = [1.0, 1.0]
    g = in_svd_form(lora(2, 9), rank=2)
    sent = {0: g, 1: g}
    updates = [lora(2, 30), lora(2, 31)]
    outer = ProductOuter("sgd", 1.0, rank=2)
    new, info = outer.step(g, sent, sum_of(updates, weights))
    assert rank_of(new) == 2 and 0 < info["cut"] < 1 and info["lost"] == pytest.approx(0.0, abs=1e-20)
    for m in MODS:
        exact = 0.5 * (dense(updates[0])[m] + dense(updates[1])[m])
        assert torch.allclose(dense(new)[m] + dense(outer.residual)[m], exact, atol=1e-10)
    state = outer.state_dict()
    again = ProductOuter("sgd", 1.0, rank=2)
    again.load_state_dict(state)
    close(again.residual, outer.residual, tol=0)


def test_factors_gap_measures_the_cross_term():
    updates, weights = [lora(3, 40), lora(3, 41)], [2.0, 1.0]
    gap = FactorsGap(sketch=64)
    p = [2 / 3, 1 / 3]
    mean = {k: sum(pk * u[k] for pk, u in zip(p, updates)) for k in updates[0]}
    for u, w in zip(updates, weights):
        gap.add(u, w)
    num = den = 0.0
    for m in MODS:
        exact = sum(pk * dense(u)[m] for pk, u in zip(p, updates))
        num += float(((dense(mean)[m] - exact) ** 2).sum())
        den += float((exact ** 2).sum())
    assert gap.relative(mean) == pytest.approx((num / den) ** 0.5, rel=1e-9)  # n = 10 <= 64: exact
    same = FactorsGap()
    for w in weights:
        same.add(updates[0], w)
    assert same.relative(updates[0]) == pytest.approx(0.0, abs=1e-12)  # equal clients: no gap
    low = FactorsGap(sketch=4)  # n = 10 > 4: the Gaussian sketch, in float32 for float32 updates
    high = FactorsGap(sketch=4)
    for u, w in zip(updates, weights):
        low.add({k: v.float() for k, v in u.items()}, w)
        high.add(u, w)
    assert all(a.dtype == torch.float64 for a in low.acc.values())  # summed in float64
    assert low.relative(mean) == pytest.approx(high.relative(mean), rel=1e-5)
    # a gap kept from round to round (the server's) measures each round as a fresh one would
    low.new_round()
    fresh = FactorsGap(sketch=4)
    for u, w in zip(reversed(updates), weights):
        low.add(u, w)
        fresh.add(u, w)
    assert low.relative(updates[0]) == fresh.relative(updates[0])


def test_layouts_of_clients_of_different_ranks_differ_only_in_rank():
    a, b = Layout.of(lora(4, 1, torch.float32)), Layout.of(lora(8, 1, torch.float32))
    assert a.rank_difference(b) is None
    other = lora(4, 1, torch.float32)
    other["layer.0.q_proj.lora_B.weight"] = torch.zeros(M + 1, 4)
    assert "layer.0.q_proj.lora_B.weight" in Layout.of(other).rank_difference(a)


# ---------------------------------------------------------------- config and weights

HET = ["client_overrides.1.lora.global.r=8"]


def test_a_client_of_its_own_rank_keeps_the_scaling():
    cfg = load_config(CONFIGS / "demo.yaml", HET + ["global.combine=product"])
    assert cfg.global_ranks() == [4, 8] and cfg.global_init_client() == 1
    g0, g1 = cfg.global_adapter(0), cfg.global_adapter(1)
    assert g1.alpha / g1.r == g0.alpha / g0.r and g1.target_modules == g0.target_modules
    assert load_config(CONFIGS / "demo.yaml", HET + ["client_overrides.1.lora.global.alpha=16"]).global_adapter(1).alpha == 16
    assert load_config(CONFIGS / "demo.yaml", HET + ["federation.compress=int8"]).federation.compress == "int8"  # a stream per client


@pytest.mark.parametrize("sets, match", [
    (HET + ["client_overrides.1.lora.global.alpha=3"], r"client_overrides\.1\.lora\.global: alpha / r = 3 / 8 .* set it to 16"),
    (["client_overrides.1.lora.global.alpha=3"], r"client_overrides\.1\.lora\.global\.alpha without r"),
    (HET + ["global.combine=frozen_a"], r"global ranks differ \(\[4, 8\].*global\.combine = frozen_a"),
    (HET + ["global.init=personal_mean"], r"global ranks differ.*global\.init = personal_mean"),
    (["global.combine=product", "outer.optimizer=adam"], r"outer\.optimizer = adam.*use sgd or nesterov"),
    (["global.combine=frozen_a", "global.init=personal_mean"], r"frozen_a keeps .*use global\.init: seed"),
    (["global.combine=products"], r"global\.combine = 'products' is not valid; expected one of 'factors', 'product', 'frozen_a'"),
    (["global.aggregation=work"], r"global\.aggregation = 'work' is not valid; expected one of 'samples', 'uniform', 'steps'"),
    (HET + ["personal.sync_every=1"], r"same r, alpha and target_modules \(now r 4 vs 8"),
])
def test_combine_and_rank_errors_name_the_key(sets, match):
    with pytest.raises(ConfigError, match=match):
        load_config(CONFIGS / "demo.yaml", sets)


def test_steps_weighs_by_the_rows_a_client_trained_on():
    cfg = load_config(CONFIGS / "demo.yaml", ["global.aggregation=steps", "client_overrides.1.inner_steps=6",
                                              "train.inner_steps=3", "train.micro_batch_size=2"])
    s = make_strategy(cfg)
    assert cfg.local_rows(0) == 3 * 2 * 1 * 2 and cfg.local_rows(1) == 6 * 2 * 1 * 2  # K x micro x accum x ranks
    assert s.weight(100.0, 0) == 12.0 and s.weight(10.0, 1) == 24.0
    assert make_strategy(load_config(CONFIGS / "demo.yaml")).weight(100.0, 1) == 100.0  # samples, the default


def test_frozen_a_takes_the_a_matrices_out_of_training():
    from fdlora_cluster.model import adapter_params, add_adapters, build_base, freeze_a

    cfg = load_config(CONFIGS / "demo.yaml")
    model = add_adapters(build_base(cfg.model.model_copy(update={"pretrained": None}), 0, vocab_size=300),
                         {"personal": cfg.lora.personal, "global": cfg.lora.global_}, 0)
    freeze_a(model, "global")
    glob, personal = adapter_params(model, "global"), adapter_params(model, "personal")
    assert all(p.requires_grad == k.endswith(".lora_B.weight") for k, p in glob.items())
    assert all(p.requires_grad for p in personal.values())
