"""Dual adapters through PEFT: by name, the trainable set, scaled activation."""

import pytest
import torch

from fdlora_cluster.config import load_config
from fdlora_cluster.data import get_tokenizer
from fdlora_cluster.model import add_adapters, adapter_params, build_base, set_active
from fdlora_cluster.state import GLOBAL, PERSONAL

from conftest import CONFIGS

pytestmark = pytest.mark.unit


def model_and_batch():
    cfg = load_config(CONFIGS / "demo.yaml")
    base = build_base(cfg.model, cfg.seed, vocab_size=get_tokenizer(None).vocab_size)
    model = add_adapters(base, {PERSONAL: cfg.lora.personal, GLOBAL: cfg.lora.global_}, cfg.seed)
    for p in adapter_params(model, PERSONAL).values():  # make B non-zero so both adapters matter
        torch.nn.init.normal_(p, std=0.1)
    for p in adapter_params(model, GLOBAL).values():
        torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    return model, ids


def test_only_the_active_adapter_gets_gradients():
    model, ids = model_and_batch()
    for name, other in ((GLOBAL, PERSONAL), (PERSONAL, GLOBAL)):
        model.zero_grad(set_to_none=True)
        set_active(model, name)
        model(input_ids=ids, labels=ids).loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        expected = {n for n, p in model.named_parameters() if any(p is q for q in adapter_params(model, name).values())}
        assert with_grad == expected and expected
        assert all(p.grad is None for p in adapter_params(model, other).values())
        # the frozen base never requires grad
        base_trainable = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
        assert base_trainable == []


def test_adapters_are_distinct_and_scales_add_up():
    model, ids = model_and_batch()
    set_active(model, [])
    with torch.no_grad():
        base = model(input_ids=ids).logits
        set_active(model, PERSONAL)
        p = model(input_ids=ids).logits
        set_active(model, GLOBAL)
        g = model(input_ids=ids).logits
        set_active(model, [PERSONAL, GLOBAL], {PERSONAL: 0.0, GLOBAL: 1.0})
        g2 = model(input_ids=ids).logits
    assert not torch.allclose(p, g) and not torch.allclose(p, base)
    torch.testing.assert_close(g, g2)
    pk = set(adapter_params(model, PERSONAL))
    assert pk == set(adapter_params(model, GLOBAL))  # same PEFT keys, different tensors
    assert all(a is not b for a, b in zip(adapter_params(model, PERSONAL).values(), adapter_params(model, GLOBAL).values()))


def test_per_module_scales_scale_each_module_and_default_to_one():
    from fdlora_cluster.fusion import modules_of
    from fdlora_cluster.model import _lora_layers

    model, ids = model_and_batch()
    modules = modules_of(adapter_params(model, PERSONAL))
    half = modules[: len(modules) // 2]
    set_active(model, [PERSONAL, GLOBAL], {PERSONAL: {m: 0.5 for m in half}, GLOBAL: 2.0})
    for name, mod in _lora_layers(model):
        base = mod.lora_alpha[PERSONAL] / mod.r[PERSONAL]
        assert mod.scaling[PERSONAL] == base * (0.5 if name in half else 1.0)
        assert mod.scaling[GLOBAL] == mod.lora_alpha[GLOBAL] / mod.r[GLOBAL] * 2.0
    # every module given the same number is the adapter-wide number
    with torch.no_grad():
        set_active(model, [PERSONAL, GLOBAL], {PERSONAL: {m: 0.3 for m in modules}, GLOBAL: {m: 0.7 for m in modules}})
        per_module = model(input_ids=ids).logits
        set_active(model, [PERSONAL, GLOBAL], {PERSONAL: 0.3, GLOBAL: 0.7})
        whole = model(input_ids=ids).logits
    assert torch.equal(per_module, whole)
    set_active(model, PERSONAL)  # a later call without scales leaves none behind
    assert all(mod.scaling[a] == mod.lora_alpha[a] / mod.r[a] for _, mod in _lora_layers(model) for a in (PERSONAL, GLOBAL))
