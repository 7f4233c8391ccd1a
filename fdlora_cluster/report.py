"""`fdlora-cluster report RUN_DIR [RUN_DIR ...]`: a Markdown report with the per-client table and plots.

One run directory gives `RUN_DIR/report/REPORT.md` with:
  - the per-client table (every evaluated adapter: accuracy, loss, perplexity, and with
    eval.generate exact match and ROUGE-L; the optimizer steps behind it) and the means;
  - per run, the client-level differential privacy spent (epsilon at delta) when privacy was on;
  - `loss_per_round.png`: each client's mean training loss per round (round 0 = personal stage);
  - `fusion_weights.png`: each client's (w_personal, w_global), for strategies with a fusion phase.
Several run directories (e.g. one per strategy on the same scenario) add the comparison:
  - a table of each method's headline adapter per client (fused if the method fuses, else the one
    it evaluates), and `accuracy_by_method.png`.

It reads only what every run writes (`config.yaml`, `summary.json`, `metrics.jsonl`), so it works on
any finished run, and imports matplotlib (Agg backend, no display) only to draw.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import yaml

from .log import privacy_sentence


class ReportError(ValueError):
    """A run directory that cannot be reported on; the message names the directory and file."""


@dataclass
class Run:
    dir: str
    config: dict
    summary: dict
    metrics: list[dict]

    @property
    def method(self) -> str:
        return self.summary.get("strategy") or self.config.get("strategy", "?")


def load_run(run_dir: str) -> Run:
    """Read a finished run directory; ReportError says which file is missing or broken."""
    def need(name):
        path = os.path.join(run_dir, name)
        if not os.path.isfile(path):
            raise ReportError(f"{run_dir}: no {name} (is this a finished run directory?)")
        return path

    try:
        with open(need("summary.json")) as f:
            summary = json.load(f)
    except json.JSONDecodeError as e:
        raise ReportError(f"{run_dir}/summary.json: not valid JSON ({e.msg})") from None
    with open(need("config.yaml")) as f:
        try:
            config = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ReportError(f"{run_dir}/config.yaml: not valid YAML ({e})") from None
    metrics = []
    with open(need("metrics.jsonl")) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    metrics.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ReportError(f"{run_dir}/metrics.jsonl:{n}: not valid JSON ({e.msg})") from None
    if not isinstance(summary, dict) or not summary.get("clients"):
        raise ReportError(f"{run_dir}/summary.json: no per-client results")
    for i, c in enumerate(summary["clients"]):
        ok = (isinstance(c, dict) and "client" in c and isinstance(c.get("metrics"), dict) and c["metrics"]
              and all(isinstance(m, dict) and "loss" in m for m in c["metrics"].values()))
        if not ok:
            raise ReportError(f"{run_dir}/summary.json: clients[{i}] lacks client / metrics per adapter with a loss "
                              "(was it written by fdlora-cluster?)")
    return Run(run_dir, config, summary, metrics)


def headline_adapter(client_summary: dict) -> str:
    """The adapter a method is judged by: the fused one when it fuses, else the one it evaluates
    (personal for local, global for fedavg / fedprox / diloco)."""
    m = client_summary["metrics"]
    return "fused" if "fused" in m else next(iter(m))


def _fmt(x, nd=3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _md_table(head, rows) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


GENERATION = ("exact_match", "rouge_l")  # eval.generate's metrics, columns only where a run has them


def generation_columns(runs: list[Run]) -> list[str]:
    return [k for k in GENERATION
            if any(k in m for r in runs for s in r.summary["clients"] for m in s["metrics"].values())]


def steps_of(client_summary: dict, adapter: str) -> str:
    """The optimizer steps behind an adapter (summary.json's optimizer_steps): its own, or for the
    fused one none of its own and its parts' (personal + global). Two methods compared at different
    step counts have not been compared on method alone."""
    steps = client_summary.get("optimizer_steps")
    if not steps:
        return "-"  # a run made before the steps were recorded
    if adapter == "fused":
        return f"0 ({steps['personal']} + {steps['global']})"
    return str(steps.get(adapter, "-"))


def per_client_rows(run: Run, gen: tuple = ()) -> list[tuple]:
    rows = []
    for s in sorted(run.summary["clients"], key=lambda s: s["client"]):
        for adapter, m in s["metrics"].items():
            rows.append((run.method, s["client"], adapter, _fmt(m.get("accuracy")), *(_fmt(m.get(k)) for k in gen),
                         _fmt(m["loss"], 4), _fmt(m.get("perplexity"), 3), m.get("rows", "-"), steps_of(s, adapter)))
    return rows


def mean_rows(run: Run, gen: tuple = ()) -> list[tuple]:
    """Per adapter, the mean over clients (unweighted: every client counts once)."""
    by = {}
    for s in run.summary["clients"]:
        for adapter, m in s["metrics"].items():
            by.setdefault(adapter, []).append(m)

    def mean(ms, k):
        v = [m[k] for m in ms if k in m]
        return _fmt(sum(v) / len(v) if v else None)

    rows = []
    for adapter, ms in by.items():
        rows.append((run.method, "mean", adapter, mean(ms, "accuracy"), *(mean(ms, k) for k in gen),
                     _fmt(sum(m["loss"] for m in ms) / len(ms), 4), "-", "-", "-"))
    return rows


def per_client_table(runs: list[Run]) -> str:
    gen = tuple(generation_columns(runs))
    head = ("method", "client", "adapter", "accuracy", *gen, "loss", "perplexity", "test rows", "optimizer steps")
    rows = []
    for r in runs:
        rows += per_client_rows(r, gen) + mean_rows(r, gen)
    return _md_table(head, rows)


def comparison(runs: list[Run]) -> tuple[list[str], list[int], dict]:
    """(method labels, client ids, {(label, client): (adapter, metrics)}) of each run's headline adapter."""
    labels, clients, cells = [], set(), {}
    seen = {}
    for r in runs:
        label = r.method if r.method not in seen else f"{r.method} ({os.path.basename(r.dir.rstrip('/'))})"
        seen[r.method] = True
        labels.append(label)
        for s in r.summary["clients"]:
            a = headline_adapter(s)
            cells[(label, s["client"])] = (a, s["metrics"][a])
            clients.add(s["client"])
    return labels, sorted(clients), cells


def comparison_table(runs: list[Run], metric: str = "accuracy") -> str:
    """Clients as rows, methods as columns, each method's headline adapter; a mean row at the end."""
    labels, clients, cells = comparison(runs)
    head = ["client"] + [f"{l} ({cells[(l, clients[0])][0]})" if (l, clients[0]) in cells else l for l in labels]
    rows = []
    for c in clients:
        rows.append([str(c)] + [_fmt(cells[(l, c)][1].get(metric)) if (l, c) in cells else "-" for l in labels])
    means = []
    for l in labels:
        v = [cells[(l, c)][1].get(metric) for c in clients if (l, c) in cells]
        v = [x for x in v if x is not None]
        means.append(_fmt(sum(v) / len(v)) if v else "-")
    rows.append(["mean"] + means)
    return _md_table(head, rows)


def loss_per_round(run: Run) -> dict:
    """{(client, adapter): [(round, mean training loss)]} from the run's `train` records."""
    acc = {}
    for rec in run.metrics:
        if rec.get("event") == "train" and rec.get("loss") is not None and rec.get("client") is not None:
            acc.setdefault((rec["client"], rec.get("adapter", "?")), {}).setdefault(rec["round"], []).append(rec["loss"])
    return {k: sorted((t, sum(v) / len(v)) for t, v in d.items()) for k, d in acc.items()}


def after_rounds(run: Run) -> dict | None:
    """The time of the rounds and of what follows them, from metrics.jsonl's `seconds`: the rounds'
    sum, and on the client whose fusion + evaluation took longest (the job waits for it) its
    fusion's and its adapters' evaluations', with their ratio to the rounds (issue 18's target:
    under 0.25). None for a run with no timed rounds (or one written before the records had times)."""
    rounds = sum(float(r.get("seconds") or 0.0) for r in run.metrics if r.get("event") == "round")
    parts: dict[int, dict] = {}
    for r in run.metrics:
        if r.get("event") in ("fusion", "eval") and r.get("seconds") is not None:
            p = parts.setdefault(r.get("client"), {"fusion": 0.0, "evaluation": 0.0, "evaluations": 0})
            p["fusion" if r["event"] == "fusion" else "evaluation"] += float(r["seconds"])
            p["evaluations"] += int(r.get("evaluations") or 0)
    if rounds <= 0 or not parts:
        return None
    client, slowest = max(parts.items(), key=lambda kv: kv[1]["fusion"] + kv[1]["evaluation"])
    return {"rounds": rounds, "client": client, **slowest,
            "ratio": (slowest["fusion"] + slowest["evaluation"]) / rounds}


def after_rounds_sentence(t: dict) -> str:
    def sec(x):
        return f"{x:.0f} s" if x >= 10 else f"{x:.1f} s"

    fusion = f"fusion {sec(t['fusion'])} ({t['evaluations']} evaluations) + " if t["fusion"] else ""
    return (f"rounds {sec(t['rounds'])}, then {fusion}evaluation {sec(t['evaluation'])} on client "
            f"{t['client']} (the slowest): {t['ratio']:.2f}x the rounds")


def fusion_weights(run: Run) -> dict:
    return {s["client"]: s["fusion_weights"] for s in run.summary["clients"] if s.get("fusion_weights")}


# --------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss(runs: list[Run], path: str) -> bool:
    series = [(r, loss_per_round(r)) for r in runs]
    if not any(s for _, s in series):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for r, s in series:
        for (client, adapter), pts in sorted(s.items()):
            name = f"client {client} {adapter}" + (f" ({r.method})" if len(runs) > 1 else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name)
    ax.set_xlabel("round (0 = personal stage)")
    ax.set_ylabel("mean training loss")
    ax.set_yscale("log")
    ax.set_title("Training loss per round per client")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_accuracy(runs: list[Run], path: str) -> bool:
    labels, clients, cells = comparison(runs)
    if not any("accuracy" in m for _, m in cells.values()):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(labels) * max(1, len(clients)) / 2), 4))
    width = 0.8 / max(1, len(clients))
    for j, c in enumerate(clients):
        xs = [i + (j - (len(clients) - 1) / 2) * width for i in range(len(labels))]
        ys = [cells[(l, c)][1].get("accuracy", 0.0) if (l, c) in cells else 0.0 for l in labels]
        ax.bar(xs, ys, width, label=f"client {c}")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([f"{l}\n({cells[(l, clients[0])][0]})" if (l, clients[0]) in cells else l for l in labels],
                       fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title("Accuracy by method and client")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_fusion(runs: list[Run], path: str) -> bool:
    rows = [(r, c, w) for r in runs for c, w in sorted(fusion_weights(r).items())]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows)), 3.5))
    names = [f"client {c}" + (f"\n{r.method}" if len(runs) > 1 else "") for r, c, _ in rows]
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [w["personal"] for _, _, w in rows], 0.4, label="w_personal")
    ax.bar([x + 0.2 for x in xs], [w["global"] for _, _, w in rows], 0.4, label="w_global")
    ax.axhline(0, color="black", lw=0.5)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_title("Fusion weights per client")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------- the report


