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
candidate, so its objective is at most each anchor's. With `folds` > 1 the choice is checked out
of fold: on each k-fold split of the rows the weights picked on k-1 folds (among those the search
scored, or, with `refit`, among a new search's on those rows) are scored on the held-out fold,
and the fusion leaves personal only when that beats it by the margin; else the search is judged
to fit noise and the best anchor (checked the same way) or personal only is chosen.

Pure functions over state dicts and per-row scores; the search takes a scoring callback and
knows nothing of MPI or of how a candidate is evaluated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch

State = dict[str, torch.Tensor]

OBJECTIVES = ("candidates", "loss", "accuracy", "mix")
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


def per_adapter(weights, groups: dict[str, list[str]]) -> tuple[dict[str, float], dict[str, float]]:
    """`per_module`'s weights as ({module: w_p}, {module: w_g}): what `fuse` and the scaled scoring take."""
    wm = per_module(weights, groups)
    return {m: p for m, (p, _) in wm.items()}, {m: g for m, (_, g) in wm.items()}


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
    response tokens, their counts, (when the objective needs it) whether the row's best-scored
    candidate response was its own (1.0) or not (0.0), and (objective `candidates`) every
    candidate response's summed NLL per row with the index of the row's own response among them
    (-1: not a candidate, the row then counts its token loss)."""

    nll: np.ndarray
    tokens: np.ndarray
    correct: np.ndarray | None = None
    cand_nll: np.ndarray | None = None
    label: np.ndarray | None = None


def candidate_cross_entropy(cand_nll: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Per row, -log of the probability the model gives the row's own response among its candidates
    when each candidate's probability is its sequence likelihood, renormalised over the
    candidates: the cross-entropy of the classifier the accuracy evaluates (argmin NLL)."""
    z = -np.asarray(cand_nll, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    log_norm = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    own = z[np.arange(len(z)), np.maximum(label, 0)]
    return log_norm - own


@dataclass
class Objective:
    """What the search minimises on a set of rows: the mean over rows of a per-row term, plus
    `l1` * mean |w - center|, `center` the best anchor on those rows (a pull towards the anchor the
    data already prefers, not towards w = 0, which is the base model).

    candidates (default): per labelled row, the cross-entropy over the client's candidate
    responses (`candidate_cross_entropy`, what deployment's argmax decides on); rows whose
    response is not a candidate count their token loss. loss: mean token NLL (the per-row terms
    are each row's NLL over the mean tokens per row, so their mean is the token-weighted loss).
    accuracy: the error rate, with the loss as tie-break: loss/(1+loss) scaled by 1/(n+1) is below
    one row's 1/n, so it orders only candidates with the same number of rows right. mix: `mix` *
    error rate + (1 - mix) * loss."""

    kind: str = "candidates"
    l1: float = 0.0
    mix: float = 0.5

    def parts(self, s: RowScores, idx: np.ndarray) -> tuple[float, float | None]:
        loss = float(s.nll[idx].sum() / max(float(s.tokens[idx].sum()), 1.0))
        acc = float(s.correct[idx].mean()) if s.correct is not None and len(idx) else None
        return loss, acc

    def rows(self, s: RowScores, idx: np.ndarray) -> np.ndarray:
        """The per-row terms of `idx`; their mean is the objective without the regulariser."""
        token_rows = s.nll[idx] * len(idx) / max(float(s.tokens[idx].sum()), 1.0)
        if self.kind == "loss":
            return token_rows
        if self.kind == "candidates":
            own_loss = s.nll[idx] / np.maximum(s.tokens[idx], 1.0)  # a row without candidates: its mean token loss
            if s.cand_nll is None:
                return own_loss
            label = s.label[idx]
            return np.where(label >= 0, candidate_cross_entropy(s.cand_nll[idx], label), own_loss)
        if s.correct is None:
            raise ValueError(f"fusion.objective = {self.kind!r} needs accuracy, but the rows have no candidate "
                             "responses (labelled rows with few distinct responses); use fusion.objective: loss")
        err = 1.0 - s.correct[idx]
        if self.kind == "accuracy":
            loss = float(token_rows.mean()) if len(idx) else 0.0
            return err + (loss / (1.0 + loss)) / (len(idx) + 1)
        if self.kind == "mix":
            return self.mix * err + (1.0 - self.mix) * token_rows
        raise ValueError(f"fusion.objective = {self.kind!r}; expected one of {', '.join(OBJECTIVES)}")

    def data(self, s: RowScores, idx: np.ndarray) -> float:
        return float(self.rows(s, idx).mean()) if len(idx) else 0.0

    def __call__(self, s: RowScores, idx: np.ndarray, w: np.ndarray, center: np.ndarray | None = None) -> float:
        c = np.zeros_like(w) if center is None else center
        return self.data(s, idx) + self.l1 * float(np.abs(np.asarray(w) - c).mean())


def beats_by_margin(base_rows: np.ndarray, rows: np.ndarray, margin: float) -> bool:
    """Whether `rows` (per-row objective terms) beat `base_rows` on the same rows by more than
    `margin` standard errors of the paired difference (one-sided): a few rows decide nothing
    unless they all lean the same way."""
    d = np.asarray(base_rows, dtype=np.float64) - np.asarray(rows, dtype=np.float64)
    if len(d) == 0:
        return False
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0
    return float(d.mean()) > margin * se and float(d.mean()) > 0


# --------------------------------------------------------------------------- the search


@dataclass
class SearchResult:
    weights: np.ndarray
    """(groups, 2): the chosen (w_p, w_g) of every weight group."""
    objective: float
    """The chosen weights' objective on all search rows (regulariser included)."""
    loss: float
    accuracy: float | None
    chosen_by: str
    """'search' (the best candidate on all rows), or 'anchor <name>': personal only unless a choice
    beat it by the paired margin (out of fold with folds > 1, on the search rows otherwise)."""
    curve: list[dict] = field(default_factory=list)
    """Every evaluation: step, phase (anchor / search / fold <j>), weights, loss, accuracy,
    objective on all rows (and, in fold searches, the objective on the rows it was fitted to)."""
    cv: dict | None = None
    """With folds > 1: the held-out objective of the search's pick and of the anchors' pick, per fold,
    and the out-of-fold means of personal only, the search and the anchors' pick."""
    data_objective: float = 0.0
    """The chosen weights' objective without the regulariser (the mean per-row term)."""
    center: np.ndarray | None = None
    """The anchor the regulariser pulled towards (the best anchor on all rows)."""
    left_anchors: bool = False
    """Whether the chosen weights are none of the anchors."""
    evaluations: int = 0
    """Distinct weights scored (each a pass over every search row); repeats are served from memory."""


def search_evaluations(budget: int, n_groups: int) -> int:
    """Nevergrad's asks per search: budget - 3 (the anchors), and at least 4 per weight pair searched
    (2 per weight), so a per-layer or per-module search is not left with fewer asks than weights."""
    return max(budget - len(ANCHORS), 4 * n_groups)


def most_evaluations(budget: int, n_groups: int, folds: int, refit: bool) -> int:
    """The most distinct weights `search_weights` scores: the anchors, its own search, and one more
    search per fold when the folds refit (with `pool` they choose among what is already scored)."""
    return len(ANCHORS) + search_evaluations(budget, n_groups) * (1 + (folds if folds > 1 and refit else 0))


def search_weights(score_fn, n_groups: int, optimizer: str, budget: int, bounds, l1: float, seed: int,
                   objective: str = "candidates", mix: float = 0.5, folds: int = 1, margin: float = 1.0,
                   refit: bool = False, progress=None) -> SearchResult:
    """Search (w_p, w_g) per weight group; `score_fn(weights (n_groups, 2)) -> RowScores`.

    Each search scores the three anchors (once, shared) and asks nevergrad `search_evaluations`
    times. With `folds` > 1 each fold picks, on its k-1 folds, among the weights the search scored
    (`refit` False: no more evaluations) or among a new search's on those rows (`refit`: `folds`
    more searches), and that pick is scored on the held-out fold. The choice
    leaves personal only when a procedure (the search, or picking the best anchor) beats personal
    only by `margin` standard errors of the paired per-row difference: on held-out folds with
    `folds` > 1, on the search rows otherwise. `progress(done, best)` is called after every
    evaluation (the leader's console line)."""
    import warnings

    import nevergrad as ng

    if optimizer not in ng.optimizers.registry:
        raise ValueError(f"fusion.optimizer = {optimizer!r} is not a nevergrad optimizer (e.g. NGOpt, Shiwa, CMA)")
    if budget < len(ANCHORS):
        raise ValueError(f"fusion.budget = {budget} must be >= {len(ANCHORS)} (the anchors are its first candidates)")
    obj = Objective(objective, l1, mix)
    lo, hi = bounds
    asks = search_evaluations(budget, n_groups)
    curve: list[dict] = []
    cache: dict[bytes, RowScores] = {}
    best_seen = [float("inf")]

    def evaluate(w: np.ndarray, phase: str) -> RowScores:
        key = np.round(w, 12).tobytes()
        if key not in cache:
            cache[key] = score_fn(w.copy())
            if n_rows is not None and len(cache[key].nll) != n_rows:
                raise ValueError(f"score_fn gave {len(cache[key].nll)} rows, the first candidate {n_rows}")
        s = cache[key]
        loss, acc = obj.parts(s, everything)
        value = obj(s, everything, w, center_all[0])
        curve.append({"step": len(curve), "phase": phase, "weights": w.tolist(),
                      "w_personal": float(w[:, 0].mean()), "w_global": float(w[:, 1].mean()),
                      "loss": loss, "accuracy": acc, "objective": value})
        best_seen[0] = min(best_seen[0], value)
        if progress is not None:
            progress(len(cache), best_seen[0])
        return s

    n_rows = None
    everything = np.arange(0)
    center_all = [None]
    anchors = {}
    for name, (wp, wg) in ANCHORS.items():
        w = np.tile(np.array([wp, wg], dtype=np.float64), (n_groups, 1))
        if n_rows is None:
            s0 = score_fn(w.copy())
            n_rows, everything = len(s0.nll), np.arange(len(s0.nll))
            cache[np.round(w, 12).tobytes()] = s0
        anchors[name] = (w, evaluate(w, "anchor"))

    def best_anchor(idx: np.ndarray) -> tuple[np.ndarray, RowScores]:
        return min(anchors.values(), key=lambda a: obj.data(a[1], idx))

    # the anchors' objective in the curve is re-stated with the regulariser's centre, now known
    center_all[0] = best_anchor(everything)[0]
    for c, (w, s) in zip(curve, anchors.values()):
        c["objective"] = obj(s, everything, w, center_all[0])

    def run_search(idx: np.ndarray, phase: str, rng_seed: int, center: np.ndarray) -> list[tuple[np.ndarray, RowScores]]:
        """Nevergrad on the rows `idx`, started at the best anchor there (clipped into the box)."""
        param = ng.p.Array(init=np.clip(center, lo, hi), lower=lo, upper=hi)
        param.random_state = np.random.RandomState(rng_seed)
        opt = ng.optimizers.registry[optimizer](parametrization=param, budget=asks)
        out = []
        with warnings.catch_warnings():  # NGOpt may pick COBYLA, which warns about its own defaults
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(asks):
                cand = opt.ask()
                w = np.asarray(cand.value, dtype=np.float64).reshape(n_groups, 2)
                s = evaluate(w, phase)
                value = obj(s, idx, w, center)
                if phase != "search":
                    curve[-1]["fit_objective"] = value
                opt.tell(cand, value)
                out.append((w, s))
        return out

    pool = list(anchors.values()) + run_search(everything, "search", seed, center_all[0])
    best_w, best_s = min(pool, key=lambda c: obj(c[1], everything, c[0], center_all[0]))
    personal = anchors["personal"]
    personal_rows = obj.rows(personal[1], everything)
    cv = None
    if folds > 1 and n_rows >= folds:
        fold_of = np.random.RandomState(seed).permutation(n_rows) % folds
        per_fold = []
        oof = {"search": np.zeros(n_rows), "anchor": np.zeros(n_rows)}  # out-of-fold per-row terms
        for j in range(folds):
            fit, held = np.flatnonzero(fold_of != j), np.flatnonzero(fold_of == j)
            center = best_anchor(fit)[0]
            if refit:  # a new search on the fold's rows: its trajectory never saw the held-out rows
                cands = list(anchors.values()) + run_search(fit, f"fold {j}", seed + 7919 * (j + 1), center)
            else:  # the weights already scored: choosing among them is what is checked, at no forward
                cands = pool
            pick = min(cands, key=lambda c: obj(c[1], fit, c[0], center))
            anchor_pick = best_anchor(fit)
            # the held-out rows' terms, each row's term as it is in a mean over all rows
            oof["search"][held] = obj.rows(pick[1], everything)[held]
            oof["anchor"][held] = obj.rows(anchor_pick[1], everything)[held]
            per_fold.append({"fold": j, "rows": int(len(held)), "search": obj.data(pick[1], held),
                             "anchor": obj.data(anchor_pick[1], held), "personal": obj.data(personal[1], held)})
        cv = {"folds": per_fold, "search": float(oof["search"].mean()), "anchor": float(oof["anchor"].mean()),
              "personal": float(personal_rows.mean()), "margin": margin}
        # on a tie the anchor wins: the simpler procedure
        passed = [k for k in ("anchor", "search") if beats_by_margin(personal_rows, oof[k], margin)]
        cv["passed"] = passed
        winner = min(passed, key=lambda k: cv[k]) if passed else None
    else:
        winner = "search" if beats_by_margin(personal_rows, obj.rows(best_s, everything), margin) else None
    if winner == "search":
        chosen_by = "search"
    else:
        name = min(anchors, key=lambda a: obj.data(anchors[a][1], everything)) if winner == "anchor" else "personal"
        best_w, best_s = anchors[name]
        chosen_by = f"anchor {name}"
    loss, acc = obj.parts(best_s, everything)
    left = not any(np.array_equal(best_w, a[0]) for a in anchors.values())
    return SearchResult(weights=best_w, objective=obj(best_s, everything, best_w, center_all[0]), loss=loss,
                        accuracy=acc, chosen_by=chosen_by, curve=curve, cv=cv,
                        data_objective=obj.data(best_s, everything), center=center_all[0], left_anchors=left,
                        evaluations=len(cache))
