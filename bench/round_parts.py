"""How much of a federated round is training and how much is the federation around it, from a
finished run's own records (metrics.jsonl); nothing is rerun.

    python bench/round_parts.py runs/compare-seeds/seed-0/fedavg runs/compare-seeds/seed-0/fdlora

Per round, the server's `round` record times the whole round: from sending the global adapter to
the aggregate being ready. The slowest client's `train` record of that round times its local
steps. The rest, round - slowest train, is the federation part: the server's send and receive,
each leader's receive, the broadcast inside the client, writing the global into the model,
reading the trained adapter back, packing, sending, checking and aggregating. Round 1 pays
start-up (first forward, allocations) and is left out. Prints a markdown table, one row per run.

    python bench/round_parts.py --group /tmp/rp-e100-1 /tmp/rp-e1-1 /tmp/rp-e100-2 /tmp/rp-e1-2

`--group`: runs repeated to see through a loaded machine's noise are grouped by their directory
name less a trailing `-<n>` (rp-e100-1, rp-e100-2 -> rp-e100); a second table gives each group's
mean seconds per round, its spread (min-max over its runs) and how much longer its rounds are
than the first group's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
    ap.add_argument("--group", action="store_true", help="also a table per group of repeated runs (NAME-<n>)")
    args = ap.parse_args()
    print("| run | rounds | s per round | slowest client's training s | federation s | federation share |")
    print("|---|---|---|---|---|---|")
    parts = [round_parts(d) for d in args.runs]
    for p in parts:
        print(f"| {p['run']} | {p['rounds']} | {p['round_s']:.3f} | {p['train_s']:.3f} | "
              f"{p['federation_s']:.3f} | {p['fraction']:.1%} |")
    if args.group:
        print()
        print(group_table(parts))


def group_table(parts: list[dict]) -> str:
    """Mean s per round of each group of runs (NAME-<n>), its min-max, and its rounds' length
    against the first group's."""
    groups: dict[str, list[float]] = {}
    for p in parts:
        name = re.sub(r"-\d+$", "", os.path.basename(os.path.normpath(p["run"])))
        groups.setdefault(name, []).append(p["round_s"])
    base = statistics.mean(next(iter(groups.values())))
    lines = ["| group | runs | mean s per round | min-max | vs the first group |", "|---|---|---|---|---|"]
    for name, xs in groups.items():
        m = statistics.mean(xs)
        lines.append(f"| {name} | {len(xs)} | {m:.3f} | {min(xs):.3f}-{max(xs):.3f} | {m / base - 1:+.1%} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
