"""The server's combine step (global.combine, issue 19) for N clients of a 7B Llama's q,v LoRA
(32 layers x 2 modules, 4096 x 4096), at ranks 8-64. Prints a Markdown table.

    python bench/combine.py [--clients 8] [--ranks 8 16 32 64] [--modules 64] [--dense-modules 1] [--threads 1]

factors:  FedAvg as the server runs it: InOrderSum.add of each update, the mean, OuterOptimizer
          sgd lr 1 (A and B averaged separately), plus the per-round FactorsGap sketch.
product:  ProductSum.add of each update, ProductOuter sgd lr 1 (thin QR of the stacks, SVD of the
          small core, cut to rank r with the residual kept), and the truncation each client gets.
dense:    the reference: sum_k p_k B_k A_k formed as a dense 4096 x 4096 float64 matrix per
          module and torch.linalg.svd of it, top r kept. Timed on --dense-modules modules and
          scaled to --modules (said in the table).
Updates are seeded random fp32 (client k: the global slice plus noise). Each method and rank runs
in its own process, so its peak RSS (ru_maxrss) is its own; --threads torch threads.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN = 4096


def keys(modules: int, r: int) -> dict[str, tuple[int, int]]:
    out = {}
    for i in range(modules):
        base = f"base_model.model.model.layers.{i // 2}.self_attn.{('q_proj', 'v_proj')[i % 2]}"
        out[f"{base}.lora_A.weight"], out[f"{base}.lora_B.weight"] = (r, HIDDEN), (HIDDEN, r)
    return out


def one(method: str, clients: int, r: int, modules: int, threads: int, warm: bool = True) -> dict:
    import torch

    if warm:  # first calls pay one-off costs (torch.optim's and LAPACK's set-up): not the method's
        one(method, 2, 2, 1, threads, warm=False)

    from fdlora_cluster.strategies.aggregate import InOrderSum, OuterOptimizer
    from fdlora_cluster.strategies.combine import (A_SUFFIX, B_SUFFIX, FactorsGap, ProductOuter, ProductSum,
                                                   in_svd_form, truncate)

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    shapes = keys(modules, r)
    glob = {k: torch.randn(s, generator=g) * (0.02 if k.endswith(A_SUFFIX) else 0.01) for k, s in shapes.items()}
    if method == "product":
        glob = in_svd_form(glob, r)

    def update(c: int) -> dict:
        gc = torch.Generator().manual_seed(100 + c)
        return {k: v + 0.01 * torch.randn(v.shape, generator=gc) for k, v in glob.items()}

    weights = [float(10 + c) for c in range(clients)]
    t0 = time.perf_counter()
    if method == "factors":
        total, gap = InOrderSum(range(clients)), FactorsGap()
        elapsed = 0.0
        for c in range(clients):
            u = update(c)
            t = time.perf_counter()
            total.add(c, u, weights[c])
            gap.add(u, weights[c])
            elapsed += time.perf_counter() - t
            del u
        t = time.perf_counter()
        total.close()
        mean = total.mean()
        OuterOptimizer("sgd", 1.0).step(glob, {k: glob[k].double() - mean[k].double() for k in glob})
        gap.relative(mean)
        elapsed += time.perf_counter() - t
    elif method == "product":
        total, elapsed = ProductSum(range(clients)), 0.0
        for c in range(clients):
            u = update(c)
            t = time.perf_counter()
            total.add(c, u, weights[c])
            elapsed += time.perf_counter() - t
        t = time.perf_counter()
        total.close()
        sent = {c: glob for c in range(clients)}  # each client held the global at its own (equal) rank
        new, _ = ProductOuter("sgd", 1.0, rank=r).step(glob, sent, total)
        truncate(new, r)
        elapsed += time.perf_counter() - t
    else:  # dense: the m x n average and its SVD, for `modules` modules
        ups = [update(c) for c in range(clients)]
        elapsed = 0.0
        names = sorted({k[:-len(A_SUFFIX)] for k in shapes if k.endswith(A_SUFFIX)})
        for m in names:
            t = time.perf_counter()
            p = [w / sum(weights) for w in weights]
            dw = sum(pk * (u[m + B_SUFFIX].double() @ u[m + A_SUFFIX].double()) for pk, u in zip(p, ups))
            u_, s, vh = torch.linalg.svd(dw, full_matrices=False)
            u_[:, :r] * s[:r], vh[:r]
            elapsed += time.perf_counter() - t
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB on Linux
    return {"method": method, "rank": r, "seconds": elapsed, "rss_mib": rss, "wall": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--modules", type=int, default=64)
    ap.add_argument("--dense-modules", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=["factors", "product", "dense"])
    ap.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # method rank: a child process
    a = ap.parse_args()
    if a.one:
        method, r = a.one[0], int(a.one[1])
        mods = a.dense_modules if method == "dense" else a.modules
        print(json.dumps(one(method, a.clients, r, mods, a.threads)))
        return
    print(f"{a.clients} clients, {a.modules} modules of 4096 x 4096 (7B q,v), {a.threads} torch thread(s)\n")
    print("| rank | factors (FedAvg) s | product s | dense SVD s (scaled) | factors RSS MiB | product RSS MiB | dense RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in a.ranks:
        got = {}
        for method in a.methods:
            out = subprocess.run([sys.executable, __file__, "--one", method, str(r), "--clients", str(a.clients),
                                  "--modules", str(a.modules), "--dense-modules", str(a.dense_modules),
                                  "--threads", str(a.threads)], capture_output=True, text=True, check=True)
            got[method] = json.loads(out.stdout.strip().splitlines()[-1])
        dense = got.get("dense")
        dense_s = f"{dense['seconds'] * a.modules / a.dense_modules:.0f} ({a.dense_modules} timed)" if dense else "-"
        cell = lambda m, k, f: f.format(got[m][k]) if m in got else "-"
        print(f"| {r} | {cell('factors', 'seconds', '{:.2f}')} | {cell('product', 'seconds', '{:.2f}')} | {dense_s} | "
              f"{cell('factors', 'rss_mib', '{:.0f}')} | {cell('product', 'rss_mib', '{:.0f}')} | "
              f"{cell('dense', 'rss_mib', '{:.0f}')} |", flush=True)


if __name__ == "__main__":
    main()
