"""How the server combines the clients' global adapters (`global.combine`), in the product space.

A LoRA adapter changes a weight by dW = s * B @ A (B: m x r, A: r x n, s = alpha / r, the same for
every client: config keeps alpha / r equal when a client's rank differs). Averaging A and B
separately (`factors`, FedAvg's rule) gives (sum p_k B_k)(sum p_k A_k), which is not the average
of the clients' changes sum p_k B_k A_k; the difference is -sum p_k (B_k - B)(A_k - A).

    factors   A and B averaged separately (today's rule); clients of different ranks are
              zero-padded to the largest rank and get back their first r_k components (HetLoRA,
              arXiv 2401.06432). `FactorsGap` estimates, per round, how far this is from `product`.
    product   the exact weighted average of the products, computed from the stacked factors
              without the dense m x n matrix (`svd_of_sum`: thin QR of both stacks, SVD of the
              small core, O((m + n) q^2) for q stacked columns; FlexLoRA, arXiv 2402.11505). The
              server keeps the global adapter as B = U S, A = V^T (its SVD, largest first), so a
              client of rank r gets its best rank-r part by slicing (`truncate`); `ProductOuter`
              is the outer optimizer in this space.
    frozen_a  every client keeps the global adapter's A at its seeded init and trains B alone
              (FFA-LoRA, ICLR 2024): B A averages exactly, and only B travels.

Torch only; float64 inside when any input is float64, else float32 (`work_dtype`); results in
the inputs' dtype.
"""

from __future__ import annotations

import math

import torch

from ..state import State
from .aggregate import InOrderSum

COMBINES = ("factors", "product", "frozen_a")  # global.combine
AGGREGATIONS = ("samples", "uniform", "steps")  # global.aggregation

A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


# ---------------------------------------------------------------- keys and ranks

def modules(state: dict) -> list[str]:
    """The LoRA modules of a state (or a layout's names), in key order: `...q_proj` for each A."""
    return [k[:-len(A_SUFFIX)] for k in state if k.endswith(A_SUFFIX)]


def b_keys(keys) -> list[str]:
    """The B halves of an adapter's keys: what travels under `frozen_a`."""
    return [k for k in keys if k.endswith(B_SUFFIX)]


def rank_of(shapes: dict) -> int:
    """The one LoRA rank of a state or {key: shape}; ValueError when modules differ."""
    ranks = {tuple(getattr(v, "shape", v))[0] for k, v in shapes.items() if k.endswith(A_SUFFIX)}
    if len(ranks) != 1:
        raise ValueError(f"an adapter with ranks {sorted(ranks)} across its modules; expected one rank")
    return ranks.pop()


# ---------------------------------------------------------------- factored sums

Term = tuple[float, torch.Tensor, torch.Tensor]  # (coefficient c, B m x q, A q x n): c * B @ A
SVD = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # U (m x k), S (all, descending), V (n x k)

# How many bytes of stacked factors one batched call may hold: a chunk of same-shape modules goes
# through geqrf/svd/ormqr at once (one call each, not one per module), and this bounds the copies.
CHUNK_BYTES = 256 << 20


def svd_of_sum(terms: list[Term], keep: int | None = None) -> SVD:
    """U, S, V with sum_i c_i B_i A_i = U diag(S) V^T, S descending, without the m x n matrix:
    B = [c_1 B_1 | c_2 B_2 | ...] = Qb Rb and A^T = [A_1; A_2; ...]^T = Qa Ra (thin QR), so the sum
    is Qb (Rb Ra^T) Qa^T and the SVD of the small q x q core does the rest. `keep`: how many
    columns of U and V to form (all of S is returned either way: the energies need it)."""
    return svd_of_sums([terms], keep)[0]


