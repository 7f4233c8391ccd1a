"""Run configuration: pydantic models loaded from YAML with strict keys.

Every field is documented where it is declared, with its range (`Field(ge=...)`) or choices
(`Literal`) and the validators that check it beside it. Loading is strict: an unknown key names the
file, the key and the keys allowed there; a wrong type or value names the key and what is allowed;
every error of a file is reported at once. Checks across sections (topology against per-client
overrides, strategy against adapters, DeepSpeed against model.dtype) print the relation that failed.

    cfg = load_config("configs/demo.yaml", overrides=["train.rounds=5"])
"""

from __future__ import annotations

import os
import re
import types
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml
from annotated_types import Ge, Gt, Le, Lt
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and why."""


def _require(cond: bool, msg: str) -> None:
    """In a validator: refuse with `msg`, which names the keys (pydantic collects it with the others)."""
    if not cond:
        raise ValueError(msg)


def _why(text: str) -> dict:
    """`Field(json_schema_extra=_why(...))`: added in parentheses to the field's range error."""
    return {"why": text}


def _section(**kw):
    """A section left out is validated as an empty one (`model:` and `topology:` then say what they need)."""
    return Field(default_factory=dict, validate_default=True, **kw)


MAX_RANKS = 2**20  # beyond any machine this runs on; raise it for a bigger one


class Section(BaseModel):
    """Every section: unknown keys are errors, types are strict as YAML writes them (no "3" for 3,
    no true for 1; an int is a float), and an empty section (`train:` with nothing under it) is the defaults."""

    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True, use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_defaults(cls, data):
        return {} if data is None else data


# --------------------------------------------------------------------------- sections


class ModelConfig(Section):
    path: Optional[str] = None
    """Local Hugging Face checkpoint directory (model + tokenizer). Nothing is downloaded."""
    config: Optional[dict] = None
    """A transformers config (with `model_type`) to build a base from scratch, seeded by `seed`.
    Used by the demo and the tests; the tokenizer is then the built-in byte-level one."""
    pretrained: Optional[str] = None
    """Directory of a base produced by `fdlora-cluster pretrain` (only with `config`): when set and
    present, its weights replace the random initialisation."""
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    """Precision of the frozen base. Default: DeepSpeed's own config decides (`bf16: {enabled: true}`
    -> bfloat16, `fp16: {enabled: true}` -> float16, else float32). bfloat16/float16 here turn on
    DeepSpeed's matching section; a disagreement between the two is refused. Either way DeepSpeed
    keeps fp32 master weights and optimizer state for the trained adapters, and the adapters
    travel, fuse and save in fp32 (docs/LAUNCH.md, "Mixed precision")."""
    pretrain_steps: int = Field(400, ge=1)
    """`fdlora-cluster pretrain`: full-parameter steps on the scenario's general text."""
    pretrain_lr: float = Field(3e-3, gt=0)
    """`fdlora-cluster pretrain`: AdamW peak learning rate (warm-up, then linear decay)."""
    pretrain_batch_size: int = Field(32, ge=1)
    """`fdlora-cluster pretrain`: rows per step."""
    pretrain_seed: int = 0
    """`fdlora-cluster pretrain`: seed of the init and the corpus (independent of the run's seed,
    so runs with different seeds share one cached base)."""

    @model_validator(mode="after")
    def _one_source(self):
        _require((self.path is None) != (self.config is None),
                 "model: set exactly one of model.path (a local checkpoint) or model.config (build from scratch)")
        if self.path is not None:
            _require(os.path.isdir(self.path), f"model.path = {self.path!r} is not a directory")
            _require(self.pretrained is None, "model.pretrained only applies with model.config")
            return self
        _require("model_type" in self.config, "model.config needs a model_type (e.g. llama)")
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as known

        mt = self.config["model_type"]
        _require(isinstance(mt, str) and mt in known,
                 f"model.config.model_type = {mt!r} is not a causal LM type this transformers knows; "
                 f"e.g. {', '.join(t for t in ('llama', 'mistral', 'qwen2', 'gpt2') if t in known)}")
        return self


class AdapterConfig(Section):
    r: int = Field(8, ge=1)
    """LoRA rank."""
    alpha: float = Field(16.0, gt=0)
    """LoRA alpha; the adapter's delta is scaled by alpha / r."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """LoRA dropout (0 keeps runs bit-reproducible)."""
    target_modules: list[str] = Field(["q_proj", "v_proj"], min_length=1)
    """Module names (PEFT `target_modules`) that get this adapter."""


class LoraConfig(Section):
    personal: AdapterConfig = _section()
    """The client's own adapter; it never leaves the client."""
    global_: AdapterConfig = _section(alias="global")
    """The adapter synchronised through the server (YAML key `global`)."""


