"""Flower's side of bench/flower_compare.py: FedAvg of one LoRA adapter with Flower's gRPC runtime.

One server process (Flower's built-in FedAvg strategy) and one process per client
(`flwr.client.start_client` with a NumPyClient), on localhost. The work is exactly our `fedavg` job's:
the same base (built by fdlora_cluster.model.build_base from the same config and seed), the same
LoRA (`lora.global` of the config, via PEFT), the same rows (client c's training rows from
fdlora_cluster.data, taken in order, batches collated by the same `collate`), `train.inner_steps`
AdamW steps of `train.micro_batch_size` rows per round at `train.lr`, the optimizer fresh each round
(our clients also restart AdamW each round). Written the way a Flower user would write it:
the DataLoader-style per-step collation, a plain torch loop.

    python bench/flower_fedavg.py server CONFIG --port P --out TIMES.json [--set K=V ...]
    python bench/flower_fedavg.py client CONFIG --port P --client C [--set K=V ...]

Run with a Python that has `flwr` (bench/flower_compare.py makes .venv-flower); flwr is a
benchmark tool here, not a dependency of the package. The server writes per-round wall times
(configure_fit of round t to the end of aggregate_fit of round t, as our server measures a
round: from sending the global adapter to having aggregated) and the clients' fit seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build(cfg, client: int | None):
    """The base + one LoRA, and (for a client) its rows, exactly as our job builds them."""
    import torch
    from peft import get_peft_model

    from fdlora_cluster.data import get_tokenizer, load_clients
    from fdlora_cluster.model import build_base, lora_config

    tok = get_tokenizer(cfg.model.path)
    base = build_base(cfg.model, cfg.seed, vocab_size=tok.vocab_size, dtype=cfg.base_dtype(0))
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = get_peft_model(base, lora_config(cfg.lora.global_))
    rows = None if client is None else load_clients(cfg.data, len(cfg.client_sizes()), cfg.seed)[client].train
    return tok, model, rows


def lora_state(model):
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def serve(cfg, port: int, out: str) -> None:
    import flwr as fl
    from flwr.common import ndarrays_to_parameters

    _, model, _ = build(cfg, None)
    initial = ndarrays_to_parameters([v.numpy() for v in lora_state(model).values()])
    n = len(cfg.client_sizes())
    times: dict = {"round_seconds": [], "client_fit_seconds": []}

    class TimedFedAvg(fl.server.strategy.FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            self._t0 = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"round {server_round}: {len(failures)} client failure(s): {failures[:1]}")
            agg = super().aggregate_fit(server_round, results, failures)
            times["round_seconds"].append(time.perf_counter() - self._t0)
            times["client_fit_seconds"].append(sorted(r.metrics["seconds"] for _, r in results))
            return agg

    strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
                           min_evaluate_clients=0, initial_parameters=initial)
    fl.server.start_server(server_address=f"127.0.0.1:{port}",
                           config=fl.server.ServerConfig(num_rounds=cfg.train.rounds), strategy=strategy)
    with open(out, "w") as f:
        json.dump(times, f)


def client(cfg, port: int, cid: int) -> None:
    import flwr as fl
    import torch

    from fdlora_cluster.data import collate

    tok, model, rows = build(cfg, cid)
    model.train()
    keys = list(lora_state(model))
    params = [p for p in model.parameters() if p.requires_grad]
    micro, steps = cfg.train.micro_batch_size, cfg.train.inner_steps
    cursor = [0]

    class LoraClient(fl.client.NumPyClient):
        def fit(self, parameters, config):
            model.load_state_dict({k: torch.from_numpy(v) for k, v in zip(keys, parameters)}, strict=False)
            opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0)
            t0 = time.perf_counter()
            for _ in range(steps):
                batch = [rows[(cursor[0] + i) % len(rows)] for i in range(micro)]
                cursor[0] += micro
                loss = model(**collate(tok, batch, cfg.train.max_seq_len)).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - t0
            return [v.numpy() for v in lora_state(model).values()], steps * micro, {"seconds": seconds}

    fl.client.start_client(server_address=f"127.0.0.1:{port}", client=LoraClient().to_client())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("role", choices=("server", "client"))
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--client", type=int, default=0)
    ap.add_argument("--out", default="flower-times.json")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from fdlora_cluster.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.role == "server":
        serve(cfg, args.port, args.out)
    else:
        client(cfg, args.port, args.client)
    return 0


if __name__ == "__main__":
    sys.exit(main())
