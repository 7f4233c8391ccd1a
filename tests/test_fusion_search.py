"""The fusion search as a pure function (issue 10, part 2): never worse than personal only,
global only and both at 1 on its rows; objectives; weight groups; the k-fold check."""

import numpy as np
import pytest
import torch

from fdlora_cluster.fusion import (ANCHORS, Objective, RowScores, candidate_cross_entropy, delta_weight, fuse,
                                   most_evaluations, per_adapter, search_evaluations, search_weights, weight_groups)

pytestmark = pytest.mark.unit

MODULES = [f"base_model.model.model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]


def rows_scorer(n_rows=16, seed=0, best=(0.3, 0.4)):
    """Per-row losses that make every anchor look bad next to an interior point: a bowl around
    `best` plus fixed per-row noise, with accuracy = the share of rows whose loss is under 0.5."""
    noise = np.random.default_rng(seed).uniform(0.0, 0.4, size=n_rows)
    calls = []

    def score(w):
        calls.append(np.array(w))
        d = float(((np.asarray(w) - np.asarray(best)) ** 2).sum())
        nll = d + noise
        return RowScores(nll, np.ones(n_rows), (nll < 0.5).astype(float))

    return score, calls


@pytest.mark.parametrize("objective", ["loss", "accuracy", "mix"])
@pytest.mark.parametrize("folds,refit", [(1, False), (4, False), (4, True)])
def test_search_is_never_worse_than_its_anchors(objective, folds, refit):
    score, calls = rows_scorer()
    res = search_weights(score, 1, "NGOpt", 12, (-1.5, 1.5), 0.05, seed=3, objective=objective, folds=folds,
                         refit=refit)
    # the anchors are the first three evaluations, in order
    assert [c["phase"] for c in res.curve[:3]] == ["anchor"] * 3
    assert [tuple(c["weights"][0]) for c in res.curve[:3]] == list(ANCHORS.values())
    anchor_objectives = [c["objective"] for c in res.curve[:3]]
    assert all(res.objective <= a for a in anchor_objectives)
    # and here the search does better than all of them (the bowl's minimum is inside the box)
    assert res.objective < min(anchor_objectives)
    # the recorded objective is the chosen weights' objective, recomputed from scratch, its
    # regulariser pulling towards the best anchor
    obj = Objective(objective, 0.05, 0.5)
    best_anchor = min(res.curve[:3], key=lambda c: c["objective"] - 0.05 * np.abs(np.array(c["weights"]) - res.center).mean())
    np.testing.assert_array_equal(res.center, best_anchor["weights"])
    assert obj(score(res.weights), np.arange(16), res.weights, res.center) == pytest.approx(res.objective)
    assert res.data_objective == pytest.approx(obj.data(score(res.weights), np.arange(16)))
    assert res.left_anchors and res.chosen_by == "search"
    # refit: one more search per fold; pool: the folds choose among the search's scores, no evaluation more
    searches = {c["phase"] for c in res.curve}
    assert searches == ({"anchor", "search"} | ({f"fold {j}" for j in range(folds)} if refit else set()))
    assert len(res.curve) == 3 + (1 + (folds if refit else 0)) * (12 - 3)
    assert res.evaluations == len(calls) - 2  # the two recomputations above are not the search's
    assert res.evaluations <= most_evaluations(12, 1, folds, refit) == len(res.curve)
    if folds > 1:
        assert len(res.cv["folds"]) == folds and res.cv["passed"]


def test_search_keeps_an_anchor_when_every_other_point_is_worse():
    # the loss is lowest exactly at the personal-only anchor: nothing in the box beats it
    def score(w):
        (a, b), = w
        return RowScores(np.array([(a - 1.0) ** 2 + b ** 2 + 0.1]), np.array([1.0]))

    res = search_weights(score, 1, "NGOpt", 15, (-1.5, 1.5), 0.0, seed=0)
    np.testing.assert_array_equal(res.weights, [[1.0, 0.0]])
    assert res.objective == pytest.approx(0.1)


@pytest.mark.parametrize("refit", [False, True])
def test_kfold_falls_back_to_the_best_anchor_when_the_search_fits_noise(refit):
    # Every row's loss depends on w through its own random direction: a point that is good on
    # some rows is bad on others, so what the search gains on k-1 folds it loses on the held-out one.
    rng = np.random.default_rng(1)
    n = 12
    dirs = rng.normal(size=(n, 2)) * 3.0

    def score(w):
        (a, b), = w
        x = np.array([a - 1.0, b])  # all rows agree only at the personal anchor
        return RowScores(0.5 + (dirs @ x) + 2.0 * (x ** 2).sum(), np.ones(n))

    res = search_weights(score, 1, "NGOpt", 15, (-1.5, 1.5), 0.0, seed=0, folds=4, refit=refit)
    assert res.cv is not None and len(res.cv["folds"]) == 4
    assert res.cv["search"] > res.cv["anchor"]
    assert res.chosen_by == "anchor personal"
    np.testing.assert_array_equal(res.weights, [[1.0, 0.0]])
    # a real decision: on all rows the search had found something better than the anchor
    assert min(c["objective"] for c in res.curve if c["phase"] == "search") < res.objective
    assert all(res.objective <= c["objective"] for c in res.curve if c["phase"] == "anchor")
    # without the k-fold check, and with no paired margin asked, the search's fitted point is taken
    assert search_weights(score, 1, "NGOpt", 15, (-1.5, 1.5), 0.0, seed=0, margin=0.0).chosen_by == "search"


def test_accuracy_objective_breaks_ties_by_loss_and_never_overturns_a_row():
    obj = Objective("accuracy")
    idx = np.arange(4)
    w = np.zeros((1, 2))
    right3_high_loss = RowScores(np.array([5.0] * 4), np.ones(4), np.array([1, 1, 1, 0.0]))
    right2_low_loss = RowScores(np.array([0.01] * 4), np.ones(4), np.array([1, 1, 0, 0.0]))
    right2_lower_loss = RowScores(np.array([0.001] * 4), np.ones(4), np.array([1, 1, 0, 0.0]))
    assert obj(right3_high_loss, idx, w) < obj(right2_low_loss, idx, w)  # one more row right wins
    assert obj(right2_lower_loss, idx, w) < obj(right2_low_loss, idx, w)  # same rows right: lower loss wins
    with pytest.raises(ValueError, match="fusion.objective = 'accuracy' needs accuracy"):
        obj(RowScores(np.ones(4), np.ones(4)), idx, w)


def test_weight_groups_by_adapter_layer_and_module():
    assert weight_groups(MODULES, "adapter") == {"adapter": MODULES}
    layers = weight_groups(MODULES, "layer")
    assert list(layers) == ["layer 0", "layer 1"] and all(len(v) == 2 for v in layers.values())
    assert weight_groups(MODULES, "module") == {m: [m] for m in MODULES}
    with pytest.raises(ValueError, match="fusion.granularity = 'row'; expected one of adapter, layer, module"):
        weight_groups(MODULES, "row")


def test_per_layer_exact_merge_is_the_per_layer_weighted_sum():
    g = torch.Generator().manual_seed(0)
    p = {f"{m}.lora_A.weight": torch.randn(2, 6, generator=g) for m in MODULES}
    p |= {f"{m}.lora_B.weight": torch.randn(5, 2, generator=g) for m in MODULES}
    q = {k: torch.randn(v.shape, generator=g) for k, v in p.items()}
    groups = weight_groups(MODULES, "layer")
    w = np.array([[0.9, 0.2], [-0.3, 1.1]])
    f = fuse(p, q, *per_adapter(w, groups), 2.0, 0.5, "exact")
    for i, m in enumerate(MODULES):
        layer = int(m.split(".layers.")[1].split(".")[0])
        k = f"{m}.lora_A.weight"
        want = w[layer, 0] * delta_weight(p, 2.0, k) + w[layer, 1] * delta_weight(q, 0.5, k)
        torch.testing.assert_close(delta_weight(f, 1.0, k), want, rtol=1e-5, atol=1e-6)


def test_search_refuses_a_budget_below_its_anchors():
    score, _ = rows_scorer()
    with pytest.raises(ValueError, match=r"fusion.budget = 2 must be >= 3"):
        search_weights(score, 1, "NGOpt", 2, (-1.5, 1.5), 0.0, seed=0)


# ---------------------------------------------------------------- the objective deployment scores (issue 18, item 3)


def test_candidate_objective_is_the_cross_entropy_over_the_candidates():
    # 3 rows, 3 candidates; row 2's response is no candidate: it counts its token loss
    cand_nll = np.array([[0.1, 2.0, 3.0], [1.0, 1.0, 5.0], [0.5, 0.2, 0.9]])
    label = np.array([0, 1, -1])
    s = RowScores(np.array([0.1, 1.0, 6.0]), np.array([1.0, 1.0, 3.0]), np.array([1.0, 0.0, 0.0]), cand_nll, label)
    p = np.exp(-cand_nll) / np.exp(-cand_nll).sum(1, keepdims=True)
    want = [-np.log(p[0, 0]), -np.log(p[1, 1]), 6.0 / 3.0]
    obj = Objective("candidates", l1=0.1)
    np.testing.assert_allclose(obj.rows(s, np.arange(3)), want)
    np.testing.assert_allclose(candidate_cross_entropy(cand_nll[:2], label[:2]), want[:2])
    # the regulariser pulls towards the centre it is given (the best anchor), not towards 0
    w = np.array([[1.0, 0.5]])
    assert obj(s, np.arange(3), w, np.array([[1.0, 0.0]])) == pytest.approx(np.mean(want) + 0.1 * 0.25)
    # a tie between two candidates is log 2, whatever the loss of the tokens
    assert candidate_cross_entropy(np.array([[4.0, 4.0]]), np.array([0]))[0] == pytest.approx(np.log(2))


def anchor_scorer(personal, glob, both):
    """Per-row candidate cross-entropies given for each anchor (two candidates, the own one first);
    any other weights score as the worst anchor on every row."""
    def ce_rows(target):  # cand_nll of the other candidate so that -log softmax(-nll)[0] = target
        other = -np.log(np.expm1(np.asarray(target, dtype=np.float64)))
        return np.stack([np.zeros(len(target)), other], axis=1)

    table = {(1.0, 0.0): personal, (0.0, 1.0): glob, (1.0, 1.0): both}
    worst = np.maximum.reduce([np.asarray(v) for v in table.values()]) + 0.5

    def score(w):
        key = tuple(float(x) for x in np.asarray(w)[0])
        ce = np.asarray(table.get(key, worst), dtype=np.float64)
        n = len(ce)
        return RowScores(np.ones(n), np.ones(n), np.ones(n), ce_rows(ce), np.zeros(n, dtype=int))

    return score


@pytest.mark.parametrize("folds,refit", [(1, False), (4, False), (4, True)])
def test_a_wrong_anchor_lucky_on_a_few_rows_is_caught(folds, refit):
    """The RESULTS case: global only looks best on the search rows thanks to one row, and is worse
    than personal on all the others. Leaving personal only needs a paired margin (folds 1) or an
    out-of-fold win (folds 4); neither holds, so personal only is kept."""
    personal = [1.0] * 8
    glob = [0.01] + [1.05] * 7  # mean 0.92: the best anchor on all rows, by one row
    score = anchor_scorer(personal, glob, [2.0] * 8)
    res = search_weights(score, 1, "NGOpt", 6, (-1.5, 1.5), 0.0, seed=0, folds=folds, refit=refit)
    obj = Objective("candidates")
    assert obj.data(score(np.array([[0.0, 1.0]])), np.arange(8)) < obj.data(score(np.array([[1.0, 0.0]])), np.arange(8))
    assert res.chosen_by == "anchor personal" and not res.left_anchors
    np.testing.assert_array_equal(res.weights, [[1.0, 0.0]])
    if folds > 1:
        assert res.cv["passed"] == [] and res.cv["anchor"] > res.cv["personal"]
    # with margin 0 and no folds the lucky anchor would have been taken: the check is what catches it
    assert search_weights(score, 1, "NGOpt", 6, (-1.5, 1.5), 0.0, seed=0, margin=0.0).chosen_by == "search"


def test_an_anchor_better_on_every_row_is_taken():
    score = anchor_scorer([1.0] * 8, [0.5, 0.6, 0.4, 0.5, 0.55, 0.45, 0.5, 0.6], [2.0] * 8)
    res = search_weights(score, 1, "NGOpt", 6, (-1.5, 1.5), 0.0, seed=0, folds=4)
    assert res.chosen_by == "anchor global" and "anchor" in res.cv["passed"]
    np.testing.assert_array_equal(res.weights, [[0.0, 1.0]])


def test_the_search_budget_grows_with_the_weights_searched_and_progress_is_reported():
    assert search_evaluations(20, 1) == 17  # one pair: budget - 3 anchors, as before
    assert search_evaluations(20, 30) == 120  # 60 weights: 2 asks per weight
    score, calls = rows_scorer()
    seen = []
    res = search_weights(lambda w: score(w[:1]), 6, "NGOpt", 5, (-1.5, 1.5), 0.0, seed=0,
                         progress=lambda done, best: seen.append((done, best)))
    assert len(res.curve) == 3 + 24
    assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1][0] == res.evaluations == len(calls)
    assert all(b2 <= b1 for (_, b1), (_, b2) in zip(seen, seen[1:]))  # best so far never rises
