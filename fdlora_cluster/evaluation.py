"""FedDPA's instance-wise dynamic weighting of the two adapters at test time.

Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models" (NeurIPS 2024), as their
code computes it (Lydia-yang/FedDPA, GlobalModel_generated.py, `get_weight` and `set_local`):

    for a test row x, with the local (personal) adapter alone active:
        r(x)   = last-layer hidden state of x's prompt at its last token   (or the mean over tokens)
        w_g(x) = max_global_weight * mean_{j in S(x)} cos(r(x), r(x_j))   S(x): k random training rows
        output = base + w_g(x) * global(x) + (1 - w_g(x)) * local(x)         (per LoRA layer)

The pure pieces (`instance_global_weights`, `reference_sample`) are tested against a hand
computation; `representations` and `evaluate_instance_weighted` run on a ClientEngine and are
collective over the client's ranks, like `ClientEngine.evaluate`, whose scoring they repeat with
one weight per row instead of one per call.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from .data import Example
from .model import set_active
from .state import GLOBAL, PERSONAL


def reference_sample(num_train: int, num_test: int, k: int, seed: int, client: int) -> np.ndarray:
    """[num_test, k] indices of the training rows each test row is compared with: k distinct rows
    per test row (all of them when there are fewer), seeded per client so every rank and every run
    draws the same (the authors draw them with an unseeded random.sample per test row)."""
    k = min(k, num_train)
    rng = np.random.default_rng([seed, client, 1])  # its own stream, apart from the batch streams
    if num_test == 0:
        return np.zeros((0, k), dtype=np.int64)
    return np.stack([rng.choice(num_train, size=k, replace=False) for _ in range(num_test)])


def instance_global_weights(test_reps: torch.Tensor, train_reps: torch.Tensor, sample: np.ndarray,
                            max_global_weight: float) -> torch.Tensor:
    """w_g per test row: max_global_weight * mean cosine similarity of the row's representation to
    its sampled training rows' representations. [num_test] float64; the local weight is 1 - w_g."""
    t = torch.nn.functional.normalize(test_reps.double(), dim=-1)
    r = torch.nn.functional.normalize(train_reps.double(), dim=-1)
    idx = torch.as_tensor(sample, dtype=torch.long)
    cos = (r[idx] * t[:, None, :]).sum(-1)  # [num_test, k]
    return max_global_weight * cos.mean(-1)


