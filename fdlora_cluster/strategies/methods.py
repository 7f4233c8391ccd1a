"""The federated algorithms as small strategy objects (what a client does in a round, what the
server does with the updates). The schedule that runs them is `fdlora_cluster.train`.

A strategy answers a few questions; it imports neither MPI nor DeepSpeed:
  - does the client train its personal adapter before the rounds (`personal_stage`), in a round
    (`personal_in_round(t)`), and/or once after the rounds (`personal_after_rounds()`), and how
    (`PersonalTraining`: steps, proximal pull to the global adapter, global adapter active)?
  - does the global adapter travel (`federated`) and with which proximal weight (`prox_mu`)?
  - how does the server turn updates into the next global adapter (`aggregate`)?
  - which adapters are evaluated, and is there a fusion phase (`fusion`: None, "search", "fixed")
    or a per-test-row weighting of the two adapters (`instance_weighting`)?
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model import GLOBAL, PERSONAL


@dataclass(frozen=True)
class PersonalTraining:
    """How the personal adapter trains in one phase (the schedule passes this to ClientEngine.train)."""

    steps: int
    prox_mu: float = 0.0
    """> 0: the loss adds (prox_mu/2)||personal - w||^2, w the global adapter as received at the
    round's start (Ditto's lambda)."""
    global_weight: float | None = None
    """Not None: the global adapter takes part in the forward, frozen (no gradient, no update), its
    output scaled by this (FedDPA). None: the personal adapter alone."""
    personal_weight: float = 1.0
    """Scale of the personal adapter's own output while it trains (FedDPA's local_weight)."""
    before_global: bool = False
    """Train right after the global adapter is received, before the round's global steps, so the
    active global adapter is the server's aggregate and not this client's half-trained copy."""
from .aggregate import InOrderSum, OuterOptimizer, State, check_update, pseudo_gradient


class Strategy:
    name = "base"
    federated = True
    personal_stage = False
    personal_each_round = False
    fusion: str | None = None
    evaluated: tuple[str, ...] = (GLOBAL,)
    trains_global = True

    def __init__(self, cfg):
        self.cfg = cfg
        o = cfg.outer
        self.outer = OuterOptimizer(o.optimizer, o.lr, o.momentum, o.betas, o.eps)

    # Set by strategies that evaluate the two adapters with per-test-row weights (FedDPA dynamic).
    instance_weighting = False
    # Ditto: the personal adapter starts as a copy of the first global adapter received.
    personal_starts_as_global = False

    @property
    def prox_mu(self) -> float:
        return 0.0

    def personal_in_round(self, t: int, inner_steps: int) -> PersonalTraining | None:
        """How the personal adapter trains in round t (None: it does not). By default: alone, for
        personal.steps_per_round steps (else K), when the strategy trains it every round."""
        if not self.personal_each_round:
            return None
        return PersonalTraining(steps=self.cfg.personal.steps_per_round or inner_steps)

    def personal_after_rounds(self, inner_steps: int) -> PersonalTraining | None:
        """How the personal adapter trains once after the last round (None: it does not)."""
        return None

    @property
    def adapters(self) -> tuple[str, ...]:
        """Adapters the client model carries. Every strategy creates both, so the dual-adapter
        machinery (and the proof that `personal` never travels) is exercised by all of them."""
        return (PERSONAL, GLOBAL)

    def weight(self, num_samples: float) -> float:
        """An update's weight in the average: its sample count (global.aggregation = samples) or 1."""
        return 1.0 if self.cfg.global_.aggregation == "uniform" else float(num_samples)

    def step(self, global_before: State, total: InOrderSum) -> State:
        """Next global adapter: outer step on the pseudo-gradient `before - weighted mean of the
        updates`. The server adds the updates to `total` as they arrive (Server.finish_round)."""
        return self.outer.step(global_before, pseudo_gradient(global_before, total.mean()))

    def aggregate(self, global_before: State, updates: list[State], sample_counts: list[float]) -> State:
        """`step` on updates given as a list (update i is client i's), summed as the server does."""
        total = InOrderSum(range(len(updates)))
        for i, (u, n) in enumerate(zip(updates, sample_counts)):
            check_update(global_before, u, client=i)
            total.add(i, u, self.weight(n))
        total.close()
        return self.step(global_before, total)

    def describe(self) -> str:
        return (self.__doc__ or self.name).strip().splitlines()[0]


class FedAvg(Strategy):
    """FedAvg of one LoRA adapter, as in FedIT (Zhang et al., "Towards Building the Federated GPT",
    2023). Clients train the global adapter for K steps; the server averages (outer sgd, lr 1.0
    gives the plain weighted average). No personal training."""

    name = "fedavg"


class FedProx(FedAvg):
    """FedProx (Li et al., MLSys 2020): FedAvg whose local objective adds (mu/2)||w - w_global||^2,
    pulling each client's copy towards the round's global adapter."""

    name = "fedprox"

    @property
    def prox_mu(self) -> float:
        return self.cfg.fedprox_mu


