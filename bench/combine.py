"""The server's combine step (global.combine, issue 19) for N clients of a 7B Llama's q,v LoRA
(32 layers x 2 modules, 4096 x 4096), at ranks 8-64. Prints a Markdown table.

    python bench/combine.py [--clients 8] [--ranks 8 16 32 64] [--modules 64] [--reps 2] [--threads 1]
    python bench/combine.py --rss [--ranks 64]            # peak memory, one process per method
    python bench/combine.py --dense [--dense-modules 1]   # the dense reference, timed on a few modules
    python bench/combine.py --precision [--ranks 64] [--modules 4]   # product in float32 against float64

Inputs (not timed): the global adapter in SVD form (B = U S, A = V^T, float32) and each client's
update, the global plus seeded float32 noise; both methods get the same ones, and sgd lr 1.
factors: FedAvg as the server runs it, timed in two parts: `sum` (InOrderSum.add of each update,
          the mean, OuterOptimizer sgd: FedAvg itself) and `gap` (the per-round FactorsGap sketch,
          the diagnostic the server adds under factors).
product:  ProductSum.add of each update, ProductOuter sgd (the batched factored SVD, cut to rank r
          with the residual kept) and the truncation each client gets.
dense:    the reference: sum_k p_k B_k A_k formed as a dense 4096 x 4096 float64 matrix per module
          and torch.linalg.svd of it, top r kept; timed on --dense-modules modules, scaled to --modules.
The timing rows time rounds after the first, as the server runs them (one untimed round of each
method first: FactorsGap's sketches are drawn once per job, and from round 2 ProductOuter adds the
last round's residual to the sum), factors and product alternately in one process (--reps times
each, the order swapped every rep) so both see the same machine load; the table gives the medians, their ratio and
the load average (os.getloadavg) before and after the row. --rss runs each method in its own
process and gives its peak RSS (ru_maxrss) before and after the method: the inputs, then the peak.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN = 4096
METHODS = ("factors", "product", "dense")


def keys(modules: int, r: int) -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(modules):
        base = f"base_model.model.model.layers.{i // 2}.self_attn.{('q_proj', 'v_proj')[i % 2]}"
        out[f"{base}.lora_A.weight"], out[f"{base}.lora_B.weight"] = (r, HIDDEN), (HIDDEN, r)
    return out


def inputs(clients: int, r: int, modules: int):
    """The global adapter (SVD form), the clients' updates and their weights: seeded, float32."""
    import torch

    from fdlora_cluster.strategies.combine import A_SUFFIX, in_svd_form

    g = torch.Generator().manual_seed(0)
    glob = {k: torch.randn(s, generator=g) * (0.02 if k.endswith(A_SUFFIX) else 0.01) for k, s in keys(modules, r).items()}
    glob = in_svd_form(glob, r)
    updates = []
    for c in range(clients):
        gc_ = torch.Generator().manual_seed(100 + c)
        updates.append({k: v + 0.01 * torch.randn(v.shape, generator=gc_) for k, v in glob.items()})
    return glob, updates, [float(10 + c) for c in range(clients)]


def run_factors(glob, updates, weights, gap=None) -> dict:
    """One FedAvg round; `gap`: the job's FactorsGap (its sketches already drawn, as the server's
    are after its first round), else a new one, which draws them inside the timing."""
    from fdlora_cluster.state import pseudo_gradient
    from fdlora_cluster.strategies.aggregate import InOrderSum, OuterOptimizer
    from fdlora_cluster.strategies.combine import FactorsGap

    gap = gap or FactorsGap()
    gap.new_round()
    total, t_sum, t_gap = InOrderSum(range(len(updates))), 0.0, 0.0
    for c, (u, w) in enumerate(zip(updates, weights)):
        t = time.perf_counter()
        total.add(c, u, w)
        t_sum += time.perf_counter() - t
        t = time.perf_counter()
        gap.add(u, w)
        t_gap += time.perf_counter() - t
    t = time.perf_counter()
    total.close()
    mean = total.mean()
    OuterOptimizer("sgd", 1.0).step(glob, pseudo_gradient(glob, mean))
    t_sum += time.perf_counter() - t
    t = time.perf_counter()
    gap.relative(mean)
    t_gap += time.perf_counter() - t
    return {"sum": t_sum, "gap": t_gap}


