"""global.combine on the shipped scenario: FedAvg's global adapter (configs/fedavg.yaml) on one-rank
clients of the given global ranks, per variant and seed; prints the mean test accuracy of the
global adapter.

    python bench/combine_accuracy.py [--seeds 0 1] [--ranks 4 4 8 8] [--variants het-product ...] [--out runs/combine]
    python bench/combine_accuracy.py --ranks 4 8 16 --set model.path=runs/smollm2-135m ...   # another model (RESULTS)
    python bench/combine_accuracy.py --setting runs/loghub/setting.yaml --ranks 4 4 8 16 ...  # LogHub (bench/loghub.py)

One client per entry of `--ranks` (default 4 4 8 8: clients 0, 1 at rank 4, clients 2, 3 at 8),
alpha / r = 2 for every client (lora.global.r = the smallest rank, `client_overrides.<i>.lora.global.r`
for the others). Variants:
    het-product    the ranks given, global.combine: product (each client gets back its own rank's best part)
    het-padding    the ranks given, global.combine: factors (zero-padding to the largest: HetLoRA's baseline)
    all-min        every client at the smallest rank, factors (FedAvg as before)
    eq-product     every client at the smallest rank, product
    eq-frozen_a    every client at the smallest rank, frozen_a (A at its seed, B alone trained and sent)
Each job is `fdlora-cluster launch configs/fedavg.yaml --set ...` (then the `--set`s given here)
into OUT/<variant>-seed<S>; a job already finished there is read, not rerun. With `--setting FILE`
the setting's own sections are merged over configs/fedavg.yaml first (as bench/compare.py does; the
merged config goes to OUT/configs/fedavg.yaml), e.g. the LogHub task's setting.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = ("het-product", "het-padding", "all-min", "eq-product", "eq-frozen_a")


def variant_sets(variant: str, ranks: list[int]) -> list[str]:
    """The --set arguments of one variant for clients of `ranks`."""
    low = min(ranks)
    sets = [f"topology.clients=[{', '.join('1' for _ in ranks)}]", f"lora.global.r={low}", f"lora.global.alpha={2 * low}"]
    if variant.startswith("het-"):
        sets += [f"client_overrides.{c}.lora.global.r={r}" for c, r in enumerate(ranks) if r != low]
    combine = {"het-product": "product", "het-padding": "factors", "all-min": "factors",
               "eq-product": "product", "eq-frozen_a": "frozen_a"}[variant]
    return sets + [f"global.combine={combine}"]


def run(variant: str, seed: int, out: str, ranks: list[int], extra: list[str], config: str) -> list[float]:
    where = os.path.join(out, f"{variant}-seed{seed}")
    summary = os.path.join(where, "summary.json")
    if not os.path.isfile(summary):
        cmd = [sys.executable, "-m", "fdlora_cluster.cli", "launch", config, "--output", where]
        for s in [f"seed={seed}", *variant_sets(variant, ranks), *extra]:
            cmd += ["--set", s]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    with open(summary) as f:
        clients = json.load(f)["clients"]
    return [c["metrics"]["global"]["accuracy"] for c in sorted(clients, key=lambda c: c["client"])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 4, 8, 8], help="one client per rank (default 4 4 8 8)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="passed to every job after the variant's own (e.g. another model)")
    ap.add_argument("--setting", metavar="FILE", help="YAML merged over configs/fedavg.yaml (bench/compare.py's "
                    "--setting), e.g. bench/loghub.py's OUT/setting.yaml")
    ap.add_argument("--out", default="runs/combine")
    a = ap.parse_args()
    config = os.path.join(ROOT, "configs", "fedavg.yaml")
    if a.setting:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import compare

        config = compare.with_setting([config], os.path.abspath(a.setting), os.path.join(os.path.abspath(a.out), "configs"))[0]
    n = len(a.ranks)
    print("| variant | " + " | ".join(f"client {c}" for c in range(n)) + " | mean | " +
          " | ".join(f"seed {s}" for s in a.seeds) + " |")
    print("|---" * (2 + n + len(a.seeds)) + "|")
    for v in a.variants:
        per_seed = [run(v, s, os.path.abspath(a.out), a.ranks, a.sets, config) for s in a.seeds]
        means = [sum(x) / len(x) for x in per_seed]
        cell = lambda xs: f"{statistics.mean(xs):.3f}" + (f" +- {statistics.stdev(xs):.3f}" if len(xs) > 1 else "")
        cols = [cell([p[c] for p in per_seed]) for c in range(n)]
        print(f"| {v} | " + " | ".join(cols) + f" | {cell(means)} | " + " | ".join(f"{m:.3f}" for m in means) + " |",
              flush=True)


if __name__ == "__main__":
    main()
