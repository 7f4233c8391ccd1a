"""FDLoRA's stage 2 measured (issue 18, item 2): which personal training during the rounds, over seeds.

    python bench/stage2.py                                  # every variant, seeds 0 1 2, into runs/stage2
    python bench/stage2.py --variants H0 residual --seeds 0 --out runs/stage2-quick
    python bench/stage2.py --report-only                    # tabulate what runs/stage2 holds

Each variant is configs/demo.yaml (fdlora) or a baseline config with a few `--set`s, run with
`fdlora-cluster launch` on one-rank clients (1 server + 2 clients x 1 rank, micro batch 16: the
demo's 16 rows per client step on half the processes), 5 rounds of K = 10 and a 50-step personal
stage (the demo's run halved, and the length of the SmolLM2 setting's 5 rounds, where the outer
step's momentum matters most), so that a job takes about 2 minutes on a shared 2-core machine:

    H0        stage 1 only: the personal adapter trains 50 steps before the rounds, then never
    H1/H2/H5  + personal <- global every H rounds (the paper's line 14, personal.sync_every)
    each      + personal.steps_per_round = K every round (the personal adapter alone)
    residual  + personal.steps_per_round = K every round with the global adapter active and frozen
    local     local training with the budget of `each` / `residual` (50 + rounds x K personal steps)
    fedavg    FedAvg of the global adapter (sgd, lr 1.0), for the outer step's comparison (item 5)
    warmup    H0 with outer.momentum_warmup = 5 (the nesterov momentum ramped over 5 rounds)
    diloco    the global adapter with fdlora's outer step (nesterov 0.7 / 0.9) and no personal one

The table gives, per variant, each evaluated adapter's test accuracy (eval.headline) as the mean
over clients per seed, the mean +- sd over seeds, and the optimizer steps each adapter took
(summary.json's optimizer_steps). Nothing is tuned on test rows: the table is all it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHEAP = ["topology.clients=[1, 1]", "train.micro_batch_size=16", "train.rounds=5", "train.personal_steps=50"]
VARIANTS = {
    "H0": ("demo.yaml", []),
    "H1": ("demo.yaml", ["personal.sync_every=1"]),
    "H2": ("demo.yaml", ["personal.sync_every=2"]),
    "H5": ("demo.yaml", ["personal.sync_every=5"]),
    "each": ("demo.yaml", ["personal.steps_per_round=10"]),
    "residual": ("demo.yaml", ["personal.steps_per_round=10", "personal.residual=true"]),
    "warmup": ("demo.yaml", ["outer.momentum_warmup=5"]),
    "local": ("local.yaml", []),
    "fedavg": ("fedavg.yaml", []),
    "diloco": ("diloco.yaml", []),
}


def run(variant: str, seed: int, out: str, extra: list[str]) -> None:
    if os.path.isfile(os.path.join(out, "summary.json")):
        print(f"stage2: {variant} seed {seed}: {out} is done, kept", flush=True)
        return
    config, sets = VARIANTS[variant]
    cmd = [sys.executable, "-m", "fdlora_cluster.cli", "launch", os.path.join(ROOT, "configs", config),
           "--output", out]
    for s in CHEAP + sets + [f"seed={seed}"] + extra:
        cmd += ["--set", s]
    print("+ " + " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, stdout=subprocess.DEVNULL)
    print(f"stage2: {variant} seed {seed}: status {rc} in {time.perf_counter() - t0:.0f}s", flush=True)
    if rc != 0:
        raise SystemExit(rc)


def table(out: str, variants: list[str], seeds: list[int], metric: str = "accuracy") -> str:
    rows = ["| variant | adapter | mean +- sd over seeds | " + " | ".join(f"seed {s}" for s in seeds)
            + " | optimizer steps (personal, global) per client |", "|" + "---|" * (4 + len(seeds))]
    for v in variants:
        summaries = {}
        for s in seeds:
            path = os.path.join(out, f"seed-{s}", v, "summary.json")
            if os.path.isfile(path):
                with open(path) as f:
                    summaries[s] = json.load(f)
        if not summaries:
            continue
        first = next(iter(summaries.values()))["clients"][0]
        steps = first.get("optimizer_steps", {})
        for adapter in first["metrics"]:
            per_seed = {s: statistics.mean(c["metrics"][adapter][metric] for c in summ["clients"])
                        for s, summ in summaries.items()}
            xs = list(per_seed.values())
            ms = f"{statistics.mean(xs):.3f} +- {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"
            cells = [f"{per_seed[s]:.3f}" if s in per_seed else "-" for s in seeds]
            rows.append(f"| {v} | {adapter} | {ms} | " + " | ".join(cells)
                        + f" | {steps.get('personal', '-')}, {steps.get('global', '-')} |")
    return "\n".join(rows)


def fusion_choices(out: str, variants: list[str], seeds: list[int], metric: str = "accuracy") -> str:
    """Per fdlora variant, over every client of every seed: what the fusion chose (summary.json's
    `fusion.chosen_by`), how often it left the anchors, and fused minus personal on test."""
    rows = ["| variant | client-runs | chosen by | left the anchors | fused - personal on test (mean; per client-run) |",
            "|---|---|---|---|---|"]
    for v in variants:
        picks, left, gains = {}, 0, []
        for s in seeds:
            path = os.path.join(out, f"seed-{s}", v, "summary.json")
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                for c in json.load(f)["clients"]:
                    if "fusion" not in c:
                        continue
                    picks[c["fusion"]["chosen_by"]] = picks.get(c["fusion"]["chosen_by"], 0) + 1
                    left += bool(c["fusion"]["left_anchors"])
                    gains.append(c["metrics"]["fused"][metric] - c["metrics"]["personal"][metric])
        if gains:
            rows.append(f"| {v} | {len(gains)} | " + ", ".join(f"{k}: {n}" for k, n in sorted(picks.items()))
                        + f" | {left} | {statistics.mean(gains):+.3f}; " + " ".join(f"{g:+.3f}" for g in gains) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default="runs/stage2")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override applied to every job (repeatable)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.report_only:
        for seed in args.seeds:  # seed-major: a partial run still has every variant of the first seeds
            for v in args.variants:
                run(v, seed, os.path.join(args.out, f"seed-{seed}", v), args.extra)
    cmd = "python bench/stage2.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"\nMade by `{cmd.strip()}`; test accuracy (mean over the 2 clients):\n")
    print(table(args.out, args.variants, args.seeds))
    print("\nFusion choices (fdlora variants):\n")
    print(fusion_choices(args.out, args.variants, args.seeds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