class DiLoCo(Strategy):
    """DiLoCo-style global-only training (Douillard et al., 2023): K inner AdamW steps per round,
    outer Nesterov momentum on the averaged pseudo-gradient (configs/diloco.yaml: lr 0.7, m 0.9).
    Unlike FedAvg its outer optimizer has state; unlike FDLoRA there is no personal adapter."""

    name = "diloco"


class Local(Strategy):
    """Local training only: each client trains its personal adapter on its own rows (the personal
    stage, then K steps every round) and nothing is communicated."""

    name = "local"
    federated = False
    trains_global = False
    personal_stage = True
    personal_each_round = True
    evaluated = (PERSONAL,)


class FDLoRA(Strategy):
    """FDLoRA (Qi et al., "FDLoRA: Personalized Federated Learning of Large Language Model via Dual
    LoRA Tuning", arXiv 2406.07925, 2024): a personal stage, global rounds with inner AdamW on the
    clients and an outer optimizer on the server, an optional personal <- global sync every H
    rounds, and AdaFusion: a gradient-free search of (w_p, w_g) on few-shot rows."""

    name = "fdlora"
    personal_stage = True
    fusion = "search"
    evaluated = (PERSONAL, GLOBAL, "fused")


class FedDPA(Strategy):
    """FedDPA (Yang, Long, Shen, Jiang, Blumenstein, "Dual-Personalizing Adapter for Federated
    Foundation Models", NeurIPS 2024; code github.com/Lydia-yang/FedDPA): a global adapter federated
    by FedAvg and a local (personal) adapter trained with the global one active and frozen in the
    forward pass (output = w_l * local + (1 - w_l) * global, w_l = feddpa.local_weight).

    -T (`feddpa.variant: T`, iterative): from round 2 on, each round first trains the local adapter
    with the just-received global one active, then the global one for K steps as in FedAvg.
    -F (`variant: F`, fine-tuning): FedAvg rounds only, then the local adapter trains once with the
    final global adapter active. At test time (`weighting: dynamic`) each test row gets its own
    global weight, max_global_weight x the mean cosine similarity of its representation to a few
    of the client's training rows (fdlora_cluster.evaluation); `fixed` fuses with
    fusion.fixed_weights instead. docs/ALGORITHMS.md lists what is confirmed and what is not."""

    name = "feddpa"

    def __init__(self, cfg):
        super().__init__(cfg)
        d = cfg.feddpa
        self.variant = d.variant
        self.instance_weighting = d.weighting == "dynamic"
        self.fusion = None if self.instance_weighting else "fixed"
        # fixed: the `fused` adapter is evaluated like any adapter. dynamic: there is no one fused
        # adapter (the weights differ per test row); the schedule adds the weighted pair as "fused".
        self.evaluated = (PERSONAL, GLOBAL) if self.instance_weighting else (PERSONAL, GLOBAL, "fused")

    def _local(self, steps: int, before_global: bool) -> PersonalTraining:
        w = self.cfg.feddpa.local_weight
        return PersonalTraining(steps=steps, global_weight=1.0 - w, personal_weight=w, before_global=before_global)

    def personal_in_round(self, t: int, inner_steps: int) -> PersonalTraining | None:
        # Authors' code (main.py, `local_model and epoch > 0`): no local training in the first round,
        # whose global adapter is still the untrained initialisation.
        if self.variant != "T" or t < 2:
            return None
        return self._local(self.cfg.personal.steps_per_round or inner_steps, before_global=True)

    def personal_after_rounds(self, inner_steps: int) -> PersonalTraining | None:
        if self.variant != "F":
            return None
        steps = self.cfg.feddpa.finetune_steps
        if steps is None:  # the local steps -T takes: every round but the first
            steps = max(self.cfg.train.rounds - 1, 0) * (self.cfg.personal.steps_per_round or inner_steps)
        return self._local(steps, before_global=False)


class Ditto(Strategy):
    """Ditto (Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
    Personalization", ICML 2021; code github.com/litian96/ditto): the global adapter w is trained by
    FedAvg as usual; every round each client also trains its personal adapter v on
    loss + (lambda/2)||v - w_t||^2, w_t the global adapter received at the round's start
    (`ditto.lambda`). v starts as a copy of the first global adapter and never travels. Both v
    (Ditto's personalised model) and the global adapter are evaluated."""

    name = "ditto"
    personal_each_round = True
    personal_starts_as_global = True
    evaluated = (PERSONAL, GLOBAL)

    def personal_in_round(self, t: int, inner_steps: int) -> PersonalTraining | None:
        return PersonalTraining(steps=self.cfg.personal.steps_per_round or inner_steps, prox_mu=self.cfg.ditto.lam)


STRATEGIES = {s.name: s for s in (FDLoRA, FedAvg, FedProx, DiLoCo, Local, FedDPA, Ditto)}


def make_strategy(cfg) -> Strategy:
    return STRATEGIES[cfg.strategy](cfg)