class TopologyConfig(Section):
    clients: Optional[list[int]] = None
    """Ranks per client, in rank order, e.g. [2, 2] or [1, 3]. World = 1 + sum(clients)."""
    num_clients: Optional[int] = Field(None, ge=1)
    """With `ranks_per_client`, the even alternative to `clients`."""
    ranks_per_client: Optional[int] = Field(None, ge=1)
    """Ranks in every client when `num_clients` is used."""
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """torch.distributed backend inside each client; auto = nccl with CUDA, else gloo."""
    rendezvous_addr: Optional[str] = None
    """Address each leader publishes for its client's torch.distributed world: an IP, a host name,
    or a network interface name (e.g. ib0) whose address the leader publishes, for clusters with
    several networks. Only clients that span hosts use it (a client on one host meets on loopback).
    Default: the leader host's address, never loopback (env FDLORA_RENDEZVOUS_ADDR overrides both;
    docs/LAUNCH.md)."""
    share_gpus: bool = False
    """Allow ranks of DIFFERENT clients on one GPU (a one-GPU workstation, small adapters). Ranks of
    one client never share a GPU (NCCL refuses it); without this, any sharing is refused at start
    with the host, its GPUs and the ranks (topology.place_gpus, docs/LAUNCH.md)."""

    @model_validator(mode="after")
    def _one_layout(self):
        if self.clients is not None:
            _require(self.num_clients is None and self.ranks_per_client is None,
                     "topology: give either clients: [sizes] or num_clients + ranks_per_client, not both")
            _require(len(self.clients) >= 1, "topology.clients must list at least one client")
            _require(all(s >= 1 for s in self.clients),
                     f"topology.clients = {self.clients}: every client needs at least 1 rank")
        else:
            _require(self.num_clients is not None and self.ranks_per_client is not None,
                     "topology: set clients: [ranks per client, ...] or both num_clients and ranks_per_client")
        ranks = sum(self.clients) if self.clients is not None else self.num_clients * self.ranks_per_client
        _require(ranks <= MAX_RANKS, f"topology: {ranks} client ranks; at most {MAX_RANKS} are supported")
        return self

    def client_sizes(self) -> list[int]:
        if self.clients is not None:
            return list(self.clients)
        return [self.ranks_per_client] * self.num_clients


class TrainConfig(Section):
    rounds: int = Field(3, ge=0)
    """Federated rounds T."""
    inner_steps: int = Field(3, ge=0)
    """K: optimizer steps each client takes on the global adapter per round."""
    personal_steps: int = Field(0, ge=0)
    """Optimizer steps on the personal adapter in the personal stage (strategies that have one)."""
    micro_batch_size: int = Field(4, ge=1)
    """Rows per rank per forward (DeepSpeed `train_micro_batch_size_per_gpu`)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro batches per optimizer step."""
    lr: float = Field(3e-3, gt=0)
    """Inner (client) AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """Inner AdamW weight decay."""
    max_seq_len: int = Field(64, ge=1)
    """Longest prompt + response in tokens; longer rows are cut from the left of the prompt."""
    eval_batch_size: int = Field(16, ge=1)
    """Rows per rank per forward in evaluation and in the fusion search."""


class ClientOverride(Section):
    deepspeed: Optional[dict] = None
    """Merged (recursively) over the DeepSpeed config for this client only."""
    inner_steps: Optional[int] = Field(None, ge=0)
    """This client's K, in place of `train.inner_steps`."""
    micro_batch_size: Optional[int] = Field(None, ge=1)
    """This client's micro batch per rank (wins over train.micro_batch_size and the shared
    DeepSpeed dict's train_micro_batch_size_per_gpu)."""


class OuterConfig(Section):
    optimizer: Optional[Literal["sgd", "nesterov", "adam"]] = None
    """Server optimizer over the averaged pseudo-gradient: sgd with lr 1.0 is FedAvg, nesterov
    is DiLoCo-style, adam is FedAdam. Left out: the strategy's own (OUTER_DEFAULTS: nesterov for
    fdlora and diloco, as their papers; sgd for fedavg, fedprox and feddpa)."""
    lr: Optional[float] = Field(None, gt=0)
    """Outer learning rate. Left out: the optimizer's default (sgd 1.0, nesterov 0.7, adam 1.0)."""
    momentum: Optional[float] = Field(None, ge=0, lt=1)
    """Momentum for `nesterov`. Left out: 0.9 (DiLoCo's)."""
    betas: list[float] = [0.9, 0.99]
    """Adam betas for `adam`."""
    eps: float = Field(1e-8, gt=0)
    """Adam epsilon for `adam`."""

    @field_validator("betas")
    @classmethod
    def _two_betas(cls, v):
        _require(len(v) == 2 and all(0 <= b < 1 for b in v), f"outer.betas = {v}: need two numbers in [0, 1)")
        return v


