"""`fdlora-cluster pretrain`: trains the tiny base, caches it by recipe, and build_base loads it."""

from __future__ import annotations

import pytest

import torch

from fdlora_cluster.config import load_config
from fdlora_cluster.model import build_base
from fdlora_cluster.pretrain import ensure_pretrained, is_cached, pretrain, recipe_hash

from conftest import CONFIGS

pytestmark = pytest.mark.unit


def test_pretrain_caches_and_build_base_loads_it(tmp_path):
    out = tmp_path / "base"
    cfg = load_config(CONFIGS / "demo.yaml", [f"model.pretrained={out}", "model.pretrain_steps=3",
                                              "model.pretrain_batch_size=4"])
    assert not is_cached(cfg)
    logs = []
    meta = pretrain(cfg, log=logs.append)
    assert is_cached(cfg) and meta["hash"] == recipe_hash(cfg)
    assert (out / "model.safetensors").is_file() and (out / "pretrain.json").is_file()
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    ensure_pretrained(cfg, log=logs.append)  # up to date: nothing retrained
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    # the run seed does not change the base; the recipe does
    other_seed = load_config(CONFIGS / "demo.yaml", [f"model.pretrained={out}", "model.pretrain_steps=3",
                                                     "model.pretrain_batch_size=4", "seed=5"])
    assert is_cached(other_seed)
    stale = load_config(CONFIGS / "demo.yaml", [f"model.pretrained={out}", "model.pretrain_steps=4",
                                                "model.pretrain_batch_size=4"])
    assert not is_cached(stale)
    # build_base loads the pretrained weights, whatever the run seed
    a = build_base(cfg.model, seed=0, vocab_size=258)
    b = build_base(other_seed.model, seed=5, vocab_size=258)
    for (k, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), k
