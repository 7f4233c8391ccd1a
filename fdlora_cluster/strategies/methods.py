"""The federated algorithms as small strategy objects (Flower's idea): what a client does in a
round, and what the server does with the updates. A strategy imports neither MPI nor DeepSpeed.

The client's side is three plans (strategies/plan.py), lists of steps the client runs in order:
  - `before_rounds(K)`: the personal stage, joining the federation;
  - `round_plan(t, K, first)`: round t (K = this client's inner steps; `first`: the client's first
    round in this job, counted from the start, not from a resume);
  - `after_rounds(K)`: personal training after the rounds, fusion, evaluation.
The server's side is `federated` (does the global adapter travel at all), `weight` and `step`.
Adding a strategy is a class here and an entry in STRATEGIES; nothing outside strategies/ changes.
"""

from __future__ import annotations

from ..state import FUSED, GLOBAL, PERSONAL, State, pseudo_gradient
from .aggregate import InOrderSum, OuterOptimizer, check_update
from .combine import ProductOuter, ProductSum
from .plan import Copy, Evaluate, Fuse, JoinFederation, SendUpdate, Step, Train


class Strategy:
    """FedAvg's shape, which the others change in parts: K steps on the global adapter, send it,
    and (personal.sync_every = H) personal <- global every H rounds."""

    name = "base"
    federated = True
    sync_refused = ""
    """Why personal.sync_every (= {H}) cannot be used with this strategy, as the rest of a sentence
    that starts with its name; empty: the sync is allowed."""

    def __init__(self, cfg):
        self.cfg = cfg
        o = cfg.outer
        self.combine = cfg.global_.combine
        if self.combine == "product":  # the outer step on the product B A (strategies/combine.py)
            self.outer = ProductOuter(o.optimizer, o.lr, o.momentum, rank=max(cfg.global_ranks()))
        else:
            self.outer = OuterOptimizer(o.optimizer, o.lr, o.momentum, o.betas, o.eps, warmup=o.momentum_warmup)

    # ---------------------------------------------------------------- the client's plans

    def before_rounds(self, inner_steps: int) -> list[Step]:
        return [JoinFederation()] if self.federated else []

    def round_plan(self, t: int, inner_steps: int, first: bool) -> list[Step]:
        return self.global_steps(inner_steps) + self.sync(t)

    def after_rounds(self, inner_steps: int) -> list[Step]:
        return [Evaluate((GLOBAL,))]

    def evaluated(self) -> set[str]:
        """The adapters the plan after the rounds evaluates (the ones export will serve)."""
        return {a for step in self.after_rounds(self.cfg.train.inner_steps) if isinstance(step, Evaluate)
                for a in step.adapters}

    # ---------------------------------------------------------------- parts the plans share

    def personal_stage(self) -> list[Step]:
        """Stage 1: the personal adapter alone, from the shared initialisation."""
        steps = self.cfg.train.personal_steps
        return [Train(PERSONAL, steps)] if steps else []

    def global_steps(self, inner_steps: int, prox_mu: float = 0.0) -> list[Step]:
        return [Train(GLOBAL, inner_steps, prox_mu=prox_mu), SendUpdate()]

    def personal_round_steps(self, inner_steps: int) -> int:
        """Personal steps in a round: personal.steps_per_round, else K."""
        return self.cfg.personal.steps_per_round or inner_steps

    def sync(self, t: int) -> list[Step]:
        """The paper's line 14: personal <- the client's copy of the global adapter every H rounds."""
        every = self.cfg.personal.sync_every
        return [Copy(GLOBAL, PERSONAL, "personal_sync")] if every and t % every == 0 else []

    # ---------------------------------------------------------------- the server's side

    def weight(self, num_samples: float, client: int = 0) -> float:
        """An update's weight in the average (global.aggregation): its sample count (`samples`), 1
        (`uniform`), or the rows the client trained on this round (`steps`: cfg.local_rows)."""
        mode = self.cfg.global_.aggregation
        if mode == "uniform":
            return 1.0
        return float(self.cfg.local_rows(client)) if mode == "steps" else float(num_samples)

    def new_sum(self, clients) -> InOrderSum:
        """The round's sum of updates: the weighted factors themselves under global.combine = product."""
        return ProductSum(clients) if self.combine == "product" else InOrderSum(clients)

    def step(self, global_before: State, total: InOrderSum, sent: dict | None = None) -> State:
        """Next global adapter: outer step on the pseudo-gradient `before - weighted mean of the
        updates`. The server adds the updates to `total` as they arrive (Server.finish_round).
        Under global.combine = product, `sent` (client -> the adapter it received) measures each
        change from what that client held; the energies are then in `self.last_info`."""
        if isinstance(total, ProductSum):
            new, self.last_info = self.outer.step(global_before, sent, total)
            return new
        return self.outer.step(global_before, pseudo_gradient(global_before, total.mean()))

    def aggregate(self, global_before: State, updates: list[State], sample_counts: list[float]) -> State:
        """`step` on updates given as a list (update i is client i's), summed as the server does."""
        total = self.new_sum(range(len(updates)))
        for i, (u, n) in enumerate(zip(updates, sample_counts)):
            check_update(global_before, u, client=i)
            total.add(i, u, self.weight(n, i))
        total.close()
        return self.step(global_before, total, {i: global_before for i in range(len(updates))})

    def describe(self) -> str:
        return (self.__doc__ or self.name).strip().splitlines()[0]

    # ---------------------------------------------------------------- settings it would ignore

    @classmethod
    def ignored(cls, cfg) -> list[str]:
        """The settings of `cfg` this strategy would ignore or that would undo what it trains, each
        as a sentence naming the strategy, the key and the fix: Config refuses them on load, so a
        run never quietly differs from what its config says (issue 18: budgets that match)."""
        out = []
        p = cfg.personal
        if p.steps_per_round and not cls.personal_phase(cfg):
            out.append(f"strategy {cls.name} has no per-round personal phase, so personal.steps_per_round = "
                       f"{p.steps_per_round} would be ignored; set it to 0 (it is used by fdlora, local, ditto, "
                       "feddpa -T, and feddpa -F without feddpa.finetune_steps)")
        if p.residual and cls.name != "fdlora":
            out.append(f"personal.residual is fdlora's stage-2 option; strategy {cls.name} ignores it "
                       "(feddpa always trains its local adapter with the global one active): set it to false")
        if p.sync_every and cls.sync_refused:
            out.append(f"strategy {cls.name} " + cls.sync_refused.format(H=p.sync_every))
        if cfg.fusion.fold_back_steps and cls.name != "fdlora":
            out.append(f"fusion.fold_back_steps = {cfg.fusion.fold_back_steps} trains the personal adapter after "
                       f"fdlora's fusion search; strategy {cls.name} has none, so it would be ignored: set it to 0")
        return out

    @classmethod
    def personal_phase(cls, cfg) -> bool:
        """Whether personal.steps_per_round sets how long some personal training of this strategy is."""
        return False