# What a strategy's outer step is when the config does not say: the method's own, so that an
# fdlora config written from scratch runs FDLoRA's Nesterov outer step and not FedAvg.
OUTER_DEFAULTS = {"fdlora": "nesterov", "diloco": "nesterov", "fedavg": "sgd", "fedprox": "sgd",
                  "feddpa": "sgd", "local": "sgd"}
OUTER_OPTIMIZER_DEFAULTS = {"sgd": {"lr": 1.0, "momentum": 0.9}, "nesterov": {"lr": 0.7, "momentum": 0.9},
                            "adam": {"lr": 1.0, "momentum": 0.9}}


def resolve_outer(cfg: "Config") -> OuterConfig:
    """cfg.outer with every field the config left out filled in: the optimizer from the strategy,
    lr and momentum from the optimizer. What the YAML gives wins, key by key."""
    o = cfg.outer
    opt = o.optimizer or OUTER_DEFAULTS.get(cfg.strategy, "sgd")
    d = OUTER_OPTIMIZER_DEFAULTS[opt]
    return OuterConfig(optimizer=opt, lr=d["lr"] if o.lr is None else o.lr,
                       momentum=d["momentum"] if o.momentum is None else o.momentum,
                       betas=list(o.betas), eps=o.eps)


class GlobalConfig(Section):
    init: Literal["seed", "personal_mean"] = "seed"
    """Start of the global adapter: the server's seeded init, or (paper's Algorithm 1, line 7) the
    mean of the clients' stage-1 personal adapters, which sends each personal adapter once."""
    aggregation: Literal["samples", "uniform"] = "samples"
    """Client weights in the average: by training rows, or 1/N."""


class FederationConfig(Section):
    round_timeout_s: Optional[float] = Field(None, gt=0, json_schema_extra=_why("or left out: wait for every client"))
    """When set, the server aggregates the updates that arrived within this many seconds of sending
    the round's global adapter; the others count as missing for the round (metrics.jsonl, summary).
    A late update is recognised by its round and dropped; its client goes on from the newest global.
    Default: wait for every client."""
    min_clients: int = Field(1, ge=1)
    """A round needs at least this many accepted updates; fewer fails the job with the clients
    that were missing or rejected and why."""
    max_update_norm: Optional[float] = Field(None, gt=0, json_schema_extra=_why("or left out"))
    """When set, an update whose change ||client global - round's global|| exceeds it is rejected
    for that round (logged with the client and its norm), not averaged."""
    compress: Literal["none", "bf16", "int8"] = "none"
    """What crosses MPI in both directions (fdlora_cluster/compress.py): `none`, the fp32 adapter;
    `bf16` or `int8`, each global adapter after the first as its change to the previous one and each
    update as its change to the round's global adapter, rounded, with error feedback (what rounding
    lost is sent with the next change). Every rank still holds the same global adapter bit for bit.
    A resumed job restarts the error feedback at zero (bit-identical resume needs `none`)."""
    compress_block: int = Field(256, ge=0, json_schema_extra=_why("0 = one scale per tensor"))
    """int8: values per fp32 scale (0 = one scale per tensor)."""


class PersonalConfig(Section):
    sync_every: int = Field(0, ge=0)
    """H: every H rounds the client overwrites its personal adapter with its local copy of the
    global one (0 = never)."""
    steps_per_round: int = Field(0, ge=0)
    """Personal-adapter steps per round, for strategies that train it during the rounds (ditto)."""


