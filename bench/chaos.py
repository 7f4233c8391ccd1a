"""The table of docs/RELIABILITY.md's "Faults injected and survived": the faults of a finished
chaos job (tests/test_chaos.py: the seeded schedule of fdlora_cluster/faults.py `chaos`, a SIGKILL
and `--resume auto` in the middle) and what each round's record shows for them.

    python -m pytest -q -m job tests/test_chaos.py --basetemp=/tmp/chaos
    python bench/chaos.py /tmp/chaos/test_a_seeded_chaos_job_with_a0/run [--seed 0]

Reads RUN_DIR/config.yaml (rounds, clients, round_timeout_s, min_clients) and metrics.jsonl,
draws the schedule again from the seed, and prints a markdown table: per fault kind, how many, where
(client@round), what the records show and how many of them match the schedule. Exits 1 when a
round's record differs from what the schedule predicts (the differences on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fdlora_cluster.config import load_config  # noqa: E402
from fdlora_cluster.faults import chaos  # noqa: E402

SHOWS = {
    "slow": "in time (`clients`): counted; the round lasted at least the delay",
    "late": "`missing` in its round, which ended at the deadline; `late` in the next round's record (recognised, dropped); its client counted again there",
    "nan_update": "`rejected` (non-finite) in its round, the others averaged; the client counted again in its next round (its int8 rounding error dropped with the update)",
    "drop": "`missing` in its round, which ended at the deadline; never `late`",
    "skip": "`skipped` (fewer than min_clients usable updates): global adapter unchanged (`global_change` 0), in every client's `rounds_missed`",
    "kill": "the job died; `--resume auto` went on from the checkpoint of the round before, with the records of the rounds before it",
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    cfg = load_config(os.path.join(a.run_dir, "config.yaml"))
    fed = cfg.federation
    clients = len(cfg.topology.clients)
    plan = chaos(a.seed, cfg.train.rounds, clients, int(fed.round_timeout_s), fed.min_clients)
    with open(os.path.join(a.run_dir, "metrics.jsonl")) as f:
        rounds = {m["round"]: m for m in map(json.loads, f) if m["event"] == "round"}
    expected = plan.expected()
    wrong = []
    for t, want in expected.items():
        rec = rounds.get(t)
        got = rec and {"clients": rec["clients"], "missing": rec["missing"],
                       "rejected": sorted(map(int, rec["rejected"])),
                       "late": sorted((x["client"], x["round"]) for x in rec["late"]), "skipped": "skipped" in rec}
        if got != want:
            wrong.append(f"round {t}: {got} != {want}")
    print(f"seed {a.seed}: {cfg.train.rounds} rounds, {clients} one-rank clients, round_timeout_s = "
          f"{fed.round_timeout_s:g}, min_clients = {fed.min_clients}, on_short_round = {fed.on_short_round}, "
          f"compress = {fed.compress}; {len(rounds)} round records, {cfg.train.rounds - len(wrong)} as the schedule predicts\n")
    print("| fault | count | client@round | what the records show | rounds as predicted |")
    print("|---|---|---|---|---|")
    skip_nans = {(f.client, f.round) for f in plan.faults if f.round in plan.skips}
    for kind in ("slow", "late", "nan_update", "drop"):
        faults = [f for f in plan.faults if f.kind == kind and (f.client, f.round) not in skip_nans]
        where = ", ".join(f"{f.client}@{f.round}" + (f" ({f.seconds} s)" if f.seconds else "") for f in faults)
        shown = sorted({f.round for f in faults} | ({f.round + 1 for f in faults} if kind == "late" else set()))
        ok = sum(1 for t in shown if not any(w.startswith(f"round {t}:") for w in wrong))
        print(f"| {kind} | {len(faults)} | {where} | {SHOWS[kind]} | {ok}/{len(shown)} |")
    where = "; ".join(f"round {t}: nan_update from clients {sorted(c for c, r in skip_nans if r == t)}" for t in plan.skips)
    ok = sum(1 for t in plan.skips if not any(w.startswith(f"round {t}:") for w in wrong))
    print(f"| short round | {len(plan.skips)} | {where} | {SHOWS['skip']} | {ok}/{len(plan.skips)} |")
    print(f"| kill (SIGKILL) | 1 | client {plan.kill_client}'s leader at the start of round {plan.kill_round} | "
          f"{SHOWS['kill']} | {sum(1 for t in expected if t in rounds)}/{cfg.train.rounds} rounds recorded |")
    waited = [rounds[t]["seconds"] for t, w in expected.items() if w["missing"] and t in rounds]
    if waited:
        print(f"\nrounds that waited out the deadline: {len(waited)}, {min(waited):.2f}-{max(waited):.2f} s "
              f"(round_timeout_s = {fed.round_timeout_s:g})")
    for w in wrong:
        print(w, file=sys.stderr)
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