class FedAvg(Strategy):
    """FedAvg of one LoRA adapter, as in FedIT (Zhang et al., "Towards Building the Federated GPT",
    2023). Clients train the global adapter for K steps; the server averages (outer sgd, lr 1.0
    gives the plain weighted average). No personal training."""

    name = "fedavg"


class FedProx(FedAvg):
    """FedProx (Li et al., MLSys 2020): FedAvg whose local objective adds (mu/2)||w - w_global||^2,
    pulling each client's copy towards the round's global adapter."""

    name = "fedprox"

    def round_plan(self, t: int, inner_steps: int, first: bool) -> list[Step]:
        return self.global_steps(inner_steps, prox_mu=self.cfg.fedprox_mu) + self.sync(t)


class DiLoCo(Strategy):
    """DiLoCo-style global-only training (Douillard et al., 2023): K inner AdamW steps per round,
    outer Nesterov momentum on the averaged pseudo-gradient (configs/diloco.yaml: lr 0.7, m 0.9).
    Unlike FedAvg its outer optimizer has state; unlike FDLoRA there is no personal adapter."""

    name = "diloco"


class Local(Strategy):
    """Local training only: each client trains its personal adapter on its own rows (the personal
    stage, then K steps every round) and nothing is communicated."""

    name = "local"
    sync_refused = "trains no global adapter, so personal.sync_every = {H} would be ignored; set it to 0"
    federated = False

    def before_rounds(self, inner_steps: int) -> list[Step]:
        return self.personal_stage()

    def round_plan(self, t: int, inner_steps: int, first: bool) -> list[Step]:
        return [Train(PERSONAL, self.personal_round_steps(inner_steps))]

    def after_rounds(self, inner_steps: int) -> list[Step]:
        return [Evaluate((PERSONAL,))]

    @classmethod
    def personal_phase(cls, cfg) -> bool:
        return True