class FusionConfig(Section):
    optimizer: str = "NGOpt"
    """nevergrad optimizer name (NGOpt, Shiwa, CMA, ...)."""
    budget: int = Field(20, ge=3, json_schema_extra=_why("the search scores personal only, global only and both at 1 first"))
    """Evaluations one search spends, its three anchors included (personal only, global only,
    both at 1: scored first, so the choice is never worse than any of them on the search rows)."""
    bounds: list[float] = [-1.5, 1.5]
    """Search box for each weight."""
    l1: float = Field(0.05, ge=0)
    """L1 penalty on the weights, added to the few-shot loss."""
    rows: Literal["heldout", "train"] = "heldout"
    """Few-shot rows for the search: the client's few-shot split, or (paper) its training rows."""
    merge: Literal["exact", "params"] = "exact"
    """exact: fused delta = w_p*dW_p + w_g*dW_g (rank r_p + r_g). params: A and B weighted
    separately, LoraHub's reading (needs equal ranks)."""
    fixed_weights: list[float] = [0.5, 0.5]
    """(w_p, w_g) for strategies that fuse without searching."""

    @field_validator("bounds")
    @classmethod
    def _low_high(cls, v):
        _require(len(v) == 2 and v[0] < v[1], f"fusion.bounds = {v}: need [low, high] with low < high")
        return v

    @field_validator("fixed_weights")
    @classmethod
    def _two_weights(cls, v):
        _require(len(v) == 2, "fusion.fixed_weights needs (w_personal, w_global)")
        return v
    objective: Literal["loss", "accuracy", "mix"] = "loss"
    """What the search minimises on its rows (plus l1): `loss` (mean token loss), `accuracy` (the
    error rate under eval.headline's label set, loss breaking ties), or `mix` (mix * error rate +
    (1 - mix) * loss). docs/ALGORITHMS.md gives the measurements behind the default."""
    mix: float = Field(0.5, ge=0, le=1)
    """Weight of the error rate in `objective: mix`, in [0, 1]."""
    granularity: Literal["adapter", "layer", "module"] = "adapter"
    """One (w_p, w_g) pair for the whole adapter (the paper's AdaFusion), one per transformer
    layer, or one per target module (2 x groups weights for nevergrad to search)."""
    folds: int = Field(4, ge=1, json_schema_extra=_why("1 = no k-fold check"))
    """k of a k-fold check over the search rows (1 = off): the search is rerun on every k-1 folds;
    when its picks do worse on the held-out folds than the best anchor's, the best anchor is
    chosen (the search fitted noise). Each fold costs another `budget` - 3 evaluations. Default 4:
    on a development run (docs/ALGORITHMS.md) every unchecked search did worse on new rows than
    the personal adapter alone, and the check caught it."""


class FedDPAConfig(Section):
    """FedDPA (Yang et al., NeurIPS 2024; docs/ALGORITHMS.md says what is from the paper, what from
    the authors' code, and what is our choice)."""

    variant: Literal["T", "F"] = "T"
    """T: the local (personal) adapter trains every round from round 2 on, before the global steps,
    with the just-received global adapter active and frozen. F: plain FedAvg of the global adapter,
    then the local adapter trains once after the rounds, with the final global active and frozen."""
    local_weight: float = Field(0.5, ge=0, le=1, json_schema_extra=_why("the frozen global adapter gets 1 - it"))
    """While the local adapter trains, its output is scaled by this and the frozen global one's by
    1 - this (the authors' --local_weight, default 0.5). In [0, 1]."""
    finetune_steps: Optional[int] = Field(None, ge=0, json_schema_extra=_why("or left out"))
    """F only: steps on the local adapter after the rounds. None: the local steps T takes, (rounds - 1)
    x the per-round personal steps (personal.steps_per_round, else K)."""
    weighting: Literal["dynamic", "fixed"] = "dynamic"
    """Test time. dynamic: per test row, global weight = max_global_weight x mean cosine similarity
    of the row's representation to `reference_rows` random training rows, local weight = 1 - that.
    fixed: the `fused` adapter with fusion.fixed_weights (w_personal, w_global)."""
    max_global_weight: float = Field(0.5, gt=0, le=1)
    """dynamic: the largest global weight (the authors' --max_weight, default 0.5). In (0, 1]."""
    reference_rows: int = Field(5, ge=1)
    """dynamic: training rows each test row is compared with (the authors' --instance_num, 5)."""
    representation: Literal["last", "mean"] = "last"
    """dynamic: the prompt's last-layer hidden state at its last token, or the mean over its tokens
    (the authors' --emb_type last / avg), computed with the local adapter alone active."""


class DittoConfig(Section):
    """Ditto (Li et al., ICML 2021)."""

    lam: float = Field(1.0, ge=0, alias="lambda")
    """lambda: the personal adapter v trains on loss + (lambda/2)||v - w||^2, w the global adapter
    received at the round's start (YAML key `lambda`; the authors' run scripts use 1). >= 0."""


