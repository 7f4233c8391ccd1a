"""The frozen base and its two named LoRA adapters, `personal` and `global`, through PEFT.

Adapter state is read and written by adapter name through PEFT's layer structure
(`layer.lora_A[name]`), never by matching substrings of parameter names. The state keys are the
ones PEFT writes in `adapter_model.safetensors`, so a saved directory loads with
`peft.PeftModel.from_pretrained(base, path)`.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch

from .state import ADAPTERS, check_same_layout


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def missing_pretrained(model_cfg) -> str | None:
    """Why `model.pretrained` cannot be loaded (no weights there yet), or None when it can or is unset.
    Client ranks ask before the job starts (cli), and build_base again when it loads them."""
    if model_cfg.pretrained and not os.path.isfile(os.path.join(model_cfg.pretrained, "model.safetensors")):
        return f"model.pretrained = {model_cfg.pretrained}: no model.safetensors there; run `fdlora-cluster pretrain CONFIG` first"
    return None


def build_base(model_cfg, seed: int, vocab_size: int | None = None, dtype: str | None = None):
    """A causal LM: a local checkpoint (`path`) or built from a transformers config (`config`), in
    `dtype` (default model.dtype, else float32; the trainer passes Config.base_dtype)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = _DTYPES[dtype or model_cfg.dtype or "float32"]
    if model_cfg.path:
        model = AutoModelForCausalLM.from_pretrained(model_cfg.path, dtype=dtype, local_files_only=True)
    else:
        kw = dict(model_cfg.config)
        model_type = kw.pop("model_type")
        if vocab_size is not None:
            kw.setdefault("vocab_size", vocab_size)
        config = AutoConfig.for_model(model_type, **kw)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        if model_cfg.pretrained:
            missing = missing_pretrained(model_cfg)
            if missing:
                raise FileNotFoundError(missing)
            from safetensors.torch import load_file

            model.load_state_dict(load_file(os.path.join(model_cfg.pretrained, "model.safetensors")))
        model = model.to(dtype)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def lora_config(a):
    """PEFT LoraConfig from our AdapterConfig."""
    from peft import LoraConfig

    return LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                      target_modules=list(a.target_modules), bias="none", task_type="CAUSAL_LM")


def add_adapters(base, configs: dict, seed: int, trainable=ADAPTERS):
    """Wrap `base` in a PeftModel with the named adapters ({name: AdapterConfig}), each initialised
    from its own seed; only `trainable` ones require grad.

    Every client seeds `global` the same way, so all clients (and the server's copy) start equal."""
    from peft import get_peft_model

    model = None
    for i, (name, cfg) in enumerate(configs.items()):
        with torch.random.fork_rng():
            torch.manual_seed(seed * 1000 + 17 + i)
            if model is None:
                model = get_peft_model(base, lora_config(cfg), adapter_name=name)
            else:
                model.add_adapter(name, lora_config(cfg))
    for p in model.parameters():
        p.requires_grad_(False)
    for name in trainable:
        for p in adapter_params(model, name).values():
            p.requires_grad_(True)
    return model


def freeze_a(model, name: str) -> None:
    """The adapter's A matrices stop requiring grad (global.combine = frozen_a): the engine leaves
    them out of the optimizer, so they keep their seeded values on every rank."""
    for k, p in adapter_params(model, name).items():
        if k.endswith(".lora_A.weight"):
            p.requires_grad_(False)


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer

    for mod_name, mod in model.named_modules():
        if isinstance(mod, LoraLayer):
            yield mod_name, mod


def adapter_params(model, name: str) -> dict[str, torch.nn.Parameter]:
    """The adapter's parameters keyed as PEFT saves them (`...q_proj.lora_A.weight`)."""
    out = {}
    for mod_name, mod in _lora_layers(model):
        if name in mod.lora_A:
            out[f"{mod_name}.lora_A.weight"] = mod.lora_A[name].weight
            out[f"{mod_name}.lora_B.weight"] = mod.lora_B[name].weight
    if not out:
        raise KeyError(f"adapter {name!r} not found in the model")
    return out


def adapter_scaling(model, name: str) -> float:
    """The adapter's own alpha / r (lora_config sets no rslora), not `mod.scaling`, which holds
    whatever scales the last `set_active` applied (a fusion search's candidate weights)."""
    for _, mod in _lora_layers(model):
        if name in mod.lora_alpha:
            return float(mod.lora_alpha[name] / mod.r[name])
    raise KeyError(name)


