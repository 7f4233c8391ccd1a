"""Run configuration: typed dataclasses loaded from YAML with strict keys.

Every field is documented where it is declared. Loading is strict: an unknown key names the
file, the key and the keys allowed there; a wrong type or value names the key and what is
allowed. Cross-field checks (topology against world size, per-client overrides against the
number of clients) print the relation that failed.

    cfg = load_config("configs/demo.yaml", overrides=["train.rounds=5"])
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and why."""


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
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
    pretrain_steps: int = 400
    """`fdlora-cluster pretrain`: full-parameter steps on the scenario's general text."""
    pretrain_lr: float = 3e-3
    """`fdlora-cluster pretrain`: AdamW peak learning rate (warm-up, then linear decay)."""
    pretrain_batch_size: int = 32
    """`fdlora-cluster pretrain`: rows per step."""
    pretrain_seed: int = 0
    """`fdlora-cluster pretrain`: seed of the init and the corpus (independent of the run's seed,
    so runs with different seeds share one cached base)."""


@dataclass
class AdapterConfig:
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha; the adapter's delta is scaled by alpha / r."""
    dropout: float = 0.0
    """LoRA dropout (0 keeps runs bit-reproducible)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    """Module names (PEFT `target_modules`) that get this adapter."""


@dataclass
class LoraConfig:
    personal: AdapterConfig = field(default_factory=AdapterConfig)
    """The client's own adapter; it never leaves the client."""
    global_: AdapterConfig = field(default_factory=AdapterConfig, metadata={"key": "global"})
    """The adapter synchronised through the server (YAML key `global`)."""


@dataclass
class TopologyConfig:
    clients: Optional[list[int]] = None
    """Ranks per client, in rank order, e.g. [2, 2] or [1, 3]. World = 1 + sum(clients)."""
    num_clients: Optional[int] = None
    """With `ranks_per_client`, the even alternative to `clients`."""
    ranks_per_client: Optional[int] = None
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

    def client_sizes(self) -> list[int]:
        if self.clients is not None:
            return list(self.clients)
        return [self.ranks_per_client] * self.num_clients


@dataclass
class TrainConfig:
    rounds: int = 3
    """Federated rounds T."""
    inner_steps: int = 3
    """K: optimizer steps each client takes on the global adapter per round."""
    personal_steps: int = 0
    """Optimizer steps on the personal adapter in the personal stage (strategies that have one)."""
    micro_batch_size: int = 4
    """Rows per rank per forward (DeepSpeed `train_micro_batch_size_per_gpu`)."""
    gradient_accumulation_steps: int = 1
    """Micro batches per optimizer step."""
    lr: float = 3e-3
    """Inner (client) AdamW learning rate."""
    weight_decay: float = 0.0
    """Inner AdamW weight decay."""
    max_seq_len: int = 64
    """Longest prompt + response in tokens; longer rows are cut from the left of the prompt."""
    eval_batch_size: int = 16
    """Rows per rank per forward in evaluation and in the fusion search."""


@dataclass
class ClientOverride:
    deepspeed: Optional[dict] = None
    """Merged (recursively) over the DeepSpeed config for this client only."""
    inner_steps: Optional[int] = None
    """This client's K, in place of `train.inner_steps`."""
    micro_batch_size: Optional[int] = None
    """This client's micro batch per rank (wins over train.micro_batch_size and the shared
    DeepSpeed dict's train_micro_batch_size_per_gpu)."""


@dataclass
class OuterConfig:
    optimizer: Optional[Literal["sgd", "nesterov", "adam"]] = None
    """Server optimizer over the averaged pseudo-gradient: sgd with lr 1.0 is FedAvg, nesterov
    is DiLoCo-style, adam is FedAdam. Left out: the strategy's own (OUTER_DEFAULTS: nesterov for
    fdlora and diloco, as their papers; sgd for fedavg, fedprox and feddpa)."""
    lr: Optional[float] = None
    """Outer learning rate. Left out: the optimizer's default (sgd 1.0, nesterov 0.7, adam 1.0)."""
    momentum: Optional[float] = None
    """Momentum for `nesterov`. Left out: 0.9 (DiLoCo's)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    """Adam betas for `adam`."""
    eps: float = 1e-8
    """Adam epsilon for `adam`."""


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


@dataclass
class GlobalConfig:
    init: Literal["seed", "personal_mean"] = "seed"
    """Start of the global adapter: the server's seeded init, or (paper's Algorithm 1, line 7) the
    mean of the clients' stage-1 personal adapters, which sends each personal adapter once."""
    aggregation: Literal["samples", "uniform"] = "samples"
    """Client weights in the average: by training rows, or 1/N."""


