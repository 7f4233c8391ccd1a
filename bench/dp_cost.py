"""The accuracy cost of client-level differential privacy (`privacy:`) on the shipped scenario.

    python bench/dp_cost.py                                      # demo, epsilon 8 / 4 / 1, seeds 0 1
    python bench/dp_cost.py --seeds 0 1 2 --out runs/dp-cost
    python bench/dp_cost.py --set train.rounds=2 --set data.rows_per_client=60 --seeds 0   # a quick look

Per seed: one non-private run and one run per target epsilon, each `fdlora-cluster launch CONFIG`
(configs/demo.yaml: fdlora, 1 server + 2 clients x 2 ranks, 10 rounds) with
`global.aggregation: uniform` in all of them (privacy needs it; the demo's two clients have equal
row counts, so the weights are the same as by samples). For each epsilon the noise multiplier is
the smallest that keeps the configured rounds within (epsilon, delta), found by dp-accounting
(`dp.noise_for_epsilon`), and the run's `privacy.target_epsilon` is that epsilon, so the job
itself refuses to pass it. A run whose summary.json exists is not run again (rerun into a new
--out to start over). Prints a Markdown table: per epsilon, the mean over clients of each
adapter's test accuracy (mean +- sample std over seeds, and per seed), and the fused adapter's
change against the non-private run of the same seed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fdlora_cluster.config import load_config  # noqa: E402
from fdlora_cluster.dp import noise_for_epsilon  # noqa: E402

ADAPTERS = ("fused", "personal", "global")


def run(config: str, out: str, sets: list[str]) -> dict:
    """One job (skipped when its summary exists); returns its summary."""
    summary = os.path.join(out, "summary.json")
    if not os.path.exists(summary):
        cmd = [sys.executable, "-m", "fdlora_cluster.cli", "launch", config, "--output", out]
        for s in sets:
            cmd += ["--set", s]
        print("+ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    with open(summary) as f:
        return json.load(f)


def mean_accuracy(summary: dict, adapter: str) -> float:
    """The mean over clients of one adapter's test accuracy (eval.headline's label set)."""
    return statistics.fmean(c["metrics"][adapter]["accuracy"] for c in summary["clients"])


def spread(xs: list[float]) -> str:
    return f"{statistics.fmean(xs):.3f} +- {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 4.0, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--clip-norm", type=float, default=0.5,
                    help="privacy.clip_norm (the demo's non-private updates have norms of 0.7 to 1.0)")
    ap.add_argument("--accountant", default="rdp", choices=("rdp", "pld"))
    ap.add_argument("--set", dest="sets", action="append", default=[], help="key.path=value for every run")
    ap.add_argument("--out", default="runs/dp-cost")
    args = ap.parse_args(argv)

    cfg = load_config(os.path.join(ROOT, args.config), args.sets)
    rounds = cfg.train.rounds
    sigmas = {e: noise_for_epsilon(e, rounds, args.delta, args.accountant) for e in args.epsilons}
    base = [*args.sets, "global.aggregation=uniform"]
    results: dict = {None: {}, **{e: {} for e in args.epsilons}}  # epsilon -> seed -> summary
    for seed in args.seeds:
        where = os.path.join(args.out, f"seed-{seed}")
        results[None][seed] = run(args.config, os.path.join(where, "none"), [*base, f"seed={seed}"])
        for e, sigma in sigmas.items():
            privacy = {"clip_norm": args.clip_norm, "noise_multiplier": sigma, "delta": args.delta,
                       "target_epsilon": e, "accountant": args.accountant}
            results[e][seed] = run(args.config, os.path.join(where, f"eps-{e:g}"),
                                   [*base, f"seed={seed}", f"privacy={json.dumps(privacy)}"])

    seeds = args.seeds
    head = ["target epsilon", "noise multiplier", "epsilon reported", *(f"{a} (mean over clients)" for a in ADAPTERS),
            "fused - non-private", *(f"fused, seed {s}" for s in seeds)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e, by_seed in results.items():
        fused = [mean_accuracy(by_seed[s], "fused") for s in seeds]
        gap = [f - mean_accuracy(results[None][s], "fused") for f, s in zip(fused, seeds)]
        reported = "-" if e is None else f"{by_seed[seeds[0]]['privacy']['epsilon']:.3f}"
        lines.append("| " + " | ".join([
            "none (non-private)" if e is None else f"{e:g}", "-" if e is None else f"{sigmas[e]:.3f}", reported,
            *(spread([mean_accuracy(by_seed[s], a) for s in seeds]) for a in ADAPTERS),
            "-" if e is None else spread(gap), *(f"{f:.3f}" for f in fused)]) + " |")
    print(f"\n{args.config}, {rounds} rounds, delta {args.delta:g}, clip_norm {args.clip_norm:g}, "
          f"{args.accountant} accountant, seeds {' '.join(map(str, seeds))}\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
