"""AdaFusion: combine a client's personal and global adapters into one fused adapter.

The weights are searched gradient-free with nevergrad (as LoraHub does). One weight pair
(w_p, w_g) per adapter as in the paper, or one per transformer layer or per target module
(`fusion.granularity`). The final merge is one of:

  exact:  delta W = w_p * dW_personal + w_g * dW_global. Stacking A's rows and B's columns gives
          a rank r_p + r_g adapter whose delta is exactly that sum (PEFT's "cat" combination).
  params: A = w_p A_p + w_g A_g and B = w_p B_p + w_g B_g (LoraHub's and the paper's reading). Its
          delta has cross terms w_p w_g (B_p A_g + B_g A_p), so it is not the weighted sum.

The search is never worse than its parts on the rows it scores: personal only (1, 0), global only
(0, 1) and both at full strength (1, 1) are its first candidates, and the choice is the best
candidate, so its objective is at most each anchor's. With `folds` > 1 the search is also run
on each k-fold split of the rows; if the weights it picks on k-1 folds do worse on the held-out
fold than the best anchor picked the same way, the search is judged to fit noise and the best
anchor is chosen instead (still never worse than the anchors on all rows).

Pure functions over state dicts and per-row scores; the search takes a scoring callback and
knows nothing of MPI or of how a candidate is evaluated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

State = dict[str, torch.Tensor]

OBJECTIVES = ("loss", "accuracy", "mix")
GRANULARITIES = ("adapter", "layer", "module")
# the search's first candidates, (w_personal, w_global) in every weight group
ANCHORS = {"personal": (1.0, 0.0), "global": (0.0, 1.0), "both": (1.0, 1.0)}

_A = "lora_A.weight"
_B = "lora_B.weight"


def fused_lora_shape(personal_cfg, global_cfg, merge: str) -> tuple[int, float]:
    """(r, alpha) of the fused adapter. exact: rank r_p + r_g with alpha = r (scaling 1)."""
    if merge == "exact":
        r = personal_cfg.r + global_cfg.r
        return r, float(r)
    return personal_cfg.r, personal_cfg.alpha


# --------------------------------------------------------------------------- weight groups


def modules_of(state: State) -> list[str]:
    """The LoRA-wrapped module names of an adapter state (`...layers.0.self_attn.q_proj`)."""
    return sorted(k[: -len(_A) - 1] for k in state if k.endswith(_A))


_LAYER = re.compile(r"\.(?:layers|h|layer|blocks)\.(\d+)\.")


def weight_groups(modules: list[str], granularity: str) -> dict[str, list[str]]:
    """Group name -> the modules that share one (w_p, w_g) pair.

    adapter: one group (the paper's AdaFusion); layer: one per transformer block (found by the
    `.layers.<i>.` / `.h.<i>.` part of the name; modules outside every block share "other");
    module: one per target module."""
    if granularity == "adapter":
        return {"adapter": list(modules)}
    if granularity == "module":
        return {m: [m] for m in modules}
    if granularity == "layer":
        out: dict[str, list[str]] = {}
        for m in modules:
            hit = _LAYER.search("." + m + ".")
            out.setdefault(f"layer {int(hit.group(1))}" if hit else "other", []).append(m)
        return dict(sorted(out.items(), key=lambda kv: (kv[0] == "other", int(kv[0].split()[1]) if kv[0] != "other" else 0)))
    raise ValueError(f"fusion.granularity = {granularity!r}; expected one of {', '.join(GRANULARITIES)}")


def per_module(weights, groups: dict[str, list[str]]) -> dict[str, tuple[float, float]]:
    """{module: (w_p, w_g)} from one (w_p, w_g) row per group (in `groups` order)."""
    w = np.asarray(weights, dtype=np.float64).reshape(len(groups), 2)
    return {m: (float(w[i, 0]), float(w[i, 1])) for i, mods in enumerate(groups.values()) for m in mods}


# --------------------------------------------------------------------------- the merge


def fuse(personal: State, glob: State, w_p, w_g, s_p: float, s_g: float, merge: str) -> State:
    """The fused adapter's state. s_p, s_g: each adapter's scaling (alpha / r).

    w_p and w_g are numbers (one pair for the whole adapter) or {module: weight} dicts."""
    if set(personal) != set(glob):
        raise ValueError("fusion needs personal and global adapters on the same target modules")

    def weight(w, module):
        return float(w[module]) if isinstance(w, dict) else float(w)

    out = {}
    for k in personal:
        if k.endswith(_A):
            module = k[: -len(_A) - 1]
            kb = k[: -len(_A)] + _B
            a_p, a_g, b_p, b_g = personal[k], glob[k], personal[kb], glob[kb]
            wp, wg = weight(w_p, module), weight(w_g, module)
            if merge == "exact":
                # fused scaling is 1: fold each adapter's weight and scaling into its B block
                out[k] = torch.cat([a_p, a_g], dim=0)
                out[kb] = torch.cat([(wp * s_p) * b_p, (wg * s_g) * b_g], dim=1)
            elif merge == "params":
                if a_p.shape != a_g.shape:
                    raise ValueError(f"{k}: merge 'params' needs equal ranks, got {tuple(a_p.shape)} and {tuple(a_g.shape)}")
                out[k] = wp * a_p + wg * a_g
                out[kb] = wp * b_p + wg * b_g
            else:
                raise ValueError(f"fusion.merge = {merge!r}; expected exact or params")
    return out


def delta_weight(state: State, scaling: float, a_key: str) -> torch.Tensor:
    """scaling * B @ A for one layer (for tests and checks)."""
    b_key = a_key[: -len(_A)] + _B
    return scaling * state[b_key].to(torch.float64) @ state[a_key].to(torch.float64)


# --------------------------------------------------------------------------- the objective


@dataclass
class RowScores:
    """One candidate's scores on every search row, in row order: the summed NLL of each row's
    response tokens, their counts, and (when the objective needs it) whether the row's best-scored
    candidate response was its own (1.0) or not (0.0)."""

    nll: np.ndarray
    tokens: np.ndarray
    correct: np.ndarray | None = None


@dataclass
class Objective:
    """What the search minimises on a set of rows, plus `l1` * mean |w|.

    loss: mean token NLL. accuracy: the error rate, with the loss as tie-break: loss/(1+loss)
    scaled by 1/(n+1) is below one row's 1/n, so it orders only candidates with the same number
    of rows right. mix: `mix` * error rate + (1 - mix) * loss."""

    kind: str = "loss"
    l1: float = 0.0
    mix: float = 0.5

    def parts(self, s: RowScores, idx: np.ndarray) -> tuple[float, float | None]:
        loss = float(s.nll[idx].sum() / max(float(s.tokens[idx].sum()), 1.0))
        acc = float(s.correct[idx].mean()) if s.correct is not None and len(idx) else None
        return loss, acc

    def __call__(self, s: RowScores, idx: np.ndarray, w: np.ndarray) -> float:
        loss, acc = self.parts(s, idx)
        if self.kind == "loss":
            base = loss
        else:
            if acc is None:
                raise ValueError(f"fusion.objective = {self.kind!r} needs accuracy, but the rows have no candidate "
                                 "responses (labelled rows with few distinct responses); use fusion.objective: loss")
            err = 1.0 - acc
            if self.kind == "accuracy":
                base = err + (loss / (1.0 + loss)) / (len(idx) + 1)
            elif self.kind == "mix":
                base = self.mix * err + (1.0 - self.mix) * loss
            else:
                raise ValueError(f"fusion.objective = {self.kind!r}; expected one of {', '.join(OBJECTIVES)}")
        return base + self.l1 * float(np.abs(w).mean())


# --------------------------------------------------------------------------- the search


@dataclass
class SearchResult:
    weights: np.ndarray
    """(groups, 2): the chosen (w_p, w_g) of every weight group."""
    objective: float
    """The chosen weights' objective on all search rows."""
    loss: float
    accuracy: float | None
    chosen_by: str
    """'search' (the best candidate on all rows), or 'anchor <name>' when the k-fold check
    found the search no better than the anchors on held-out folds."""
    curve: list[dict] = field(default_factory=list)
    """Every evaluation: step, phase (anchor / search / fold <j>), weights, loss, accuracy,
    objective on all rows (and, in fold searches, the objective on the rows it was fitted to)."""
    cv: dict | None = None
    """With folds > 1: the held-out objective of the search's pick and of the anchors' pick, per fold."""


