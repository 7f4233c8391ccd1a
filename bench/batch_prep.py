"""Per-step batch preparation in a client's training loop: tokenising and padding each step's rows
against padding rows tokenised once (what ClientEngine._train_batch does).

    python bench/batch_prep.py configs/demo.yaml         # the demo's byte-level tokenizer
    python bench/batch_prep.py configs/demo.yaml --set model.config=null --set model.pretrained=null \
        --set model.path=runs/smollm2-135m               # SmolLM2's BPE tokenizer (bench/smollm2.py)

Prints one JSON line: milliseconds per batch of `train.micro_batch_size` rows (one forward), on
client 0's rows: `before_ms` the engine's previous per-step batch (`collate_before`),
`tokenise_and_pad_ms` today's `collate`, `pad_only_ms` the engine's batch of rows tokenised once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fdlora_cluster.config import load_config  # noqa: E402
from fdlora_cluster.data import (IGNORE_INDEX, collate, encode_example, get_tokenizer, load_clients,  # noqa: E402
                                 pad_batch)


def collate_before(tok, rows, max_len: int):
    """The engine's per-step batch until 2026-11-27, kept for the comparison: every row tokenised
    again, and one small tensor per row and field."""
    import torch

    enc = [encode_example(tok, ex, max_len) for ex in rows]
    width = max(len(i) for i, _ in enc)
    ids = torch.full((len(enc), width), tok.pad_id, dtype=torch.long)
    labels = torch.full((len(enc), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for k, (i, lab) in enumerate(enc):
        ids[k, : len(i)] = torch.tensor(i)
        labels[k, : len(lab)] = torch.tensor(lab)
        mask[k, : len(i)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def per_batch_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    ap.add_argument("--repeats", type=int, default=500)
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    tok = get_tokenizer(cfg.model.path)
    rows = load_clients(cfg.data, len(cfg.client_sizes()), cfg.seed)[0].train[:cfg.train.micro_batch_size]
    max_len = cfg.train.max_seq_len
    encoded = [encode_example(tok, ex, max_len) for ex in rows]
    print(json.dumps({
        "tokenizer": type(tok).__name__, "model": cfg.model.path, "rows": len(rows),
        "before_ms": round(per_batch_ms(lambda: collate_before(tok, rows, max_len), args.repeats), 3),
        "tokenise_and_pad_ms": round(per_batch_ms(lambda: collate(tok, rows, max_len), args.repeats), 3),
        "pad_only_ms": round(per_batch_ms(lambda: pad_batch(tok, encoded), args.repeats), 3)}))


if __name__ == "__main__":
    main()
