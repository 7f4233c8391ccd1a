"""The federated algorithms as small strategy objects (what a client does in a round, what the
server does with the updates). The schedule that runs them is `fdlora_cluster.train`.

A strategy answers a few questions; it imports neither MPI nor DeepSpeed:
  - does the client train its personal adapter before the rounds (`personal_stage`),
    and/or during every round (`personal_each_round`)?
  - does the global adapter travel (`federated`) and with which proximal weight (`prox_mu`)?
  - how does the server turn updates into the next global adapter (`aggregate`)?
  - which adapters are evaluated, and is there a fusion phase (`fusion`: None, "search", "fixed")?
"""

from __future__ import annotations

from ..model import GLOBAL, PERSONAL
from .aggregate import OuterOptimizer, State, check_update, client_weights, pseudo_gradient, weighted_average


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

    @property
    def prox_mu(self) -> float:
        return 0.0

    @property
    def adapters(self) -> tuple[str, ...]:
        """Adapters the client model carries. Every strategy creates both, so the dual-adapter
        machinery (and the proof that `personal` never travels) is exercised by all of them."""
        return (PERSONAL, GLOBAL)

    def aggregate(self, global_before: State, updates: list[State], sample_counts: list[float]) -> State:
        """Next global adapter: outer step on the weighted average of the clients' pseudo-gradients."""
        for i, u in enumerate(updates):
            check_update(global_before, u, client=i)
        weights = client_weights(sample_counts, self.cfg.global_.aggregation)
        average = weighted_average(updates, weights)
        return self.outer.step(global_before, pseudo_gradient(global_before, average))

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
    """FedDPA-style dual adapters with fixed weights (after Yang et al., "Dual-Personalizing
    Adapter for Federated Foundation Models", NeurIPS 2024, without its instance-wise weighting):
    the global adapter is federated by FedAvg, the personal one trains locally every round, and
    the two are fused with the fixed `fusion.fixed_weights`, no search."""

    name = "feddpa"
    personal_stage = True
    personal_each_round = True
    fusion = "fixed"
    evaluated = (PERSONAL, GLOBAL, "fused")


STRATEGIES = {s.name: s for s in (FDLoRA, FedAvg, FedProx, DiLoCo, Local, FedDPA)}


def make_strategy(cfg) -> Strategy:
    return STRATEGIES[cfg.strategy](cfg)
