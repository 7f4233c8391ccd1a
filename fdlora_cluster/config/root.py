"""The whole run config: the sections together (sections.py), the checks across them, and the two
ways to build one, from a YAML file (`load_config`) or from a raw mapping (`config_from_dict`).
Every error of a file is reported at once; each cross-section check prints the relation that failed
(topology against per-client overrides, strategy against adapters, DeepSpeed against model.dtype).

    cfg = load_config("configs/demo.yaml", overrides=["train.rounds=5"])
"""

from __future__ import annotations

import math
import os
import re
from typing import Optional, Union

from pydantic import Field, ValidationError, field_validator, model_validator

from ..data.scenario import MAX_CLIENTS
from ..strategies import STRATEGIES
from .deepspeed import deepspeed_dict
from .errors import config_error, describe, require
from .loading import apply_override, read_yaml
from .federation import (FederationConfig, GlobalConfig, OuterConfig, PrivacyConfig, resolve_outer)
from .sections import (AdapterConfig, CheckpointConfig, ClientOverride, DataConfig, DittoConfig, EvalConfig,
                       FedDPAConfig, FusionConfig, LogConfig, LoraConfig, ModelConfig, PersonalConfig, Section,
                       TopologyConfig, TrainConfig, section)


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
    privacy: Optional[PrivacyConfig] = None
    """Client-level differential privacy on the global adapter (left out or null: off)."""
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
    def _global_ranks(self):
        """Per-client global ranks (client_overrides.<i>.lora.global) and global.combine."""
        g, combine = self.lora.global_, self.global_.combine
        for c, o in sorted(self.client_overrides.items()):
            a = o.lora.global_
            if a.alpha is not None and a.r is not None:
                require(math.isclose(a.alpha / a.r, g.alpha / g.r, rel_tol=1e-12),
                         f"client_overrides.{c}.lora.global: alpha / r = {a.alpha:g} / {a.r} differs from lora.global's "
                         f"{g.alpha:g} / {g.r}; every client's global adapter needs the same scaling (the server adds "
                         f"their B A products): leave alpha out, or set it to {a.r * g.alpha / g.r:g}")
            require(a.alpha is None or a.r is not None,
                     f"client_overrides.{c}.lora.global.alpha without r: the scaling alpha / r must stay lora.global's; "
                     "set r (alpha follows it)")
        ranks = self.global_ranks()
        if len(set(ranks)) > 1:
            why = f"clients' global ranks differ ({ranks}, client_overrides.<i>.lora.global.r)"
            require(combine != "frozen_a", f"{why}, but global.combine = frozen_a averages B against one shared A: "
                     "use global.combine: product (or factors, the zero-padding baseline)")
            require(self.global_.init == "seed", f"{why}; global.init = personal_mean averages the personal "
                     "adapters parameter by parameter: use global.init: seed")
        require(not (combine == "product" and self.outer.optimizer == "adam"),
                 "global.combine = product steps the outer optimizer on the product B A in factored form; "
                 "outer.optimizer = adam's elementwise moments have none: use sgd or nesterov")
        require(not (combine == "product" and self.outer.momentum_warmup),
                 "global.combine = product keeps its own momentum on the product B A, which outer.momentum_warmup "
                 f"(= {self.outer.momentum_warmup}) does not ramp: leave outer.momentum_warmup at 0 with product")
        require(not (combine == "frozen_a" and self.global_.init == "personal_mean"),
                 "global.combine = frozen_a keeps the global adapter's A at its seeded init, but global.init = "
                 "personal_mean starts it from the personal adapters' mean: use global.init: seed")
        return self

    @model_validator(mode="after")
    def _fits_the_strategy(self):
        p, f = self.lora.personal, self.fusion
        # with per-client global ranks, each client's pair is checked; the first that fails is named
        g = next((self.global_adapter(c) for c in range(len(self.client_sizes()))
                  if self.global_adapter(c).r != p.r), self.lora.global_)
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
    def _fits_privacy(self):
        if self.privacy is None:
            return self
        require(STRATEGIES[self.strategy].federated,
                 f"privacy protects the federated global adapter, but strategy {self.strategy} sends none; "
                 "remove the privacy section or pick a federated strategy")
        # the noise is calibrated to the sum of clipped updates (sensitivity C); a weighted mean's
        # sensitivity depends on the weights, which are themselves the clients' data sizes
        require(self.global_.aggregation == "uniform",
                 "privacy bounds each client's share of the SUM of updates, which a mean weighted by sample counts "
                 "does not keep (a client's weight is its own data size): set global.aggregation: uniform "
                 f"(now {self.global_.aggregation!r})")
        require(self.global_.init == "seed",
                 "privacy: global.init = personal_mean sends each stage-1 personal adapter to the server without "
                 "clip or noise; use global.init: seed")
        # error feedback would carry a client's rounding error into its next message, past the clip
        require(self.federation.compress == "none",
                 f"privacy: federation.compress = {self.federation.compress!r} adds the last round's rounding error "
                 "to the next update (error feedback), so the message a client sends is no longer bounded by "
                 "privacy.clip_norm; use federation.compress: none with privacy")
        # product sums the factor pairs themselves (strategies/combine.py ProductSum), not the changes
        # the clip bounds, so there is no sum for the noise to go on
        require(self.global_.combine != "product",
                 "privacy: global.combine = product sums the clients' factor pairs, not the clipped changes the "
                 "noise is calibrated to; use global.combine: factors or frozen_a with privacy")
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

    def global_adapter(self, client: int) -> AdapterConfig:
        """`client`'s global adapter: lora.global with its override's rank, and alpha keeping
        lora.global's alpha / r unless given (validated equal)."""
        g = self.lora.global_
        o = self.client_overrides.get(client)
        r = o.lora.global_.r if o and o.lora.global_.r is not None else g.r
        if r == g.r:
            return g
        alpha = o.lora.global_.alpha if o.lora.global_.alpha is not None else r * g.alpha / g.r
        return g.model_copy(update={"r": r, "alpha": alpha})

    def global_ranks(self) -> list[int]:
        return [self.global_adapter(c).r for c in range(len(self.client_sizes()))]

    def global_init_client(self) -> int:
        """The client whose seeded global adapter is the server's start (global.init = seed): the
        first of the largest rank, so that every client can be given a slice of it (0 when equal)."""
        ranks = self.global_ranks()
        return ranks.index(max(ranks))

    def local_rows(self, client: int) -> int:
        """Rows `client` trains on in a round: K x micro batch x accumulation x ranks
        (global.aggregation = steps weighs by it)."""
        ds = deepspeed_dict(self, client)
        return (self.inner_steps(client) * ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
                * self.client_sizes()[client])

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
