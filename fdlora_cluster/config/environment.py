"""The checks of a valid config that need installed packages: a tracker's package, nevergrad's
optimizer registry, the model types transformers knows, `datasets` for `data.source: hf`.

They are kept out of loading, so that loading a config imports none of transformers, nevergrad,
peft, deepspeed or a tracking backend (the server rank and `report` load configs too).
`fdlora-cluster check` and `launch` run every check before any rank starts; `run` runs on each
rank the checks of what that rank uses, so the server does not import transformers at start:

    check_environment(cfg, source="configs/demo.yaml")                   # check, launch
    check_environment(cfg, source, roles=("server",))                     # run, rank 0
"""

from __future__ import annotations

import importlib.util

from .errors import config_error

ROLES = ("server", "client")


def _trackers(cfg) -> list[str]:
    from ..tracking import missing_packages

    # asked for, so no silent skip
    return [f"log.{key} = true needs the `{package}` package, which is not installed: "
            f"pip install {package} (or set log.{key}: false)" for key, package in missing_packages(cfg.log)]


def _model_type(cfg) -> list[str]:
    if cfg.model.config is None:
        return []
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as known

    mt = cfg.model.config["model_type"]
    if isinstance(mt, str) and mt in known:
        return []
    return [f"model.config.model_type = {mt!r} is not a causal LM type this transformers knows; "
            f"e.g. {', '.join(t for t in ('llama', 'mistral', 'qwen2', 'gpt2') if t in known)}"]


def _fusion_optimizer(cfg) -> list[str]:
    if cfg.strategy != "fdlora":  # the one strategy that searches with nevergrad
        return []
    import nevergrad as ng

    if cfg.fusion.optimizer in ng.optimizers.registry:
        return []
    return [f"fusion.optimizer = {cfg.fusion.optimizer!r} is not a nevergrad optimizer; "
            "e.g. NGOpt, Shiwa, CMA, OnePlusOne"]


def _datasets(cfg) -> list[str]:
    if cfg.data.source != "hf" or importlib.util.find_spec("datasets") is not None:
        return []
    return ["data.source = 'hf' reads datasets with the `datasets` library, which is not installed: "
            "pip install 'fdlora-cluster[hf]' (or pip install datasets)"]


def _privacy(cfg) -> list[str]:
    """The accountant is installed, and the configured rounds stay within privacy.target_epsilon."""
    p = cfg.privacy
    if p is None:
        return []
    if importlib.util.find_spec("dp_accounting") is None:
        return ["privacy: the privacy loss is computed by the `dp-accounting` package, which is not installed: "
                "pip install 'fdlora-cluster[dp]' (or pip install dp-accounting)"]
    if p.target_epsilon is None:
        return []
    from ..dp import epsilon

    eps = epsilon(p.noise_multiplier, cfg.train.rounds, p.delta, p.accountant)
    if eps <= p.target_epsilon:
        return []
    return [f"privacy: train.rounds = {cfg.train.rounds} with noise_multiplier {p.noise_multiplier:g} reach "
            f"epsilon {eps:.4g} at delta {p.delta:g} ({p.accountant} accountant), over privacy.target_epsilon = "
            f"{p.target_epsilon:g}; raise privacy.noise_multiplier or lower train.rounds"]


# (check, the role that needs it): the server logs to the trackers; the clients build the model,
# read the data and search the fusion weights.
CHECKS = ((_trackers, "server"), (_model_type, "client"), (_fusion_optimizer, "client"), (_datasets, "client"),
          (_privacy, "server"))


def check_environment(cfg, source: str = "<config>", roles: tuple[str, ...] = ROLES) -> None:
    """Raise one ConfigError (worded as loading's) with every check of `roles` that fails."""
    msgs = [m for check, role in CHECKS if role in roles for m in check(cfg)]
    if msgs:
        raise config_error(source, msgs)
