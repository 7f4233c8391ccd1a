"""How much of a federated round is training and how much is the federation around it, from a
finished run's own records (metrics.jsonl); nothing is rerun.

    python bench/round_parts.py runs/compare-seeds/seed-0/fedavg runs/compare-seeds/seed-0/fdlora

Per round, the server's `round` record times the whole round: from sending the global adapter to
the aggregate being ready. The slowest client's `train` record of that round times its local
steps. The rest, round - slowest train, is the federation part: the server's send and receive,
each leader's receive, the broadcast inside the client, writing the global into the model,
reading the trained adapter back, packing, sending, checking and aggregating. Round 1 pays
start-up (first forward, allocations) and is left out. Prints a markdown table, one row per run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics


def round_parts(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    rounds = {r["round"]: r["seconds"] for r in recs if r["event"] == "round"}
    train: dict[int, float] = {}
    for r in recs:
        if r["event"] == "train" and r.get("adapter") == "global" and r["round"] in rounds:
            train[r["round"]] = max(train.get(r["round"], 0.0), r["seconds"])
    keep = sorted(k for k in rounds if k > 1 and k in train)
    if not keep:
        raise SystemExit(f"{run_dir}: no rounds after the first with both a round and a train record")
    whole = statistics.mean(rounds[k] for k in keep)
    steps = statistics.mean(train[k] for k in keep)
    return {"run": run_dir, "rounds": len(keep), "round_s": whole, "train_s": steps,
            "federation_s": whole - steps, "fraction": (whole - steps) / whole}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    args = ap.parse_args()
    print("| run | rounds | s per round | slowest client's training s | federation s | federation share |")
    print("|---|---|---|---|---|---|")
    for d in args.runs:
        p = round_parts(d)
        print(f"| {p['run']} | {p['rounds']} | {p['round_s']:.3f} | {p['train_s']:.3f} | "
              f"{p['federation_s']:.3f} | {p['fraction']:.1%} |")


if __name__ == "__main__":
    main()
