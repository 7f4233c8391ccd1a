"""Candidate scoring, full rows against each prompt run once (evaluation.score_batch), on one process:
the same NLLs and picks, and the time of each, on a config's own model, tokenizer and rows.

    python bench/scoring.py --set model.path=runs/smollm2-135m          # configs/real-smollm2.yaml

For client 0's few-shot rows against its own labels (what one fusion evaluation scores) and its test
rows against every client's labels (the final evaluation), in batches of train.eval_batch_size:
  - token check: how many rows' candidates share one prefix (more than one group: the prompt is cut by
    max_seq_len), and how many (row, candidate) pairs a tokenizer would split differently if the text
    were encoded whole (the trainer encodes prompt and response apart; its tokens are the truth);
  - max |NLL difference| over all (row, candidate) pairs, and whether every row picks the same candidate;
  - seconds of each path (the median of --repeat), with the load average beside them.
The adapters are the config's, their B set to seeded noise (scale --scale) so that both change the output.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/real-smollm2.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--scale", type=float, default=0.02)
    args = ap.parse_args(argv)

    import torch

    from fdlora_cluster.config import load_config
    from fdlora_cluster.data import Example, encode_example, get_tokenizer, load_clients
    from fdlora_cluster.evaluation import Stripes, prefix_groups, score_batch, sequence_nll
    from fdlora_cluster.model import adapter_params, add_adapters, build_base, set_active
    from fdlora_cluster.state import GLOBAL, PERSONAL

    cfg = load_config(args.config, overrides=args.set)
    tok = get_tokenizer(cfg.model.path)
    model = add_adapters(build_base(cfg.model, cfg.seed, vocab_size=tok.vocab_size),
                         {PERSONAL: cfg.lora.personal, GLOBAL: cfg.lora.global_}, cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    for name in (PERSONAL, GLOBAL):
        for p in adapter_params(model, name).values():
            p.data = args.scale * torch.randn(p.shape, generator=g)
    model.eval()
    set_active(model, [PERSONAL, GLOBAL], {PERSONAL: 0.6, GLOBAL: 0.4})
    engine = types.SimpleNamespace(engine=model, model=model, tok=tok, cfg=cfg, device=torch.device("cpu"),
                                   size=1, local_rank=0,
                                   comm=types.SimpleNamespace(allreduce=lambda x: x, allgather=lambda x: [x]))
    data = load_clients(cfg.data, len(cfg.topology.clients), cfg.seed)[0]
    n, bs = cfg.train.max_seq_len, cfg.train.eval_batch_size
    load = os.getloadavg()
    print(f"model {cfg.model.path}, max_seq_len {n}, eval_batch_size {bs}, threads {torch.get_num_threads()}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for what, rows, cands in (("fusion evaluation (few-shot, own labels)", data.fewshot, data.candidates),
                              ("final evaluation (test, all labels)", data.test, data.candidates_all)):
        split = sum(len(prefix_groups([encode_example(tok, Example(r.prompt, c), n) for c in cands])) > 1 for r in rows)
        whole = sum(tok.encode(r.prompt + c) != tok.encode(r.prompt) + tok.encode(c) for r in rows for c in cands)
        batches = [idx for idx, _ in Stripes(engine, len(rows)).batches(bs)]

        def full():  # what scored_batches ran before: the rows, then one full row per row and candidate
            out = []
            for idx in batches:
                sequence_nll(engine, [rows[i] for i in idx])
                out.append(sequence_nll(engine, [Example(rows[i].prompt, c) for i in idx for c in cands])[0]
                           .view(len(idx), len(cands)))
            return torch.cat(out)

        def shared():  # scored_batches now: the same two forwards, the second on the candidates' tokens
            return torch.cat([score_batch(engine, [rows[i] for i in idx], idx, cands)[2] for idx in batches])

        times = {}
        with torch.no_grad():
            for name, fn in (("full rows", full), ("prompt once", shared)):
                secs = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    out = fn()
                    secs.append(time.perf_counter() - t)
                times[name] = (statistics.median(secs), out)
        a, b = times["full rows"][1], times["prompt once"][1]
        print(f"{what}: {len(rows)} rows x {len(cands)} candidates; rows split by max_seq_len {split}; "
              f"pairs a whole-text encoding would split differently {whole}")
        print(f"  max |NLL difference| {float((a - b).abs().max()):.2e}; same pick on every row: "
              f"{bool((a.argmin(-1) == b.argmin(-1)).all())}")
        print(f"  seconds (median of {args.repeat}): full rows {times['full rows'][0]:.2f}, "
              f"prompt once {times['prompt once'][0]:.2f} ({times['full rows'][0] / times['prompt once'][0]:.1f}x)")
    load = os.getloadavg()
    print(f"load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