def work_dtype(terms: list[Term]) -> torch.dtype:
    """float64 when any factor is float64 (the tests' dense references, a float64 momentum), else
    float32: the adapters travel in float32 or narrower, and on 8 clients of a 7B q,v at rank 64
    the float32 step was 1.2-2.5x faster (two runs on a loaded machine) and 1.6e-6 (relative,
    Frobenius) from the float64 one (`bench/combine.py --precision`, docs/BENCHMARKS.md)."""
    return torch.float64 if any(t.dtype == torch.float64 for _, b, a in terms for t in (b, a)) else torch.float32


def svd_of_sums(sums: list[list[Term]], keep: int | None = None) -> list[SVD]:
    """`svd_of_sum` of each list of terms (one per module), batched: modules whose stacks have the
    same shape go through one geqrf, one svd and one ormqr call per chunk."""
    out: list[SVD | None] = [None] * len(sums)
    groups: dict[tuple, list[int]] = {}
    for i, terms in enumerate(sums):
        if not terms:
            raise ValueError(f"sum {i} has no terms")
        m, n = terms[0][1].shape[0], terms[0][2].shape[1]
        q = sum(b.shape[1] for _, b, _ in terms)
        groups.setdefault((m, n, q, work_dtype(terms)), []).append(i)
    for (m, n, q, dtype), idx in groups.items():
        per = max(1, CHUNK_BYTES // ((m + n) * q * dtype.itemsize))
        for lo in range(0, len(idx), per):
            part = idx[lo:lo + per]
            stacks = [_stacked(sums[i], dtype) for i in part]
            u, s, v = _factored_svd(torch.stack([b for b, _ in stacks]), torch.stack([a for _, a in stacks]), keep)
            for j, i in enumerate(part):
                out[i] = (u[j], s[j], v[j])
    return out


def _stacked(terms: list[Term], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[c_1 B_1 | c_2 B_2 | ...] (m x q) and [A_1; A_2; ...]^T (n x q), in `dtype`."""
    b = torch.cat([bi.to(dtype) for _, bi, _ in terms], dim=1)
    b *= torch.cat([torch.full((bi.shape[1],), float(c), dtype=dtype) for c, bi, _ in terms])
    return b, torch.cat([ai.to(dtype) for _, _, ai in terms], dim=0).T


def _factored_svd(b: torch.Tensor, at: torch.Tensor, keep: int | None) -> SVD:
    """Batched: b (.., m, q), at (.., n, q); the SVD of b @ at^T. Householder QR (geqrf) of both,
    the SVD of Rb Ra^T, and only the `keep` wanted columns of Qb Uc and Qa Vc, applied as
    reflectors (ormqr): forming the whole Q (orgqr) and multiplying it out cost twice the QR."""
    m, n, q = b.shape[-2], at.shape[-2], b.shape[-1]
    kb, ka = min(m, q), min(n, q)
    hb, tb = torch.geqrf(b)
    ha, ta = torch.geqrf(at)
    uc, s, vch = torch.linalg.svd(hb[..., :kb, :].triu() @ ha[..., :ka, :].triu().mT, full_matrices=False)
    k = s.shape[-1] if keep is None else min(keep, s.shape[-1])
    if k == 0:
        return b.new_zeros(*b.shape[:-2], m, 0), s, b.new_zeros(*b.shape[:-2], n, 0)

    def apply_q(h, tau, small, rows):  # Q @ [small; 0]: Q's first columns only, never Q itself
        full = small.new_zeros(*small.shape[:-2], rows, k)
        full[..., :small.shape[-2], :] = small
        return torch.ormqr(h[..., :small.shape[-2]], tau, full)

    return apply_q(hb, tb, uc[..., :k], m), s, apply_q(ha, ta, vch[..., :k, :].mT, n)


def split(u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Components lo..hi of an SVD as LoRA factors: B = U S (m x k), A = V^T (k x n, orthonormal rows,
    so a client's A stays trainable where S is 0, as a seeded A is)."""
    return u[:, lo:hi] * s[lo:hi], v[:, lo:hi].T.contiguous()


def energy(s: torch.Tensor) -> float:
    return float((s * s).sum())


def product_distance(x: dict, y: dict) -> float:
    """sqrt(sum over modules of ||B_x A_x - B_y A_y||_F^2), from the singular values of each
    difference in factored form (`svd_of_sums`, no U or V formed): the distance of two adapters'
    products, whatever basis their factors are in."""
    svds = svd_of_sums([[(1.0, x[m + B_SUFFIX], x[m + A_SUFFIX]), (-1.0, y[m + B_SUFFIX], y[m + A_SUFFIX])]
                        for m in modules(y)], keep=0)
    return math.sqrt(sum(energy(s) for _, s, _ in svds))


def complete(a: torch.Tensor, r: int, generator: torch.Generator) -> torch.Tensor:
    """`a` (k x n, orthonormal rows) with r - k more orthonormal rows, seeded: a client whose rank
    exceeds what the global adapter holds trains those directions from B = 0, like a fresh LoRA."""
    k, n = a.shape
    if k >= r:
        return a
    extra = torch.randn(n, r - k, dtype=torch.float64, generator=generator)
    extra -= a.T @ (a @ extra)
    q, _ = torch.linalg.qr(extra)
    return torch.cat([a, q.T], dim=0)


# ---------------------------------------------------------------- the global adapter, sliced per client

def truncate(global_state: State, r: int, seed: int = 0) -> State:
    """A client's rank-r global adapter from the server's (held as B = U S, A = V^T, largest first):
    its first r components, and when the server's holds fewer, zero B columns with seeded
    orthonormal A rows (they add nothing to B A)."""
    out = {}
    for i, m in enumerate(modules(global_state)):
        a, b = global_state[m + A_SUFFIX], global_state[m + B_SUFFIX]
        if a.shape[0] >= r:
            out[m + A_SUFFIX], out[m + B_SUFFIX] = a[:r].clone(), b[:, :r].clone()
            continue
        g = torch.Generator().manual_seed(seed * 7919 + i)
        full = complete(a.to(torch.float64), r, g).to(a.dtype)
        out[m + A_SUFFIX] = full
        out[m + B_SUFFIX] = torch.cat([b, torch.zeros(b.shape[0], r - a.shape[0], dtype=b.dtype)], dim=1)
    return {k: out[k] for k in global_state}  # key order as the adapter's


def held_energy(global_state: State, r: int) -> float:
    """Share of the server's global adapter (||B A||^2 over all modules) a rank-r client cannot hold:
    the energy of its components r, r+1, ... (B = U S: column norms are the singular values)."""
    total = dropped = 0.0
    for m in modules(global_state):
        s2 = global_state[m + B_SUFFIX].to(torch.float64).pow(2).sum(dim=0)
        total += float(s2.sum())
        dropped += float(s2[r:].sum())
    return dropped / total if total > 0 else 0.0


def in_svd_form(state: State, rank: int) -> State:
    """`state` rewritten as B = U S, A = V^T of the same product, at most `rank` components (the
    server's start for `product`)."""
    return mean_of_products([state], [1.0], rank)


def mean_of_products(states: list[State], weights: list[float], rank: int) -> State:
    """sum_k w_k B_k A_k as B = U S, A = V^T with at most `rank` components (global.init =
    personal_mean under product: the average of the personal adapters' products)."""
    names = modules(states[0])
    svds = svd_of_sums([[(w, st[m + B_SUFFIX], st[m + A_SUFFIX]) for w, st in zip(weights, states)] for m in names],
                       keep=rank)
    out = {}
    for m, (u, s, v) in zip(names, svds):
        b, a = split(u, s, v, 0, min(rank, s.numel()))
        out[m + B_SUFFIX], out[m + A_SUFFIX] = b.to(states[0][m + B_SUFFIX].dtype), a.to(states[0][m + A_SUFFIX].dtype)
    return {k: out[k] for k in states[0]}


# ---------------------------------------------------------------- zero-padding (factors, HetLoRA)

def pad(state: State, r: int) -> State:
    """A rank-k adapter zero-padded to rank r >= k (A rows and B columns of zeros)."""
    out = {}
    for k, v in state.items():
        extra = r - (v.shape[0] if k.endswith(A_SUFFIX) else v.shape[1])
        if extra < 0:
            raise ValueError(f"{k}: rank {r} is below the adapter's")
        out[k] = (torch.cat([v, v.new_zeros(extra, v.shape[1])], dim=0) if k.endswith(A_SUFFIX)
                  else torch.cat([v, v.new_zeros(v.shape[0], extra)], dim=1))
    return out


def first(state: State, r: int) -> State:
    """The first r components of an adapter (what a rank-r client gets of a padded average)."""
    return {k: (v[:r] if k.endswith(A_SUFFIX) else v[:, :r]).clone() for k, v in state.items()}


# ---------------------------------------------------------------- product: the round's sum and the outer step

class ProductSum(InOrderSum):
    """The round's updates kept as weighted factors, in client-id order (InOrderSum's order), for
    `ProductOuter`: the product of each client's B A is only formed inside `svd_of_sum`."""

    def _accumulate(self, state: State, w: float) -> None:
        if self.sum is None:
            self.sum, self.factors = {}, []
            self.dtypes = {k: v.dtype for k, v in state.items()}
        self.factors.append((self.added_next(), w, state))
        self.weight += w

    def added_next(self) -> int:
        return self.order[self.next - 1]  # _drain advanced `next` past the client being added

    def mean(self) -> State:
        raise TypeError("a product round has no mean of the factors; ProductOuter.step combines it")


class ProductOuter:
    """The outer optimizer on the global adapter's product dW = B A, in factored form.

    Each client k received T_k (the server's rank-r_k slice) and sent back B'_k A'_k. The
    pseudo-gradient is delta = sum_k p_k (T_k - B'_k A'_k) (p_k: normalised weights): a client's
    change measured from what it actually held, so the part of the global adapter a small client
    could not hold is not averaged away: with sgd lr 1, new = sum p_k (G - T_k) + sum p_k B'_k A'_k,
    the exact average of the products plus what each client's truncation dropped (error feedback
    by construction). Then the result is cut to `rank` components (the largest client rank); what
    that drops is kept (`residual`, at most `rank` components) and added to the next round's sum.

    sgd:      G <- G - lr * delta
    nesterov: M <- mu * M + delta; G <- G - lr * (delta + mu * M)   (torch.optim.SGD(nesterov=True))
    Both are linear in the matrices, so doing them on factored sums is exact: the momentum M is kept
    as a product too (at most `rank` components; what its cut drops is reported, not kept), which
    stays meaningful when the basis of the global adapter changes between rounds, unlike momentum
    on A and B. Adam's elementwise moments have no factored form: config refuses it with product.
    """

    def __init__(self, name: str, lr: float, momentum: float = 0.9, rank: int = 8):
        if name not in ("sgd", "nesterov"):
            raise ValueError(f"outer optimizer {name!r} with global.combine = product; expected sgd or nesterov")
        self.name, self.lr, self.momentum, self.rank = name, lr, momentum, rank
        self.residual: State | None = None  # what the last cut of the global adapter dropped
        self.buffer: State | None = None    # nesterov's momentum, as a product

    def state_dict(self) -> dict:
        return {"combine": "product", "residual": self.residual, "buffer": self.buffer}

    def load_state_dict(self, d: dict) -> None:
        if d.get("combine") != "product":
            raise ValueError("the checkpoint's outer optimizer state is not global.combine = product's")
        self.residual, self.buffer = d["residual"], d["buffer"]

    def step(self, g: State, sent: dict[int, State], total: ProductSum) -> tuple[State, dict]:
        """The next global adapter (B = U S, A = V^T, at most `rank` components) and the round's
        energies: `cut`, the share of the new product the cut to `rank` moved to the residual;
        `lost`, what fell off the residual and the momentum (beyond `rank` each). Every module's
        sum goes through one batched `svd_of_sums` (two for nesterov: the momentum first)."""
        if not total.factors or total.weight <= 0:
            raise ValueError(f"no update to combine (clients added: {total.added})")
        mu, lr, names = self.momentum, self.lr, modules(g)
        held = {m: self._held(g, m, sent, total) for m in names}
        delta = {m: held[m][1] + [(-w / total.weight, st[m + B_SUFFIX], st[m + A_SUFFIX]) for _, w, st in total.factors]
                 for m in names}
        steps = dict(delta)
        buffer, e_lost = {}, 0.0
        if self.name == "nesterov":
            prior = {m: [(mu, self.buffer[m + B_SUFFIX], self.buffer[m + A_SUFFIX])] if self.buffer else [] for m in names}
            for m, (u, s, v) in zip(names, svd_of_sums([prior[m] + delta[m] for m in names], keep=self.rank)):
                k = min(self.rank, s.numel())
                buffer[m + B_SUFFIX], buffer[m + A_SUFFIX] = split(u, s, v, 0, k)
                e_lost += energy(s[k:])
                steps[m] = delta[m] + [(mu, buffer[m + B_SUFFIX], buffer[m + A_SUFFIX])]
        sums = []
        for m in names:
            gb, ga = g[m + B_SUFFIX], g[m + A_SUFFIX]
            mask, held_terms = held[m]
            rest = steps[m][len(held_terms):]
            if mask is not None:
                # G - lr * G diag(c) is one term G diag(1 - lr c), not two: the stack loses r columns,
                # and none at all when every client held all of G and lr is 1 (the column scale is 0).
                scale = 1.0 - lr * mask
                terms = [(1.0, gb * scale.to(gb.dtype), ga)] if bool(scale.any()) else []
            else:
                terms, rest = [(1.0, gb, ga)], steps[m]
            terms += [(-lr * c, b, a) for c, b, a in rest]
            if self.residual:
                terms.append((1.0, self.residual[m + B_SUFFIX], self.residual[m + A_SUFFIX]))
            sums.append(terms)
        new, residual = {}, {}
        e_new = e_cut = 0.0
        for m, (u, s, v) in zip(names, svd_of_sums(sums, keep=2 * self.rank)):
            k = min(self.rank, s.numel())
            dtype_b, dtype_a = g[m + B_SUFFIX].dtype, g[m + A_SUFFIX].dtype
            b, a = split(u, s, v, 0, k)
            new[m + B_SUFFIX], new[m + A_SUFFIX] = b.to(dtype_b), a.to(dtype_a)
            kr = min(s.numel(), 2 * k)  # the residual keeps the next `rank` components
            b, a = split(u, s, v, k, kr)
            residual[m + B_SUFFIX], residual[m + A_SUFFIX] = b.to(dtype_b), a.to(dtype_a)
            e_new, e_cut, e_lost = e_new + energy(s), e_cut + energy(s[k:]), e_lost + energy(s[kr:])
        order = list(g)
        self.residual = {k: residual[k] for k in order}
        self.buffer = {k: buffer[k] for k in order} if buffer else None
        info = {"cut": e_cut / e_new if e_new > 0 else 0.0, "lost": e_lost / e_new if e_new > 0 else 0.0}
        return {k: new[k] for k in order}, info

    @staticmethod
    def _held(g: State, m: str, sent: dict[int, State], total: ProductSum) -> tuple[torch.Tensor | None, list[Term]]:
        """sum_k p_k T_k of module m (what the clients held) as terms. When each T_k is the first r_k
        components of G (no compression), it is B diag(c) A with c_i = the sum of p_k over the
        clients holding component i: one term of G's rank instead of one per client (the stack, and
        the QR, stay small); then c is returned too, else None and one term per client."""
        gb, ga = g[m + B_SUFFIX], g[m + A_SUFFIX]
        mask = torch.zeros(ga.shape[0], dtype=torch.float64)
        for client, w, _ in total.factors:
            held_b, held_a = sent[client][m + B_SUFFIX], sent[client][m + A_SUFFIX]
            r = held_a.shape[0]
            if not (r <= ga.shape[0] and torch.equal(held_a, ga[:r]) and torch.equal(held_b, gb[:, :r])):
                return None, [(w / total.weight, sent[c][m + B_SUFFIX], sent[c][m + A_SUFFIX]) for c, w, _ in total.factors]
            mask[:r] += w / total.weight
        return mask, [(1.0, gb * mask.to(gb.dtype), ga)]


def dense(state: State) -> dict[str, torch.Tensor]:
    """{module: B @ A} in float64: the dense reference of tests and the bench (small shapes only)."""
    return {m: state[m + B_SUFFIX].to(torch.float64) @ state[m + A_SUFFIX].to(torch.float64) for m in modules(state)}


# ---------------------------------------------------------------- factors: how far from product?

class FactorsGap:
    """Per round under `factors`: ||(sum p B_k)(sum p A_k) - sum p B_k A_k|| relative to
    ||sum p B_k A_k||, over all modules, without keeping the updates or forming m x n matrices:
    both are multiplied by a seeded n x s Gaussian sketch (E||M W||^2 = ||M||^2; W is the identity,
    so the figure is exact, when n <= s), and only sum p_k B_k (A_k W) (m x s) is accumulated.
    With s = 64 the estimate is within about +-20% (1/sqrt(s/2)): enough to see whether it matters.
    The server keeps one for the whole job and calls `new_round` before each round: the sketches,
    the same every round (seeded), are drawn once."""

    def __init__(self, sketch: int = 64, seed: int = 0):
        self.sketch, self.seed = sketch, seed
        self.omega: dict[str, torch.Tensor] = {}
        self.cast: dict[str, torch.Tensor] = {}  # omega in float32, for float32 updates
        self.new_round()

    def new_round(self) -> None:
        """Forget the last round's updates; keep the sketches."""
        self.acc: dict[str, torch.Tensor] = {}
        self.weight = 0.0

    def _omega(self, m: str, n: int) -> torch.Tensor:
        if m not in self.omega:
            if n <= self.sketch:
                self.omega[m] = torch.eye(n, dtype=torch.float64)
            else:
                g = torch.Generator().manual_seed(self.seed * 104729 + len(self.omega))
                self.omega[m] = torch.randn(n, self.sketch, dtype=torch.float64, generator=g) / math.sqrt(self.sketch)
        return self.omega[m]

    def add(self, state: State, w: float) -> None:
        # The sketch products in the update's own precision (float32 for float32 adapters, no float64
        # copies: this was most of FedAvg's server time at 7B q,v), summed in float64.
        for m in modules(state):
            a, b = state[m + A_SUFFIX], state[m + B_SUFFIX]
            dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
            omega = self._omega(m, a.shape[1])
            if omega.dtype != dtype:
                omega = self.cast.setdefault(m, omega.to(dtype))
            term = b.to(dtype) @ (a.to(dtype) @ omega)
            if m in self.acc:
                self.acc[m].add_(term, alpha=w)
            else:
                self.acc[m] = term.to(torch.float64) * w
        self.weight += w

    def relative(self, mean: State) -> float:
        """The relative gap, given the round's factor average (InOrderSum.mean); 0 when nothing came."""
        if self.weight <= 0:
            return 0.0
        num = den = 0.0
        for m, acc in self.acc.items():
            exact = acc / self.weight
            a, b = mean[m + A_SUFFIX].to(torch.float64), mean[m + B_SUFFIX].to(torch.float64)
            gap = b @ (a @ self.omega[m]) - exact
            num, den = num + float((gap * gap).sum()), den + float((exact * exact).sum())
        return math.sqrt(num / den) if den > 0 else 0.0