class DataConfig(Section):
    source: Literal["generator", "jsonl", "hf"] = "generator"
    """generator: the built-in seeded scenario; jsonl: JSONL files below; hf: local Hugging Face
    datasets below (JSON, JSONL, Parquet, Arrow, save_to_disk directories; needs `datasets`)."""
    files: Optional[list[str]] = None
    """jsonl / hf: one file per client (in client order), or one file split by `partition`."""
    split: Optional[str] = None
    """hf: the split to read from a dataset saved with several (a DatasetDict); one split is taken as is."""
    partition: Literal["iid", "dirichlet", "field"] = "iid"
    """How one file is split across clients; `field` uses each row's `client`."""
    alpha: float = Field(0.5, gt=0)
    """Dirichlet concentration over labels (small = skewed clients)."""
    rows_per_client: int = Field(200, ge=1)
    """generator: rows generated per client."""
    fewshot_rows: int = Field(8, ge=0)
    """Rows per client held out for the fusion search."""
    test_fraction: float = Field(0.2, gt=0, lt=1)
    """Share of each client's rows held out for its test split."""
    max_rows_per_client: Optional[int] = Field(None, ge=1, json_schema_extra=_why("or left out"))
    """Cap on each client's rows after partitioning (None = all)."""
    skew: float = Field(1.0, gt=0)
    """generator: how different the clients' line mixes are (a Dirichlet concentration; small =
    strong label skew between clients, large = alike)."""

    @model_validator(mode="after")
    def _files_exist(self):
        if self.source in ("jsonl", "hf"):
            _require(bool(self.files),
                     f"data.source = {self.source!r} needs data.files (one per client, or one to split)")
            for p in self.files:  # hf also reads save_to_disk directories
                _require(os.path.isfile(p) or self.source == "hf" and os.path.isdir(p), f"data.files: {p} not found")
        if self.source == "hf":
            import importlib.util

            _require(importlib.util.find_spec("datasets") is not None,
                     "data.source = 'hf' reads datasets with the `datasets` library, which is not installed: "
                     "pip install 'fdlora-cluster[hf]' (or pip install datasets)")
        return self


class EvalConfig(Section):
    headline: Literal["accuracy", "accuracy_all"] = "accuracy"
    """The accuracy that judges a method (comparison tables, fusion.objective accuracy / mix).
    Both are always reported: `accuracy` picks each row's answer among the client's own label set
    (the responses in its own rows), `accuracy_all` among every client's labels together. They
    differ when clients name their labels differently; the union then charges a shared adapter
    for answering with another client's name for the same label."""
    generate: bool = False
    """Also answer each test row's prompt by greedy decoding and score the text against the row's
    response (eval.metrics), for every evaluated adapter: the evaluation for tasks without labels.
    It costs up to max_new_tokens forwards per batch of test rows, so it is off by default."""
    metrics: list[Literal["exact_match", "rouge_l"]] = ["exact_match", "rouge_l"]
    """What eval.generate reports: `exact_match` (equal after whitespace normalisation: stripped,
    inner runs of whitespace one space; case kept) and `rouge_l` (ROUGE-L F1 on whitespace tokens)."""
    max_new_tokens: int = Field(32, ge=1)
    """eval.generate: at most this many generated tokens per row (decoding also stops at eos)."""
    generate_rows: Optional[int] = Field(None, ge=1, json_schema_extra=_why("or null: every test row"))
    """eval.generate: decode only the first this many test rows per client (null = all of them);
    loss, perplexity and accuracy still cover every test row."""

    @field_validator("metrics")
    @classmethod
    def _each_once(cls, v):
        _require(len(v) >= 1 and len(set(v)) == len(v),
                 f"eval.metrics = {v}: list each of exact_match, rouge_l at most once, and at least one")
        return v


class LogConfig(Section):
    level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"
    """Level of the console and the per-rank log files."""
    followers_on_console: bool = False
    """Show non-leader client ranks on the console too (they always write their log file)."""
    every: int = Field(1, ge=1)
    """Log a step line (to the rank's log file) every this many optimizer steps."""
    progress: Literal["auto", "bar", "lines"] = "auto"
    """The server's progress over rounds on the console: a tqdm bar, or one line per round.
    `auto`: a bar when the console is a terminal, lines in a file or pipe (Slurm, CI; log.use_bar)."""
    tensorboard: bool = False
    """Write per-client losses, accuracies, fusion weights, bytes and round times as TensorBoard
    scalars into RUN_DIR/tensorboard (needs tensorboardX: pip install 'fdlora-cluster[track]')."""
    wandb: bool = False
    """Also log them to Weights & Biases (needs wandb; its WANDB_* variables say where and how)."""
    mlflow: bool = False
    """Also log them to MLflow (needs mlflow; MLFLOW_TRACKING_URI says where, e.g. sqlite:///mlflow.db)."""
    project: str = "fdlora-cluster"
    """The W&B project and the MLflow experiment; the run is named after the run directory."""

    @field_validator("project")
    @classmethod
    def _not_empty(cls, v):
        _require(bool(v.strip()), "log.project must not be empty (the W&B project and MLflow experiment)")
        return v

    @model_validator(mode="after")
    def _trackers_installed(self):
        from .tracking import missing_packages

        for key, package in missing_packages(self):  # asked for, so no silent skip
            raise ValueError(f"log.{key} = true needs the `{package}` package, which is not installed: "
                             f"pip install {package} (or set log.{key}: false)")
        return self


