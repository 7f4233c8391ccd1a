"""Pure server-side math on adapter state dicts: checks, weighted averages, outer optimizers.

Nothing here imports MPI or DeepSpeed; tests compare it against numpy and torch.optim.
"""

from __future__ import annotations

import math

import torch

from ..model import key_diff

State = dict[str, torch.Tensor]


class UpdateError(ValueError):
    """A client's update that the server refuses; the message names the client and the key."""


def check_update(reference: State, update: State, client: int) -> None:
    """Same keys, shapes and dtypes as the reference, and only finite values."""
    diff = key_diff(reference, update)
    if diff:
        raise UpdateError(f"client {client}: update keys differ from the global adapter ({diff})")
    for k, ref in reference.items():
        u = update[k]
        if u.shape != ref.shape or u.dtype != ref.dtype:
            raise UpdateError(f"client {client}: {k} is {tuple(u.shape)} {u.dtype}, expected {tuple(ref.shape)} {ref.dtype}")
        if not torch.isfinite(u).all():
            raise UpdateError(f"client {client}: {k} has non-finite values")


def client_weights(sample_counts: list[float], mode: str) -> list[float]:
    """Normalised aggregation weights: by training rows (`samples`) or 1/N (`uniform`)."""
    if mode == "uniform":
        return [1.0 / len(sample_counts)] * len(sample_counts)
    total = float(sum(sample_counts))
    if total <= 0:
        raise UpdateError(f"sample counts {sample_counts} sum to {total}; cannot weight by samples")
    return [c / total for c in sample_counts]


def weighted_average(states: list[State], weights: list[float]) -> State:
    """sum_i w_i * state_i, computed in float64 and returned in each tensor's own dtype."""
    if len(states) != len(weights) or not states:
        raise ValueError(f"{len(states)} states and {len(weights)} weights")
    out = {}
    for k, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for s, w in zip(states, weights):
            acc += w * s[k].to(torch.float64)
        out[k] = acc.to(ref.dtype)
    return out


class InOrderSum:
    """The clients' weighted updates summed as they arrive, without keeping them: sum_i w_i * x_i
    and sum_i w_i in float64, for the clients of one round.

    Floating-point addition is not associative, so a sum in arrival order would make the average
    depend on which leader was fastest, and a resumed job would not end bit-identical. The updates
    are therefore added in client-id order: one that arrives before a lower-id client's is held
    (`held`) until every lower id is added, refused (`skip`) or known missing (`close`). Clients
    that arrive in id order are added at once, so then at most one update is held.
    """

    def __init__(self, clients):
        self.order = sorted(clients)
        self.next = 0  # index in `order` of the first client not yet added or skipped
        self.held: dict[int, tuple[State, float] | None] = {}  # None: skipped
        self.sum: State | None = None
        self.weight = 0.0
        self.added: list[int] = []
        self.dtypes: dict[str, torch.dtype] = {}
        self.most_held = 0  # the most updates ever held at once (tests, bench)

    def add(self, client: int, state: State, weight: float) -> None:
        """Client `client`'s update with weight w (its sample count, or 1 for uniform weights)."""
        self._resolve(client, (state, float(weight)))
        self._drain()
        self.most_held = max(self.most_held, sum(v is not None for v in self.held.values()))

    def skip(self, client: int) -> None:
        """Client `client` has no usable update this round (rejected)."""
        self._resolve(client, None)
        self._drain()

    def close(self) -> None:
        """No more updates this round: every client not heard from is missing."""
        for c in self.order[self.next:]:
            self.held.setdefault(c, None)
        self._drain()

    def _resolve(self, client: int, item) -> None:
        if client not in self.order:
            raise ValueError(f"client {client} is not one of this round's clients {self.order}")
        if client in self.held or client in self.order[:self.next]:
            raise ValueError(f"client {client}'s update was already counted this round")
        self.held[client] = item

    def _drain(self) -> None:
        while self.next < len(self.order) and self.order[self.next] in self.held:
            client = self.order[self.next]
            item = self.held.pop(client)
            self.next += 1
            if item is not None:
                self._accumulate(*item)
                self.added.append(client)

    def _accumulate(self, state: State, w: float) -> None:
        if self.sum is None:
            self.sum = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in state.items()}
            self.dtypes = {k: v.dtype for k, v in state.items()}
        for k, acc in self.sum.items():
            acc.add_(state[k].to(torch.float64), alpha=w)
        self.weight += w

    def mean(self) -> State:
        """sum_i w_i x_i / sum_i w_i, in each tensor's own dtype (call after `close`)."""
        if self.held:
            raise ValueError(f"clients {sorted(self.held)} are still held: call close() first")
        if self.sum is None or self.weight <= 0:
            raise UpdateError(f"no update to average (clients added: {self.added}, total weight {self.weight})")
        return {k: (acc / self.weight).to(self.dtypes[k]) for k, acc in self.sum.items()}


class OuterOptimizer:
    """The server's optimizer over the pseudo-gradient `delta = global_before - average(clients)`.

    sgd:      p -= lr * delta                     (lr 1.0 gives exactly FedAvg's average)
    nesterov: b = m*b + delta; p -= lr * (delta + m*b)   (torch.optim.SGD(nesterov=True); DiLoCo)
    adam:     Adam with bias correction on delta (FedAdam, Reddi et al. 2021)
    Its state (momentum buffers, Adam moments) lives on the server only.
    """

    def __init__(self, name: str, lr: float, momentum: float = 0.9, betas=(0.9, 0.99), eps: float = 1e-8):
        if name not in ("sgd", "nesterov", "adam"):
            raise ValueError(f"outer optimizer {name!r}; expected sgd, nesterov or adam")
        self.name, self.lr, self.momentum, self.betas, self.eps = name, lr, momentum, tuple(betas), eps
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.steps = 0

    def state_dict(self) -> dict:
        return {"state": self.state, "steps": self.steps}

    def load_state_dict(self, d: dict) -> None:
        self.state, self.steps = d["state"], d["steps"]

    def step(self, params: State, delta: State) -> State:
        self.steps += 1
        out = {}
        for k, p in params.items():
            g = delta[k].to(torch.float64)
            p64 = p.to(torch.float64)
            st = self.state.setdefault(k, {})
            if self.name == "sgd":
                upd = g
            elif self.name == "nesterov":
                buf = st.get("momentum")
                buf = g.clone() if buf is None else self.momentum * buf + g
                st["momentum"] = buf
                upd = g + self.momentum * buf
            else:
                b1, b2 = self.betas
                m = st.get("m", torch.zeros_like(g))
                v = st.get("v", torch.zeros_like(g))
                m = b1 * m + (1 - b1) * g
                v = b2 * v + (1 - b2) * g * g
                st["m"], st["v"] = m, v
                mhat = m / (1 - b1 ** self.steps)
                vhat = v / (1 - b2 ** self.steps)
                upd = mhat / (vhat.sqrt() + self.eps)
            out[k] = (p64 - self.lr * upd).to(p.dtype)
        return out


def pseudo_gradient(before: State, after: State) -> State:
    return {k: before[k].to(torch.float64) - after[k].to(torch.float64) for k in before}


def l2_distance(a: State, b: State) -> float:
    """||a - b|| over all tensors of two states with the same keys."""
    return math.sqrt(sum(float(((a[k].to(torch.float64) - b[k].to(torch.float64)) ** 2).sum()) for k in a))
