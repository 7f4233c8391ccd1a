"""Sweep the fusion search's settings on a finished fdlora run, in one process, with plain PEFT.

    python bench/fusion_sweep.py runs/dev-seed1/fdlora [--budget 20] [--split test]

For every client it loads the run's saved personal and global adapters, runs `search_weights` on
the client's search rows (`fusion.rows` of the run) for every objective x granularity x folds,
with the exact merge scored as the trainer scores it (both adapters active, each module scaled),
and reports the chosen weights' accuracy and loss on `--split` of the run's data. Use it on a run
with another seed than the one you report (a development split), so the defaults are not fitted
to the test rows they are reported on.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from fdlora_cluster.config import load_config  # noqa: E402
from fdlora_cluster.fusion import RowScores, modules_of, per_module, search_weights, weight_groups  # noqa: E402


def scorer(model, tok, max_len):
    from fdlora_cluster.data import Example, collate
    from fdlora_cluster.model import set_active

    def score(rows, cands, wm):
        set_active(model, ["personal", "global"], {a: {name: w[i] for name, w in wm.items()}
                                                   for a, i in (("personal", 0), ("global", 1))})

        def nll(batch_rows):
            b = collate(tok, batch_rows, max_len)
            with torch.no_grad():
                logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
            labels = b["labels"][:, 1:]
            mask = labels != -100
            t = -torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            return t.sum(-1).numpy(), mask.sum(-1).numpy()

        n, toks = nll(rows)
        cn, _ = nll([Example(ex.prompt, c) for ex in rows for c in cands])
        best = cn.reshape(len(rows), len(cands)).argmin(-1)
        right = np.array([float(cands[int(j)] == ex.response) for j, ex in zip(best, rows)])
        return RowScores(n, toks.astype(float), right)

    return score


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument("--budget", type=int, default=20)
    ap.add_argument("--split", default="test", choices=["test", "train"])
    args = ap.parse_args(argv)

    from peft import PeftModel

    from fdlora_cluster.data import get_tokenizer, load_clients
    from fdlora_cluster.model import build_base

    cfg = load_config(os.path.join(args.run_dir, "config.yaml"))
    f = cfg.fusion
    tok = get_tokenizer(cfg.model.path)
    clients = load_clients(cfg.data, len(cfg.client_sizes()), cfg.seed)
    settings = list(itertools.product(("loss", "accuracy", "mix"), ("adapter", "layer", "module"), (1, 4)))
    results = {s: [] for s in settings}
    anchors_eval = {}
    for data in clients:
        base = build_base(cfg.model, cfg.seed, tok.vocab_size)
        model = PeftModel.from_pretrained(base, os.path.join(args.run_dir, "adapters", f"client-{data.client}", "personal"),
                                          adapter_name="personal")
        model.load_adapter(os.path.join(args.run_dir, "adapters", "global"), adapter_name="global")
        model.eval()
        score = scorer(model, tok, cfg.train.max_seq_len)
        rows = data.fewshot if f.rows == "heldout" else data.train[: cfg.data.fewshot_rows]
        held = getattr(data, args.split)
        from safetensors.torch import load_file

        mods = modules_of(load_file(os.path.join(args.run_dir, "adapters", "global", "adapter_model.safetensors")))
        from fdlora_cluster.model import _lora_layers

        # PEFT saves keys under the module names it wraps, so they name the loaded model's layers
        names = {n: n for n, _ in _lora_layers(model)}
        assert set(mods) <= set(names), "saved adapter keys do not name the loaded model's LoRA layers"
        for a, w in (("personal", (1, 0)), ("global", (0, 1)), ("both", (1, 1))):
            s = score(held, data.candidates, {names[m]: w for m in mods})
            anchors_eval.setdefault(a, []).append((s.correct.mean(), s.nll.sum() / s.tokens.sum()))
        for objective, granularity, folds in settings:
            groups = weight_groups(mods, granularity)

            def fn(w):
                wm = per_module(w, groups)
                return score(rows, data.candidates, {names[m]: wm[m] for m in mods})

            res = search_weights(fn, len(groups), f.optimizer, args.budget, f.bounds, f.l1,
                                 seed=cfg.seed * 1009 + data.client, objective=objective, mix=f.mix, folds=folds)
            wm = per_module(res.weights, groups)
            s = score(held, data.candidates, {names[m]: wm[m] for m in mods})
            results[(objective, granularity, folds)].append(
                (s.correct.mean(), s.nll.sum() / s.tokens.sum(), res.chosen_by, res.accuracy))
    print(f"run {args.run_dir}: seed {cfg.seed}, budget {args.budget}, l1 {f.l1}; scored on its {args.split} split\n")
    print(f"| setting | mean {args.split} accuracy | mean {args.split} loss | per client accuracy | chosen by |")
    print("|---|---|---|---|---|")
    for a, v in anchors_eval.items():
        print(f"| anchor {a} | {np.mean([x[0] for x in v]):.3f} | {np.mean([x[1] for x in v]):.4f} | "
              + ", ".join(f"{x[0]:.3f}" for x in v) + " | - |")
    for (objective, granularity, folds), v in results.items():
        print(f"| {objective} / {granularity} / folds {folds} | {np.mean([x[0] for x in v]):.3f} | "
              f"{np.mean([x[1] for x in v]):.4f} | " + ", ".join(f"{x[0]:.3f}" for x in v) + " | "
              + ", ".join(x[2] for x in v) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
