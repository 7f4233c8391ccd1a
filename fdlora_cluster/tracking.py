"""Experiment tracking: the run's numbers as scalars in TensorBoard (and W&B / MLflow when asked),
written by the server, which has every round's record as it happens and every client's records at
the end of the job (train.finish gathers them).

Tags (step = the round; a client's evaluation and fusion, which follow the rounds, at step = rounds):

    round/seconds, round/bytes_sent, round/bytes_received,         the server, each round, as it ends
    round/global_change, round/updates
    client<i>/train_loss/<adapter>, client<i>/train_seconds/<adapter>   each training phase (personal
                                                                   stage: step 0; after the rounds:
                                                                   rounds + 1)
    client<i>/eval/<adapter>/<metric>                              loss, perplexity, accuracy, ...
    client<i>/fusion/w_personal, client<i>/fusion/w_global         the fusion weights (their means)
    client<i>/bytes_total, client<i>/bytes_per_round               what its leader sent and received

The numbers are the ones metrics.jsonl and summary.json hold (tests compare them).
"""

from __future__ import annotations

import importlib.util
import os

PACKAGES = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}  # log.<key>: the package it needs


def missing_packages(log_cfg) -> list[tuple[str, str]]:
    """(log key, package) for each tracker the config asks for whose package is not installed."""
    return [(key, pkg) for key, pkg in PACKAGES.items()
            if getattr(log_cfg, key) and importlib.util.find_spec(pkg) is None]


def scalars(rec: dict, rounds: int) -> list[tuple[str, float, int]]:
    """(tag, value, step) for one metrics record (the tags in the module docstring)."""
    event, c = rec["event"], rec.get("client")
    if event == "round":
        t = rec["round"]
        return [("round/seconds", rec["seconds"], t), ("round/bytes_sent", rec["server_bytes_sent"], t),
                ("round/bytes_received", rec["server_bytes_received"], t),
                ("round/global_change", rec["global_change"], t), ("round/updates", len(rec["clients"]), t)]
    if event == "train" and rec.get("loss") is not None:
        a, t = rec["adapter"], rec["round"]
        return [(f"client{c}/train_loss/{a}", rec["loss"], t), (f"client{c}/train_seconds/{a}", rec["seconds"], t)]
    if event == "eval":
        skip = {"time", "rank", "round", "client", "rows"}
        return [(f"client{c}/eval/{rec['adapter']}/{k}", float(v), rounds) for k, v in rec.items()
                if k not in skip and _number(v)]
    if event == "fusion":
        return [(f"client{c}/fusion/w_personal", rec["w_personal"], rounds),
                (f"client{c}/fusion/w_global", rec["w_global"], rounds)]
    return []


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class Tracker:
    """The trackers the `log` config asks for, on the server rank; a no-op when it asks for none."""

    def __init__(self, cfg, run_dir: str):
        self.rounds = cfg.train.rounds
        self.sinks = []
        if cfg.log.tensorboard:
            self.sinks.append(_TensorBoard(os.path.join(run_dir, "tensorboard")))
        if cfg.log.wandb:
            self.sinks.append(_WandB(cfg, run_dir))
        if cfg.log.mlflow:
            self.sinks.append(_MLflow(cfg, run_dir))

    def record(self, rec: dict) -> None:
        for tag, value, step in scalars(rec, self.rounds):
            for s in self.sinks:
                s.add(tag, float(value), step)

    def summary(self, summary: dict) -> None:
        for cl in summary["clients"]:
            for k in ("bytes_total", "bytes_per_round"):
                for s in self.sinks:
                    s.add(f"client{cl['client']}/{k}", float(cl[k]), self.rounds)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


class _TensorBoard:
    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter  # light: numpy and protobuf, no TensorFlow, no tensorboard

        self.w = SummaryWriter(logdir=logdir)

    def add(self, tag, value, step):
        self.w.add_scalar(tag, value, step)

    def close(self):
        self.w.close()


class _WandB:
    """W&B wants its own step to grow; the round is logged as a metric and is every chart's x-axis,
    so the clients' records, which arrive at the end, land at their rounds too."""

    def __init__(self, cfg, run_dir: str):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=cfg.log.project, name=os.path.basename(os.path.abspath(run_dir)),
                              dir=run_dir, config=cfg.to_dict())
        self.run.define_metric("round")
        self.run.define_metric("*", step_metric="round")

    def add(self, tag, value, step):
        self.run.log({tag: value, "round": step})

    def close(self):
        self.run.finish()


class _MLflow:
    def __init__(self, cfg, run_dir: str):
        import mlflow

        self.mlflow = mlflow
        mlflow.set_experiment(cfg.log.project)
        mlflow.start_run(run_name=os.path.basename(os.path.abspath(run_dir)))

    def add(self, tag, value, step):
        self.mlflow.log_metric(tag, value, step=step)

    def close(self):
        self.mlflow.end_run()
