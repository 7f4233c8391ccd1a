"""Data: rows, partitions across clients, train / few-shot / test splits, tokenisation, the
shipped scenario.

The trainer needs `load_clients(cfg, num_clients, seed)`, `get_tokenizer` and `collate`:

    clients = load_clients(cfg.data, num_clients=2, seed=0)   # list[ClientData], one per client
    batch = collate(tokenizer, clients[0].train[:8], max_len=48)

Sources (`data.source`): `generator` (the shipped scenario, `scenario.py`), `jsonl` (user files:
one per client, or one split by `data.partition`) or `hf` (the same, as local Hugging Face datasets
read by the optional `datasets` library, `hf.py`). Rows come in three layouts (`formats.py`):
prompt/response, instruction (Alpaca) and chat. Every split is deterministic in the seed.
"""

from __future__ import annotations

import random

from ..log import FILE_ONLY, get_logger
from .chat import has_chat_template
from .errors import DataError
from .examples import IGNORE_INDEX, ClientData, Example, collate, encode_example, pad_batch, segments
from .formats import Row, parse_row
from .jsonl import read_jsonl, write_jsonl
from .partition import (PARTITIONS, field_clients, file_client, label_counts, partition_dirichlet, partition_iid,
                        partition_rows)
from .scenario import LABELS, general_text, generate_client_rows
from .tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer

MAX_CANDIDATES = 16  # labelled rows with at most this many distinct responses are scored as classification


def candidate_responses(per_client: list[list[Example]]) -> list[str]:
    """The responses scored for accuracy among the given rows: their distinct responses, when every
    row has a label and there are at most MAX_CANDIDATES of them; otherwise [] (loss only).

    Over one client's rows it is the client's own label set (`accuracy`); over every client's rows
    the union (`accuracy_all`: a client whose partition lacks a label can still be wrong towards
    it, and a shared adapter is charged for answering with another client's name for a label)."""
    every = [e for rows in per_client for e in rows]
    responses = {e.response for e in every}
    # chat rows are scored by loss only: a candidate after the plain prompt is not what the chat
    # template renders, so its likelihood would not be the model's answer to the conversation
    if all(e.label is not None and e.messages is None for e in every) and len(responses) <= MAX_CANDIDATES:
        return sorted(responses)
    return []


def split_client(client: int, rows: list[Example], cfg, seed: int, where: str = "",
                 candidates_all: list[str] | None = None, name: str | None = None) -> ClientData:
    """Shuffle one client's rows (seeded by seed and client) into test, few-shot and train.

    `candidates` is this client's own label set (`candidate_responses([rows])`, all its rows before
    the split); `candidates_all` is every client's (default: the client's own)."""
    rng = random.Random(f"fdlora-split:{seed}:{client}")
    rows = list(rows)
    rng.shuffle(rows)
    if cfg.max_rows_per_client is not None:
        rows = rows[: cfg.max_rows_per_client]
    n_test = max(1, int(round(len(rows) * cfg.test_fraction)))
    n_few = cfg.fewshot_rows
    if len(rows) < n_test + n_few + 1:
        raise DataError(f"{where}client {client} has {len(rows)} rows; it needs more than test ({n_test}) + "
                        f"few-shot ({n_few}) to keep at least one training row")
    test, few, train = rows[:n_test], rows[n_test:n_test + n_few], rows[n_test + n_few:]
    candidates = candidate_responses([rows])
    if candidates_all is None:
        candidates_all = candidates
    return ClientData(client=client, train=train, fewshot=few, test=test, candidates=candidates,
                      candidates_all=candidates_all, name=name)


def read_rows(cfg, path: str) -> list[Row]:
    """One user file's rows, by `data.source`."""
    if cfg.source == "hf":
        from .hf import read_dataset

        return read_dataset(path, cfg.split)
    return read_jsonl(path)


def load_rows(cfg, num_clients: int, seed: int) -> tuple[list[list[Example]], list[str], list[str | None]]:
    """Every client's rows before splitting, a description of where each came from, and each
    client's name (the string id its rows give it; None where they give none or an index)."""
    if cfg.source == "generator":
        rows = [generate_client_rows(c, num_clients, cfg.rows_per_client, seed, cfg.skew) for c in range(num_clients)]
        return rows, ["generator: " for _ in range(num_clients)], [None] * num_clients
    files = list(cfg.files or [])
    if len(files) == num_clients and num_clients > 1 or (len(files) == 1 and num_clients == 1):
        per_file = [read_rows(cfg, p) for p in files]
        names = [file_client(rs, c, p) for c, (rs, p) in enumerate(zip(per_file, files))]
        for c, n in enumerate(names):
            if n is not None and names.index(n) != c:
                raise DataError(f"{files[c]}: client {n!r} is also the client of {files[names.index(n)]}; "
                                "with one file per client, every file holds a different client")
        return [[r.example for r in rs] for rs in per_file], [f"{p}: " for p in files], names
    if len(files) != 1:
        raise DataError(f"data.files has {len(files)} files; give 1 (split across clients) or {num_clients} (one per client)")
    rows = read_rows(cfg, files[0])
    parts = partition_rows(rows, num_clients, cfg.partition, cfg.alpha, seed, files[0])
    names = field_clients(rows, num_clients, files[0])[1] if cfg.partition == "field" else [None] * num_clients
    return [[r.example for r in p] for p in parts], [f"{files[0]}: " for _ in range(num_clients)], names


