"""The shipped scenario: log-line anomaly detection across systems, generated from a seed.

It mirrors FDLoRA's setting (several organisations with few labelled rows each, whose tasks share
structure but differ in local conventions). Every client is one system (hdfs, spark, ...) that
labels four-word log lines " normal" or " abnormal":

- **shared anomaly words** (`SHARED_ANOMALIES`) are abnormal on every system. Each client meets
  only a few examples of each, with a client-specific mix (some failure modes are common on one
  system and rare on another), so pooling them through a global adapter helps;
- **private anomaly words** (two per client) are abnormal on their own system only. The other
  systems see them too, in harmless lines labelled normal, so the private rules conflict across
  clients and a single shared adapter cannot serve everyone: only a personal adapter can;
- **label skew**: each client has its own anomaly rate and its own mix of the kinds of lines.

The prompt does not name the system, so nothing in the input tells a shared model whose rule
applies. `general_text` is the pretraining corpus for the tiny base: the same line format with
other anomaly words (`PRETRAIN_ANOMALIES`). It carries neither the shared nor any private rule, so
the base has to learn those from the clients (see notes: a base that already knows the shared rule
leaves the global adapter nothing to add).
"""

from __future__ import annotations

import random

import numpy as np

from .examples import Example

SYSTEMS = ["hdfs", "spark", "kafka", "nginx", "mysql", "redis", "ceph", "yarn"]
FILLER = ["disk", "user", "login", "cache", "retry", "socket", "kernel", "thread", "queue", "write",
          "read", "sync", "mount", "token", "route", "buffer", "signal", "daemon", "lease", "shard",
          "block", "node", "task", "job", "port", "host", "file", "page", "index", "table",
          "commit", "flush", "open", "close", "start", "stop", "send", "recv", "load", "scan"]
PRETRAIN_ANOMALIES = ["fatal", "crash", "abort", "failed", "error", "segfault", "halt", "killed"]
SHARED_ANOMALIES = ["panic", "corrupt", "overflow", "deadlock", "unreachable", "oom", "hung",
                    "checksum", "badblock", "truncated", "fenced", "split-brain"]
PRIVATE_ANOMALIES = ["timeout", "denied", "refused", "stale", "orphan", "leak", "drift", "evict",
                     "throttled", "degraded", "rebalance", "backlog", "replay", "lagging", "skew", "quota"]
LABELS = [" normal", " abnormal"]
PRIVATE_PER_CLIENT = 2
MAX_CLIENTS = len(PRIVATE_ANOMALIES) // PRIVATE_PER_CLIENT

# Kinds of lines; a client's mix over them is drawn around these shares (label skew).
KINDS = ("shared", "private", "foreign", "plain")
BASE_MIX = (0.25, 0.25, 0.2, 0.3)


def private_words(client: int) -> list[str]:
    """The anomaly words of one client only (abnormal there, harmless elsewhere)."""
    if not 0 <= client < MAX_CLIENTS:
        raise ValueError(f"the shipped scenario has private rules for {MAX_CLIENTS} clients; client {client} is out of range")
    return PRIVATE_ANOMALIES[client * PRIVATE_PER_CLIENT:(client + 1) * PRIVATE_PER_CLIENT]


def client_profile(client: int, num_clients: int, seed: int, skew: float = 1.0) -> dict:
    """The client's line mix over KINDS and its weights over the shared anomaly words.

    `skew` is a Dirichlet concentration: small = very different clients, large = alike."""
    rng = np.random.default_rng([seed, 7919, client])
    mix = rng.dirichlet(np.asarray(BASE_MIX) * 20.0 * skew)
    mix = np.maximum(mix, 0.05)
    if num_clients == 1:  # no other system, so no foreign words
        mix[2] = 0.0
    mix = mix / mix.sum()
    shared_w = rng.dirichlet(np.full(len(SHARED_ANOMALIES), skew))
    return {"system": SYSTEMS[client % len(SYSTEMS)], "mix": mix.tolist(), "shared_weights": shared_w.tolist()}


def _line(rng: random.Random, word: str | None) -> str:
    words = rng.sample(FILLER, 4)
    if word is not None:
        words[rng.randrange(4)] = word
    return "log: " + " ".join(words) + " =>"


def generate_client_rows(client: int, num_clients: int, n: int, seed: int, skew: float = 1.0) -> list[Example]:
    """`n` labelled rows for `client`, deterministic in (seed, client, num_clients, skew)."""
    prof = client_profile(client, num_clients, seed, skew)
    rng = random.Random(f"fdlora-scenario:{seed}:{client}")
    mine = private_words(client)
    foreign = [w for c in range(num_clients) if c != client for w in private_words(c)]
    rows = []
    for _ in range(n):
        kind = rng.choices(KINDS, weights=prof["mix"])[0]
        if kind == "shared":
            word, label = rng.choices(SHARED_ANOMALIES, weights=prof["shared_weights"])[0], "abnormal"
        elif kind == "private":
            word, label = rng.choice(mine), "abnormal"
        elif kind == "foreign" and foreign:
            word, label = rng.choice(foreign), "normal"  # another system's anomaly: harmless here
        else:
            word, label = None, "normal"
        rows.append(Example(prompt=_line(rng, word), response=" " + label, label=label))
    return rows


def general_text(n: int, seed: int) -> list[Example]:
    """The pretraining corpus: same format, pretraining-only anomaly words, no scenario rule."""
    rng = random.Random(f"fdlora-general:{seed}")
    rows = []
    for _ in range(n):
        if rng.random() < 0.5:
            word, label = rng.choice(PRETRAIN_ANOMALIES), "abnormal"
        else:
            word, label = None, "normal"
        rows.append(Example(prompt=_line(rng, word), response=" " + label, label=label))
    return rows
