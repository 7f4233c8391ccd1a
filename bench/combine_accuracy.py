"""global.combine on the shipped scenario: FedAvg's global adapter (configs/fedavg.yaml) on 4
one-rank clients, per variant and seed; prints the mean test accuracy of the global adapter.

    python bench/combine_accuracy.py [--seeds 0 1] [--variants het-product het-padding all-4 ...] [--out runs/combine]

Variants (clients 0, 1 at rank 4; `het-*`: clients 2, 3 at rank 8):
    het-product    global.combine: product      (each client gets back its own rank's best part)
    het-padding    global.combine: factors      (zero-padding to rank 8: HetLoRA's baseline)
    all-4          every client at rank 4, factors (FedAvg as before)
    eq-product     every client at rank 4, product
    eq-frozen_a    every client at rank 4, frozen_a (A at its seed, B alone trained and sent)
Each job is `fdlora-cluster launch configs/fedavg.yaml --set ...` into OUT/<variant>-seed<S>.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HET = ["client_overrides.2.lora.global.r=8", "client_overrides.3.lora.global.r=8"]
VARIANTS = {
    "het-product": HET + ["global.combine=product"],
    "het-padding": HET + ["global.combine=factors"],
    "all-4": ["global.combine=factors"],
    "eq-product": ["global.combine=product"],
    "eq-frozen_a": ["global.combine=frozen_a"],
}


def run(variant: str, seed: int, out: str) -> list[float]:
    where = os.path.join(out, f"{variant}-seed{seed}")
    summary = os.path.join(where, "summary.json")
    if not os.path.isfile(summary):
        sets = ["topology.clients=[1,1,1,1]", f"seed={seed}", *VARIANTS[variant]]
        cmd = [sys.executable, "-m", "fdlora_cluster.cli", "launch", "configs/fedavg.yaml", "--output", where]
        for s in sets:
            cmd += ["--set", s]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    with open(summary) as f:
        clients = json.load(f)["clients"]
    return [c["metrics"]["global"]["accuracy"] for c in sorted(clients, key=lambda c: c["client"])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", default="runs/combine")
    a = ap.parse_args()
    print("| variant | " + " | ".join(f"client {c}" for c in range(4)) + " | mean | " +
          " | ".join(f"seed {s}" for s in a.seeds) + " |")
    print("|---" * (6 + len(a.seeds)) + "|")
    for v in a.variants:
        per_seed = [run(v, s, a.out) for s in a.seeds]
        means = [sum(x) / len(x) for x in per_seed]
        cell = lambda xs: f"{statistics.mean(xs):.3f}" + (f" +- {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")
        cols = [cell([p[c] for p in per_seed]) for c in range(4)]
        print(f"| {v} | " + " | ".join(cols) + f" | {cell(means)} | " + " | ".join(f"{m:.3f}" for m in means) + " |",
              flush=True)


if __name__ == "__main__":
    main()