def _prompt_batch(tok, prompts: list[str], max_len: int):
    """Right-padded prompt-only ids (cut from the left like training rows) and each row's length."""
    enc = [tok.encode(p)[-max_len:] or [tok.pad_id] for p in prompts]
    width = max(len(e) for e in enc)
    ids = torch.full((len(enc), width), tok.pad_id, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.tensor(e)
        mask[i, :len(e)] = 1
    return ids, mask


@torch.no_grad()
def representations(engine, rows: list[Example], adapter: str = PERSONAL, how: str = "last") -> torch.Tensor:
    """[len(rows), hidden] representations of the rows' prompts with `adapter` alone active, on
    every rank of the client (each rank embeds its share; the shares are all-gathered over MPI)."""
    set_active(engine.model, adapter)
    engine.engine.eval()
    size, me = engine.size, engine.local_rank
    mine = list(range(me, len(rows), size))
    per_rank = -(-len(rows) // size)
    bs = engine.cfg.train.eval_batch_size
    out: list[np.ndarray] = []
    for start in range(0, per_rank, bs):
        chunk = mine[start:start + bs]
        real = len(chunk)
        # every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively)
        chunk = chunk + [0] * (min(bs, per_rank - start) - real)
        ids, mask = _prompt_batch(engine.tok, [rows[i].prompt for i in chunk], engine.cfg.train.max_seq_len)
        hidden = engine.engine(input_ids=ids.to(engine.device), attention_mask=mask.to(engine.device),
                               output_hidden_states=True).hidden_states[-1].float().cpu()
        if how == "last":  # right padding: the last real token is at length - 1
            rep = hidden[torch.arange(len(chunk)), mask.sum(-1) - 1]
        else:  # mean over real tokens (the authors' "avg" also averages pads; we leave them out)
            rep = (hidden * mask[..., None]).sum(1) / mask.sum(-1, keepdim=True)
        out.extend(rep[:real].numpy())
    gathered = [(i, v) for idx, vecs in engine.comm.allgather((mine, out)) for i, v in zip(idx, vecs)]
    reps = torch.zeros(len(rows), len(gathered[0][1]) if gathered else 0)
    for i, v in gathered:
        reps[i] = torch.as_tensor(v)
    return reps


@contextlib.contextmanager
def row_weighted_branches(model, weights: dict[str, list]):
    """Inside the block, each named adapter's LoRA output is multiplied row by row by
    `weights[name][0]` (a [batch] tensor the caller sets before each forward)."""
    from peft.tuners.lora import LoraLayer

    def hook_for(name):
        def hook(_mod, _args, out):
            w = weights[name][0].to(out.device, out.dtype)
            return out * w.view(-1, *([1] * (out.dim() - 1)))
        return hook

    handles = [mod.lora_B[n].register_forward_hook(hook_for(n))
               for mod in model.modules() if isinstance(mod, LoraLayer) for n in weights if n in mod.lora_B]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def evaluate_instance_weighted(engine, rows: list[Example], w_global: torch.Tensor,
                               candidates: list[str] | None = None, generate: bool = True) -> dict:
    """Loss, perplexity and (with candidates) accuracy on `rows` with both adapters active, row i
    weighted w_global[i] * global + (1 - w_global[i]) * personal. Same scoring, striping and
    padding across the client's ranks as ClientEngine.evaluate; with eval.generate (and `generate`)
    also its exact_match and rouge_l, each row decoded under its own weights."""
    set_active(engine.model, [PERSONAL, GLOBAL])  # plain alpha / r scaling; the row weights come on top
    engine.engine.eval()
    size, me = engine.size, engine.local_rank
    mine = list(range(me, len(rows), size))
    per_rank = -(-len(rows) // size)
    bs = engine.cfg.train.eval_batch_size
    cands = candidates or []
    current = {GLOBAL: [None], PERSONAL: [None]}
    nll_sum = tok_sum = correct = n = 0.0
    gen = {}
    with row_weighted_branches(engine.model, current):
        for start in range(0, per_rank, bs):
            idx = mine[start:start + bs]
            real = len(idx)
            idx = idx + [0] * (min(bs, per_rank - start) - real)
            chunk = [rows[i] for i in idx]
            w = w_global[idx].float()
            current[GLOBAL][0], current[PERSONAL][0] = w, 1.0 - w
            nll, toks = engine._sequence_nll(chunk)
            nll_sum += float(nll[:real].sum())
            tok_sum += float(toks[:real].sum())
            n += real
            if cands:
                scored = [Example(ex.prompt, c) for ex in chunk for c in cands]
                wc = w.repeat_interleave(len(cands))
                current[GLOBAL][0], current[PERSONAL][0] = wc, 1.0 - wc
                cn, _ = engine._sequence_nll(scored)
                best = cn.view(len(chunk), len(cands)).argmin(-1)
                correct += sum(1 for i in range(real) if cands[int(best[i])] == chunk[i].response)
        if generate and engine.cfg.eval.generate:
            from .generation import generation_metrics

            def set_row_weights(idx):  # the batch's rows keep their weights at every decoding step
                w = w_global[idx].float()
                current[GLOBAL][0], current[PERSONAL][0] = w, 1.0 - w

            gen = generation_metrics(engine, rows, before_batch=set_row_weights)
    nll_sum, tok_sum, correct, n = engine.comm.allreduce(np.array([nll_sum, tok_sum, correct, n]))
    loss = nll_sum / max(tok_sum, 1.0)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "rows": int(n)}
    if cands:
        out["accuracy"] = correct / max(n, 1.0)
    out.update(gen)
    return out


def dynamic_weights(engine, test: list[Example], train: list[Example], cfg_feddpa, seed: int, client: int) -> torch.Tensor:
    """w_g for every test row (collective over the client's ranks; the same on every rank)."""
    sample = reference_sample(len(train), len(test), cfg_feddpa.reference_rows, seed, client)
    used = np.unique(sample)  # embed only the training rows some test row is compared with
    test_reps = representations(engine, test, PERSONAL, cfg_feddpa.representation)
    used_reps = representations(engine, [train[i] for i in used], PERSONAL, cfg_feddpa.representation)
    train_reps = torch.zeros(len(train), used_reps.shape[1])
    train_reps[torch.as_tensor(used, dtype=torch.long)] = used_reps
    return instance_global_weights(test_reps, train_reps, sample, cfg_feddpa.max_global_weight)