class FDLoRA(Strategy):
    """FDLoRA (Qi et al., "FDLoRA: Personalized Federated Learning of Large Language Model via Dual
    LoRA Tuning", arXiv 2406.07925, 2024): a personal stage, global rounds with inner AdamW on the
    clients and an outer optimizer on the server, an optional personal <- global sync every H
    rounds, and AdaFusion: a gradient-free search of (w_p, w_g) on few-shot rows."""

    name = "fdlora"

    def before_rounds(self, inner_steps: int) -> list[Step]:
        return self.personal_stage() + [JoinFederation()]

    def round_plan(self, t: int, inner_steps: int, first: bool) -> list[Step]:
        """Stage 2: with personal.steps_per_round = P > 0 the personal adapter trains P steps every
        round before the global steps, with the just-received global adapter (the server's
        aggregate, not this client's half-trained copy) active and frozen when personal.residual,
        so that it learns what the global one lacks and the pair's sum is what is optimised."""
        return self.personal_round() + self.global_steps(inner_steps) + self.sync(t)

    def personal_round(self) -> list[Step]:
        steps = self.cfg.personal.steps_per_round
        if not steps:
            return []
        return [Train(PERSONAL, steps, frozen={GLOBAL: 1.0} if self.cfg.personal.residual else {})]

    @classmethod
    def personal_phase(cls, cfg) -> bool:
        return True

    @classmethod
    def ignored(cls, cfg) -> list[str]:
        out = super().ignored(cfg)
        p = cfg.personal
        if p.residual and not p.steps_per_round:
            out.append("strategy fdlora: personal.residual trains the personal adapter in the rounds, which needs "
                       "personal.steps_per_round > 0 (now 0); set both, or residual: false")
        if p.residual and p.sync_every:
            out.append(f"strategy fdlora: personal.residual makes the personal adapter a residual on top of the "
                       f"global one, and personal.sync_every = {p.sync_every} would overwrite it with a copy of the "
                       "global (the pair's sum would count the global twice); use one of them")
        return out

    def after_rounds(self, inner_steps: int) -> list[Step]:
        n = self.cfg.fusion.fold_back_steps
        # the few-shot rows, held out from training so the search could score on them, go back into the
        # personal adapter once the weights are chosen (as its stage-2 phase trains it), fused again
        fold_back = [Train(PERSONAL, n, frozen={GLOBAL: 1.0} if self.cfg.personal.residual else {}, fewshot=True),
                     Fuse("chosen")] if n else []
        return [Fuse("search"), *fold_back, Evaluate((PERSONAL, GLOBAL, FUSED))]


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
    sync_refused = ("trains its local (personal) adapter as a complement of the global one; "
                    "personal.sync_every = {H} would overwrite it with the global; set it to 0")

    def _local(self, steps: int) -> Train:
        w = self.cfg.feddpa.local_weight
        return Train(PERSONAL, steps, frozen={GLOBAL: 1.0 - w}, weight=w)

    def round_plan(self, t: int, inner_steps: int, first: bool) -> list[Step]:
        # -T trains the local adapter first, so the active global adapter is the server's aggregate
        # and not this client's half-trained copy. Authors' code (main.py, `local_model and epoch >
        # 0`): no local training in the first round, whose global adapter is still the untrained
        # initialisation.
        local = [self._local(self.personal_round_steps(inner_steps))] if self.cfg.feddpa.variant == "T" and t >= 2 else []
        return local + self.global_steps(inner_steps) + self.sync(t)

    def after_rounds(self, inner_steps: int) -> list[Step]:
        d = self.cfg.feddpa
        plan: list[Step] = []
        if d.variant == "F":
            steps = d.finetune_steps
            if steps is None:  # the local steps -T takes: every round but the first
                steps = max(self.cfg.train.rounds - 1, 0) * self.personal_round_steps(inner_steps)
            plan.append(self._local(steps))
        if d.weighting == "dynamic":
            # no one fused adapter (the weights differ per test row): the weighted pair is reported as "fused"
            return plan + [Evaluate((PERSONAL, GLOBAL), instance_weighted=True)]
        return plan + [Fuse("fixed"), Evaluate((PERSONAL, GLOBAL, FUSED))]

    @classmethod
    def personal_phase(cls, cfg) -> bool:
        return cfg.feddpa.variant == "T" or cfg.feddpa.finetune_steps is None


class Ditto(Strategy):
    """Ditto (Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated Learning Through
    Personalization", ICML 2021; code github.com/litian96/ditto): the global adapter w is trained by
    FedAvg as usual; every round each client also trains its personal adapter v on
    loss + (lambda/2)||v - w_t||^2, w_t the global adapter received at the round's start
    (`ditto.lambda`). v starts as a copy of the first global adapter and never travels. Both v
    (Ditto's personalised model) and the global adapter are evaluated."""

    name = "ditto"
    sync_refused = ("trains its personal adapter v apart from the global one (pulled to it by ditto.lambda); "
                    "personal.sync_every = {H} would overwrite v with the global; set it to 0")

    def round_plan(self, t: int, inner_steps: int, first: bool) -> list[Step]:
        start = [Copy(GLOBAL, PERSONAL, "personal_init")] if first else []  # v starts as the global model
        personal = Train(PERSONAL, self.personal_round_steps(inner_steps), prox_mu=self.cfg.ditto.lam)
        return start + self.global_steps(inner_steps) + [personal] + self.sync(t)

    def after_rounds(self, inner_steps: int) -> list[Step]:
        return [Evaluate((PERSONAL, GLOBAL))]

    @classmethod
    def personal_phase(cls, cfg) -> bool:
        return True


STRATEGIES = {s.name: s for s in (FDLoRA, FedAvg, FedProx, DiLoCo, Local, FedDPA, Ditto)}


def make_strategy(cfg) -> Strategy:
    return STRATEGIES[cfg.strategy](cfg)
