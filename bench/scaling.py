"""Server scaling and waiting ranks (issue 11, items 3 and 4). Prints Markdown tables.

    python bench/scaling.py aggregate [--clients 8 32 128 512 1024] [--stacked-max 128]
    python bench/scaling.py waiting [--rounds 3] [--ref main] [--fault slow@client=1,round=2,seconds=12]
    python bench/scaling.py waits            # what a rank burns while it waits, per kind of wait
    python bench/scaling.py rounds [--topologies 1 1,1 1,1,1,1 ...]   # round time against clients

aggregate: the server's work per round for N simulated client updates of a 7B Llama's LoRA
(r=8 on q_proj and v_proj: 32 layers x 2 modules x (8x4096 A + 4096x8 B) fp32 = 16.8 MB each), as
Server.finish_round does it (check_update, the update's norm, InOrderSum.add; then the mean and
the outer step), against a plain torch reduction of the same numbers: a float64 running sum over
one flat tensor per update (every N), and torch's weighted sum of the N updates stacked in one
(N, D) tensor (N <= --stacked-max; 1024 stacked updates would need 17 GB). Updates are made on the
fly (a clone of one of 4 random updates, scaled per client; not timed), so no method holds more
than it needs. Each method and N runs in its own process, so its peak RSS is its own.

waiting: the demo job (configs/demo.yaml, fedavg, 1 server + 2 clients x 2 ranks) run twice, with
the package of `--ref` (unpacked from git into a temporary directory) and with this tree, each
rank's CPU seconds against its wall seconds (bench/rank_cpu.py). `--fault slow@client=1,round=2,seconds=12`
makes client 1's leader a straggler the other ranks wait for (faults.py), so the rounds' columns
are mostly waiting.

waits: two ranks; rank 1 waits ~3 s for rank 0 in MPI's blocking bcast, in MPI_Ibarrier tested
with waits.wait_for's backoff, and in a torch.distributed (gloo) broadcast; its CPU seconds
in each wait.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYERS, R, HIDDEN = 32, 8, 4096


def lora_keys() -> list[tuple[str, tuple[int, int]]]:
    keys = []
    for layer in range(LAYERS):
        for module in ("q_proj", "v_proj"):
            base = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            keys += [(f"{base}.lora_A.weight", (R, HIDDEN)), (f"{base}.lora_B.weight", (HIDDEN, R))]
    return keys


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ------------------------------------------------------------------ aggregate


def aggregate_one(method: str, n: int) -> dict:
    """One method on n updates, in this process. Returns seconds (timed part only) and RSS."""
    import torch

    from fdlora_cluster.server import rejection
    from fdlora_cluster.strategies import InOrderSum, OuterOptimizer
    from fdlora_cluster.state import pseudo_gradient
    from fdlora_cluster.transport import ClientUpdate

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    keys = lora_keys()
    pool = [{k: torch.randn(shape, generator=g) * 0.01 for k, shape in keys} for _ in range(4)]
    before = {k: torch.zeros(shape) for k, shape in keys}
    counts = [float(50 + (i * 37) % 200) for i in range(n)]

    def update(i):  # a fresh update, as an unpacked message would be
        return {k: v * (1.0 + i * 1e-4) for k, v in pool[i % 4].items()}

    base = rss_mb()
    timed = 0.0
    if method == "server":  # what Server.finish_round does per update, then the outer step
        total = InOrderSum(range(n))
        for i in range(n):
            u = ClientUpdate(1, i, counts[i], update(i))
            t0 = time.perf_counter()
            assert rejection(u, 1, before, None) is None
            from fdlora_cluster.state import l2_distance
            l2_distance(u.state, before)
            total.add(i, u.state, counts[i])
            timed += time.perf_counter() - t0
            del u
        t0 = time.perf_counter()
        total.close()
        OuterOptimizer("sgd", 1.0).step(before, pseudo_gradient(before, total.mean()))
        timed += time.perf_counter() - t0
    elif method == "sum":  # InOrderSum alone: the running sum and the mean
        total = InOrderSum(range(n))
        for i in range(n):
            u = update(i)
            t0 = time.perf_counter()
            total.add(i, u, counts[i])
            timed += time.perf_counter() - t0
            del u
        t0 = time.perf_counter()
        total.close()
        total.mean()
        timed += time.perf_counter() - t0
    elif method == "torch-stream":  # plain torch: one flat vector per update, float64 running sum
        flat = [torch.cat([v.reshape(-1) for v in p.values()]) for p in pool]
        acc, w = torch.zeros(flat[0].numel(), dtype=torch.float64), 0.0
        for i in range(n):
            x = flat[i % 4] * (1.0 + i * 1e-4)
            t0 = time.perf_counter()
            acc.add_(x, alpha=counts[i])  # computed in float64
            w += counts[i]
            timed += time.perf_counter() - t0
            del x
        t0 = time.perf_counter()
        (acc / w).to(torch.float32)
        timed += time.perf_counter() - t0
    elif method == "torch-stacked":  # plain torch: all N updates in one (N, D) tensor, one weighted sum
        flat = [torch.cat([v.reshape(-1) for v in p.values()]) for p in pool]
        stacked = torch.empty(n, flat[0].numel())
        for i in range(n):
            torch.mul(flat[i % 4], 1.0 + i * 1e-4, out=stacked[i])
        w = torch.tensor(counts, dtype=torch.float64)
        t0 = time.perf_counter()
        ((w / w.sum()).to(torch.float32) @ stacked)
        timed += time.perf_counter() - t0
    else:
        raise ValueError(method)
    return {"method": method, "n": n, "seconds": timed, "rss_base_mb": base, "rss_peak_mb": peak_rss_mb()}


def most_held_random(n: int, seed: int = 0) -> int:
    """Updates InOrderSum holds at most when they arrive in a random order (tiny states: the count
    is all that matters; each held update would be one 16.8 MB update)."""
    import torch

    from fdlora_cluster.strategies import InOrderSum

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    total = InOrderSum(range(n))
    for c in order:
        total.add(c, {"x": torch.zeros(1)}, 1.0)
    total.close()
    return total.most_held


def cmd_aggregate(args) -> None:
    update_mb = sum(a * b for _, (a, b) in lora_keys()) * 4 / 1e6
    print(f"update: {len(lora_keys())} tensors, {update_mb:.1f} MB fp32; one torch thread; timed: the server's "
          "work once an update is unpacked (not the making of updates)\n")
    rows = []
    for n in args.clients:
        res = {}
        methods = ["server", "sum", "torch-stream"] + (["torch-stacked"] if n <= args.stacked_max else [])
        for m in methods:
            out = subprocess.run([sys.executable, __file__, "aggregate-one", m, str(n)], capture_output=True,
                                 text=True, cwd=ROOT, check=True)
            res[m] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append((n, res, most_held_random(n)))
        print(f"  N={n} done", file=sys.stderr, flush=True)
    print("| clients N | server path (checks + norm + sum + step) s | InOrderSum only s | torch float64 stream s "
          "| sum / stream | torch stacked (N, D) s | sum / stacked | peak RSS over start, MB: server / sum / stream "
          "/ stacked | held at most, random arrival |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, res, held in rows:
        s, su, st = res["server"], res["sum"], res["torch-stream"]
        sk = res.get("torch-stacked")
        mem = " / ".join(f"{r['rss_peak_mb'] - r['rss_base_mb']:.0f}" for r in (s, su, st, sk) if r)
        print(f"| {n} | {s['seconds']:.2f} | {su['seconds']:.2f} | {st['seconds']:.2f} | "
              f"{su['seconds'] / st['seconds']:.2f}x | {sk['seconds']:.2f} | {su['seconds'] / sk['seconds']:.2f}x | "
              if sk else
              f"| {n} | {s['seconds']:.2f} | {su['seconds']:.2f} | {st['seconds']:.2f} | "
              f"{su['seconds'] / st['seconds']:.2f}x | - | - | ", end="")
        print(f"{mem}{'' if sk else ' / -'} | {held} ({held * update_mb:.0f} MB) |")


# ------------------------------------------------------------------ waiting


def run_job(pkg_root: Path, out: Path, rounds: int, fault: str = "") -> dict:
    from fdlora_cluster.config import apply_override, read_yaml

    raw = read_yaml(str(ROOT / "configs" / "demo.yaml"))
    sets = {"strategy": "fedavg", "train.rounds": rounds, "train.inner_steps": 10, "data.rows_per_client": 60,
            "outer.optimizer": "sgd", "outer.lr": 1.0, "output_dir": str(out / "run")}
    for k, v in sets.items():
        apply_override(raw, f"{k}={json.dumps(v)}")
    import yaml

    cfg_path = out / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    (out / "cpu").mkdir()
    from fdlora_cluster.cli import find_mpiexec

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "RANK_CPU_DIR": str(out / "cpu"),
           "PYTHONPATH": str(pkg_root), "FDLORA_FAULT": fault}
    cmd = [find_mpiexec(), "-n", "5", sys.executable, str(ROOT / "bench" / "rank_cpu.py"), "run", str(cfg_path)]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"job failed ({pkg_root}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    ranks = [json.loads((out / "cpu" / f"rank-{r}.json").read_text()) for r in range(5)]
    summary = json.loads((out / "run" / "summary.json").read_text())
    from safetensors.torch import load_file

    final = load_file(str(out / "run" / "adapters" / "global" / "adapter_model.safetensors"))
    # The rounds, as the server recorded them: from the first round's start to the last one's end.
    rounds = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    rounds = [r for r in rounds if r["event"] == "round"]
    start, end = min(r["time"] - r["seconds"] for r in rounds), max(r["time"] for r in rounds)
    for r in ranks:
        cpu_at = lambda t: min(r["samples"], key=lambda s: abs(s[0] - t))[1]  # noqa: E731 (nearest sample)
        r["rounds_cpu_s"], r["rounds_wall_s"] = cpu_at(end) - cpu_at(start), end - start
    return {"ranks": ranks, "job_wall_s": wall, "seconds_per_round": summary["seconds_per_round"], "global": final}


def cmd_waiting(args) -> None:
    from fdlora_cluster.pretrain import ensure_pretrained
    from fdlora_cluster.config import load_config

    os.chdir(ROOT)
    ensure_pretrained(load_config(ROOT / "configs" / "demo.yaml"), log=lambda m: None)
    roles = ["server", "client 0 leader", "client 0 follower", "client 1 leader", "client 1 follower"]
    with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
        tmp = Path(tmp)
        ref = tmp / "ref"
        ref.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.ref, "fdlora_cluster"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(ref)], input=archive, check=True)
        ref_sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.ref], capture_output=True,
                                 text=True).stdout.strip()
        head_sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                  text=True).stdout.strip()
        results = {}
        for name, pkg in ((f"before ({args.ref} {ref_sha})", ref), (f"after (this tree, HEAD {head_sha})", ROOT)):
            (tmp / name.split()[0]).mkdir()
            results[name] = run_job(pkg, tmp / name.split()[0], args.rounds, args.fault)
            got = {r["package"] for r in results[name]["ranks"]}
            assert got == {str(pkg / "fdlora_cluster")}, f"{name} ran {got}"
            print(f"  {name}: done", file=sys.stderr, flush=True)
    print(f"fedavg on configs/demo.yaml, {args.rounds} rounds, K = 10, 60 rows per client, 1 server + 2 clients x 2 "
          "ranks, OMP_NUM_THREADS=1" + (f", FDLORA_FAULT={args.fault}" if args.fault else "") + "\n")
    print("| run | rank | role | whole rank: CPU s / wall s | during the rounds: CPU s / wall s | CPU / wall in the rounds |")
    print("|---|---|---|---|---|---|")
    for name, res in results.items():
        for r in res["ranks"]:
            print(f"| {name} | {r['rank']} | {roles[r['rank']]} | {r['cpu_s']:.1f} / {r['wall_s']:.1f} | "
                  f"{r['rounds_cpu_s']:.1f} / {r['rounds_wall_s']:.1f} | {r['rounds_cpu_s'] / r['rounds_wall_s']:.0%} |")
    print()
    for name, res in results.items():
        print(f"- {name}: job {res['job_wall_s']:.1f} s, {res['seconds_per_round']:.2f} s per round (server's record)")
    (a, b) = (r["global"] for r in results.values())
    same = a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
    print(f"- final global adapter, before against after: {'bit-identical' if same else f'differs, max |diff| {worst:.3g}'}")


# ------------------------------------------------------------------ rounds


def cmd_rounds(args) -> None:
    """Round time (the server's record) against the number of clients and ranks per client."""
    from fdlora_cluster.cli import find_mpiexec
    from fdlora_cluster.config import apply_override, read_yaml
    from fdlora_cluster.pretrain import ensure_pretrained
    from fdlora_cluster.config import load_config
    import yaml

    os.chdir(ROOT)
    ensure_pretrained(load_config(ROOT / "configs" / "demo.yaml"), log=lambda m: None)
    rows = []
    for spec in args.topologies:
        sizes = [int(x) for x in spec.split(",")]
        with tempfile.TemporaryDirectory(prefix="scaling-rounds-") as tmp:
            raw = read_yaml(str(ROOT / "configs" / "demo.yaml"))
            sets = {"strategy": "fedavg", "topology.clients": sizes, "train.rounds": args.rounds, "train.inner_steps": 5,
                    "data.rows_per_client": 60, "outer.optimizer": "sgd", "outer.lr": 1.0,
                    "output_dir": str(Path(tmp) / "run")}
            for k, v in sets.items():
                apply_override(raw, f"{k}={json.dumps(v)}")
            cfg = Path(tmp) / "config.yaml"
            cfg.write_text(yaml.safe_dump(raw))
            env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)}
            t0 = time.monotonic()
            proc = subprocess.run([find_mpiexec(), "-n", str(1 + sum(sizes)), sys.executable, "-m", "fdlora_cluster.cli",
                                   "run", str(cfg)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
            if proc.returncode != 0:
                raise SystemExit(f"job {sizes} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
            summary = json.loads((Path(tmp) / "run" / "summary.json").read_text())
            rows.append((sizes, summary["seconds_per_round"], time.monotonic() - t0))
        print(f"  {sizes} done", file=sys.stderr, flush=True)
    print(f"fedavg on configs/demo.yaml, {args.rounds} rounds, K = 5, 60 rows per client, OMP_NUM_THREADS=1\n")
    print("| clients | ranks per client | world | s per round (server) | job s |")
    print("|---|---|---|---|---|")
    for sizes, per_round, job in rows:
        print(f"| {len(sizes)} | {sizes} | {1 + sum(sizes)} | {per_round:.2f} | {job:.0f} |")


# ------------------------------------------------------------------ waits


def waits_probe(seconds: float) -> None:
    """Run on 2 ranks: rank 0 sleeps `seconds` before each collective, rank 1 waits in it."""
    from mpi4py import MPI

    import torch
    import torch.distributed as dist

    from fdlora_cluster.waits import yielding_barrier

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    port = comm.bcast(29500 + os.getpid() % 1000 if rank == 0 else None, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    waits = {
        "MPI bcast (mpi4py, blocking)": lambda: comm.bcast("x" if rank == 0 else None, root=0),
        "MPI_Ibarrier + waits.wait_for": lambda: yielding_barrier(comm),
        "torch.distributed broadcast (gloo)": lambda: dist.broadcast(torch.zeros(1024), src=0),
        "torch.distributed barrier (gloo)": lambda: dist.barrier(),
    }
    rows = []
    for name, wait in waits.items():
        comm.Barrier()
        if rank == 0:
            time.sleep(seconds)
        c0, t0 = time.process_time(), time.monotonic()
        wait()
        rows.append((name, time.process_time() - c0, time.monotonic() - t0))
    dist.destroy_process_group()
    if rank == 1:
        print("| rank 1 waits for rank 0 in | CPU s | wall s | CPU / wall |")
        print("|---|---|---|---|")
        for name, cpu, wall in rows:
            print(f"| {name} | {cpu:.2f} | {wall:.2f} | {cpu / wall:.0%} |")


def cmd_waits(args) -> None:
    from fdlora_cluster.cli import find_mpiexec

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([find_mpiexec(), "-n", "2", sys.executable, __file__, "waits-probe", str(args.seconds)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
    print(proc.stdout.strip())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("aggregate")
    a.add_argument("--clients", type=int, nargs="+", default=[8, 32, 128, 512, 1024])
    a.add_argument("--stacked-max", type=int, default=128)
    one = sub.add_parser("aggregate-one")
    one.add_argument("method")
    one.add_argument("n", type=int)
    w = sub.add_parser("waiting")
    w.add_argument("--rounds", type=int, default=3)
    w.add_argument("--ref", default="main")
    w.add_argument("--fault", default="", help="FDLORA_FAULT for both jobs, e.g. slow@client=1,round=2,seconds=12: "
                   "a straggler every other rank waits for")
    rs = sub.add_parser("rounds")
    rs.add_argument("--rounds", type=int, default=2)
    rs.add_argument("--topologies", nargs="+", default=["1", "1,1", "1,1,1,1", "1,1,1,1,1,1,1,1", "2,2"],
                    help="ranks per client, comma-separated, one job each")
    ws = sub.add_parser("waits")
    ws.add_argument("--seconds", type=float, default=3.0)
    wp = sub.add_parser("waits-probe")
    wp.add_argument("seconds", type=float)
    args = p.parse_args()
    if args.cmd == "aggregate":
        cmd_aggregate(args)
    elif args.cmd == "aggregate-one":
        print(json.dumps(aggregate_one(args.method, args.n)))
    elif args.cmd == "waiting":
        cmd_waiting(args)
    elif args.cmd == "rounds":
        cmd_rounds(args)
    elif args.cmd == "waits":
        cmd_waits(args)
    else:
        waits_probe(args.seconds)


if __name__ == "__main__":
    main()
