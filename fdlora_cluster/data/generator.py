"""A small seeded log-anomaly task that needs no download (the demo's data).

Each row is a log line of four words; the response is " normal" or " abnormal". Some anomaly
words are shared by every client (knowledge a global adapter can pool); each client also has a
private anomaly word that is harmless for the others (knowledge only its personal adapter can
hold), so personalisation matters.
"""

from __future__ import annotations

import random

from .examples import Example

WORDS = ["disk", "user", "login", "cache", "retry", "socket", "kernel", "thread", "queue", "write",
         "read", "sync", "mount", "token", "route", "buffer", "signal", "daemon", "lease", "shard"]
SHARED_ANOMALIES = ["panic", "corrupt", "overflow"]
PRIVATE_ANOMALIES = ["timeout", "denied", "refused", "stale", "orphan", "leak", "drift", "evict"]
LABELS = [" normal", " abnormal"]


def private_word(client: int) -> str:
    return PRIVATE_ANOMALIES[client % len(PRIVATE_ANOMALIES)]


def generate_client_rows(client: int, num_clients: int, n: int, seed: int) -> list[Example]:
    """`n` rows for `client`, deterministic in (seed, client)."""
    rng = random.Random(f"fdlora-generator:{seed}:{client}")
    mine = private_word(client)
    others = [private_word(c) for c in range(num_clients) if private_word(c) != mine]
    rows = []
    for _ in range(n):
        words = rng.sample(WORDS, 4)
        kind = rng.random()
        if kind < 0.25:
            words[rng.randrange(4)] = rng.choice(SHARED_ANOMALIES)
            label = " abnormal"
        elif kind < 0.5:
            words[rng.randrange(4)] = mine
            label = " abnormal"
        elif kind < 0.65 and others:
            words[rng.randrange(4)] = rng.choice(others)  # another client's anomaly: harmless here
            label = " normal"
        else:
            label = " normal"
        rows.append(Example(prompt="log: " + " ".join(words) + " =>", response=label, label=label.strip()))
    return rows