def search_weights(score_fn, n_groups: int, optimizer: str, budget: int, bounds, l1: float, seed: int,
                   objective: str = "loss", mix: float = 0.5, folds: int = 1) -> SearchResult:
    """Search (w_p, w_g) per weight group; `score_fn(weights (n_groups, 2)) -> RowScores`.

    Each search spends `budget` evaluations, the three anchors included (they are scored once and
    shared). With `folds` > 1 there are `folds` more searches, one per held-out fold."""
    import warnings

    import nevergrad as ng

    if optimizer not in ng.optimizers.registry:
        raise ValueError(f"fusion.optimizer = {optimizer!r} is not a nevergrad optimizer (e.g. NGOpt, Shiwa, CMA)")
    if budget < len(ANCHORS):
        raise ValueError(f"fusion.budget = {budget} must be >= {len(ANCHORS)} (the anchors are its first candidates)")
    obj = Objective(objective, l1, mix)
    lo, hi = bounds
    curve: list[dict] = []
    cache: dict[bytes, RowScores] = {}

    def evaluate(w: np.ndarray, phase: str) -> RowScores:
        key = np.round(w, 12).tobytes()
        if key not in cache:
            cache[key] = score_fn(w.copy())
            if n_rows is not None and len(cache[key].nll) != n_rows:
                raise ValueError(f"score_fn gave {len(cache[key].nll)} rows, the first candidate {n_rows}")
        s = cache[key]
        loss, acc = obj.parts(s, everything)
        curve.append({"step": len(curve), "phase": phase, "weights": w.tolist(),
                      "w_personal": float(w[:, 0].mean()), "w_global": float(w[:, 1].mean()),
                      "loss": loss, "accuracy": acc, "objective": obj(s, everything, w)})
        return s

    n_rows = None
    everything = np.arange(0)
    anchors = {}
    for name, (wp, wg) in ANCHORS.items():
        w = np.tile(np.array([wp, wg], dtype=np.float64), (n_groups, 1))
        if n_rows is None:
            s0 = score_fn(w.copy())
            n_rows, everything = len(s0.nll), np.arange(len(s0.nll))
            cache[np.round(w, 12).tobytes()] = s0
        anchors[name] = (w, evaluate(w, "anchor"))

    def run_search(idx: np.ndarray, phase: str, rng_seed: int) -> list[tuple[np.ndarray, RowScores]]:
        """Nevergrad on the rows `idx`, started at the best anchor there (clipped into the box)."""
        start = min(anchors.values(), key=lambda a: obj(a[1], idx, a[0]))[0]
        param = ng.p.Array(init=np.clip(start, lo, hi), lower=lo, upper=hi)
        param.random_state = np.random.RandomState(rng_seed)
        opt = ng.optimizers.registry[optimizer](parametrization=param, budget=budget - len(ANCHORS))
        out = []
        with warnings.catch_warnings():  # NGOpt may pick COBYLA, which warns about its own defaults
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(budget - len(ANCHORS)):
                cand = opt.ask()
                w = np.asarray(cand.value, dtype=np.float64).reshape(n_groups, 2)
                s = evaluate(w, phase)
                value = obj(s, idx, w)
                if phase != "search":
                    curve[-1]["fit_objective"] = value
                opt.tell(cand, value)
                out.append((w, s))
        return out

    pool = list(anchors.values()) + run_search(everything, "search", seed)
    best_w, best_s = min(pool, key=lambda c: obj(c[1], everything, c[0]))
    chosen_by, cv = "search", None
    if folds > 1 and n_rows >= folds:
        fold_of = np.random.RandomState(seed).permutation(n_rows) % folds
        per_fold = []
        for j in range(folds):
            fit, held = np.flatnonzero(fold_of != j), np.flatnonzero(fold_of == j)
            cands = list(anchors.values()) + run_search(fit, f"fold {j}", seed + 7919 * (j + 1))
            pick = min(cands, key=lambda c: obj(c[1], fit, c[0]))
            anchor_pick = min(anchors.values(), key=lambda c: obj(c[1], fit, c[0]))
            per_fold.append({"fold": j, "rows": int(len(held)), "search": obj(pick[1], held, pick[0]),
                             "anchor": obj(anchor_pick[1], held, anchor_pick[0])})
        cv = {"folds": per_fold, "search": float(np.mean([f["search"] for f in per_fold])),
              "anchor": float(np.mean([f["anchor"] for f in per_fold]))}
        if cv["search"] > cv["anchor"]:
            name = min(anchors, key=lambda a: obj(anchors[a][1], everything, anchors[a][0]))
            best_w, best_s = anchors[name]
            chosen_by = f"anchor {name}"
    loss, acc = obj.parts(best_s, everything)
    return SearchResult(weights=best_w, objective=obj(best_s, everything, best_w), loss=loss, accuracy=acc,
                        chosen_by=chosen_by, curve=curve, cv=cv)
