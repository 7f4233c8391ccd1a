"""The sections of a run config: one pydantic model per YAML section, every field documented where
it is declared, with its range (`Field(ge=...)`) or choices (`Literal`) and the validators that
check it beside it. Each list of choices is the one of the module that implements it (compress.MODES,
fusion.OBJECTIVES, ...), so a new choice there is a valid value here. The federation's own sections
(outer, global, federation, privacy) are in federation.py. Checks across sections are Config's
(root.py); checks that need an installed package are environment.py's.
"""

from __future__ import annotations

import os
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..data.partition import PARTITIONS
from ..fusion import GRANULARITIES, OBJECTIVES
from ..generation import METRICS
from .errors import require


def _why(text: str) -> dict:
    """`Field(json_schema_extra=_why(...))`: added in parentheses to the field's range error."""
    return {"why": text}


def section(**kw):
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
        require((self.path is None) != (self.config is None),
                 "model: set exactly one of model.path (a local checkpoint) or model.config (build from scratch)")
        if self.path is not None:
            require(os.path.isdir(self.path), f"model.path = {self.path!r} is not a directory")
            require(self.pretrained is None, "model.pretrained only applies with model.config")
            return self
        # whether transformers knows the type is environment.check_environment's to say
        require("model_type" in self.config, "model.config needs a model_type (e.g. llama)")
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
    personal: AdapterConfig = section()
    """The client's own adapter; it never leaves the client."""
    global_: AdapterConfig = section(alias="global")
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
            require(self.num_clients is None and self.ranks_per_client is None,
                     "topology: give either clients: [sizes] or num_clients + ranks_per_client, not both")
            require(len(self.clients) >= 1, "topology.clients must list at least one client")
            require(all(s >= 1 for s in self.clients),
                     f"topology.clients = {self.clients}: every client needs at least 1 rank")
        else:
            require(self.num_clients is not None and self.ranks_per_client is not None,
                     "topology: set clients: [ranks per client, ...] or both num_clients and ranks_per_client")
        ranks = sum(self.clients) if self.clients is not None else self.num_clients * self.ranks_per_client
        require(ranks <= MAX_RANKS, f"topology: {ranks} client ranks; at most {MAX_RANKS} are supported")
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


class ClientAdapterOverride(Section):
    r: Optional[int] = Field(None, ge=1)
    """This client's rank of the global adapter, in place of `lora.global.r` (clients of different
    sizes, e.g. 4 on a small cluster and 16 on a big one). Target modules stay lora.global's."""
    alpha: Optional[float] = Field(None, gt=0, json_schema_extra=_why("or left out: r x lora.global's alpha / r"))
    """This client's LoRA alpha. Left out: r x (lora.global.alpha / lora.global.r), so the scaling
    alpha / r is every client's (the server adds the clients' B A products; a different scaling
    would weigh them differently), and a given alpha must keep it too."""


class ClientLoraOverride(Section):
    global_: ClientAdapterOverride = section(alias="global")
    """This client's global adapter (YAML key `global`): its rank (and alpha)."""


class ClientOverride(Section):
    lora: ClientLoraOverride = section()
    """This client's LoRA: `lora.global.r` (and alpha) for a global adapter of its own rank
    (docs/ALGORITHMS.md, "Global adapters of different ranks")."""
    deepspeed: Optional[dict] = None
    """Merged (recursively) over the DeepSpeed config for this client only."""
    inner_steps: Optional[int] = Field(None, ge=0)
    """This client's K, in place of `train.inner_steps`."""
    micro_batch_size: Optional[int] = Field(None, ge=1)
    """This client's micro batch per rank (wins over train.micro_batch_size and the shared
    DeepSpeed dict's train_micro_batch_size_per_gpu)."""


class PersonalConfig(Section):
    sync_every: int = Field(0, ge=0)
    """H: every H rounds the client overwrites its personal adapter with its local copy of the
    global one (0 = never)."""
    steps_per_round: int = Field(0, ge=0)
    """Personal-adapter steps per round (0: K for local, ditto and feddpa -T, none for fdlora).
    fdlora: > 0 turns on its stage-2 personal phase, these steps every round before the global
    steps. A strategy with no per-round personal phase (fedavg, fedprox, diloco) refuses it."""
    residual: bool = False
    """fdlora only, with steps_per_round > 0: the personal adapter trains with the received global
    adapter active and frozen, so it learns what the global one lacks and the pair's sum is what
    is optimised (FedDPA's mechanism, local and global at full weight)."""


