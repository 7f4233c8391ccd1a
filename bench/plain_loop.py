"""The baseline a federated client's inner step is measured against: a plain DeepSpeed + PEFT loop.

One process, one rank: the config's base model (same dtype), ONE LoRA adapter with the config's
`lora.global` settings, the client's DeepSpeed config (ZeRO stage, bf16/fp16, optimizer, lr, micro
batch) and client 0's training rows, tokenised once before timing. No federation, no second adapter,
no per-step collation: what a user would write by hand. Prints one JSON line.

    python bench/plain_loop.py configs/demo.yaml --steps 50 --set model.pretrained=null
    DS_ACCELERATOR=cpu python bench/plain_loop.py configs/demo.yaml     # on CPU (gloo)

bench/step_ratio.py runs this and the federated job side by side and prints the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    ap.add_argument("--steps", type=int, default=50, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    ap.add_argument("--torch", action="store_true",
                    help="no DeepSpeed: torch.optim.AdamW on the LoRA parameters (the plain torch + PEFT loop)")
    ap.add_argument("--second-adapter", action="store_true",
                    help="carry a second, inactive LoRA in its own parameter group at lr 0, as the federated "
                         "client carries its personal adapter while it trains the global one")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from peft import get_peft_model

    from fdlora_cluster.config import load_config
    from fdlora_cluster.config import deepspeed_dict
    from fdlora_cluster.data import collate, get_tokenizer, load_clients
    from fdlora_cluster.model import build_base, lora_config
    from fdlora_cluster.rendezvous import skip_deepspeed_shm_op

    cfg = load_config(args.config, args.overrides)
    tok = get_tokenizer(cfg.model.path)
    rows = load_clients(cfg.data, len(cfg.client_sizes()), cfg.seed)[0].train
    base = build_base(cfg.model, cfg.seed, vocab_size=tok.vocab_size, dtype=cfg.base_dtype(0))
    model = get_peft_model(base, lora_config(cfg.lora.global_), adapter_name="global")
    if args.second_adapter:
        model.add_adapter("personal", lora_config(cfg.lora.personal))
        model.set_adapter("global")  # the personal adapter stays in the model, out of the forward
        for n, p in model.named_parameters():
            p.requires_grad = "lora_" in n  # set_adapter freezes the inactive adapter; the trainer keeps it a group
    ds = deepspeed_dict(cfg, 0)
    micro = ds["train_micro_batch_size_per_gpu"]

    gpu = cfg.client_backend() == "nccl"
    if args.torch:
        return torch_loop(args, cfg, tok, rows, model, micro, gpu)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    skip_deepspeed_shm_op()  # as the trainer does: an inference-only op, and a build lock that can hang the start
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo", auto_mpi_discovery=False, verbose=False,
                               init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    params = [{"params": [p for n, p in model.named_parameters() if p.requires_grad and ".global." in n]}]
    if args.second_adapter:  # the trainer's two groups: the trained adapter, and the other one at lr 0
        params.append({"params": [p for n, p in model.named_parameters() if ".personal." in n], "lr": 0.0})
    engine, *_ = deepspeed.initialize(model=model, config=ds, model_parameters=params)
    device = engine.device
    # tokenised once, on the device: the loop below is forward, backward, step and nothing else
    n_batches = max(1, len(rows) // micro)
    batches = [{k: v.to(device) for k, v in collate(tok, rows[i * micro:(i + 1) * micro] or rows[:micro],
                                                      cfg.train.max_seq_len).items()} for i in range(n_batches)]
    engine.train()

    def step(i):
        loss = engine(**batches[i % n_batches]).loss
        engine.backward(loss)
        engine.step()
        return loss

    for i in range(args.warmup):
        step(i)
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    float(loss)  # wait for the last step, as the federated client does when it logs a step's loss
    if gpu:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    print(json.dumps({"what": "plain DeepSpeed + PEFT loop", "second_adapter": args.second_adapter,
                      "seconds_per_step": seconds, "steps": args.steps,
                      "micro_batch": micro, "zero_stage": ds["zero_optimization"].get("stage", 0),
                      "dtype": cfg.base_dtype(0), "device": str(device),
                      "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}))
    return 0


def torch_loop(args, cfg, tok, rows, model, micro: int, gpu: bool) -> int:
    """The same loop without DeepSpeed: forward, backward, torch AdamW step, zero_grad."""
    import torch

    from fdlora_cluster.data import collate

    device = torch.device("cuda" if gpu else "cpu")
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=0.0)
    n_batches = max(1, len(rows) // micro)
    batches = [{k: v.to(device) for k, v in collate(tok, rows[i * micro:(i + 1) * micro] or rows[:micro],
                                                      cfg.train.max_seq_len).items()} for i in range(n_batches)]

    def step(i):
        loss = model(**batches[i % n_batches]).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    float(loss)
    if gpu:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.steps
    print(json.dumps({"what": "plain torch + PEFT loop", "seconds_per_step": seconds, "steps": args.steps,
                      "micro_batch": micro, "zero_stage": None, "dtype": cfg.base_dtype(0), "device": str(device),
                      "trainable_params": sum(p.numel() for p in params)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
