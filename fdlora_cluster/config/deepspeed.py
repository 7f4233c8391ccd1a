"""The DeepSpeed config dict of one client, built from the run config: the one source the engine
and `fdlora-cluster check` read, and that Config builds for every client on load (root.py)."""

from __future__ import annotations

import json

from .errors import ConfigError
from .loading import merge


def deepspeed_dict(cfg, client: int) -> dict:
    """The DeepSpeed config for one client (`cfg`: the run's root.Config, which calls this while it
    validates, so this module does not import it): file or dict, then the client's override, then
    the batch sizes and optimizer from `train` where the user did not set them."""
    base = cfg.deepspeed
    if isinstance(base, str):
        with open(base, encoding="utf-8") as f:
            try:
                base = json.load(f)
            # ValueError: bad JSON, bad UTF-8, an integer too long to convert; RecursionError: nesting
            except (ValueError, RecursionError) as e:
                raise ConfigError(f"deepspeed: {cfg.deepspeed} is not valid JSON: {e}") from None
    if not isinstance(base, dict):
        raise ConfigError(f"deepspeed: expected a mapping (or a JSON file of one), got {type(base).__name__}")
    ds = merge(dict(base), {})
    o = cfg.client_overrides.get(client)
    if o and o.deepspeed:
        ds = merge(ds, o.deepspeed)
    where = f"deepspeed (client {client})"
    for key in ("zero_optimization", "optimizer"):
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {ds[key]!r}")
    if "scheduler" in ds:
        # The adapter not being trained is frozen by its parameter group's lr = 0 (engine.py); a
        # DeepSpeed scheduler rewrites every group's lr each step and would move it.
        raise ConfigError(f"{where}: an LR scheduler is not supported (it would un-freeze the adapter that "
                          "is not being trained); remove `scheduler` and set the learning rate with train.lr")
    # The trainer slices batches and sets group learning rates from this dict, so it is the one
    # source: DeepSpeed keys the user set win over `train`, a client's micro_batch_size over both.
    if o and o.micro_batch_size is not None:
        given = (o.deepspeed or {}).get("train_micro_batch_size_per_gpu", o.micro_batch_size)
        if given != o.micro_batch_size:
            raise ConfigError(f"client_overrides.{client}: micro_batch_size = {o.micro_batch_size} but its "
                              f"deepspeed.train_micro_batch_size_per_gpu = {given}; set one of them")
        ds["train_micro_batch_size_per_gpu"] = o.micro_batch_size
    ds.setdefault("train_micro_batch_size_per_gpu", cfg.train.micro_batch_size)
    ds.setdefault("gradient_accumulation_steps", cfg.train.gradient_accumulation_steps)
    ds.setdefault("optimizer", {"type": "AdamW", "params": {
        "weight_decay": cfg.train.weight_decay, "torch_adam": True}})
    params = ds["optimizer"].setdefault("params", {})
    if not isinstance(params, dict):
        raise ConfigError(f"{where}: optimizer.params must be a mapping, got {params!r}")
    params.setdefault("lr", cfg.train.lr)
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if isinstance(ds[key], bool) or not isinstance(ds[key], int) or ds[key] < 1:
            raise ConfigError(f"{where}: {key} = {ds[key]!r} must be an integer >= 1")
    if isinstance(params["lr"], bool) or not isinstance(params["lr"], (int, float)) or params["lr"] <= 0:
        raise ConfigError(f"{where}: optimizer.params.lr = {params['lr']!r} must be a number > 0")
    _mixed_precision(ds, cfg.model.dtype, where)
    ds.setdefault("zero_optimization", {"stage": 0})
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    ds.pop("train_batch_size", None)  # derived by DeepSpeed from micro batch x accum x ranks
    stage = ds["zero_optimization"].get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed.zero_optimization.stage = {stage!r} (client {client}); expected 0, 1, 2 or 3")
    return ds


def _mixed_precision(ds: dict, dtype: str | None, where: str) -> None:
    """One source for precision: DeepSpeed's bf16/fp16 sections, which model.dtype may switch on."""
    for key in ("bfloat16", "bf16", "fp16"):  # bfloat16: DeepSpeed's alias of the bf16 section
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(f"{where}: {key} must be a mapping such as {{enabled: true}}, got {ds[key]!r}")
        if key in ds and not isinstance(ds[key].get("enabled", False), bool):
            raise ConfigError(f"{where}: {key}.enabled = {ds[key]['enabled']!r} must be true or false")
    if "bfloat16" in ds:
        ds["bf16"] = merge(ds.pop("bfloat16"), ds.get("bf16", {}))
    enabled = [k for k in ("bf16", "fp16") if ds.get(k, {}).get("enabled", False)]
    if len(enabled) == 2:
        raise ConfigError(f"{where}: bf16 and fp16 are both enabled; enable one")
    wanted = {"bfloat16": "bf16", "float16": "fp16", "float32": None}.get(dtype or "", "unset")
    if dtype is None:
        return
    if wanted is None and enabled:
        raise ConfigError(f"{where}: {enabled[0]}.enabled is true but model.dtype = float32; "
                          f"remove model.dtype (DeepSpeed's section then decides) or the {enabled[0]} section")
    if wanted and enabled and enabled[0] != wanted:
        raise ConfigError(f"{where}: model.dtype = {dtype} but DeepSpeed's {enabled[0]} section is enabled; "
                          f"use {wanted}, or remove model.dtype")
    if wanted and ds.get(wanted, {}).get("enabled", True) is False:
        raise ConfigError(f"{where}: model.dtype = {dtype} but DeepSpeed's {wanted}.enabled is false; "
                          f"remove one of them")
    if wanted:
        ds.setdefault(wanted, {})["enabled"] = True