@dataclass
class FederationConfig:
    round_timeout_s: Optional[float] = None
    """When set, the server aggregates the updates that arrived within this many seconds of sending
    the round's global adapter; the others count as missing for the round (metrics.jsonl, summary).
    A late update is recognised by its round and dropped; its client goes on from the newest global.
    Default: wait for every client."""
    min_clients: int = 1
    """A round needs at least this many accepted updates; fewer fails the job with the clients
    that were missing or rejected and why."""
    max_update_norm: Optional[float] = None
    """When set, an update whose change ||client global - round's global|| exceeds it is rejected
    for that round (logged with the client and its norm), not averaged."""
    compress: Literal["none", "bf16", "int8"] = "none"
    """What crosses MPI in both directions (fdlora_cluster/compress.py): `none`, the fp32 adapter;
    `bf16` or `int8`, each global adapter after the first as its change to the previous one and each
    update as its change to the round's global adapter, rounded, with error feedback (what rounding
    lost is sent with the next change). Every rank still holds the same global adapter bit for bit.
    A resumed job restarts the error feedback at zero (bit-identical resume needs `none`)."""
    compress_block: int = 256
    """int8: values per fp32 scale (0 = one scale per tensor)."""


@dataclass
class PersonalConfig:
    sync_every: int = 0
    """H: every H rounds the client overwrites its personal adapter with its local copy of the
    global one (0 = never)."""
    steps_per_round: int = 0
    """Personal-adapter steps per round, for strategies that train it during the rounds (ditto)."""


@dataclass
class FusionConfig:
    optimizer: str = "NGOpt"
    """nevergrad optimizer name (NGOpt, Shiwa, CMA, ...)."""
    budget: int = 20
    """Evaluations one search spends, its three anchors included (personal only, global only,
    both at 1: scored first, so the choice is never worse than any of them on the search rows)."""
    bounds: list[float] = field(default_factory=lambda: [-1.5, 1.5])
    """Search box for each weight."""
    l1: float = 0.05
    """L1 penalty on the weights, added to the few-shot loss."""
    rows: Literal["heldout", "train"] = "heldout"
    """Few-shot rows for the search: the client's few-shot split, or (paper) its training rows."""
    merge: Literal["exact", "params"] = "exact"
    """exact: fused delta = w_p*dW_p + w_g*dW_g (rank r_p + r_g). params: A and B weighted
    separately, LoraHub's reading (needs equal ranks)."""
    fixed_weights: list[float] = field(default_factory=lambda: [0.5, 0.5])
    """(w_p, w_g) for strategies that fuse without searching."""
    objective: Literal["loss", "accuracy", "mix"] = "loss"
    """What the search minimises on its rows (plus l1): `loss` (mean token loss), `accuracy` (the
    error rate under eval.headline's label set, loss breaking ties), or `mix` (mix * error rate +
    (1 - mix) * loss). docs/ALGORITHMS.md gives the measurements behind the default."""
    mix: float = 0.5
    """Weight of the error rate in `objective: mix`, in [0, 1]."""
    granularity: Literal["adapter", "layer", "module"] = "adapter"
    """One (w_p, w_g) pair for the whole adapter (the paper's AdaFusion), one per transformer
    layer, or one per target module (2 x groups weights for nevergrad to search)."""
    folds: int = 4
    """k of a k-fold check over the search rows (1 = off): the search is rerun on every k-1 folds;
    when its picks do worse on the held-out folds than the best anchor's, the best anchor is
    chosen (the search fitted noise). Each fold costs another `budget` - 3 evaluations. Default 4:
    on a development run (docs/ALGORITHMS.md) every unchecked search did worse on new rows than
    the personal adapter alone, and the check caught it."""