class CheckpointConfig(Section):
    every: int = Field(1, ge=0, json_schema_extra=_why("0 = no checkpoints"))
    """Write a checkpoint after every this many rounds, and after the last round (0 = never).
    `fdlora-cluster run CONFIG --resume auto` continues from the newest complete one
    (docs/RELIABILITY.md, fdlora_cluster/checkpoint.py)."""
    keep: int = Field(2, ge=1)
    """Complete checkpoints kept under RUN_DIR/checkpoints; older ones are removed."""


# fdlora_cluster.strategies implements these. A str checked against them rather than a Literal, so
# the error lists the names unquoted, as the docs write them.
STRATEGIES = ("fdlora", "fedavg", "fedprox", "diloco", "local", "feddpa", "ditto")


class Config(Section):
    strategy: str = "fedavg"
    """The federated algorithm: one of fdlora_cluster.strategies.STRATEGIES."""
    seed: int = Field(0, ge=0)
    """Seeds the base init, adapters, data splits and every per-client, per-round stream."""
    output_dir: str = "runs/demo"
    """Run directory (config.yaml, metrics.jsonl, summary.json, adapters/, logs/)."""
    model: ModelConfig = _section()
    lora: LoraConfig = _section()
    topology: TopologyConfig = _section()
    deepspeed: Union[dict, str] = Field(default_factory=dict)
    """DeepSpeed config dict, or the path of a DeepSpeed JSON file, passed through. Batch sizes
    and the optimizer (and its lr) are filled in from `train` unless given here; what is given
    here wins, and the trainer uses it too. No `scheduler`: the adapter not being trained is
    frozen by lr 0 in its parameter group, which a scheduler would overwrite."""
    client_overrides: dict[int, ClientOverride] = Field(default_factory=dict)
    """Per-client settings keyed by client id (0-based)."""
    train: TrainConfig = _section()
    outer: OuterConfig = _section()
    global_: GlobalConfig = _section(alias="global")
    personal: PersonalConfig = _section()
    federation: FederationConfig = _section()
    """What the server accepts: checks on every update (docs/RELIABILITY.md)."""
    fusion: FusionConfig = _section()
    fedprox_mu: float = Field(0.01, ge=0)
    """Proximal weight mu for `fedprox`."""
    feddpa: FedDPAConfig = _section()
    """Settings of strategy `feddpa`."""
    ditto: DittoConfig = _section()
    """Settings of strategy `ditto`."""
    data: DataConfig = _section()
    eval: EvalConfig = _section()
    log: LogConfig = _section()
    checkpoint: CheckpointConfig = _section()

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, v):
        _require(v in STRATEGIES, f"strategy = {v!r} is not valid; expected one of {', '.join(STRATEGIES)}")
        return v

    @field_validator("deepspeed")
    @classmethod
    def _file_exists(cls, v):
        _require(not isinstance(v, str) or os.path.isfile(v), f"deepspeed: JSON file {v} not found")
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
            _require(isinstance(k, int) and not isinstance(k, bool), f"client_overrides key {k!r} must be an integer")
            out[k] = o
        return out

    # ----------------------------------------------------------------- checks across sections
    # Each runs once every section is valid; each message says the relation that failed.

    @model_validator(mode="after")
    def _fits_the_clients(self):
        n = len(self.client_sizes())
        for c in self.client_overrides:
            _require(0 <= c < n, f"client_overrides has client {c}, but the topology has {n} clients (ids 0..{n - 1})")
        _require(self.federation.min_clients <= n, f"federation.min_clients = {self.federation.min_clients} "
                 f"must be in [1, number of clients = {n}]")
        d = self.data
        if d.files:
            _require(len(d.files) in (1, n),
                     f"data.files has {len(d.files)} files; give 1 (split across clients) or {n} (one per client)")
        if d.source == "generator":
            from .data.scenario import MAX_CLIENTS

            _require(n <= MAX_CLIENTS, f"the shipped scenario has rules for {MAX_CLIENTS} clients, "
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
            _require(p.r == g.r and p.alpha == g.alpha and p.target_modules == g.target_modules,
                     "strategy ditto pulls the personal adapter towards the global one parameter by parameter and "
                     "starts it as a copy of it, so lora.personal and lora.global need the same r, alpha and "
                     f"target_modules (now r {p.r} vs {g.r}, alpha {p.alpha} vs {g.alpha}, "
                     f"targets {p.target_modules} vs {g.target_modules})")
        few = self.data.fewshot_rows
        if self.strategy == "fdlora":
            _require(few >= 1, "strategy fdlora searches its fusion weights on data.fewshot_rows rows per client; "
                     "data.fewshot_rows = 0 leaves it none: set it >= 1")
            _require(f.folds <= few, f"fusion.folds = {f.folds} needs at least one search row per fold, "
                     f"but data.fewshot_rows = {few}; set fusion.folds <= {few}")
            import nevergrad as ng

            _require(f.optimizer in ng.optimizers.registry, f"fusion.optimizer = {f.optimizer!r} is not a "
                     "nevergrad optimizer; e.g. NGOpt, Shiwa, CMA, OnePlusOne")
        if f.merge == "params":
            _require(p.r == g.r and p.alpha == g.alpha and p.target_modules == g.target_modules,
                     "fusion.merge = 'params' weights A and B separately into one adapter of one scale, so "
                     "lora.personal and lora.global need the same r, alpha and target_modules; use merge: exact otherwise")
        if self.global_.init == "personal_mean" or self.personal.sync_every:
            _require(p.r == g.r and p.target_modules == g.target_modules,
                     "global.init = personal_mean and personal.sync_every copy weights between the two adapters, "
                     "so lora.personal and lora.global need the same r and target_modules "
                     f"(now r {p.r} vs {g.r}, targets {p.target_modules} vs {g.target_modules})")
        if self.strategy in ("fdlora", "feddpa"):
            _require(p.target_modules == g.target_modules,
                     f"strategy {self.strategy} fuses the two adapters layer by layer, so lora.personal.target_modules "
                     f"({p.target_modules}) must equal lora.global.target_modules ({g.target_modules})")
        return self

    @model_validator(mode="after")
    def _deepspeed_builds(self):
        # Builds the clients' DeepSpeed dicts now, so a bad file, stage or precision fails on load: each
        # overridden client's, and one for all the others (theirs are equal), so a million clients cost one.
        from .deepspeed_config import deepspeed_dict

        n = len(self.client_sizes())
        plain = next(c for c in range(n) if c not in self.client_overrides or c == n - 1)
        for c in sorted(set(self.client_overrides) | {plain}):
            stage = deepspeed_dict(self, c)["zero_optimization"].get("stage", 0)
            _require(not (self.strategy in ("fedprox", "ditto") and stage == 3),
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
        from .deepspeed_config import deepspeed_dict

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


# --------------------------------------------------------------------------- loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""


def _no_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise ConfigError(f"{node.start_mark.name}:{key_node.start_mark.line + 1}: key {key!r} is given twice")
        seen.add(key)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


MAX_VALUES = 100_000
"""A config expands to at most this many values: YAML aliases can make a few lines stand for
billions (or for a loop), which every later step would walk."""


def _check_size(raw, where: str) -> None:
    """Refuses what later steps cannot handle: more than MAX_VALUES values, and integers too long
    to print (`0xfff...` reads as one; Python's str() refuses over 4300 digits, and every error
    message prints the value it is about)."""
    seen, stack = 0, [raw]
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ConfigError(f"{where}: expands to more than {MAX_VALUES} values (YAML aliases that repeat, "
                              "or refer to, themselves?)")
        if isinstance(node, int) and node.bit_length() > 13_000:
            raise ConfigError(f"{where}: holds an integer of {node.bit_length()} bits; no setting takes one that large")
        if isinstance(node, dict):
            stack.extend(node.values())
            stack.extend(node.keys())
        elif isinstance(node, list):
            stack.extend(node)


def _parse_yaml(text, where: str, loader=_StrictLoader):
    """YAML text or an open file as Python values; every way it can fail is a ConfigError naming `where`."""
    try:
        value = yaml.load(text, Loader=loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:  # PyYAML builds nested values recursively
        raise ConfigError(f"{where}: nested too deeply to read") from None
    except (ValueError, TypeError, OverflowError) as e:  # PyYAML's constructors do not wrap their own errors:
        # an integer of 5000 digits, `2001-13-45` read as a date, `!!int x`
        raise ConfigError(f"{where}: not valid YAML: a value cannot be read ({e})") from None
    _check_size(value, where)
    return value


def read_yaml(path: str, _seen: tuple = ()) -> dict:
    """One YAML file as a mapping, with `include: other.yaml` (relative to the file) merged under it:
    the included file's keys first, this file's keys over them, section by section."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.abspath(path) in _seen:
        raise ConfigError(f"{path}: include loop through {' -> '.join(_seen)}")
    with open(path, encoding="utf-8") as f:
        raw = _parse_yaml(f, path) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    include = raw.pop("include", None)
    if include is None:
        return raw
    if not isinstance(include, str):
        raise ConfigError(f"{path}: include must be one file name, got {include!r}")
    target = os.path.join(os.path.dirname(path), include)
    if not os.path.isfile(target):
        raise ConfigError(f"{path}: include: file {target} not found")
    base = read_yaml(target, _seen + (os.path.abspath(path),))
    return merge(base, raw)


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
        msgs = list(dict.fromkeys(_describe(err) for err in e.errors()))
        if len(msgs) == 1:
            raise ConfigError(f"{source}: {msgs[0]}") from None
        raise ConfigError(f"{source}: {len(msgs)} errors:\n" + "\n".join(f"  - {m}" for m in msgs)) from None


def apply_override(raw: dict, item: str) -> None:
    """Apply one `--set a.b.c=value` (value parsed as YAML) to the raw mapping."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key.path=value")
    key, value = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty part in key path {key!r}")
    node = raw
    for p in parts[:-1]:
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {item!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = _parse_yaml(value, f"--set {item!r}", yaml.SafeLoader) if value != "" else None


def merge(a: dict, b: dict) -> dict:
    """`b` over a copy of `a`, mapping by mapping (lists and values of `b` replace those of `a`)."""
    out = {k: (merge(v, {}) if isinstance(v, dict) else v) for k, v in a.items()}
    for k, v in b.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

# --------------------------------------------------------------------------- error messages


def _describe(err: dict) -> str:
    """One pydantic error as our message: the dotted key path, the value, and what is allowed."""
    path, tp, info, owner = _locate(err["loc"])
    kind, value = err["type"], err.get("input")
    if kind == "value_error":  # our validators' messages name their keys
        return str(err["ctx"]["error"])
    if kind == "extra_forbidden":
        where = path.rpartition(".")[0] if "." in path else "top level"
        return f"unknown key '{path}'; allowed keys at {where}: " + ", ".join(sorted(_keys(owner)))
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and info is not None:
        note = (info.json_schema_extra or {}).get("why")
        return f"{path} = {_shown(value, tp)} must be {_range(info.metadata)}" + (f" ({note})" if note else "")
    if kind == "too_short":
        return f"{path} must not be empty"
    if kind.endswith("_type") or kind == "literal_error":
        return f"{path} = {value!r} is not valid; expected {_expected(tp)}"
    return f"{path} = {value!r} is not valid: {err['msg']}"


def _locate(loc: tuple) -> tuple[str, Any, Any, Any]:
    """An error location as (dotted key path, annotation there, its Field, the section holding it)."""
    tp, path, info, owner = Config, "", None, None
    for part in loc:
        tp = _required(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            owner, info = tp, next((f for n, f in tp.model_fields.items() if (f.alias or n) == part), None)
            path = f"{path}.{part}" if path else str(part)
            if info is None:  # an unknown key
                return path, None, None, owner
            tp = info.annotation
        elif get_origin(tp) is list and isinstance(part, int):
            path, tp, info = f"{path}[{part}]", get_args(tp)[0], None
        elif get_origin(tp) is dict and part != "[key]":
            path, tp, info = f"{path}.{part}", get_args(tp)[1], None
        else:  # a union member's tag, a dict key: the error is about the value as a whole
            break
    return path, tp, info, owner


def _required(tp):
    """Optional[X] as X: a null is always allowed where it is, so errors are about X."""
    args = get_args(tp)
    if get_origin(tp) in (Union, types.UnionType) and type(None) in args:
        rest = tuple(a for a in args if a is not type(None))
        return rest[0] if len(rest) == 1 else Union[rest]
    return tp


def _keys(model) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def _expected(tp) -> str:
    tp = _required(tp)
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_expected(a) for a in args)
    if origin is list:
        return f"a list of {_expected(args[0])}"
    if origin is dict or tp is dict or isinstance(tp, type) and issubclass(tp, BaseModel):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _range(metadata: list) -> str:
    """`>= 0`, `> 0`, or `in [0, 1)` from a Field's bounds."""
    low = next(((f"[{m.ge}", f">= {m.ge}") if isinstance(m, Ge) else (f"({m.gt}", f"> {m.gt}")
                for m in metadata if isinstance(m, (Ge, Gt))), None)
    high = next(((f"{m.le}]", f"<= {m.le}") if isinstance(m, Le) else (f"{m.lt})", f"< {m.lt}")
                 for m in metadata if isinstance(m, (Le, Lt))), None)
    if low and high:
        return f"in {low[0]}, {high[0]}"
    return (low or high)[1]


def _shown(value, tp) -> str:
    """The value as the field holds it: an int given for a float prints as the float it became."""
    if _required(tp) is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return str(float(value))
        except OverflowError:
            pass
    return str(value)
