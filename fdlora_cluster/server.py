"""The server role (world rank 0): holds the global adapter and the outer optimizer, nothing else.

It never builds the model: it learns the global adapter's layout from client 0's leader, and it
never holds a personal adapter, except the one-off `global.init: personal_mean` average that the
paper's Algorithm 1 (line 7) asks for, which is logged as such.
"""

from __future__ import annotations

import time

import torch

from .log import get_logger
from .strategies import UpdateError, check_update, l2_distance, weighted_average
from .transport import TAG_GLOBAL, TAG_LAYOUT, TAG_PERSONAL_INIT, TAG_UPDATE, Layout, Transport

NUM_SAMPLES = "__num_samples__"  # scalar riding along in every update message


def update_layout(global_layout: Layout) -> Layout:
    return Layout(global_layout.entries + ((NUM_SAMPLES, (1,), "float64"),))


class Server:
    def __init__(self, cfg, topo, strategy, transport: Transport, run):
        self.cfg, self.topo, self.strategy, self.transport, self.run = cfg, topo, strategy, transport, run
        self.log = get_logger()
        self.leaders = list(range(1, topo.plan.num_clients + 1))  # federation ranks of the leaders
        self.layout: Layout | None = None
        self.global_state: dict[str, torch.Tensor] | None = None

    def init_global(self) -> None:
        """Learn the layout from client 0's leader, then the starting global adapter."""
        self.layout = self.transport.recv_layout(source=1, tag=TAG_LAYOUT)
        if self.cfg.global_.init == "seed":
            # Every client seeds `global` identically; client 0's leader sends that start once.
            self.global_state = self.transport.recv(self.layout, source=1, tag=TAG_GLOBAL)
            self.log.info("global adapter starts from the shared seeded initialisation")
        else:
            personal = self.transport.recv_from_all(self.layout, self.leaders, TAG_PERSONAL_INIT)
            for i, s in personal.items():
                check_update(next(iter(personal.values())), s, client=i - 1)
            n = len(personal)
            self.global_state = weighted_average(list(personal.values()), [1.0 / n] * n)
            self.log.info(f"global adapter starts as the mean of {n} personal adapters "
                          "(global.init = personal_mean: each personal adapter was sent to the server once)")
            del personal

    def run_round(self, t: int) -> dict:
        """send global -> (clients train) -> collect -> aggregate. Returns the round's metrics."""
        t0 = time.perf_counter()
        self.transport.new_round()
        self.transport.send_to_all(self.global_state, self.layout, self.leaders, TAG_GLOBAL)
        replies = self.transport.recv_from_all(update_layout(self.layout), self.leaders, TAG_UPDATE)
        counts = [float(replies[r].pop(NUM_SAMPLES)[0]) for r in self.leaders]
        updates = [replies[r] for r in self.leaders]
        before = self.global_state
        try:
            self.global_state = self.strategy.aggregate(before, updates, counts)
        except UpdateError as e:
            raise UpdateError(f"round {t}: {e}") from None
        seconds = time.perf_counter() - t0
        rec = {"round": t, "client": None, "event": "round", "seconds": seconds,
               **{f"server_{k}": v for k, v in self.transport.round.snapshot().items()},
               "update_norms": [l2_distance(u, before) for u in updates],
               "global_change": l2_distance(self.global_state, before)}
        return rec

    def send_final(self) -> None:
        self.transport.send_to_all(self.global_state, self.layout, self.leaders, TAG_GLOBAL)