class FusionConfig(Section):
    optimizer: str = "NGOpt"
    """nevergrad optimizer name (NGOpt, Shiwa, CMA, ...)."""
    budget: int = Field(20, ge=3, json_schema_extra=_why("the search scores personal only, global only and both at 1 first"))
    """Evaluations one search spends, its three anchors included (personal only, global only,
    both at 1: scored first, so the choice is never worse than any of them on the search rows)."""
    bounds: list[float] = [-1.5, 1.5]
    """Search box for each weight."""
    l1: float = Field(0.05, ge=0)
    """L1 pull of the weights towards the best anchor on the search rows (l1 * mean |w - anchor|),
    added to the few-shot objective; towards the anchor the rows prefer, not towards w = 0."""
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
        require(len(v) == 2 and v[0] < v[1], f"fusion.bounds = {v}: need [low, high] with low < high")
        return v

    @field_validator("fixed_weights")
    @classmethod
    def _two_weights(cls, v):
        require(len(v) == 2, "fusion.fixed_weights needs (w_personal, w_global)")
        return v
    objective: Literal[OBJECTIVES] = "candidates"
    """What the search minimises on its rows (plus l1 * mean |w - best anchor|): `candidates` (the
    cross-entropy over eval.headline's label set, from each candidate response's likelihood: what
    the accuracy decides on; rows whose response is no candidate count their token loss), `loss`
    (mean token loss), `accuracy` (the error rate, loss breaking ties), or `mix` (mix * error rate
    + (1 - mix) * loss). docs/ALGORITHMS.md gives the measurements behind the default."""
    margin: float = Field(1.0, ge=0)
    """The fusion leaves personal only when a choice beats it by this many standard errors of the
    paired per-row difference of the objective: out of fold with folds > 1, else on the search rows
    (0: any improvement of the mean)."""
    mix: float = Field(0.5, ge=0, le=1)
    """Weight of the error rate in `objective: mix`, in [0, 1]."""
    granularity: Literal[GRANULARITIES] = "adapter"
    """One (w_p, w_g) pair for the whole adapter (the paper's AdaFusion), one per transformer
    layer, or one per target module (2 x groups weights for nevergrad to search)."""
    folds: int = Field(4, ge=1, json_schema_extra=_why("1 = no k-fold check"))
    """k of a k-fold check over the search rows (1 = off): on every k-1 folds the search's pick
    and the best anchor are picked again (`fold_search`), each pick is scored on the held-out
    fold, and the fusion leaves personal only for the better of them only when its out-of-fold
    objective beats personal only's by `margin` (else personal only: the search, or the anchor,
    fitted noise). Default 4: on a development run (docs/ALGORITHMS.md) every unchecked search did
    worse on new rows than the personal adapter alone, and the check caught it."""
    fold_back_steps: int = Field(0, ge=0)
    """fdlora: once the search has chosen the weights, the personal adapter trains this many more
    steps on its training and few-shot rows together (the few-shot rows were held out for the
    search; here they are given back), and the fused adapter is merged again with the same weights.
    Counted in the personal adapter's optimizer steps; 0: off. docs/ALGORITHMS.md has its measurement."""
    fold_search: Literal["pool", "refit"] = "pool"
    """How a fold of the k-fold check picks the search's weights on its k-1 folds. pool: the best
    on those rows among every weight the search already scored (no forward more: the check costs
    nothing, and what it checks is the choice among the scored weights; the search that proposed
    them saw every row). refit: a new search on those rows (`budget` - 3 asks more per fold, at
    least 4 per weight pair: the search as a whole is checked on rows it never saw, at k + 1
    times the cost). docs/ALGORITHMS.md has the measurement behind the default."""


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
    partition: Literal[PARTITIONS] = "iid"
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
            require(bool(self.files),
                     f"data.source = {self.source!r} needs data.files (one per client, or one to split)")
            for p in self.files:  # hf also reads save_to_disk directories
                require(os.path.isfile(p) or self.source == "hf" and os.path.isdir(p), f"data.files: {p} not found")
        return self  # that `datasets` is installed for hf: environment.check_environment


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
    metrics: list[Literal[METRICS]] = list(METRICS)
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
        require(len(v) >= 1 and len(set(v)) == len(v),
                 f"eval.metrics = {v}: list each of {', '.join(METRICS)} at most once, and at least one")
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
    digests: Literal["every", "final", "off"] = "final"
    """Each rank's digest of the global adapter it received, gathered at its leader into
    metrics.jsonl (`global_received`): every round, the final adapter only, or never. A digest
    costs each rank a read of the adapter (a ZeRO-3 gather); the tests use `every` to prove that
    every rank of every client holds the same weights after each round."""

    @field_validator("project")
    @classmethod
    def _not_empty(cls, v):
        require(bool(v.strip()), "log.project must not be empty (the W&B project and MLflow experiment)")
        return v


class CheckpointConfig(Section):
    every: int = Field(1, ge=0, json_schema_extra=_why("0 = no checkpoints"))
    """Write a checkpoint after every this many rounds, and after the last round (0 = never).
    `fdlora-cluster run CONFIG --resume auto` continues from the newest complete one
    (docs/RELIABILITY.md, fdlora_cluster/checkpoint.py)."""
    keep: int = Field(2, ge=1)
    """Complete checkpoints kept under RUN_DIR/checkpoints; older ones are removed."""
