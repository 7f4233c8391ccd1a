"""The shipped scenario: log-line anomaly detection across systems, generated from a seed.

It mirrors FDLoRA's setting (several organisations with few labelled rows each, whose tasks share
structure but differ in local conventions). Every client is one system (hdfs, spark, ...) that
labels log lines `log: <component> <event> <argument> =>` as " normal" or " abnormal"; the event
decides the label, component and argument are noise:

- **shared anomaly events** (`SHARED_ANOMALIES`) are abnormal on every system. There are many of
  them and each client meets only a few examples of each, with a client-specific mix (a failure
  mode common on one system is rare on another), so pooling them through a global adapter helps;
- **private anomaly events** (two per client) are abnormal on their own system only. The other
  systems see them too, in harmless lines labelled normal, so the private rules conflict across
  clients and one shared adapter cannot serve everyone: only a personal adapter can;
- **label skew**: each client has its own anomaly rate and its own mix of kinds of lines.

The prompt does not name the system, so nothing in the input tells a shared model whose rule
applies. `general_text` is the pretraining corpus for the tiny base: the same line format with
other anomaly events (`PRETRAIN_ANOMALIES`). It carries neither the shared nor any private rule, so
the base must learn those from the clients (notes/scenario.md: a base that already knows the
shared rule leaves the global adapter nothing to add).
"""

from __future__ import annotations

import random

import numpy as np

from .examples import Example

SYSTEMS = ["hdfs", "spark", "kafka", "nginx", "mysql", "redis", "ceph", "yarn"]
COMPONENTS = ["disk", "cache", "socket", "kernel", "thread", "queue", "mount", "token", "route", "buffer",
              "daemon", "lease", "shard", "block", "node", "task", "job", "port", "host", "index"]
EVENTS = ["read", "write", "sync", "open", "close", "start", "stop", "send", "recv", "load", "scan",
          "commit", "flush", "login", "retry", "ping", "alloc", "free", "merge", "split"]
ARGS = ["ok", "id=1", "id=7", "id=42", "n=3", "n=64", "t=5ms", "t=90ms", "pid=12", "pid=88", "rc=0", "v2", "v3", "-"]
PRETRAIN_ANOMALIES = ["fatal", "crash", "abort", "failed", "error", "segfault", "halt", "killed"]
SHARED_ANOMALIES = ["panic", "corrupt", "overflow", "deadlock", "unreachable", "oom", "hung",
                    "checksum", "badblock", "truncated", "fenced", "split-brain", "livelock", "underrun",
                    "mismatch", "poisoned", "wedged", "diverged", "zombie", "unmounted", "nan", "exhausted",
                    "invalid", "lost", "starved", "garbled", "dropped", "expired", "crashloop", "rollback",
                    "partitioned", "flapping", "misrouted", "desync", "bitflip", "runaway"]
PRIVATE_ANOMALIES = ["timeout", "denied", "refused", "stale", "orphan", "leak", "drift", "evict",
                     "throttled", "degraded", "rebalance", "backlog", "replay", "lagging", "skew", "quota"]
LABELS = [" normal", " abnormal"]
PRIVATE_PER_CLIENT = 2
MAX_CLIENTS = len(PRIVATE_ANOMALIES) // PRIVATE_PER_CLIENT

# Kinds of lines; a client's mix over them is drawn around these shares (label skew).
KINDS = ("shared", "private", "foreign", "plain")
BASE_MIX = (0.3, 0.2, 0.2, 0.3)


def private_events(client: int) -> list[str]:
    """The anomaly events of one client only (abnormal there, harmless elsewhere)."""
    if not 0 <= client < MAX_CLIENTS:
        raise ValueError(f"the shipped scenario has private rules for {MAX_CLIENTS} clients; "
                         f"client {client} is out of range")
    return PRIVATE_ANOMALIES[client * PRIVATE_PER_CLIENT:(client + 1) * PRIVATE_PER_CLIENT]


def client_profile(client: int, num_clients: int, seed: int, skew: float = 1.0) -> dict:
    """The client's mix over KINDS and its weights over the shared anomaly events.

    `skew` scales two Dirichlet concentrations: small = very different clients, large = alike."""
    rng = np.random.default_rng([seed, 7919, client])
    mix = rng.dirichlet(np.asarray(BASE_MIX) * 30.0 * skew)
    mix = np.maximum(mix, 0.05)
    if num_clients == 1:  # no other system, so no foreign events
        mix[2] = 0.0
    mix = mix / mix.sum()
    shared_w = rng.dirichlet(np.full(len(SHARED_ANOMALIES), 4.0 * skew))
    return {"system": SYSTEMS[client % len(SYSTEMS)], "mix": dict(zip(KINDS, mix.tolist())),
            "shared_weights": dict(zip(SHARED_ANOMALIES, shared_w.tolist())),
            "private": private_events(client)}


def _line(rng: random.Random, event: str | None) -> str:
    """`log: <component> <event> <argument> =>`; the event decides the label, the rest is noise."""
    return f"log: {rng.choice(COMPONENTS)} {event or rng.choice(EVENTS)} {rng.choice(ARGS)} =>"


def generate_client_rows(client: int, num_clients: int, n: int, seed: int, skew: float = 1.0) -> list[Example]:
    """`n` labelled rows for `client`, deterministic in (seed, client, num_clients, skew)."""
    prof = client_profile(client, num_clients, seed, skew)
    rng = random.Random(f"fdlora-scenario:{seed}:{client}")
    mine = prof["private"]
    foreign = [e for c in range(num_clients) if c != client for e in private_events(c)]
    kinds, kind_w = list(prof["mix"]), list(prof["mix"].values())
    shared, shared_w = list(prof["shared_weights"]), list(prof["shared_weights"].values())
    rows = []
    for _ in range(n):
        kind = rng.choices(kinds, weights=kind_w)[0]
        if kind == "shared":
            event, label = rng.choices(shared, weights=shared_w)[0], "abnormal"
        elif kind == "private":
            event, label = rng.choice(mine), "abnormal"
        elif kind == "foreign" and foreign:
            event, label = rng.choice(foreign), "normal"  # another system's anomaly: harmless here
        else:
            event, label = None, "normal"
        rows.append(Example(prompt=_line(rng, event), response=" " + label, label=label))
    return rows


def general_text(n: int, seed: int) -> list[Example]:
    """The pretraining corpus: the same format, pretraining-only anomaly events, no scenario rule."""
    rng = random.Random(f"fdlora-general:{seed}")
    rows = []
    for _ in range(n):
        if rng.random() < 0.4:
            event, label = rng.choice(PRETRAIN_ANOMALIES), "abnormal"
        else:
            event, label = None, "normal"
        rows.append(Example(prompt=_line(rng, event), response=" " + label, label=label))
    return rows


def line_kind(ex: Example, client: int) -> str:
    """Which kind of line `ex` is for `client` (one of KINDS), from its event; for analysis."""
    event = ex.prompt.split()[2]
    if event in SHARED_ANOMALIES:
        return "shared"
    if event in private_events(client):
        return "private"
    if event in PRIVATE_ANOMALIES:
        return "foreign"
    return "plain"
