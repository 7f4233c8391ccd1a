"""The sections that shape the federation itself: the server's outer step (`outer:`), how the
clients' global adapters combine (`global:`), the rounds' deadlines and faults (`federation:`) and
client-level differential privacy (`privacy:`). Split from sections.py, which holds the rest, on
the same terms: every field documented where it is declared, each list of choices taken from the
module that implements it.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, field_validator

from ..compress import MODES
from ..dp import ACCOUNTANTS
from ..strategies.aggregate import OUTER_OPTIMIZERS
from ..strategies.combine import AGGREGATIONS, COMBINES
from .errors import require
from .sections import Section, _why


class OuterConfig(Section):
    optimizer: Optional[Literal[OUTER_OPTIMIZERS]] = None
    """Server optimizer over the averaged pseudo-gradient: sgd with lr 1.0 is FedAvg, nesterov
    is DiLoCo-style, adam is FedAdam. Left out: the strategy's own (OUTER_DEFAULTS: nesterov for
    fdlora and diloco, as their papers; sgd for fedavg, fedprox and feddpa)."""
    lr: Optional[float] = Field(None, gt=0)
    """Outer learning rate. Left out: the optimizer's default (sgd 1.0, nesterov 0.7, adam 1.0)."""
    momentum: Optional[float] = Field(None, ge=0, lt=1)
    """Momentum for `nesterov`. Left out: 0.9 (DiLoCo's)."""
    momentum_warmup: int = Field(0, ge=0, json_schema_extra=_why("0 = none"))
    """nesterov: the momentum grows linearly from 0 to `momentum` over this many rounds (a short
    run's steps then stay near the averaged pseudo-gradient; docs/ALGORITHMS.md, "Outer step for
    short runs"). 0 = the full momentum from the first round."""
    betas: list[float] = [0.9, 0.99]
    """Adam betas for `adam`."""
    eps: float = Field(1e-8, gt=0)
    """Adam epsilon for `adam`."""

    @field_validator("betas")
    @classmethod
    def _two_betas(cls, v):
        require(len(v) == 2 and all(0 <= b < 1 for b in v), f"outer.betas = {v}: need two numbers in [0, 1)")
        return v


# What a strategy's outer step is when the config does not say: the method's own, so that an
# fdlora config written from scratch runs FDLoRA's Nesterov outer step and not FedAvg.
OUTER_DEFAULTS = {"fdlora": "nesterov", "diloco": "nesterov", "fedavg": "sgd", "fedprox": "sgd",
                  "feddpa": "sgd", "local": "sgd"}
OUTER_OPTIMIZER_DEFAULTS = {"sgd": {"lr": 1.0, "momentum": 0.9}, "nesterov": {"lr": 0.7, "momentum": 0.9},
                            "adam": {"lr": 1.0, "momentum": 0.9}}


def resolve_outer(cfg) -> OuterConfig:
    """cfg.outer with every field the config left out filled in: the optimizer from the strategy,
    lr and momentum from the optimizer. What the YAML gives wins, key by key."""
    o = cfg.outer
    opt = o.optimizer or OUTER_DEFAULTS.get(cfg.strategy, "sgd")
    d = OUTER_OPTIMIZER_DEFAULTS[opt]
    return OuterConfig(optimizer=opt, lr=d["lr"] if o.lr is None else o.lr,
                       momentum=d["momentum"] if o.momentum is None else o.momentum,
                       momentum_warmup=o.momentum_warmup, betas=list(o.betas), eps=o.eps)


class GlobalConfig(Section):
    init: Literal["seed", "personal_mean"] = "seed"
    """Start of the global adapter: the server's seeded init, or (paper's Algorithm 1, line 7) the
    mean of the clients' stage-1 personal adapters, which sends each personal adapter once."""
    aggregation: Literal[AGGREGATIONS] = "samples"
    """Client weights in the average: `samples`, by training rows; `uniform`, 1/N; `steps`, by the
    rows the client trained on in the round (its K x micro batch x accumulation x ranks: its local
    work, for clients of different compute on alike data). docs/ALGORITHMS.md says when to use which."""
    combine: Literal[COMBINES] = "factors"
    """How the clients' global adapters become one (strategies/combine.py, docs/ALGORITHMS.md):
    `factors`, A and B averaged separately (clients of different ranks zero-padded to the largest:
    HetLoRA); `product`, the exact average of the products B A, each client getting back its own
    rank's best part (FlexLoRA); `frozen_a`, A kept at its seeded init everywhere and only B
    trained and sent (FFA-LoRA: exact, half the bytes). With ranks that differ, `product` was ahead
    of zero-padding on every setting measured; with equal ranks level with `factors`
    (docs/ALGORITHMS.md, "Which to use")."""