@dataclass
class FedDPAConfig:
    """FedDPA (Yang et al., NeurIPS 2024; docs/ALGORITHMS.md says what is from the paper, what from
    the authors' code, and what is our choice)."""

    variant: Literal["T", "F"] = "T"
    """T: the local (personal) adapter trains every round from round 2 on, before the global steps,
    with the just-received global adapter active and frozen. F: plain FedAvg of the global adapter,
    then the local adapter trains once after the rounds, with the final global active and frozen."""
    local_weight: float = 0.5
    """While the local adapter trains, its output is scaled by this and the frozen global one's by
    1 - this (the authors' --local_weight, default 0.5). In [0, 1]."""
    finetune_steps: Optional[int] = None
    """F only: steps on the local adapter after the rounds. None: the local steps T takes, (rounds - 1)
    x the per-round personal steps (personal.steps_per_round, else K)."""
    weighting: Literal["dynamic", "fixed"] = "dynamic"
    """Test time. dynamic: per test row, global weight = max_global_weight x mean cosine similarity
    of the row's representation to `reference_rows` random training rows, local weight = 1 - that.
    fixed: the `fused` adapter with fusion.fixed_weights (w_personal, w_global)."""
    max_global_weight: float = 0.5
    """dynamic: the largest global weight (the authors' --max_weight, default 0.5). In (0, 1]."""
    reference_rows: int = 5
    """dynamic: training rows each test row is compared with (the authors' --instance_num, 5)."""
    representation: Literal["last", "mean"] = "last"
    """dynamic: the prompt's last-layer hidden state at its last token, or the mean over its tokens
    (the authors' --emb_type last / avg), computed with the local adapter alone active."""


@dataclass
class DittoConfig:
    """Ditto (Li et al., ICML 2021)."""

    lam: float = field(default=1.0, metadata={"key": "lambda"})
    """lambda: the personal adapter v trains on loss + (lambda/2)||v - w||^2, w the global adapter
    received at the round's start (YAML key `lambda`; the authors' run scripts use 1). >= 0."""


@dataclass
class DataConfig:
    source: Literal["generator", "jsonl", "hf"] = "generator"
    """generator: the built-in seeded scenario; jsonl: JSONL files below; hf: local Hugging Face
    datasets below (JSON, JSONL, Parquet, Arrow, save_to_disk directories; needs `datasets`)."""
    files: Optional[list[str]] = None
    """jsonl / hf: one file per client (in client order), or one file split by `partition`."""
    split: Optional[str] = None
    """hf: the split to read from a dataset saved with several (a DatasetDict); one split is taken as is."""
    partition: Literal["iid", "dirichlet", "field"] = "iid"
    """How one file is split across clients; `field` uses each row's `client`."""
    alpha: float = 0.5
    """Dirichlet concentration over labels (small = skewed clients)."""
    rows_per_client: int = 200
    """generator: rows generated per client."""
    fewshot_rows: int = 8
    """Rows per client held out for the fusion search."""
    test_fraction: float = 0.2
    """Share of each client's rows held out for its test split."""
    max_rows_per_client: Optional[int] = None
    """Cap on each client's rows after partitioning (None = all)."""
    skew: float = 1.0
    """generator: how different the clients' line mixes are (a Dirichlet concentration; small =
    strong label skew between clients, large = alike)."""


@dataclass
class EvalConfig:
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
    metrics: list[Literal["exact_match", "rouge_l"]] = field(default_factory=lambda: ["exact_match", "rouge_l"])
    """What eval.generate reports: `exact_match` (equal after whitespace normalisation: stripped,
    inner runs of whitespace one space; case kept) and `rouge_l` (ROUGE-L F1 on whitespace tokens)."""
    max_new_tokens: int = 32
    """eval.generate: at most this many generated tokens per row (decoding also stops at eos)."""
    generate_rows: Optional[int] = None
    """eval.generate: decode only the first this many test rows per client (null = all of them);
    loss, perplexity and accuracy still cover every test row."""