def set_active(model, names, scales: dict[str, float | dict[str, float]] | None = None) -> None:
    """Make `names` the active adapters (one, or several summed) without touching requires_grad.

    `scales` multiplies an adapter's contribution (alpha / r) on top: by one number for the whole
    adapter, or by {module name: number} per LoRA-wrapped module (the fusion search's per-layer and
    per-module weights; module names as `model.named_modules()` gives them, which is also how
    fusion.modules_of names an adapter state's modules). An adapter or module left out is scaled 1.
    Every adapter's scaling is set, active or not, so no scaling of an earlier call survives."""
    names = [names] if isinstance(names, str) else list(names)
    scales = scales or {}
    for mod_name, mod in _lora_layers(model):
        mod._active_adapter = names
        for n in mod.lora_A:
            s = scales.get(n, 1.0)
            if isinstance(s, dict):
                s = s.get(mod_name, 1.0)
            mod.scaling[n] = mod.lora_alpha[n] / mod.r[n] * float(s)


@contextlib.contextmanager
def gathered(params, zero_stage: int, modifier_rank: int | None = None):
    """Full parameters inside the block. Under ZeRO-3 the partitioned tensors are gathered;
    with `modifier_rank`, that rank's writes are broadcast and re-partitioned on exit."""
    params = list(params)
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
            yield
    else:
        yield


def read_adapter(model, name: str, zero_stage: int, mixed_precision: bool = False) -> dict[str, torch.Tensor]:
    """A CPU fp32 copy of the adapter's full weights (gathered under ZeRO-3; collective then).

    With DeepSpeed bf16/fp16 the model's adapter weights are low-precision copies; a trained
    adapter is read from DeepSpeed's fp32 master weights instead (`safe_get_full_fp32_param`,
    every ZeRO stage), so what is sent, fused and saved is the fp32 adapter the optimizer holds."""
    params = adapter_params(model, name)
    if mixed_precision:
        from deepspeed.utils import safe_get_full_fp32_param

        masters = {k: safe_get_full_fp32_param(p) for k, p in params.items()}  # collective under ZeRO-3
        frozen = [k for k, m in masters.items() if m is None]  # not in the optimizer (frozen_a's A)
        if frozen and len(frozen) < len(masters):
            with gathered([params[k] for k in frozen], zero_stage):
                for k in frozen:
                    masters[k] = params[k].detach().to("cpu", torch.float32, copy=True)
        if all(m is not None for m in masters.values()):
            return {k: m.detach().to("cpu", torch.float32, copy=True).reshape(tuple(getattr(params[k], "ds_shape",
                                                                                            params[k].shape)))
                    for k, m in masters.items()}
    with gathered(params.values(), zero_stage):
        return {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in params.items()}


def write_adapter(model, name: str, state: dict[str, torch.Tensor], zero_stage: int,
                  mixed_precision: bool = False) -> None:
    """Overwrite the adapter's weights with `state` on every rank (collective under ZeRO-3): the
    model's copy and, with DeepSpeed bf16/fp16, the optimizer's fp32 master (`safe_set_full_fp32_param`)
    so that the next step starts from the exact fp32 values, not their low-precision rounding.
    In fp32 the caller refreshes the optimizer's master copies from the model afterwards."""
    params = adapter_params(model, name)
    check_same_layout(params, state, what=f"adapter {name!r}")
    with gathered(params.values(), zero_stage, modifier_rank=0):
        with torch.no_grad():
            for k, p in params.items():
                p.data.copy_(state[k].to(p.device, p.dtype))
    if mixed_precision:
        from deepspeed.utils import safe_set_full_fp32_param

        for k, p in params.items():
            safe_set_full_fp32_param(p, state[k].to(p.device, torch.float32))  # no-op for a frozen adapter


def save_adapter(path: str, state: dict[str, torch.Tensor], peft_lora_config, base_name: str | None) -> None:
    """Write a PEFT `save_pretrained`-style directory from a full state dict."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    cfg = peft_lora_config.to_dict()
    cfg["base_model_name_or_path"] = base_name
    for k, v in list(cfg.items()):
        if isinstance(v, set):
            cfg[k] = sorted(v)
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, default=str)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(path, "adapter_model.safetensors"))
