"""The whole run config: the sections together (sections.py), the checks across them, and the two
ways to build one, from a YAML file (`load_config`) or from a raw mapping (`config_from_dict`).
Every error of a file is reported at once; each cross-section check prints the relation that failed
(topology against per-client overrides, strategy against adapters, DeepSpeed against model.dtype).

    cfg = load_config("configs/demo.yaml", overrides=["train.rounds=5"])
"""

from __future__ import annotations

import os
import re
from typing import Union

from pydantic import Field, ValidationError, field_validator, model_validator

from ..data.scenario import MAX_CLIENTS
from ..strategies import STRATEGIES
from .deepspeed import deepspeed_dict
from .errors import config_error, describe, require
from .loading import apply_override, read_yaml
from .sections import (CheckpointConfig, ClientOverride, DataConfig, DittoConfig, EvalConfig, FedDPAConfig,
                       FederationConfig, FusionConfig, GlobalConfig, LogConfig, LoraConfig, ModelConfig, OuterConfig,
                       PersonalConfig, Section, TopologyConfig, TrainConfig, resolve_outer, section)


class Config(Section):
    strategy: str = "fedavg"
    """The federated algorithm: one of fdlora_cluster.strategies.STRATEGIES (a str checked against
    them rather than a Literal, so the error lists the names unquoted, as the docs write them)."""
    seed: int = Field(0, ge=0)
    """Seeds the base init, adapters, data splits and every per-client, per-round stream."""
    output_dir: str = "runs/demo"
    """Run directory (config.yaml, metrics.jsonl, summary.json, adapters/, logs/)."""
    model: ModelConfig = section()
    lora: LoraConfig = section()
    topology: TopologyConfig = section()
    deepspeed: Union[dict, str] = Field(default_factory=dict)
    """DeepSpeed config dict, or the path of a DeepSpeed JSON file, passed through. Batch sizes
    and the optimizer (and its lr) are filled in from `train` unless given here; what is given
    here wins, and the trainer uses it too. No `scheduler`: the adapter not being trained is
    frozen by lr 0 in its parameter group, which a scheduler would overwrite."""
    client_overrides: dict[int, ClientOverride] = Field(default_factory=dict)
    """Per-client settings keyed by client id (0-based)."""
    train: TrainConfig = section()
    outer: OuterConfig = section()
    global_: GlobalConfig = section(alias="global")
    personal: PersonalConfig = section()
    federation: FederationConfig = section()
    """What the server accepts: checks on every update (docs/RELIABILITY.md)."""
    fusion: FusionConfig = section()
    fedprox_mu: float = Field(0.01, ge=0)
    """Proximal weight mu for `fedprox`."""
    feddpa: FedDPAConfig = section()
    """Settings of strategy `feddpa`."""
    ditto: DittoConfig = section()
    """Settings of strategy `ditto`."""
    data: DataConfig = section()
    eval: EvalConfig = section()
    log: LogConfig = section()
    checkpoint: CheckpointConfig = section()

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v):
        require(v in STRATEGIES, f"strategy = {v!r} is not valid; expected one of {', '.join(STRATEGIES)}")
        return v

    @field_validator("deepspeed")
    @classmethod
    def _file_exists(cls, v):
        require(not isinstance(v, str) or os.path.isfile(v), f"deepspeed: JSON file {v} not found")
        return v

    @field_validator("client_overrides", mode="before")
    @classmethod
    def _client_ids(cls, v):
        if not isinstance(v, dict):
            return v
        out = {}
        for k, o in v.items():
            if isinstance(k, str) and re.fullmatch(r"\s*-?[0-9]{1,18}\s*", k):  # "1" from --set and JSON-minded users
                k = int(k)
            require(isinstance(k, int) and not isinstance(k, bool), f"client_overrides key {k!r} must be an integer")
            out[k] = o
        return out

    # ----------------------------------------------------------------- checks across sections
    # Each runs once every section is valid; each message says the relation that failed.

    @model_validator(mode="after")
    def _fits_the_clients(self):
        n = len(self.client_sizes())
        for c in self.client_overrides:
            require(0 <= c < n, f"client_overrides has client {c}, but the topology has {n} clients (ids 0..{n - 1})")
        require(self.federation.min_clients <= n, f"federation.min_clients = {self.federation.min_clients} "
                 f"must be in [1, number of clients = {n}]")
        d = self.data
        if d.files:
            require(len(d.files) in (1, n),
                     f"data.files has {len(d.files)} files; give 1 (split across clients) or {n} (one per client)")
        if d.source == "generator":
            require(n <= MAX_CLIENTS, f"the shipped scenario has rules for {MAX_CLIENTS} clients, "
                     f"the topology has {n}; use fewer clients or data.source: jsonl")
        return self

    @model_validator(mode="after")
    def _resolve_outer(self):
        self.outer = resolve_outer(self)  # the resolved config.yaml then shows what ran
        return self

    @model_validator(mode="after")
    def _fits_the_strategy(self):
        p, g, f = self.lora.personal, self.lora.global_, self.fusion
        if self.strategy == "ditto":
            require(p.r == g.r and p.alpha == g.alpha and p.target_modules == g.target_modules,
                     "strategy ditto pulls the personal adapter towards the global one parameter by parameter and "
                     "starts it as a copy of it, so lora.personal and lora.global need the same r, alpha and "
                     f"target_modules (now r {p.r} vs {g.r}, alpha {p.alpha} vs {g.alpha}, "
                     f"targets {p.target_modules} vs {g.target_modules})")
        few = self.data.fewshot_rows
        if self.strategy == "fdlora":
            require(few >= 1, "strategy fdlora searches its fusion weights on data.fewshot_rows rows per client; "
                     "data.fewshot_rows = 0 leaves it none: set it >= 1")
            lo, hi = f.bounds
            require(lo <= 0 and hi >= 1, f"strategy fdlora starts its fusion search at the anchors (weights 0 and 1), "
                     f"which fusion.bounds = {f.bounds} excludes; the bounds need low <= 0 <= 1 <= high")
            require(f.folds <= few, f"fusion.folds = {f.folds} needs at least one search row per fold, "
                     f"but data.fewshot_rows = {few}; set fusion.folds <= {few}")
            # that nevergrad has fusion.optimizer: environment.check_environment
        if f.merge == "params":
            require(p.r == g.r and p.alpha == g.alpha and p.target_modules == g.target_modules,
                     "fusion.merge = 'params' weights A and B separately into one adapter of one scale, so "
                     "lora.personal and lora.global need the same r, alpha and target_modules; use merge: exact otherwise")
        if self.global_.init == "personal_mean" or self.personal.sync_every:
            # alpha too: a copied adapter keeps its A and B, so with another alpha / r it would act scaled
            require(p.r == g.r and p.alpha == g.alpha and p.target_modules == g.target_modules,
                     "global.init = personal_mean and personal.sync_every copy weights between the two adapters, "
                     "so lora.personal and lora.global need the same r, alpha and target_modules "
                     f"(now r {p.r} vs {g.r}, alpha {p.alpha} vs {g.alpha}, targets {p.target_modules} vs "
                     f"{g.target_modules})")
        problems = STRATEGIES[self.strategy].ignored(self)
        require(not problems, "; ".join(problems))
        if self.strategy in ("fdlora", "feddpa"):
            require(p.target_modules == g.target_modules,
                     f"strategy {self.strategy} fuses the two adapters layer by layer, so lora.personal.target_modules "
                     f"({p.target_modules}) must equal lora.global.target_modules ({g.target_modules})")
        return self

    @model_validator(mode="after")
    def _deepspeed_builds(self):
        # Builds the clients' DeepSpeed dicts now, so a bad file, stage or precision fails on load: each
        # overridden client's, and one for all the others (theirs are equal), so a million clients cost one.
        n = len(self.client_sizes())
        plain = next(c for c in range(n) if c not in self.client_overrides or c == n - 1)
        for c in sorted(set(self.client_overrides) | {plain}):
            stage = deepspeed_dict(self, c)["zero_optimization"].get("stage", 0)
            require(not (self.strategy in ("fedprox", "ditto") and stage == 3),
                     f"strategy {self.strategy} adds a proximal term over the full adapter on every rank, which "
                     f"ZeRO-3 partitions: client {c} has zero_optimization.stage = 3; use stage 0, 1 or 2 "
                     f"for {self.strategy}")
        return self

    # ----------------------------------------------------------------- derived views

    def client_sizes(self) -> list[int]:
        return self.topology.client_sizes()

    def world_size(self) -> int:
        return 1 + sum(self.client_sizes())

    def base_dtype(self, client: int) -> str:
        """The frozen base's dtype for `client`, as its DeepSpeed config says (model.dtype agrees)."""
        ds = deepspeed_dict(self, client)
        for key, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
            if ds.get(key, {}).get("enabled", False):
                return dtype
        return "float32"

    def client_backend(self) -> str:
        """The clients' torch.distributed backend: topology.backend, with auto = nccl when CUDA is
        present (one rank per GPU), else gloo (CPU)."""
        if self.topology.backend == "auto":
            import torch

            return "nccl" if torch.cuda.is_available() else "gloo"
        return self.topology.backend

    def inner_steps(self, client: int) -> int:
        o = self.client_overrides.get(client)
        return o.inner_steps if o and o.inner_steps is not None else self.train.inner_steps

    def to_dict(self) -> dict:
        """Plain values under their YAML keys (`global`, `lambda`): what config.yaml records."""
        return self.model_dump(by_alias=True)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (and what it includes), apply `key.path=value` overrides, validate."""
    path = str(path)
    raw = read_yaml(path)
    for item in overrides or []:
        apply_override(raw, item)
    return config_from_dict(raw, source=path)


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    """Validate a raw mapping; every error of it is in the one ConfigError, each naming its key."""
    try:
        return Config.model_validate({} if raw is None else raw)
    except ValidationError as e:
        raise config_error(source, [describe(err, Config) for err in e.errors()]) from None
