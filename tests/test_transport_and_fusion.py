"""Packing into one buffer; the fusion merges' algebra."""

import pytest
import torch

from fdlora_cluster.fusion import delta_weight, fuse
from fdlora_cluster.state import Layout

pytestmark = pytest.mark.unit


def test_layout_packs_into_one_buffer_and_back():
    state = {"x.lora_A.weight": torch.randn(3, 5), "x.lora_B.weight": torch.randn(5, 3).to(torch.bfloat16),
             "n": torch.tensor([7.0], dtype=torch.float64)}
    layout = Layout.of(state)
    buf = layout.pack(state)
    assert buf.dtype == torch.uint8 and buf.numel() == layout.nbytes == 3 * 5 * 4 + 5 * 3 * 2 + 8
    back = layout.unpack(buf)
    for k in state:
        assert torch.equal(back[k], state[k]) and back[k].dtype == state[k].dtype
    with pytest.raises(ValueError, match="does not match the layout"):
        layout.pack({**state, "n": torch.tensor([1.0])})


def two_adapters(r_p=2, r_g=3):
    g = torch.Generator().manual_seed(0)
    p = {"m.lora_A.weight": torch.randn(r_p, 6, generator=g), "m.lora_B.weight": torch.randn(5, r_p, generator=g)}
    q = {"m.lora_A.weight": torch.randn(r_g, 6, generator=g), "m.lora_B.weight": torch.randn(5, r_g, generator=g)}
    return p, q


def test_exact_merge_is_the_weighted_sum_of_deltas():
    p, q = two_adapters()
    w_p, w_g, s_p, s_g = 0.7, -0.4, 2.0, 0.5
    f = fuse(p, q, w_p, w_g, s_p, s_g, "exact")
    assert f["m.lora_A.weight"].shape == (5, 6)  # rank r_p + r_g
    want = w_p * delta_weight(p, s_p, "m.lora_A.weight") + w_g * delta_weight(q, s_g, "m.lora_A.weight")
    got = delta_weight(f, 1.0, "m.lora_A.weight")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_params_merge_has_cross_terms():
    p, q = two_adapters(3, 3)
    f = fuse(p, q, 0.5, 0.5, 1.0, 1.0, "params")
    want = 0.5 * delta_weight(p, 1.0, "m.lora_A.weight") + 0.5 * delta_weight(q, 1.0, "m.lora_A.weight")
    got = delta_weight(f, 1.0, "m.lora_A.weight")
    assert (got - want).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs equal ranks"):
        fuse(*two_adapters(2, 3), 0.5, 0.5, 1.0, 1.0, "params")


def test_search_finds_a_known_minimum():
    import numpy as np

    from fdlora_cluster.fusion import RowScores, search_weights

    def score(w):  # one row whose loss is a bowl around (0.8, -0.3)
        (a, b), = w
        return RowScores(np.array([(a - 0.8) ** 2 + (b + 0.3) ** 2]), np.array([1.0]))

    res = search_weights(score, 1, "NGOpt", 60, (-1.5, 1.5), 0.0, seed=0)
    assert len(res.curve) == 60 and res.chosen_by == "search"
    (w_p, w_g), = res.weights
    assert abs(w_p - 0.8) < 0.15 and abs(w_g + 0.3) < 0.15