def check_responses_fit(tok, data: ClientData, max_len: int) -> None:
    """Every response of a client (every chat row's last assistant turn, every candidate label)
    fits `max_len` with its eos: checked once at start, so a long row fails the job before
    training, not when its batch comes up. Chat rows are rendered here, so a conversation the
    chat template refuses fails now too, naming its file and line."""
    rows = [("train", ex) for ex in data.train] + [("few-shot", ex) for ex in data.fewshot] + \
           [("test", ex) for ex in data.test] + [("candidate", Example("", c)) for c in data.candidates_all]
    if any(ex.messages is not None for _, ex in rows):
        get_logger().info(f"client {data.client}: chat rows rendered with " + (
            "the tokenizer's chat template" if has_chat_template(tok) else
            "the plain fallback template (the tokenizer has no chat template; docs/DATA.md)"))
    seen = set()
    for split, ex in rows:
        key = ex.messages or ex.response  # prompt/response rows: the response alone decides
        if key in seen:
            continue
        seen.add(key)
        n = len(segments(tok, ex)[-1][0])
        if n >= max_len:
            at = f"{ex.where}: " if ex.where else ""
            raise DataError(f"{at}client {data.client}: a {split} response of {n} tokens (with eos) does not fit "
                            f"train.max_seq_len = {max_len}: {ex.response[:60]!r}; raise train.max_seq_len")


def describe_clients(clients: list[ClientData]) -> str:
    """How the data's client names map to client indices, one line: `client 0 = 'acme', ...`."""
    return ", ".join(f"client {c.client} = {c.name!r}" if c.name is not None else f"client {c.client}"
                     for c in clients)


def read_clients(cfg, num_clients: int, seed: int) -> list[ClientData]:
    """Every client's train / few-shot / test rows (deterministic in seed). `cfg` is a DataConfig."""
    rows, where, names = load_rows(cfg, num_clients, seed)
    every = candidate_responses(rows)
    return [split_client(c, r, cfg, seed, where[c], every, names[c]) for c, r in enumerate(rows)]


_preloaded: dict = {}  # preload_clients' result, until load_clients takes it


def preload_clients(cfg, num_clients: int, seed: int) -> list[ClientData]:
    """Read now what the next `load_clients(cfg, num_clients, seed)` returns. `fdlora-cluster run`
    reads the data on every client rank before the job starts, so that a bad line stops every rank
    at once and is said once (cli.cmd_run); the trainer then takes the rows from here, not the files."""
    _preloaded.clear()
    clients = _preloaded[(repr(cfg), num_clients, seed)] = read_clients(cfg, num_clients, seed)
    return clients


def load_clients(cfg, num_clients: int, seed: int, announce: bool = True) -> list[ClientData]:
    """`read_clients`, or what `preload_clients` read for the same arguments. When the data names
    its clients, the mapping of names to indices is logged: on the console with `announce`, else
    in the rank's log file only (every client rank loads every client's rows: one says it)."""
    clients = _preloaded.pop((repr(cfg), num_clients, seed), None) or read_clients(cfg, num_clients, seed)
    if any(c.name is not None for c in clients):
        get_logger().info(f"data: client names -> indices: {describe_clients(clients)}",
                          extra=None if announce else FILE_ONLY)
    return clients


__all__ = ["ByteTokenizer", "ClientData", "candidate_responses", "check_responses_fit", "DataError", "Example",
           "HFTokenizer", "IGNORE_INDEX", "LABELS", "PARTITIONS", "Row", "collate", "describe_clients",
           "encode_example", "field_clients", "file_client", "general_text", "generate_client_rows", "get_tokenizer",
           "label_counts", "load_clients", "load_rows", "pad_batch", "parse_row", "partition_dirichlet",
           "partition_iid", "partition_rows", "preload_clients", "read_clients", "read_jsonl", "read_rows", "segments",
           "split_client", "write_jsonl"]