class FederationConfig(Section):
    round_timeout_s: Optional[Union[float, Literal["auto"]]] = None
    """When set, the server aggregates the updates that arrived within this many seconds of sending
    the round's global adapter; the others count as missing for the round (metrics.jsonl, summary).
    A late update is recognised by its round and dropped; its client goes on from the newest global.
    `auto`: no fixed seconds; once `min_clients` updates have arrived, the server waits a further
    `round_timeout_factor` times their median arrival time (counted from the global adapter's
    send), so a round ends soon after its quorum when some client is far slower than the rest.
    Default: wait for every client."""
    round_timeout_factor: float = Field(2.0, ge=1)
    """`round_timeout_s: auto`: the round's deadline is this multiple of the median time (since
    the global adapter went out) of the first `min_clients` updates. 2 lets a client twice as slow
    as the quorum's median in; a larger value waits longer for heterogeneous clients."""
    min_clients: int = Field(1, ge=1)
    """A round needs at least this many accepted updates; what happens with fewer is
    `on_short_round`'s."""
    on_short_round: Literal["abort", "skip", "wait"] = "abort"
    """A round with fewer than `min_clients` usable updates at its deadline. `abort` (default):
    the job fails, naming the clients that were missing or rejected and why (for a federation
    that must not go on short-handed). `skip`: the round is dropped: the global adapter and the
    outer optimizer's state stay as they were, the round's record says `skipped` (metrics.jsonl,
    `rounds_skipped` in summary.json) and the next round starts; use it for long jobs where a
    client may be away for a while. `wait`: past the deadline the server keeps waiting, with no
    limit, for the clients that have not answered, until `min_clients` usable updates are in;
    if every client has answered and too few were usable (rejected), the round fails as with
    `abort`; use it when every round must count and clients are slow but alive (with
    `hang_timeout_s` to end a job whose client stopped)."""
    hang_timeout_s: Optional[float] = Field(None, gt=0, json_schema_extra=_why("or left out: no watchdog"))
    """When set, every rank runs a watchdog (fdlora_cluster/watchdog.py): a rank that makes no
    progress (a training step, a message or a wait's poll) for this many seconds ends the job,
    printing its rank, role (server, or client c leader/follower) and Python stack. Set it above
    the longest stretch a rank works without a heartbeat: a training step, an evaluation batch,
    one checkpoint file's write and fsync (DeepSpeed's save included) on a busy disk. A client rank
    is watched once its model is built, the server once its trackers are open."""
    max_update_norm: Optional[float] = Field(None, gt=0, json_schema_extra=_why("or left out"))
    """When set, an update whose change ||client global - round's global|| exceeds it is rejected
    for that round (logged with the client and its norm), not averaged."""
    compress: Literal[MODES] = "none"
    """What crosses MPI in both directions (fdlora_cluster/compress.py): `none`, the fp32 adapter;
    `bf16` or `int8`, each global adapter after the first as its change to the previous one and each
    update as its change to the round's global adapter, rounded, with error feedback (what rounding
    lost is sent with the next change). Every rank still holds the same global adapter bit for bit.
    The references and residuals are in the checkpoint (a resumed job is bit-identical); a
    leader's rounding error of an update that was not averaged is dropped with it."""
    compress_block: int = Field(256, ge=0, json_schema_extra=_why("0 = one scale per tensor"))
    """int8: values per fp32 scale (0 = one scale per tensor)."""

    @field_validator("round_timeout_s")
    @classmethod
    def _positive_or_auto(cls, v):
        require(v is None or v == "auto" or v > 0,
                f"federation.round_timeout_s = {v}: need seconds > 0, `auto` or nothing (wait for every client)")
        return v


class PrivacyConfig(Section):
    """Client-level differential privacy on the global adapter (fdlora_cluster/dp.py; what it
    protects, where the noise is added and what the server is trusted with: docs/RELIABILITY.md).
    Left out (or null): off. The personal adapter and the fusion never leave the client and are
    outside the mechanism."""

    clip_norm: float = Field(gt=0)
    """C: each leader clips its update (trained global - received global) to this L2 norm."""
    noise_multiplier: float = Field(gt=0)
    """sigma: the server adds N(0, (sigma * C)^2) per coordinate to the sum of the clipped updates,
    once per round."""
    delta: float = Field(gt=0, lt=1, json_schema_extra=_why("typically below 1 / number of clients"))
    """The delta of the (epsilon, delta) guarantee the accountant reports epsilon for."""
    target_epsilon: Optional[float] = Field(None, gt=0, json_schema_extra=_why("or left out: no limit"))
    """When set, a run whose configured rounds would pass it is refused before it starts
    (`fdlora-cluster check`, `launch`, `run`), and a job stops before releasing a round that
    would pass it."""
    accountant: Literal[ACCOUNTANTS] = "rdp"
    """dp-accounting's accountant: `rdp` (Renyi DP, milliseconds) or `pld` (privacy loss
    distributions: a tighter epsilon, seconds per call)."""