def run_product(glob, updates, weights, r: int, outer=None) -> dict:
    """One product round; `outer`: the job's ProductOuter, holding the last round's residual (which
    the server adds to the sum every round after the first: r more stacked columns), else a new one."""
    from fdlora_cluster.strategies.combine import ProductOuter, ProductSum, truncate

    outer = outer or ProductOuter("sgd", 1.0, rank=r)
    t = time.perf_counter()
    total = ProductSum(range(len(updates)))
    for c, (u, w) in enumerate(zip(updates, weights)):
        total.add(c, u, w)
    total.close()
    sent = {c: glob for c in range(len(updates))}  # each client held the global at its own (equal) rank
    new, _ = outer.step(glob, sent, total)
    truncate(new, r)
    return {"product": time.perf_counter() - t}


def run_dense(updates, weights, r: int, modules: int) -> dict:
    import torch

    from fdlora_cluster.strategies.combine import A_SUFFIX, B_SUFFIX, modules as names

    p = [w / sum(weights) for w in weights]
    t = time.perf_counter()
    for m in names(updates[0])[:modules]:
        dw = sum(pk * (u[m + B_SUFFIX].double() @ u[m + A_SUFFIX].double()) for pk, u in zip(p, updates))
        u_, s, vh = torch.linalg.svd(dw, full_matrices=False)
        u_[:, :r] * s[:r], vh[:r]
    return {"dense": time.perf_counter() - t}


def precision_row(clients: int, r: int, modules: int) -> dict:
    """product's step on float32 inputs (worked in float32) and on the same values as float64 (worked
    in float64): the time of each and ||dW_32 - dW_64|| / ||dW_64|| over all modules."""
    import torch

    from fdlora_cluster.strategies.combine import A_SUFFIX, B_SUFFIX, ProductOuter, ProductSum, modules as names, svd_of_sum

    glob, updates, weights = inputs(clients, r, modules)
    new, secs = {}, {}
    for dt in (torch.float64, torch.float32):
        g = {k: v.to(dt) for k, v in glob.items()}
        total = ProductSum(range(clients))
        for c, (u, w) in enumerate(zip(updates, weights)):
            total.add(c, {k: v.to(dt) for k, v in u.items()}, w)
        total.close()
        t = time.perf_counter()
        new[dt], _ = ProductOuter("sgd", 1.0, rank=r).step(g, {c: g for c in range(clients)}, total)
        secs[str(dt)] = time.perf_counter() - t
    num = den = 0.0
    for m in names(glob):
        hi, lo = new[torch.float64], new[torch.float32]
        _, d, _ = svd_of_sum([(1.0, hi[m + B_SUFFIX], hi[m + A_SUFFIX]), (-1.0, lo[m + B_SUFFIX].double(), lo[m + A_SUFFIX].double())])
        _, s, _ = svd_of_sum([(1.0, hi[m + B_SUFFIX], hi[m + A_SUFFIX])])
        num, den = num + float((d * d).sum()), den + float((s * s).sum())
    return {"rank": r, **secs, "relative": (num / den) ** 0.5, "load": os.getloadavg()[0]}


def warm_up(threads: int) -> None:
    """First calls pay one-off costs (torch.optim's and LAPACK's set-up): not the method's."""
    glob, updates, weights = inputs(2, 2, 1)
    run_factors(glob, updates, weights)
    run_product(glob, updates, weights, 2)


def timing_row(clients: int, r: int, modules: int, reps: int) -> dict:
    """Rounds after the first, as the server runs them: one untimed round of each method first
    draws FactorsGap's sketches and leaves ProductOuter a residual."""
    from fdlora_cluster.strategies.combine import FactorsGap, ProductOuter

    glob, updates, weights = inputs(clients, r, modules)
    gap, outer = FactorsGap(), ProductOuter("sgd", 1.0, rank=r)
    run_factors(glob, updates, weights, gap)
    run_product(glob, updates, weights, r, outer)
    load = [os.getloadavg()[0]]
    got: dict[str, list[float]] = {"sum": [], "gap": [], "product": []}
    for rep in range(reps):
        for method in (("factors", "product") if rep % 2 == 0 else ("product", "factors")):
            gc.collect()
            out = (run_factors(glob, updates, weights, gap) if method == "factors"
                   else run_product(glob, updates, weights, r, outer))
            for k, v in out.items():
                got[k].append(v)
    load.append(os.getloadavg()[0])
    return {"rank": r, **{k: statistics.median(v) for k, v in got.items()}, "runs": got, "load": load}