@dataclass
class LogConfig:
    level: Literal["DEBUG", "INFO", "WARNING"] = "INFO"
    """Level of the console and the per-rank log files."""
    followers_on_console: bool = False
    """Show non-leader client ranks on the console too (they always write their log file)."""
    every: int = 1
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


@dataclass
class CheckpointConfig:
    every: int = 1
    """Write a checkpoint after every this many rounds, and after the last round (0 = never).
    `fdlora-cluster run CONFIG --resume auto` continues from the newest complete one
    (docs/RELIABILITY.md, fdlora_cluster/checkpoint.py)."""
    keep: int = 2
    """Complete checkpoints kept under RUN_DIR/checkpoints; older ones are removed."""


STRATEGIES = ("fdlora", "fedavg", "fedprox", "diloco", "local", "feddpa", "ditto")  # fdlora_cluster.strategies


@dataclass
class Config:
    strategy: str = "fedavg"
    """The federated algorithm: one of fdlora_cluster.strategies.STRATEGIES."""
    seed: int = 0
    """Seeds the base init, adapters, data splits and every per-client, per-round stream."""
    output_dir: str = "runs/demo"
    """Run directory (config.yaml, metrics.jsonl, summary.json, adapters/, logs/)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    deepspeed: Union[dict, str] = field(default_factory=dict)
    """DeepSpeed config dict, or the path of a DeepSpeed JSON file, passed through. Batch sizes
    and the optimizer (and its lr) are filled in from `train` unless given here; what is given
    here wins, and the trainer uses it too. No `scheduler`: the adapter not being trained is
    frozen by lr 0 in its parameter group, which a scheduler would overwrite."""
    client_overrides: dict[int, ClientOverride] = field(default_factory=dict)
    """Per-client settings keyed by client id (0-based)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    outer: OuterConfig = field(default_factory=OuterConfig)
    global_: GlobalConfig = field(default_factory=GlobalConfig, metadata={"key": "global"})
    personal: PersonalConfig = field(default_factory=PersonalConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    """What the server accepts: checks on every update (docs/RELIABILITY.md)."""
    fusion: FusionConfig = field(default_factory=FusionConfig)
    fedprox_mu: float = 0.01
    """Proximal weight mu for `fedprox`."""
    feddpa: FedDPAConfig = field(default_factory=FedDPAConfig)
    """Settings of strategy `feddpa`."""
    ditto: DittoConfig = field(default_factory=DittoConfig)
    """Settings of strategy `ditto`."""
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    source_file: Optional[str] = field(default=None, metadata={"internal": True})

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
        return _to_dict(self)


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
    return _merge(base, raw)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    """Read a YAML file (and what it includes), apply `key.path=value` overrides, validate."""
    path = str(path)
    raw = read_yaml(path)
    for item in overrides or []:
        apply_override(raw, item)
    cfg = config_from_dict(raw, source=path)
    cfg.source_file = path
    return cfg


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    cfg = _build(Config, raw, prefix="", source=source)
    validate(cfg, source)
    return cfg


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


def _key(f: dataclasses.Field) -> str:
    return f.metadata.get("key", f.name)


def _public_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal")]


def _build(cls, raw: Any, prefix: str, source: str):
    where = prefix.rstrip(".") or "top level"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {raw!r}")
    fields = {_key(f): f for f in _public_fields(cls)}
    unknown = [k for k in raw if k not in fields]
    if unknown:
        raise ConfigError(
            f"{source}: unknown key '{prefix}{unknown[0]}'; allowed keys at {where}: "
            + ", ".join(sorted(fields)))
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, f in fields.items():
        if key in raw:
            kwargs[f.name] = _coerce(hints[f.name], raw[key], f"{prefix}{key}", source)
    return cls(**kwargs)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp, value, key: str, source: str):
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{source}: {key} = {value!r} is not valid; expected {_type_name(tp)}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".", source)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise bad
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, source)
            except ConfigError:
                continue
        raise bad
    if origin is list:
        if not isinstance(value, list):
            raise bad
        (item,) = typing.get_args(tp)
        return [_coerce(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        args = typing.get_args(tp)
        if not args:
            return dict(value)
        kt, vt = args
        out = {}
        for k, v in value.items():
            if kt is int:  # YAML gives 1 or, from --set and JSON-minded users, "1"; not 1.5 or true
                if isinstance(k, str) and re.fullmatch(r"\s*-?[0-9]{1,18}\s*", k):
                    k = int(k)
                if isinstance(k, bool) or not isinstance(k, int):
                    raise ConfigError(f"{source}: {key} key {k!r} must be an integer")
            out[k] = _coerce(vt, v, f"{key}.{k}", source)
        return out
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise bad


def _to_dict(obj):
    if dataclasses.is_dataclass(obj):
        return {_key(f): _to_dict(getattr(obj, f.name)) for f in _public_fields(type(obj))}
    if isinstance(obj, dict):
        return {k: _to_dict(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_dict(v) for v in obj]
    return obj


# --------------------------------------------------------------------------- validation


MAX_RANKS = 2**20  # beyond any machine this runs on; raise it for a bigger one


def _require(cond: bool, source: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{source}: {msg}")


def validate(cfg: Config, source: str) -> None:
    """Cross-field checks; each message says the relation that failed and how to fix it."""
    _require(cfg.strategy in STRATEGIES, source,
             f"strategy = {cfg.strategy!r} is not valid; expected one of {', '.join(STRATEGIES)}")
    t = cfg.topology
    if t.clients is not None:
        _require(t.num_clients is None and t.ranks_per_client is None, source,
                 "topology: give either clients: [sizes] or num_clients + ranks_per_client, not both")
        _require(len(t.clients) >= 1, source, "topology.clients must list at least one client")
        _require(all(s >= 1 for s in t.clients), source,
                 f"topology.clients = {t.clients}: every client needs at least 1 rank")
    else:
        _require(t.num_clients is not None and t.ranks_per_client is not None, source,
                 "topology: set clients: [ranks per client, ...] or both num_clients and ranks_per_client")
        _require(t.num_clients >= 1 and t.ranks_per_client >= 1, source,
                 f"topology: num_clients ({t.num_clients}) and ranks_per_client ({t.ranks_per_client}) must be >= 1")
    ranks = sum(t.clients) if t.clients is not None else t.num_clients * t.ranks_per_client
    _require(ranks <= MAX_RANKS, source, f"topology: {ranks} client ranks; at most {MAX_RANKS} are supported")
    m = cfg.model
    _require((m.path is None) != (m.config is None), source,
             "model: set exactly one of model.path (a local checkpoint) or model.config (build from scratch)")
    if m.path is not None:
        _require(os.path.isdir(m.path), source, f"model.path = {m.path!r} is not a directory")
        _require(m.pretrained is None, source, "model.pretrained only applies with model.config")
    if m.config is not None:
        _require("model_type" in m.config, source, "model.config needs a model_type (e.g. llama)")
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        mt = m.config["model_type"]
        _require(isinstance(mt, str) and mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, source,
                 f"model.config.model_type = {mt!r} is not a causal LM type this transformers knows; "
                 f"e.g. {', '.join(t for t in ('llama', 'mistral', 'qwen2', 'gpt2') if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)}")
    _require(m.pretrain_steps >= 1 and m.pretrain_batch_size >= 1 and m.pretrain_lr > 0, source,
             f"model: pretrain_steps ({m.pretrain_steps}) and pretrain_batch_size ({m.pretrain_batch_size}) "
             f"must be >= 1 and pretrain_lr ({m.pretrain_lr}) > 0")
    _require(cfg.seed >= 0, source, f"seed = {cfg.seed} must be >= 0")
    _require(cfg.checkpoint.every >= 0 and cfg.checkpoint.keep >= 1, source,
             f"checkpoint: every ({cfg.checkpoint.every}) must be >= 0 (0 = no checkpoints) and keep "
             f"({cfg.checkpoint.keep}) >= 1")
    for name, a in (("personal", cfg.lora.personal), ("global", cfg.lora.global_)):
        _require(a.r >= 1, source, f"lora.{name}.r = {a.r} must be >= 1")
        _require(a.alpha > 0, source, f"lora.{name}.alpha = {a.alpha} must be > 0")
        _require(0.0 <= a.dropout < 1.0, source, f"lora.{name}.dropout = {a.dropout} must be in [0, 1)")
        _require(len(a.target_modules) >= 1, source, f"lora.{name}.target_modules must not be empty")
    tr = cfg.train
    for k in ("rounds", "inner_steps", "personal_steps"):
        _require(getattr(tr, k) >= 0, source, f"train.{k} = {getattr(tr, k)} must be >= 0")
    for k in ("micro_batch_size", "gradient_accumulation_steps", "max_seq_len", "eval_batch_size"):
        _require(getattr(tr, k) >= 1, source, f"train.{k} = {getattr(tr, k)} must be >= 1")
    _require(tr.lr > 0, source, f"train.lr = {tr.lr} must be > 0")
    _require(tr.weight_decay >= 0, source, f"train.weight_decay = {tr.weight_decay} must be >= 0")
    n = len(cfg.client_sizes())
    for c, o in cfg.client_overrides.items():
        _require(0 <= c < n, source,
                 f"client_overrides has client {c}, but the topology has {n} clients (ids 0..{n - 1})")
        if o.inner_steps is not None:
            _require(o.inner_steps >= 0, source, f"client_overrides.{c}.inner_steps must be >= 0")
        if o.micro_batch_size is not None:
            _require(o.micro_batch_size >= 1, source, f"client_overrides.{c}.micro_batch_size must be >= 1")
    cfg.outer = out = resolve_outer(cfg)  # the resolved config.yaml then shows what ran
    _require(out.lr > 0, source, f"outer.lr = {out.lr} must be > 0")
    _require(0 <= out.momentum < 1, source, f"outer.momentum = {out.momentum} must be in [0, 1)")
    _require(len(out.betas) == 2 and all(0 <= b < 1 for b in out.betas), source,
             f"outer.betas = {out.betas}: need two numbers in [0, 1)")
    _require(out.eps > 0, source, f"outer.eps = {out.eps} must be > 0")
    _require(cfg.fedprox_mu >= 0, source, f"fedprox_mu = {cfg.fedprox_mu} must be >= 0")
    fed = cfg.federation
    _require(1 <= fed.min_clients <= n, source,
             f"federation.min_clients = {fed.min_clients} must be in [1, number of clients = {n}]")
    _require(fed.round_timeout_s is None or fed.round_timeout_s > 0, source,
             f"federation.round_timeout_s = {fed.round_timeout_s} must be > 0 (or left out: wait for every client)")
    _require(fed.max_update_norm is None or fed.max_update_norm > 0, source,
             f"federation.max_update_norm = {fed.max_update_norm} must be > 0 (or left out)")
    _require(fed.compress_block >= 0, source,
             f"federation.compress_block = {fed.compress_block} must be >= 0 (0 = one scale per tensor)")
    _require(cfg.personal.steps_per_round >= 0, source,
             f"personal.steps_per_round = {cfg.personal.steps_per_round} must be >= 0")
    dpa = cfg.feddpa
    _require(0.0 <= dpa.local_weight <= 1.0, source,
             f"feddpa.local_weight = {dpa.local_weight} must be in [0, 1] (the frozen global adapter gets 1 - it)")
    _require(0.0 < dpa.max_global_weight <= 1.0, source,
             f"feddpa.max_global_weight = {dpa.max_global_weight} must be in (0, 1]")
    _require(dpa.reference_rows >= 1, source, f"feddpa.reference_rows = {dpa.reference_rows} must be >= 1")
    _require(dpa.finetune_steps is None or dpa.finetune_steps >= 0, source,
             f"feddpa.finetune_steps = {dpa.finetune_steps} must be >= 0 (or left out)")
    _require(cfg.ditto.lam >= 0, source, f"ditto.lambda = {cfg.ditto.lam} must be >= 0")
    if cfg.strategy == "ditto":
        p_, g_ = cfg.lora.personal, cfg.lora.global_
        _require(p_.r == g_.r and p_.alpha == g_.alpha and p_.target_modules == g_.target_modules, source,
                 "strategy ditto pulls the personal adapter towards the global one parameter by parameter and "
                 "starts it as a copy of it, so lora.personal and lora.global need the same r, alpha and "
                 f"target_modules (now r {p_.r} vs {g_.r}, alpha {p_.alpha} vs {g_.alpha}, "
                 f"targets {p_.target_modules} vs {g_.target_modules})")
    f = cfg.fusion
    _require(len(f.bounds) == 2 and f.bounds[0] < f.bounds[1], source,
             f"fusion.bounds = {f.bounds}: need [low, high] with low < high")
    _require(f.budget >= 3, source, f"fusion.budget = {f.budget} must be >= 3 (the search scores personal only, "
             "global only and both at 1 first)")
    _require(0.0 <= f.mix <= 1.0, source, f"fusion.mix = {f.mix} must be in [0, 1]")
    _require(f.folds >= 1, source, f"fusion.folds = {f.folds} must be >= 1 (1 = no k-fold check)")
    if cfg.strategy == "fdlora" and f.folds > 1 and cfg.data.fewshot_rows >= 1:  # 0 is refused below
        few = cfg.data.fewshot_rows
        _require(f.folds <= few, source, f"fusion.folds = {f.folds} needs at least one search row per fold, "
                 f"but data.fewshot_rows = {few}; set fusion.folds <= {few}")
    _require(f.l1 >= 0, source, f"fusion.l1 = {f.l1} must be >= 0")
    _require(len(f.fixed_weights) == 2, source, "fusion.fixed_weights needs (w_personal, w_global)")
    if f.merge == "params":
        _require(cfg.lora.personal.r == cfg.lora.global_.r and cfg.lora.personal.alpha == cfg.lora.global_.alpha
                 and cfg.lora.personal.target_modules == cfg.lora.global_.target_modules, source,
                 "fusion.merge = 'params' weights A and B separately into one adapter of one scale, so "
                 "lora.personal and lora.global need the same r, alpha and target_modules; use merge: exact otherwise")
    if cfg.strategy == "fdlora":
        import nevergrad as ng

        _require(f.optimizer in ng.optimizers.registry, source,
                 f"fusion.optimizer = {f.optimizer!r} is not a nevergrad optimizer; e.g. NGOpt, Shiwa, CMA, OnePlusOne")
    _require(cfg.personal.sync_every >= 0, source, "personal.sync_every must be >= 0")
    p_, g_ = cfg.lora.personal, cfg.lora.global_
    same_layout = p_.r == g_.r and p_.target_modules == g_.target_modules
    if cfg.global_.init == "personal_mean" or cfg.personal.sync_every:
        _require(same_layout, source,
                 "global.init = personal_mean and personal.sync_every copy weights between the two adapters, "
                 f"so lora.personal and lora.global need the same r and target_modules "
                 f"(now r {p_.r} vs {g_.r}, targets {p_.target_modules} vs {g_.target_modules})")
    if cfg.strategy in ("fdlora", "feddpa"):
        _require(p_.target_modules == g_.target_modules, source,
                 f"strategy {cfg.strategy} fuses the two adapters layer by layer, so lora.personal.target_modules "
                 f"({p_.target_modules}) must equal lora.global.target_modules ({g_.target_modules})")
    ev = cfg.eval
    _require(ev.max_new_tokens >= 1, source, f"eval.max_new_tokens = {ev.max_new_tokens} must be >= 1")
    _require(ev.generate_rows is None or ev.generate_rows >= 1, source,
             f"eval.generate_rows = {ev.generate_rows} must be >= 1 (or null: every test row)")
    _require(len(ev.metrics) >= 1 and len(set(ev.metrics)) == len(ev.metrics), source,
             f"eval.metrics = {ev.metrics}: list each of exact_match, rouge_l at most once, and at least one")
    d = cfg.data
    if d.source in ("jsonl", "hf"):
        _require(bool(d.files), source, f"data.source = {d.source!r} needs data.files (one per client, or one to split)")
        _require(len(d.files) in (1, n), source,
                 f"data.files has {len(d.files)} files; give 1 (split across clients) or {n} (one per client)")
        for p in d.files:  # hf also reads save_to_disk directories
            _require(os.path.isfile(p) or d.source == "hf" and os.path.isdir(p), source, f"data.files: {p} not found")
    if d.source == "hf":
        import importlib.util

        _require(importlib.util.find_spec("datasets") is not None, source, "data.source = 'hf' reads datasets with "
                 "the `datasets` library, which is not installed: pip install 'fdlora-cluster[hf]' (or pip install datasets)")
    _require(0.0 < d.test_fraction < 1.0, source, f"data.test_fraction = {d.test_fraction} must be in (0, 1)")
    _require(d.alpha > 0, source, f"data.alpha = {d.alpha} must be > 0")
    _require(d.fewshot_rows >= 0, source, "data.fewshot_rows must be >= 0")
    _require(cfg.strategy != "fdlora" or d.fewshot_rows >= 1, source,
             "strategy fdlora searches its fusion weights on data.fewshot_rows rows per client; "
             "data.fewshot_rows = 0 leaves it none: set it >= 1")
    _require(d.max_rows_per_client is None or d.max_rows_per_client >= 1, source,
             f"data.max_rows_per_client = {d.max_rows_per_client} must be >= 1 (or left out)")
    _require(d.skew > 0, source, f"data.skew = {d.skew} must be > 0")
    _require(d.rows_per_client >= 1, source, f"data.rows_per_client = {d.rows_per_client} must be >= 1")
    if d.source == "generator":
        from .data.scenario import MAX_CLIENTS

        _require(n <= MAX_CLIENTS, source, f"the shipped scenario has rules for {MAX_CLIENTS} clients, "
                 f"the topology has {n}; use fewer clients or data.source: jsonl")
    if isinstance(cfg.deepspeed, str):
        _require(os.path.isfile(cfg.deepspeed), source, f"deepspeed: JSON file {cfg.deepspeed} not found")
    _require(cfg.log.every >= 1, source, "log.every must be >= 1")
    _require(bool(cfg.log.project.strip()), source, "log.project must not be empty (the W&B project and MLflow experiment)")
    from .tracking import missing_packages

    for key, package in missing_packages(cfg.log):  # asked for, so no silent skip
        raise ConfigError(f"{source}: log.{key} = true needs the `{package}` package, which is not installed: "
                          f"pip install {package} (or set log.{key}: false)")
    # Builds the clients' DeepSpeed dicts now, so a bad file or stage fails on load: each overridden
    # client's, and one for all the others (theirs are equal), so a million clients cost one.
    plain = next(c for c in range(n) if c not in cfg.client_overrides or c == n - 1)
    for c in sorted(set(cfg.client_overrides) | {plain}):
        stage = deepspeed_dict(cfg, c)["zero_optimization"].get("stage", 0)
        _require(not (cfg.strategy in ("fedprox", "ditto") and stage == 3), source,
                 f"strategy {cfg.strategy} adds a proximal term over the full adapter on every rank, which ZeRO-3 "
                 f"partitions: client {c} has zero_optimization.stage = 3; use stage 0, 1 or 2 for {cfg.strategy}")


def deepspeed_dict(cfg: Config, client: int) -> dict:
    """The DeepSpeed config for one client: file or dict, then the client's override, then the
    batch sizes and optimizer from `train` where the user did not set them."""
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
    ds = _merge(dict(base), {})
    o = cfg.client_overrides.get(client)
    if o and o.deepspeed:
        ds = _merge(ds, o.deepspeed)
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
        ds["bf16"] = _merge(ds.pop("bfloat16"), ds.get("bf16", {}))
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


def _merge(a: dict, b: dict) -> dict:
    out = {k: (_merge(v, {}) if isinstance(v, dict) else v) for k, v in a.items()}
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