def write_report(run_dirs: list[str], out_dir: str | None = None, title: str | None = None,
                 preamble: str = "") -> str:
    """Write REPORT.md and the plots; returns the path of REPORT.md."""
    if isinstance(run_dirs, str):
        run_dirs = [run_dirs]
    runs = [load_run(d) for d in run_dirs]
    out_dir = out_dir or (os.path.join(run_dirs[0], "report") if len(runs) == 1 else "report")
    os.makedirs(out_dir, exist_ok=True)
    parts = [f"# {title or ('Run report: ' + ', '.join(r.dir for r in runs))}", ""]
    if preamble:
        parts += [preamble, ""]
    for r in runs:
        s = r.summary
        parts.append(f"- `{r.dir}`: strategy **{r.method}**, {s.get('rounds')} rounds, world size "
                     f"{s.get('world_size')}, seed {r.config.get('seed')}, "
                     f"{_fmt(s.get('bytes_per_round'), 0)} B per round at the server, "
                     f"{_fmt(s.get('seconds_per_round'), 2)} s per round"
                     + (f"; {after_rounds_sentence(t)}" if (t := after_rounds(r)) else "")
                     + (f"; {privacy_sentence(s['privacy'])}" if s.get("privacy") else ""))
    parts.append("")
    if len(runs) > 1:
        parts += ["## Comparison (test accuracy of each method's headline adapter)", "",
                  comparison_table(runs), "",
                  "Headline adapter: the fused one for methods with a fusion phase, otherwise the one the "
                  "method evaluates. The mean is over clients, each counting once.", ""]
        for k in generation_columns(runs):
            parts += [f"### {k} of each method's headline adapter (greedy generation)", "",
                      comparison_table(runs, k), ""]
    parts += ["## Per client", "", per_client_table(runs), "",
              "Accuracy: each candidate response is scored by its summed log-likelihood and the best one is "
              "the prediction (`ClientEngine.evaluate`); loss: mean NLL per response token on the client's "
              "test split; optimizer steps: the steps the adapter took in the whole run (a fused adapter "
              "takes none of its own: its parts', personal + global)." + (" exact_match / rouge_l (eval.generate): the greedy answer to each test prompt "
                               "against its response, equal after whitespace normalisation / ROUGE-L F1 on "
                               "whitespace tokens (`fdlora_cluster/generation.py`)." if generation_columns(runs) else ""), ""]
    plots = [("loss_per_round.png", plot_loss, "Training loss per round per client"),
             ("accuracy_by_method.png", plot_accuracy, "Accuracy by method and client"),
             ("fusion_weights.png", plot_fusion, "Fusion weights per client")]
    drawn = [(f, cap) for f, fn, cap in plots if fn(runs, os.path.join(out_dir, f))]
    if drawn:
        parts += ["## Plots", ""] + [f"![{cap}]({f})\n" for f, cap in drawn]
    fw = [(r.method, c, w) for r in runs for c, w in sorted(fusion_weights(r).items())]
    if fw:
        parts += ["## Fusion weights", "", _md_table(("method", "client", "w_personal", "w_global"),
                                                     [(m, c, _fmt(w["personal"]), _fmt(w["global"])) for m, c, w in fw]), ""]
    path = os.path.join(out_dir, "REPORT.md")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
