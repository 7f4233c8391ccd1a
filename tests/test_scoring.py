"""Candidate scoring with each row's prompt run once (evaluation.score_batch) against the full rows
it stands for (evaluation.sequence_nll on Example(prompt, candidate)): the summed NLLs, the accuracy
and candidate cross-entropy built on them, FedDPA's per-row weights, and the forward count that
keeps a client's ranks in step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fdlora_cluster.data import Example, encode_example
from fdlora_cluster.evaluation import (Stripes, evaluate_instance_weighted, prefix_groups, score_batch,
                                       row_weighted_branches, sequence_nll)
from fdlora_cluster.fusion import candidate_cross_entropy
from fdlora_cluster.model import set_active
from fdlora_cluster.state import GLOBAL, PERSONAL

from one_rank import OneRank

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def one_rank():
    return OneRank(seed=5, scale=0.2)


def hard_rows(e) -> tuple[list[Example], list[str]]:
    """Rows of different prompt lengths, an empty prompt, and a prompt longer than max_seq_len (48
    in the demo), which is cut from the left by a different amount for each candidate length; and
    candidates of different lengths, one of them empty (the row is its eos alone)."""
    rows = list(e.data.test[:5]) + [Example("", e.data.test[0].response),
                                    Example("a prompt much longer than the demo's max_seq_len " * 2, "x")]
    cands = sorted(set(e.data.candidates) | {"x", "", "a longer one"})
    return rows, cands


def full_rows(e, rows, cands) -> torch.Tensor:
    return sequence_nll(e, [Example(r.prompt, c) for r in rows for c in cands])[0].view(len(rows), len(cands))


def test_prefix_groups_split_at_the_tokens_before_the_first_scored_one(one_rank):
    e = one_rank
    rows, cands = hard_rows(e)
    n = e.cfg.train.max_seq_len
    enc = [encode_example(e.tok, Example(rows[0].prompt, c), n) for c in cands]
    assert prefix_groups(enc) == [(len(e.tok.encode(rows[0].prompt)), list(range(len(cands))))]
    empty = prefix_groups([encode_example(e.tok, Example("", c), n) for c in cands])
    assert all(p == 1 for p, _ in empty) and sorted(j for _, m in empty for j in m) == list(range(len(cands)))
    cut = prefix_groups([encode_example(e.tok, Example(rows[-1].prompt, c), n) for c in cands])
    lengths = {len(e.tok.encode(c)) for c in cands}
    assert len(cut) == len(lengths)  # one group per way the prompt is cut
    assert all(p == n - len(e.tok.encode(cands[m[0]])) - 1 for p, m in cut)


@pytest.mark.parametrize("active,scales", [(GLOBAL, None),
                                           ([PERSONAL, GLOBAL], {PERSONAL: 0.7, GLOBAL: -0.4})])
def test_candidate_nll_is_the_full_rows_nll(one_rank, active, scales):
    e = one_rank
    rows, cands = hard_rows(e)
    set_active(e.model, active, scales)
    nll, toks, shared = score_batch(e, rows, list(range(len(rows))), cands)
    full = full_rows(e, rows, cands)
    assert shared.shape == full.shape
    own_nll, own_toks = sequence_nll(e, rows)  # the rows' own responses, from the same first forward
    torch.testing.assert_close(nll, own_nll, rtol=1e-5, atol=1e-4)
    assert toks.tolist() == own_toks.tolist()
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-4)
    prompted = [i for i, r in enumerate(rows) if r.prompt]  # the empty candidate still scores its eos
    assert (full[prompted, cands.index("")] > 0).all() and full[rows.index(rows[5]), cands.index("")] == 0


def test_accuracy_and_candidate_cross_entropy_are_the_full_rows(one_rank):
    e = one_rank
    rows = list(e.data.test[:12])
    cands, union = e.data.candidates, sorted(set(e.data.candidates) | {"x", "another label"})
    s = e.score_rows(rows, PERSONAL, None, cands)
    set_active(e.model, PERSONAL)
    full = full_rows(e, rows, cands).double().numpy()
    np.testing.assert_allclose(s.cand_nll, full, rtol=1e-5, atol=1e-4)
    label = np.array([cands.index(r.response) for r in rows])
    np.testing.assert_allclose(candidate_cross_entropy(s.cand_nll, label), candidate_cross_entropy(full, label),
                               rtol=1e-5, atol=1e-4)
    right = [float(cands[int(i)] == r.response) for i, r in zip(full.argmin(-1), rows)]
    assert s.correct.tolist() == right
    out = e.evaluate(rows, PERSONAL, None, cands, union)
    set_active(e.model, PERSONAL)
    full_all = full_rows(e, rows, union).numpy()
    assert out["accuracy"] == pytest.approx(np.mean(right))
    assert out["accuracy_all"] == pytest.approx(np.mean([union[int(i)] == r.response
                                                         for i, r in zip(full_all.argmin(-1), rows)]))


def test_feddpa_row_weights_reach_the_prefix_and_the_candidates(one_rank):
    """Per-row weights through both forwards equal the full rows, each weighted as its row."""
    e = one_rank
    rows, cands = hard_rows(e)
    w = torch.linspace(-0.5, 1.0, len(rows), dtype=torch.float64)
    current = {GLOBAL: [None], PERSONAL: [None]}

    def weigh(idx):
        current[GLOBAL][0], current[PERSONAL][0] = w[list(idx)].float(), 1.0 - w[list(idx)].float()

    set_active(e.model, [PERSONAL, GLOBAL])
    with row_weighted_branches(e.model, current):
        shared = score_batch(e, rows, list(range(len(rows))), cands, weigh)[2]
        weigh([i for i in range(len(rows)) for _ in cands])
        full = full_rows(e, rows, cands)
        weigh([0] * len(rows))
        unweighted_row0 = score_batch(e, rows, [0] * len(rows), cands, weigh)[2]
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-4)
    assert (shared - unweighted_row0).abs().max() > 1e-3  # the weights matter
    # and through the engine's path: accuracy among candidates as the full rows pick
    out = evaluate_instance_weighted(e, rows[:5], w[:5], candidates=e.data.candidates, generate=False)
    with row_weighted_branches(e.model, current):
        set_active(e.model, [PERSONAL, GLOBAL])
        weigh([i for i in range(5) for _ in e.data.candidates])
        picks = full_rows(e, rows[:5], e.data.candidates).argmin(-1)
    assert out["accuracy"] == pytest.approx(np.mean([e.data.candidates[int(i)] == r.response
                                                     for i, r in zip(picks, rows[:5])]))


def test_every_batch_runs_the_same_forwards_whatever_its_rows(one_rank):
    """Under ZeRO-3 every forward gathers parameters collectively, so a rank's forward count may not
    depend on its rows: two per batch with candidates (the rows with any other prefix, then the
    candidates' tokens), as many as scoring full rows took; one without."""
    from fdlora_cluster.evaluation import scored_batches

    e = one_rank
    rows, cands = hard_rows(e)
    calls = []
    model = e.engine

    def counting(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return model(*args, **kwargs)

    e.engine = counting
    e.engine.eval = model.eval
    try:
        for subset in (rows[:1], rows[-1:], rows):
            for lists, per_batch in (([cands], 2), ([], 1)):
                calls.clear()
                batches = list(scored_batches(e, subset, Stripes(e, len(subset)), lists))
                assert len(calls) == per_batch * len(batches)
    finally:
        e.engine = model
