"""AdaFusion: combine a client's personal and global adapters into one fused adapter.

The weights (w_p, w_g) are searched gradient-free with nevergrad (as LoraHub does), minimising
few-shot loss + l1 * mean(|w|). The search scores candidates with both adapters active and their
contributions scaled (no adapter is rebuilt per candidate); the final merge is one of:

  exact:  delta W = w_p * dW_personal + w_g * dW_global. Stacking A's rows and B's columns gives
          a rank r_p + r_g adapter whose delta is exactly that sum (PEFT's "cat" combination).
  params: A = w_p A_p + w_g A_g and B = w_p B_p + w_g B_g (LoraHub's and the paper's reading). Its
          delta has cross terms w_p w_g (B_p A_g + B_g A_p), so it is not the weighted sum.

Pure functions over state dicts; the search takes a loss callback and knows nothing of MPI.
"""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


def fused_lora_shape(personal_cfg, global_cfg, merge: str) -> tuple[int, float]:
    """(r, alpha) of the fused adapter. exact: rank r_p + r_g with alpha = r (scaling 1)."""
    if merge == "exact":
        r = personal_cfg.r + global_cfg.r
        return r, float(r)
    return personal_cfg.r, personal_cfg.alpha


def fuse(personal: State, glob: State, w_p: float, w_g: float, s_p: float, s_g: float, merge: str) -> State:
    """The fused adapter's state. s_p, s_g: each adapter's scaling (alpha / r)."""
    if set(personal) != set(glob):
        raise ValueError("fusion needs personal and global adapters on the same target modules")
    out = {}
    for k in personal:
        if k.endswith("lora_A.weight"):
            kb = k[: -len("lora_A.weight")] + "lora_B.weight"
            a_p, a_g, b_p, b_g = personal[k], glob[k], personal[kb], glob[kb]
            if merge == "exact":
                # fused scaling is 1: fold each adapter's weight and scaling into its B block
                out[k] = torch.cat([a_p, a_g], dim=0)
                out[kb] = torch.cat([(w_p * s_p) * b_p, (w_g * s_g) * b_g], dim=1)
            elif merge == "params":
                if a_p.shape != a_g.shape:
                    raise ValueError(f"{k}: merge 'params' needs equal ranks, got {tuple(a_p.shape)} and {tuple(a_g.shape)}")
                out[k] = w_p * a_p + w_g * a_g
                out[kb] = w_p * b_p + w_g * b_g
            else:
                raise ValueError(f"fusion.merge = {merge!r}; expected exact or params")
    return out


def delta_weight(state: State, scaling: float, a_key: str) -> torch.Tensor:
    """scaling * B @ A for one layer (for tests and checks)."""
    b_key = a_key[: -len("lora_A.weight")] + "lora_B.weight"
    return scaling * state[b_key].to(torch.float64) @ state[a_key].to(torch.float64)


def search_weights(loss_fn, optimizer: str, budget: int, bounds, l1: float, seed: int):
    """Minimise loss_fn(w_p, w_g) + l1 * mean(|w|) over the box; returns (w_p, w_g, curve).

    `curve` lists every evaluation as {"step", "w_personal", "w_global", "loss", "objective"}.
    The start point (1, 1) is evaluated first: both adapters at full strength."""
    import warnings

    import nevergrad as ng
    import numpy as np

    lo, hi = bounds
    param = ng.p.Array(init=np.clip(np.array([1.0, 1.0]), lo, hi), lower=lo, upper=hi)
    param.random_state = np.random.RandomState(seed)
    if optimizer not in ng.optimizers.registry:
        raise ValueError(f"fusion.optimizer = {optimizer!r} is not a nevergrad optimizer (e.g. NGOpt, Shiwa, CMA)")
    with warnings.catch_warnings():  # NGOpt may pick COBYLA, which warns about its own defaults
        warnings.simplefilter("ignore", UserWarning)
        return _search(loss_fn, ng.optimizers.registry[optimizer](parametrization=param, budget=budget), budget, l1)


def _search(loss_fn, opt, budget: int, l1: float):
    curve = []
    for step in range(budget):
        cand = opt.ask()
        w_p, w_g = (float(x) for x in cand.value)
        loss = float(loss_fn(w_p, w_g))
        objective = loss + l1 * (abs(w_p) + abs(w_g)) / 2
        opt.tell(cand, objective)
        curve.append({"step": step, "w_personal": w_p, "w_global": w_g, "loss": loss, "objective": objective})
    best = min(curve, key=lambda c: c["objective"])
    return best["w_personal"], best["w_global"], curve
