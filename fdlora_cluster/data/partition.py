"""Splitting one file's rows across clients: `iid`, `dirichlet` over labels, or by the `client` field.

All three are deterministic in the seed. `dirichlet` follows the usual non-IID benchmark recipe
(Hsu et al., 2019): for every label, client shares p ~ Dir(alpha * 1_N) and that label's rows are
dealt out in those proportions. A small alpha gives each client a few dominant labels (skewed);
a large alpha gives every client close to the global label mix (near IID).

Client ids in the `client` field are indices (integers, the client's position) or names (strings);
names map to indices in sorted order (Python's string order, so 'acme' < 'beta' and '10' < '9'),
which does not depend on the order of the rows. One file mixes no integers and names.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from .errors import DataError
from .formats import Row

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


def field_clients(rows: list[Row], num_clients: int, path: str) -> tuple[dict, list[str | None]]:
    """For `partition: field`: {client id: index} over the rows' ids, and each index's name (None
    where the ids are indices). DataError names the row (or the file) on a problem."""
    first: dict = {}  # id -> the first row that gives it
    for r in rows:
        if r.client is None:
            raise DataError(f"{r.where}: partition 'field' needs a 'client' on every row; this row has none")
        if isinstance(r.client, int) and r.client >= num_clients:
            raise DataError(f"{r.where}: client {r.client} is out of range; the topology has "
                            f"{num_clients} clients (ids 0..{num_clients - 1})")
        other = next(iter(first.values()), r)
        if type(r.client) is not type(other.client):
            raise DataError(f"{r.where}: client {r.client!r}, but {other.where} gives {other.client!r}; "
                            "one file names its clients by index (integers) or by name (strings), not both")
        first.setdefault(r.client, r)
    if isinstance(rows[0].client, int):
        return {c: c for c in first}, [None] * num_clients
    names = sorted(first)
    if len(names) != num_clients:
        listed = ", ".join(f"{n!r} (first at {first[n].where})" for n in names[:10])
        raise DataError(f"{path}: {len(names)} client names but the topology has {num_clients} clients; every client "
                        f"needs one name: {listed}{', ...' if len(names) > 10 else ''}")
    return {n: i for i, n in enumerate(names)}, names


def file_client(rows: list[Row], index: int, path: str) -> str | None:
    """With one file per client: the name the file's rows give their client (None if they give
    none, or its index). Every `client` in the file must agree with the others and with `index`."""
    first = None
    for r in rows:
        if r.client is None:
            continue
        if isinstance(r.client, int) and r.client != index:
            raise DataError(f"{r.where}: client {r.client}, but this file is data.files[{index}], client {index}'s "
                            "(with one file per client, a row's 'client' must agree with its file)")
        if first is None:
            first = r
        elif r.client != first.client:
            raise DataError(f"{r.where}: client {r.client!r}, but {first.where} gives {first.client!r} "
                            "(with one file per client, every row of a file belongs to one client)")
    return first.client if first is not None and isinstance(first.client, str) else None


def partition_rows(rows: list[Row], num_clients: int, how: str, alpha: float, seed: int,
                   path: str) -> list[list[Row]]:
    """Split the rows of `path` across clients; DataError names the file (and the row) on a problem."""
    if how == "iid":
        parts = partition_iid(len(rows), num_clients, seed)
    elif how == "dirichlet":
        for r in rows:
            if r.example.label is None:
                raise DataError(f"{r.where}: partition 'dirichlet' needs a 'label' on every row; "
                                f"this row has none (use partition: iid, or add labels)")
        parts = partition_dirichlet([r.example.label for r in rows], num_clients, alpha, seed)
    elif how == "field":
        index, _ = field_clients(rows, num_clients, path)
        parts = [[] for _ in range(num_clients)]
        for i, r in enumerate(rows):
            parts[index[r.client]].append(i)
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
