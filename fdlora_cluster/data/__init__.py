"""Data: rows, per-client splits, tokenisation, and the shipped generator.

The trainer needs only `load_clients(cfg, num_clients, seed)` and `collate`.
"""

from __future__ import annotations

import json
import random

from .examples import IGNORE_INDEX, ClientData, Example, collate, encode_example
from .generator import LABELS, generate_client_rows
from .tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer


class DataError(ValueError):
    """Input data that cannot be used; the message names the file and line."""


def read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            for k in ("prompt", "response"):
                if not isinstance(obj.get(k), str):
                    raise DataError(f"{path}:{lineno}: missing or non-string field {k!r}")
            rows.append(obj)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _split(client: int, rows: list[Example], cfg, seed: int) -> ClientData:
    rng = random.Random(f"fdlora-split:{seed}:{client}")
    rows = list(rows)
    rng.shuffle(rows)
    if cfg.max_rows_per_client is not None:
        rows = rows[: cfg.max_rows_per_client]
    n_test = max(1, int(round(len(rows) * cfg.test_fraction)))
    n_few = cfg.fewshot_rows
    if len(rows) < n_test + n_few + 1:
        raise DataError(f"client {client} has {len(rows)} rows; it needs more than test ({n_test}) + few-shot ({n_few})")
    test, few, train = rows[:n_test], rows[n_test:n_test + n_few], rows[n_test + n_few:]
    # Labelled rows with a small set of distinct responses are scored as classification.
    responses = {e.response for e in rows}
    labelled = all(e.label is not None for e in rows)
    candidates = sorted(responses) if labelled and len(responses) <= 16 else []
    return ClientData(client=client, train=train, fewshot=few, test=test, candidates=candidates)


def load_clients(cfg, num_clients: int, seed: int) -> list[ClientData]:
    """Every client's train / few-shot / test rows (deterministic in seed). `cfg` is a DataConfig."""
    if cfg.source == "generator":
        per_client = [generate_client_rows(c, num_clients, cfg.rows_per_client, seed) for c in range(num_clients)]
    elif len(cfg.files) == num_clients:
        per_client = [[Example(r["prompt"], r["response"], r.get("label")) for r in read_jsonl(p)] for p in cfg.files]
    else:
        rows = read_jsonl(cfg.files[0])
        rng = random.Random(f"fdlora-partition:{seed}")
        order = list(range(len(rows)))
        rng.shuffle(order)
        per_client = [[] for _ in range(num_clients)]
        for k, i in enumerate(order):
            r = rows[i]
            per_client[k % num_clients].append(Example(r["prompt"], r["response"], r.get("label")))
    return [_split(c, rows, cfg, seed) for c, rows in enumerate(per_client)]


__all__ = ["ByteTokenizer", "ClientData", "DataError", "Example", "HFTokenizer", "IGNORE_INDEX", "LABELS",
           "collate", "encode_example", "get_tokenizer", "load_clients", "read_jsonl"]
