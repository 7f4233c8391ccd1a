"""Splitting one file's rows across clients: `iid`, `dirichlet` over labels, or by the `client` field.

All three are deterministic in the seed. `dirichlet` follows the usual non-IID benchmark recipe
(Hsu et al., 2019): for every label, client shares p ~ Dir(alpha * 1_N) and that label's rows are
dealt out in those proportions. A small alpha gives each client a few dominant labels (skewed);
a large alpha gives every client close to the global label mix (near IID).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .jsonl import DataError, Row

PARTITIONS = ("iid", "dirichlet", "field")


def _rng(seed: int, what: str) -> np.random.Generator:
    # Streams keyed by purpose, so changing one split never shifts another's randomness.
    return np.random.default_rng([seed, sum(map(ord, what)), len(what)])


def partition_iid(n_rows: int, num_clients: int, seed: int) -> list[list[int]]:
    """Row indices per client: a seeded shuffle dealt round-robin (sizes differ by at most one)."""
    order = _rng(seed, "iid").permutation(n_rows)
    return [sorted(order[c::num_clients].tolist()) for c in range(num_clients)]


def partition_dirichlet(labels: list[str], num_clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Row indices per client, label shares per client drawn from Dir(alpha)."""
    if alpha <= 0:
        raise ValueError(f"alpha = {alpha} must be > 0")
    rng = _rng(seed, "dirichlet")
    out: list[list[int]] = [[] for _ in range(num_clients)]
    for label in sorted(set(labels)):
        idx = np.array([i for i, l in enumerate(labels) if l == label])
        idx = idx[rng.permutation(len(idx))]
        p = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(p)[:-1] * len(idx)).round().astype(int)
        for c, part in enumerate(np.split(idx, cuts)):
            out[c].extend(part.tolist())
    return [sorted(o) for o in out]


def partition_rows(rows: list[Row], num_clients: int, how: str, alpha: float, seed: int,
                   path: str) -> list[list[Row]]:
    """Split the rows of `path` across clients; DataError names the file (and the row) on a problem."""
    if how == "iid":
        parts = partition_iid(len(rows), num_clients, seed)
    elif how == "dirichlet":
        for r in rows:
            if r.example.label is None:
                raise DataError(f"{r.path}:{r.line}: partition 'dirichlet' needs a 'label' on every row; "
                                f"this row has none (use partition: iid, or add labels)")
        parts = partition_dirichlet([r.example.label for r in rows], num_clients, alpha, seed)
    elif how == "field":
        parts = [[] for _ in range(num_clients)]
        for i, r in enumerate(rows):
            if r.client is None:
                raise DataError(f"{r.path}:{r.line}: partition 'field' needs a 'client' on every row; this row has none")
            if r.client >= num_clients:
                raise DataError(f"{r.path}:{r.line}: client {r.client} is out of range; the topology has "
                                f"{num_clients} clients (ids 0..{num_clients - 1})")
            parts[r.client].append(i)
    else:
        raise ValueError(f"unknown partition {how!r}; expected one of {', '.join(PARTITIONS)}")
    out = [[rows[i] for i in p] for p in parts]
    empty = [c for c, p in enumerate(out) if not p]
    if empty:
        hint = {"dirichlet": f"raise data.alpha (now {alpha}), give more rows, or use fewer clients",
                "field": "give every client id at least one row",
                "iid": "give at least one row per client"}[how]
        raise DataError(f"{path}: partition {how!r} left client {empty[0]} with no rows "
                        f"({len(rows)} rows over {num_clients} clients); {hint}")
    return out


def label_counts(rows) -> Counter:
    """Label histogram of Examples or Rows (None for unlabelled rows)."""
    return Counter((r.example if isinstance(r, Row) else r).label for r in rows)
