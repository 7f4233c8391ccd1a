"""`fdlora-cluster pretrain`: a short full pretraining of the tiny base on the scenario's general text.

Why: LoRA on a frozen *random* base learns nothing (notes/scenario.md: the loss stays flat for
400 steps), so the demo's base must first learn the byte-level line format. The corpus is
`data.scenario.general_text`: the same log-line format with anomaly words used nowhere else, so
the base learns the task's shape but none of the clients' rules (a base that already knows the
shared rule leaves the global adapter nothing to add).

The result is cached in `model.pretrained` (`model.safetensors`, `pretrain.json`, the tokenizer)
and reused while its recipe (model config, pretrain seed, steps, ...) is unchanged. The recipe
does not include the run's `seed`: runs with different seeds share one base (the base is part of
the setting, like a downloaded checkpoint would be). A relative `model.pretrained` is relative to
the working directory. Users with a real
checkpoint set `model.path` and skip this.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

RECIPE_FILE = "pretrain.json"
CORPUS = "logs-general-v2"  # bump when scenario.general_text changes
MAX_LEN = 64  # general-text rows are shorter than this


def recipe(cfg) -> dict:
    """Everything the cached base depends on; a change means the cache is stale."""
    m = cfg.model
    return {"config": m.config, "seed": m.pretrain_seed, "steps": m.pretrain_steps, "lr": m.pretrain_lr,
            "batch_size": m.pretrain_batch_size, "max_seq_len": MAX_LEN, "corpus": CORPUS}


def recipe_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(recipe(cfg), sort_keys=True).encode()).hexdigest()[:16]


def is_cached(cfg) -> bool:
    """True when `model.pretrained` holds a base made by the current recipe."""
    d = cfg.model.pretrained
    try:
        with open(os.path.join(d, RECIPE_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError, TypeError):
        return False
    return meta.get("hash") == recipe_hash(cfg) and os.path.isfile(os.path.join(d, "model.safetensors"))


def pretrain(cfg, log=print, force: bool = False) -> dict:
    """Train the base of `cfg.model.config` on the general text and save it to `model.pretrained`.

    Single process, CPU or one GPU; a few minutes at most for the demo's size. Returns the recipe
    record written to `pretrain.json` (with the final loss and the seconds taken)."""
    import torch
    from safetensors.torch import save_file

    from .data import collate, general_text, get_tokenizer
    from .model import build_base

    m = cfg.model
    if m.config is None or not m.pretrained:
        raise ValueError("pretrain needs model.config (the base to build) and model.pretrained (where to save it)")
    if not force and is_cached(cfg):
        log(f"pretrain: {m.pretrained} is up to date (recipe {recipe_hash(cfg)}); nothing to do")
        with open(os.path.join(m.pretrained, RECIPE_FILE)) as f:
            return json.load(f)
    tok = get_tokenizer(None)
    base_cfg = type(m)(**{**m.__dict__, "pretrained": None})  # the random init, not the (stale) cache
    model = build_base(base_cfg, m.pretrain_seed, vocab_size=tok.vocab_size, dtype="float32")  # cached in fp32
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).train()
    for p in model.parameters():
        p.requires_grad_(True)
    rows = general_text(m.pretrain_steps * m.pretrain_batch_size, m.pretrain_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=m.pretrain_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.1, 1 - s / m.pretrain_steps))
    g = torch.Generator().manual_seed(m.pretrain_seed)
    t0, loss_avg = time.perf_counter(), None
    log(f"pretrain: {m.pretrain_steps} steps x {m.pretrain_batch_size} rows of general log text -> {m.pretrained}")
    for step in range(m.pretrain_steps):
        idx = torch.randint(len(rows), (m.pretrain_batch_size,), generator=g).tolist()
        batch = {k: v.to(device) for k, v in collate(tok, [rows[i] for i in idx], MAX_LEN).items()}
        # the whole row is text here (prompt included): the base learns the line format itself
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_avg = loss.item() if loss_avg is None else 0.9 * loss_avg + 0.1 * loss.item()
        if (step + 1) % max(1, m.pretrain_steps // 5) == 0 or step + 1 == m.pretrain_steps:
            log(f"pretrain: step {step + 1}/{m.pretrain_steps} loss {loss_avg:.4f} ({time.perf_counter() - t0:.0f}s)")
    os.makedirs(m.pretrained, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # tied embeddings share storage; safetensors refuses shared tensors, so store copies
    state = {k: v.clone() for k, v in state.items()}
    tmp = os.path.join(m.pretrained, "model.safetensors.tmp")
    save_file(state, tmp)
    os.replace(tmp, os.path.join(m.pretrained, "model.safetensors"))
    tok.save_pretrained(m.pretrained)
    meta = {"hash": recipe_hash(cfg), "recipe": recipe(cfg), "final_loss": loss_avg,
            "seconds": time.perf_counter() - t0}
    with open(os.path.join(m.pretrained, RECIPE_FILE + ".tmp"), "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(m.pretrained, RECIPE_FILE + ".tmp"), os.path.join(m.pretrained, RECIPE_FILE))
    log(f"pretrain: done in {meta['seconds']:.0f}s, loss {loss_avg:.4f}; saved {m.pretrained}")
    return meta


def ensure_pretrained(cfg, log=print) -> None:
    """Pretrain the base once, in this process, when the config wants a cached base that is missing
    or stale (the hook `fdlora-cluster launch` calls before starting the ranks)."""
    if cfg.model.config is not None and cfg.model.pretrained and not is_cached(cfg):
        pretrain(cfg, log=log)