def rss_row(method: str, clients: int, r: int, modules: int, dense_modules: int) -> dict:
    glob, updates, weights = inputs(clients, r, modules)
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    if method == "factors":
        out = run_factors(glob, updates, weights)
    elif method == "product":
        out = run_product(glob, updates, weights, r)
    else:
        out = run_dense(updates, weights, r, dense_modules)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"method": method, "rank": r, "rss_inputs_mib": before, "rss_peak_mib": after, **out,
            "load": os.getloadavg()[0]}


def child(a, *args: str) -> dict:
    cmd = [sys.executable, __file__, *args, "--clients", str(a.clients), "--modules", str(a.modules),
           "--dense-modules", str(a.dense_modules), "--threads", str(a.threads), "--reps", str(a.reps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--modules", type=int, default=64)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dense-modules", type=int, default=1)
    ap.add_argument("--rss", action="store_true", help="peak RSS of each method, each in its own process")
    ap.add_argument("--dense", action="store_true", help="time the dense reference on --dense-modules modules")
    ap.add_argument("--precision", action="store_true", help="product in float32 against float64")
    ap.add_argument("--time", type=int, help=argparse.SUPPRESS)  # rank: a timing child
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # method rank: an RSS child
    a = ap.parse_args()
    if a.modules < 1 or a.clients < 1 or a.reps < 1 or any(r < 1 for r in a.ranks):
        ap.error("--modules, --clients, --reps and --ranks must be positive")
    import torch

    torch.set_num_threads(a.threads)
    if a.time is not None or a.one:
        warm_up(a.threads)
        out = (timing_row(a.clients, a.time, a.modules, a.reps) if a.time is not None else
               rss_row(a.one[0], a.clients, int(a.one[1]), a.modules, a.dense_modules))
        print(json.dumps(out))
        return
    print(f"{a.clients} clients, {a.modules} modules of 4096 x 4096 (7B q,v), float32 adapters, "
          f"{a.threads} torch thread(s)\n")
    if a.precision:
        warm_up(a.threads)
        print("| rank | float64 s | float32 s | relative difference | load |\n|---|---|---|---|---|")
        for r in a.ranks:
            got = precision_row(a.clients, r, a.modules)
            print(f"| {r} | {got['torch.float64']:.2f} | {got['torch.float32']:.2f} | {got['relative']:.1e} | "
                  f"{got['load']:.1f} |", flush=True)
        return
    if a.rss or a.dense:
        methods = ["dense"] if a.dense else ["factors", "product"]
        print("| rank | method | seconds | RSS with the inputs MiB | peak RSS MiB | load |")
        print("|---|---|---|---|---|---|")
        for r in a.ranks:
            for method in methods:
                got = child(a, "--one", method, str(r))
                secs = (f"{got['dense'] * a.modules / a.dense_modules:.0f} ({a.dense_modules} of {a.modules} modules "
                        f"timed: {got['dense']:.1f} s)" if method == "dense" else
                        f"{got['sum']:.2f} + gap {got['gap']:.2f}" if method == "factors" else f"{got['product']:.2f}")
                print(f"| {r} | {method} | {secs} | {got['rss_inputs_mib']:.0f} | {got['rss_peak_mib']:.0f} | "
                      f"{got['load']:.1f} |", flush=True)
        return
    print(f"medians of {a.reps} alternating runs each; product / FedAvg, and / FedAvg with its gap sketch\n")
    print("| rank | FedAvg sum s | + gap sketch s | product s | product / FedAvg | product / (FedAvg + gap) | load before, after |")
    print("|---|---|---|---|---|---|---|")
    for r in a.ranks:
        got = child(a, "--time", str(r))
        fed = got["sum"] + got["gap"]
        print(f"| {r} | {got['sum']:.2f} | {got['gap']:.2f} | {got['product']:.2f} | {got['product'] / got['sum']:.0f}x | "
              f"{got['product'] / fed:.1f}x | {got['load'][0]:.1f}, {got['load'][1]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
