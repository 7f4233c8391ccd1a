"""Our `fedavg` against Flower's FedAvg on the same work, side by side: per-round times and the ratio.

The work (issue 11's): one server and N one-rank clients on this machine, a Llama of SmolLM-135M's
shape built from config (134.5M parameters, random init: nothing is downloaded), one LoRA r=8 on
q_proj and v_proj, `--steps` AdamW steps of `--batch` rows per client per round, `--rounds` rounds,
one torch thread per process, the shipped scenario's rows (cut to `--seq` tokens). Ours runs with
`fdlora-cluster launch` (ZeRO-2 inside each client, MPI between server and leaders); Flower's with
bench/flower_fedavg.py (its gRPC runtime, built-in FedAvg). Both runs use the same config file and
overrides, so the model, LoRA, rows, batch, lr and seed are the same by construction. Our job is run
without checkpoints (Flower keeps none; `checkpoint.every=0`).

The two alternate `--repeats` times (ours, Flower, ours, Flower, ...), so a machine that gets
busier or quieter shifts both. Round 1 pays start-up (DeepSpeed's first step, gRPC connect) on both
sides and is left out of the means. Prints a markdown table and writes OUT/flower_compare.json.

    python bench/flower_compare.py                          # the issue's setting: 3 clients, 8 rounds
    python bench/flower_compare.py --model demo --rounds 3  # quick: the demo's tiny Llama

Flower comes from a separate virtualenv (.venv-flower, made on first use: torch==2.13.0, flwr 1.42,
transformers, peft), so it is never a dependency of the package and never changes our venv.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOWER_VENV = os.path.join(ROOT, ".venv-flower")
FLOWER_PACKAGES = ["flwr==1.42.0", "transformers", "peft", "pyyaml", "numpy", "safetensors"]

MODELS = {
    # SmolLM-135M's shape (hidden 576, 30 layers, 9 heads / 3 KV heads, vocab 49152, tied embeddings)
    "135m": "{model_type: llama, hidden_size: 576, intermediate_size: 1536, num_hidden_layers: 30, "
            "num_attention_heads: 9, num_key_value_heads: 3, vocab_size: 49152, tie_word_embeddings: true, "
            "max_position_embeddings: 2048}",
    "demo": None,  # configs/demo.yaml's tiny Llama
}


def flower_python() -> str:
    py = os.path.join(FLOWER_VENV, "bin", "python")
    if not os.path.exists(py):
        print(f"making {FLOWER_VENV} (torch==2.13.0 first, then {' '.join(FLOWER_PACKAGES)})", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", FLOWER_VENV], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", "torch==2.13.0"], check=True)
        subprocess.run([py, "-m", "pip", "install", "-q", *FLOWER_PACKAGES], check=True)
    return py


def overrides(args) -> list[str]:
    sets = ["strategy=fedavg", "model.pretrained=null", f"topology.clients=[{','.join(['1'] * args.clients)}]",
            f"train.rounds={args.rounds}", f"train.inner_steps={args.steps}", f"train.micro_batch_size={args.batch}",
            f"train.max_seq_len={args.seq}", "train.personal_steps=0", "outer={optimizer: sgd, lr: 1.0}",
            "lora.global={r: 8, alpha: 16, target_modules: [q_proj, v_proj]}",
            "deepspeed.zero_optimization={stage: 2}", "checkpoint.every=0"]
    if MODELS[args.model]:
        sets.append(f"model.config={MODELS[args.model]}")
    return sets


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": ROOT}


def run_ours(args, sets: list[str], out: str) -> dict:
    cmd = [sys.executable, "-m", "fdlora_cluster.cli", "launch", args.config, "--output", out]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"our job failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    rounds = sorted((r for r in recs if r["event"] == "round"), key=lambda r: r["round"])
    fits = [sorted(r["seconds"] for r in recs if r["event"] == "train" and r["round"] == t["round"]
                   and r.get("adapter") == "global") for t in rounds]
    return {"round_seconds": [r["seconds"] for r in rounds], "client_fit_seconds": fits, "job_seconds": wall,
            "bytes_per_round": rounds[-1].get("server_bytes_received", 0) / args.clients}


def run_flower(args, sets: list[str], out: str) -> dict:
    py = flower_python()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    times = os.path.join(out, "flower-times.json")
    os.makedirs(out, exist_ok=True)
    script = os.path.join(ROOT, "bench", "flower_fedavg.py")
    common = [args.config, "--port", str(port)] + [x for s in sets for x in ("--set", s)]
    logs = [open(os.path.join(out, f"{name}.log"), "w") for name in ["server"] + [f"client-{c}" for c in range(args.clients)]]
    t0 = time.perf_counter()
    server = subprocess.Popen([py, script, "server", *common, "--out", times], cwd=ROOT, env=env(),
                              stdout=logs[0], stderr=subprocess.STDOUT)
    time.sleep(3)  # the gRPC server listens before the clients dial (they retry anyway)
    clients = [subprocess.Popen([py, script, "client", *common, "--client", str(c)], cwd=ROOT, env=env(),
                                stdout=logs[c + 1], stderr=subprocess.STDOUT) for c in range(args.clients)]
    try:
        rc = server.wait(timeout=args.timeout)
        for c in clients:
            c.wait(timeout=60)
    finally:
        for p in [server, *clients]:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
    wall = time.perf_counter() - t0
    if rc != 0 or not os.path.exists(times):
        with open(os.path.join(out, "server.log")) as f:
            raise SystemExit(f"the Flower job failed ({rc}); {out}/server.log ends:\n{f.read()[-3000:]}")
    with open(times) as f:
        return {**json.load(f), "job_seconds": wall}


def steady(xs: list[float]) -> float:
    """Mean over rounds 2.. (round 1 pays start-up on both sides)."""
    return statistics.mean(xs[1:] if len(xs) > 1 else xs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--model", choices=sorted(MODELS), default="135m")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5, help="AdamW steps per client per round")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32, help="train.max_seq_len (rows are cut to it)")
    ap.add_argument("--repeats", type=int, default=1, help="ours/Flower pairs, alternating")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds for one Flower job")
    ap.add_argument("--out", help="directory for both runs (default: a temporary one)")
    args = ap.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="flower-compare-")
    sets = overrides(args)

    pairs = []
    for i in range(args.repeats):
        ours = run_ours(args, sets, os.path.join(out, f"ours-{i}"))
        flower = run_flower(args, sets, os.path.join(out, f"flower-{i}"))
        pairs.append({"ours": ours, "flower": flower, "ratio": steady(ours["round_seconds"]) / steady(flower["round_seconds"])})
        print(f"pair {i}: ours {steady(ours['round_seconds']):.2f} s/round, Flower {steady(flower['round_seconds']):.2f} "
              f"s/round, ratio {pairs[-1]['ratio']:.3f}", file=sys.stderr, flush=True)

    with open(os.path.join(out, "flower_compare.json"), "w") as f:
        json.dump({"args": vars(args), "overrides": sets, "pairs": pairs}, f, indent=1)
    print(f"| run | ours s/round (rounds 2-{args.rounds}) | Flower s/round | ours / Flower | ours client fit s | Flower client fit s |")
    print("|---|---|---|---|---|---|")
    for i, p in enumerate(pairs):
        o, fl = p["ours"], p["flower"]
        fit = lambda r: f"{steady([min(x) for x in r['client_fit_seconds']]):.2f}-{steady([max(x) for x in r['client_fit_seconds']]):.2f}"  # noqa: E731
        print(f"| {i} | {steady(o['round_seconds']):.2f} | {steady(fl['round_seconds']):.2f} | {p['ratio']:.3f} | "
              f"{fit(o)} | {fit(fl)} |")
    print(f"\nout: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
