"""Compare strategies on the shipped scenario: one job per `configs/<strategy>.yaml`, one table.

    python bench/compare.py                                   # fdlora, local, fedavg, diloco, feddpa, ditto
    python bench/compare.py --strategies fdlora fedprox --set seed=1 --out runs/compare-seed1
    python bench/compare.py --seeds 0 1 2                     # every job per seed, mean and spread
    python bench/compare.py --setting configs/real-smollm2.yaml --strategies fdlora local fedavg   # another setting

Every job runs with `fdlora-cluster launch` (1 server + 2 clients x 2 ranks on this machine, as
configs/demo.yaml says), each into OUT/<strategy>; the tiny base is pretrained once first. At the
end it prints the per-client table of each method's headline adapter (fused for fdlora, personal
for local, global for fedavg / diloco) under the headline accuracy (`eval.headline` of the runs:
`accuracy`, over each client's own label set, by default) and under the other one
(`accuracy_all`, over every client's labels), every adapter with both accuracies, FDLoRA's fusion
choices, and writes OUT/report/REPORT.md with the plots.
A job that fails stops the comparison with its exit status.

With `--setting FILE` the jobs run in another setting (model, topology, train, data, ...): the
file's own sections (not what it `include:`s) are merged over each strategy's config, the same way
`include:` merges, and the merged configs are written to OUT/configs/<strategy>.yaml and run. The
strategy's own sections (strategy, outer, fusion, ...) stay as the strategy config says.

With `--seeds S...` every strategy runs once per seed (the run's `seed`: data split, client mixes,
LoRA init and batch order; the pretrained base is shared) into OUT/seed-<S>/<strategy>, and the
table gives each method's headline adapter (in bold) and every other adapter it evaluates, per
client as mean +- standard deviation over the seeds, with the per-seed values beside it: no seed is
chosen, all are shown.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fdlora_cluster.config import ConfigError, load_config, merge, read_yaml  # noqa: E402
from fdlora_cluster.pretrain import ensure_pretrained  # noqa: E402
from fdlora_cluster.report import ReportError, comparison_table, load_run, steps_of, write_report  # noqa: E402

DEFAULT = ["fdlora", "local", "fedavg", "diloco", "feddpa", "ditto"]


def breakdown(run_dirs: list[str]) -> str:
    """Test accuracy per kind of line (shared / private / foreign / plain, see data/scenario.py) for
    every saved adapter of every run, recomputed in this process from the PEFT directories with the
    same candidate scoring as the trainer. Explains *where* a method wins or loses."""
    import torch
    from peft import PeftModel

    from fdlora_cluster.data import Example, collate, get_tokenizer, load_clients
    from fdlora_cluster.data.scenario import KINDS, line_kind
    from fdlora_cluster.model import build_base

    lines = ["| method | client | adapter | " + " | ".join(f"{k} (n)" for k in KINDS) + " |",
             "|" + "---|" * (3 + len(KINDS))]
    for d in run_dirs:
        cfg = load_config(os.path.join(d, "config.yaml"))
        if cfg.data.source != "generator":
            continue
        tok = get_tokenizer(cfg.model.path)
        clients = load_clients(cfg.data, len(cfg.client_sizes()), cfg.seed)
        with open(os.path.join(d, "summary.json")) as f:
            evaluated = {s["client"]: list(s["metrics"]) for s in json.load(f)["clients"]}
        for data in clients:
            adapters = {a: os.path.join(d, "adapters", f"client-{data.client}", a) for a in ("personal", "global", "fused")}
            adapters["global"] = os.path.join(d, "adapters", "global")  # the final global adapter, the same for all
            for name, path in adapters.items():
                if not os.path.isdir(path):
                    continue
                if name not in evaluated.get(data.client, []):
                    continue  # an adapter the strategy does not train or evaluate
                model = PeftModel.from_pretrained(build_base(cfg.model, cfg.seed, tok.vocab_size), path).eval()
                cands = data.candidates
                rows = [Example(ex.prompt, c) for ex in data.test for c in cands]
                with torch.no_grad():
                    b = collate(tok, rows, cfg.train.max_seq_len)
                    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
                    labels = b["labels"][:, 1:]
                    lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                    score = (lp * (labels != -100)).sum(-1).view(len(data.test), len(cands))
                pred = [cands[int(i)] for i in score.argmax(-1)]
                by = {k: [] for k in KINDS}
                for ex, p in zip(data.test, pred):
                    by[line_kind(ex, data.client)].append(p == ex.response)
                cells = [f"{sum(v) / len(v):.2f} ({len(v)})" if v else "-" for v in by.values()]
                lines.append(f"| {cfg.strategy} | {data.client} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def accuracies_table(runs) -> str:
    """Every adapter of every run with both accuracies (own label set and union) and the loss."""
    lines = ["| method | client | adapter | accuracy (own labels) | accuracy_all (union) | loss | optimizer steps |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        by: dict[str, list[dict]] = {}
        for s in sorted(run.summary["clients"], key=lambda s: s["client"]):
            for adapter, m in s["metrics"].items():
                by.setdefault(adapter, []).append(m)
                lines.append(f"| {run.method} | {s['client']} | {adapter} | {_fmt(m.get('accuracy'))} | "
                             f"{_fmt(m.get('accuracy_all'))} | {m['loss']:.4f} | {steps_of(s, adapter)} |")
        for adapter, ms in by.items():
            mean = {k: (sum(m[k] for m in ms) / len(ms) if all(k in m for m in ms) else None)
                    for k in ("accuracy", "accuracy_all", "loss")}
            lines.append(f"| {run.method} | mean | {adapter} | {_fmt(mean['accuracy'])} | "
                         f"{_fmt(mean['accuracy_all'])} | {mean['loss']:.4f} | |")
    return "\n".join(lines)


def fusion_choices(runs) -> str:
    """Per fusing client: the chosen weights, how they were chosen, and the search rows' objective
    of the choice against the three anchors (personal only, global only, both at 1)."""
    lines = ["| method | client | weights (w_p, w_g) per group | chosen by | objective | personal | global | both |",
             "|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for rec in run.metrics:
            if rec.get("event") != "fusion" or "objective" not in rec:
                continue
            c = rec["client"]
            anchors = [m["objective"] for m in run.metrics
                       if m.get("event") == "fusion_step" and m.get("client") == c and m.get("phase") == "anchor"]
            w = "; ".join(f"{g}: ({p:.2f}, {q:.2f})" for g, (p, q) in rec["weights"].items())
            lines.append(f"| {run.method} | {c} | {w} | {rec['chosen_by']} | {rec['objective']:.4f} | "
                         + " | ".join(f"{a:.4f}" for a in anchors[:3]) + " |")
    return "\n".join(lines) if len(lines) > 2 else "(no fusion search in these runs)"


def seeds_table(runs_by_seed: dict[int, list], metric: str) -> str:
    """Methods as rows: per client and over clients, `metric` as mean +- sd over seeds, then the
    per-seed means over clients. The headline adapter's row first, then a row per other adapter the
    method evaluates (FDLoRA's personal and global ones are what its fused one must beat)."""
    import statistics

    from fdlora_cluster.report import headline_adapter

    methods = [r.method for r in next(iter(runs_by_seed.values()))]
    clients = sorted(s["client"] for s in next(iter(runs_by_seed.values()))[0].summary["clients"])
    seeds = sorted(runs_by_seed)

    def value(run, client, adapter):
        return next(s for s in run.summary["clients"] if s["client"] == client)["metrics"][adapter].get(metric)

    def ms(xs):
        return f"{statistics.mean(xs):.3f} +- {statistics.stdev(xs):.3f}" if len(xs) > 1 else f"{xs[0]:.3f}"

    head = ["method (adapter)"] + [f"client {c}" for c in clients] + ["mean over clients"] + [f"seed {s}" for s in seeds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, m in enumerate(methods):
        first = runs_by_seed[seeds[0]][i].summary["clients"][0]
        headline = headline_adapter(first)
        for adapter in [headline] + [a for a in first["metrics"] if a != headline]:
            per_client = {c: [value(runs_by_seed[s][i], c, adapter) for s in seeds] for c in clients}
            per_seed = [statistics.mean(per_client[c][k] for c in clients) for k in range(len(seeds))]
            name = f"**{m} ({adapter})**" if adapter == headline else f"{m} ({adapter})"
            lines.append(f"| {name} | " + " | ".join(ms(per_client[c]) for c in clients) + f" | {ms(per_seed)} | "
                         + " | ".join(f"{x:.3f}" for x in per_seed) + " |")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def with_setting(configs: list[str], setting: str, out_dir: str) -> list[str]:
    """Each strategy config with the setting file's own sections merged over it, written to out_dir."""
    import yaml

    with open(setting, encoding="utf-8") as f:
        own = yaml.safe_load(f) or {}
    own.pop("include", None)  # its include (e.g. demo.yaml) is the strategies' base already
    if "strategy" in own:  # it would turn every job into one strategy
        raise ConfigError(f"{setting}: a setting for --setting must not set `strategy`")
    os.makedirs(out_dir, exist_ok=True)
    out = []
    for c in configs:
        path = os.path.join(out_dir, os.path.basename(c))
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(merge(read_yaml(c), own), f, sort_keys=False)
        out.append(path)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", nargs="+", default=DEFAULT, help=f"configs/<name>.yaml to run (default {DEFAULT})")
    ap.add_argument("--out", default="runs/compare", help="parent of the run directories (default runs/compare)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                    help="override applied to every job (repeatable)")
    ap.add_argument("--breakdown", action="store_true",
                    help="also print accuracy per kind of line (shared/private/foreign/plain) from the saved adapters")
    ap.add_argument("--report-only", action="store_true", help="skip the jobs; tabulate OUT/<strategy> as they are")
    ap.add_argument("--seeds", type=int, nargs="+", help="run every strategy once per seed (OUT/seed-<S>/<strategy>) "
                    "and print mean +- sd over seeds")
    ap.add_argument("--setting", metavar="FILE", help="YAML whose own sections are merged over every strategy's "
                    "config (e.g. configs/real-smollm2.yaml); the merged configs go to OUT/configs/")
    args = ap.parse_args(argv)
    if args.seeds:
        return over_seeds(args, argv)

    configs = [os.path.join(ROOT, "configs", f"{s}.yaml") for s in args.strategies]
    missing = [c for c in configs if not os.path.isfile(c)] + ([args.setting] if args.setting and
                                                               not os.path.isfile(args.setting) else [])
    if missing:
        print(f"compare: no such config: {', '.join(missing)}", file=sys.stderr)
        return 2
    run_dirs = [os.path.join(args.out, s) for s in args.strategies]
    if not args.report_only:
        try:
            if args.setting:
                configs = with_setting(configs, args.setting, os.path.join(args.out, "configs"))
            # one pretraining for all jobs (they share model.pretrained), with every core
            ensure_pretrained(load_config(configs[0], args.overrides))
        except ConfigError as e:
            print(f"compare: {e}", file=sys.stderr)
            return 2
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
    headline = runs[0].config.get("eval", {}).get("headline", "accuracy")
    other = "accuracy_all" if headline == "accuracy" else "accuracy"
    print(f"\nPer-client test {headline} (eval.headline), headline adapter of each method:\n")
    print(comparison_table(runs, metric=headline))
    print(f"\nThe same under {other}:\n")
    print(comparison_table(runs, metric=other))
    print("\nEvery adapter each method evaluates:\n")
    print(accuracies_table(runs))
    print("\nFusion choices (objective on the search rows; the anchors' for comparison):\n")
    print(fusion_choices(runs))
    if args.breakdown:
        print("\nTest accuracy per kind of line (from the saved adapters):\n")
        print(breakdown(run_dirs))
    print(f"\nreport: {report}")
    return 0


def over_seeds(args, argv) -> int:
    """Run the comparison once per seed (each into OUT/seed-<S>), then the over-seeds table."""
    base = [a for a in (sys.argv[1:] if argv is None else argv)]
    runs_by_seed = {}
    for seed in args.seeds:
        out = os.path.join(args.out, f"seed-{seed}")
        sub = ["--strategies", *args.strategies, "--out", out, *[x for o in args.overrides for x in ("--set", o)],
               "--set", f"seed={seed}"] + (["--report-only"] if args.report_only else []) + \
              (["--setting", args.setting] if args.setting else [])
        rc = main(sub)
        if rc != 0:
            return rc
        runs_by_seed[seed] = [load_run(os.path.join(out, s)) for s in args.strategies]
    headline = runs_by_seed[args.seeds[0]][0].config.get("eval", {}).get("headline", "accuracy")
    print(f"\nMade by `python bench/compare.py {' '.join(base)}`. Test {headline} (eval.headline) "
          f"over seeds {args.seeds}, each method's headline adapter in bold:\n")
    print(seeds_table(runs_by_seed, headline))
    other = "accuracy_all" if headline == "accuracy" else "accuracy"
    print(f"\nThe same under {other}:\n")
    print(seeds_table(runs_by_seed, other))
    return 0


if __name__ == "__main__":
    sys.exit(main())
