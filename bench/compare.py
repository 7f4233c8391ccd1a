"""Compare strategies on the shipped scenario: one job per `configs/<strategy>.yaml`, one table.

    python bench/compare.py                                   # fdlora, local, fedavg, diloco
    python bench/compare.py --strategies fdlora fedprox --set seed=1 --out runs/compare-seed1

Every job runs with `fdlora-cluster launch` (1 server + 2 clients x 2 ranks on this machine, as
configs/demo.yaml says), each into OUT/<strategy>; the tiny base is pretrained once first. At the
end it prints the per-client table of each method's headline adapter (fused for fdlora, personal
for local, global for fedavg / diloco) and writes OUT/report/REPORT.md with the plots.
A job that fails stops the comparison with its exit status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fdlora_cluster.config import load_config  # noqa: E402
from fdlora_cluster.pretrain import ensure_pretrained  # noqa: E402
from fdlora_cluster.report import ReportError, comparison_table, load_run, per_client_table, write_report  # noqa: E402

DEFAULT = ["fdlora", "local", "fedavg", "diloco"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", nargs="+", default=DEFAULT, help=f"configs/<name>.yaml to run (default {DEFAULT})")
    ap.add_argument("--out", default="runs/compare", help="parent of the run directories (default runs/compare)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override applied to every job (repeatable)")
    ap.add_argument("--report-only", action="store_true", help="skip the jobs; tabulate OUT/<strategy> as they are")
    args = ap.parse_args(argv)

    configs = [os.path.join(ROOT, "configs", f"{s}.yaml") for s in args.strategies]
    missing = [c for c in configs if not os.path.isfile(c)]
    if missing:
        print(f"compare: no such config: {', '.join(missing)}", file=sys.stderr)
        return 2
    run_dirs = [os.path.join(args.out, s) for s in args.strategies]
    if not args.report_only:
        # one pretraining for all jobs (they share model.pretrained), with every core
        ensure_pretrained(load_config(configs[0], args.overrides))
        for cfg, out in zip(configs, run_dirs):
            cmd = [sys.executable, "-m", "fdlora_cluster.cli", "launch", cfg, "--output", out]
            for o in args.overrides:
                cmd += ["--set", o]
            print("+ " + " ".join(cmd), flush=True)
            t0 = time.perf_counter()
            rc = subprocess.call(cmd)
            print(f"compare: {os.path.basename(cfg)} finished with status {rc} in {time.perf_counter() - t0:.0f}s",
                  flush=True)
            if rc != 0:
                return rc
    try:
        runs = [load_run(d) for d in run_dirs]
    except ReportError as e:
        print(f"compare: {e}", file=sys.stderr)
        return 2
    cmdline = "python bench/compare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = write_report(run_dirs, out_dir=os.path.join(args.out, "report"),
                          title="Strategy comparison on the shipped scenario",
                          preamble=f"Made by `{cmdline.strip()}`.")
    print("\nPer-client test accuracy, headline adapter of each method:\n")
    print(comparison_table(runs))
    print("\nEvery adapter each method evaluates:\n")
    print(per_client_table(runs))
    print(f"\nreport: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
