"""A client's work as data: the steps a strategy asks every client to run, in order.

A strategy writes three plans (strategies/methods.py): before the rounds, round t, after the rounds.
`client.Client.run_steps` executes them; nothing else in the client decides what a round does.

    Train(adapter, steps, prox_mu, frozen, weight)   optimizer steps on one adapter
    SendUpdate()                                     the global adapter to the server
    Copy(src, dst, event)                            dst <- src (Ditto's start, FDLoRA's sync)
    JoinFederation()                                 layout handshake and the global start
    Fuse(mode)                                       fusion weights (searched or fixed) -> `fused`
    Evaluate(adapters, instance_weighted)            test-split metrics per adapter

Plans are plain frozen dataclasses, so a strategy's phase order is a unit test with no MPI and
no model (tests/test_plans.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Train:
    """`steps` optimizer steps on `adapter`."""

    adapter: str
    steps: int
    prox_mu: float = 0.0
    """> 0: the loss adds (prox_mu/2)||adapter - g||^2, g the global adapter as the round received
    it (FedProx on the global adapter, Ditto's lambda on the personal one)."""
    frozen: dict[str, float] = field(default_factory=dict)
    """Other adapters active in the forward, frozen (no gradient, no update), each output scaled by
    its value (FedDPA's local training with the global adapter active)."""
    weight: float = 1.0
    """Scale of the trained adapter's own output (FedDPA's local_weight)."""
    fewshot: bool = False
    """Draw the rows from the training and few-shot rows together (fusion.fold_back_steps: the rows
    the fusion chose its weights on, given back to the personal adapter once they are chosen)."""


@dataclass(frozen=True)
class SendUpdate:
    """The client's global adapter to the server, with the loss of the round's global training."""


@dataclass(frozen=True)
class Copy:
    """Overwrite `dst` with `src` as the client holds it at this point of the plan; recorded in
    metrics.jsonl as `event`."""

    src: str
    dst: str
    event: str


@dataclass(frozen=True)
class JoinFederation:
    """The layout handshake with the server, and the global start the server cannot compute itself
    (client 0's seeded adapter, or every client's personal adapter: global.init)."""


@dataclass(frozen=True)
class Fuse:
    """Find the fusion weights (`search`: AdaFusion; `fixed`: fusion.fixed_weights) and write the
    `fused` adapter; `chosen`: write it again with the weights the last search chose (after the
    personal adapter trained on: fusion.fold_back_steps)."""

    mode: str


@dataclass(frozen=True)
class Evaluate:
    """Each adapter on the client's test split. `instance_weighted`: the pair with a global weight
    per test row is reported as `fused` too (FedDPA's dynamic weighting)."""

    adapters: tuple[str, ...]
    instance_weighted: bool = False


Step = Union[Train, SendUpdate, Copy, JoinFederation, Fuse, Evaluate]
