"""A federated client's inner step against the plain DeepSpeed + PEFT loop, side by side, as a ratio.

Runs, one after the other on the same machine:
  1. the federated job: `fedavg`, 1 server + 1 client of 1 rank, `--rounds` rounds of `--steps`
     inner steps; its step time is the client's `train` record of the LAST round (seconds / steps,
     from metrics.jsonl: the first round pays start-up costs);
  2. bench/plain_loop.py with the same config and overrides (same model, dtype, LoRA, DeepSpeed
     config and batch), `--steps` timed steps after a warm-up.
and prints one JSON line: both times and `ratio` = federated / plain (1.0 = no overhead).

    python bench/step_ratio.py configs/demo.yaml --set model.pretrained=null
    python bench/step_ratio.py configs/demo.yaml --mpiexec /usr/bin/mpirun --set deepspeed.bf16.enabled=true

Extra `--set` overrides go to both (model size, ZeRO stage, precision). Machines are noisy: compare
ratios taken in one run, and absolute times only on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def federated_step(config: str, overrides: list[str], steps: int, rounds: int, mpiexec: str | None, out: str) -> dict:
    sets = overrides + ["strategy=fedavg", "topology.clients=[1]", f"train.inner_steps={steps}",
                        f"train.rounds={rounds}", "train.personal_steps=0", "outer={optimizer: sgd, lr: 1.0}"]
    cmd = [sys.executable, "-m", "fdlora_cluster.cli", "launch", config, "--output", out]
    if mpiexec:
        cmd += ["--mpiexec", mpiexec]
    for s in sets:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"federated job failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    train = [r for r in recs if r["event"] == "train" and r.get("adapter") == "global" and r["round"] == rounds]
    if not train:
        raise SystemExit(f"no train record for round {rounds} in {out}/metrics.jsonl")
    r = train[0]
    return {"seconds_per_step": r["seconds"] / r["steps"], "steps": r["steps"], "run_dir": out}


def plain_step(config: str, overrides: list[str], steps: int) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "bench", "plain_loop.py"), config, "--steps", str(steps)]
    for s in overrides + ["topology.clients=[1]"]:
        cmd += ["--set", s]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"plain loop failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--mpiexec", help="the federated job's mpiexec (default: as `fdlora-cluster launch` finds it)")
    ap.add_argument("--out", help="run directory of the federated job (default: a temporary one)")
    ap.add_argument("--label", default="", help="a name for this line of output")
    args = ap.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="step-ratio-")
    fed = federated_step(args.config, args.overrides, args.steps, args.rounds, args.mpiexec, out)
    plain = plain_step(args.config, args.overrides, args.steps)
    print(json.dumps({"label": args.label, "federated_s_per_step": round(fed["seconds_per_step"], 5),
                      "plain_s_per_step": round(plain["seconds_per_step"], 5),
                      "ratio": round(fed["seconds_per_step"] / plain["seconds_per_step"], 3),
                      "dtype": plain["dtype"], "zero_stage": plain["zero_stage"], "device": plain["device"],
                      "overrides": args.overrides}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
