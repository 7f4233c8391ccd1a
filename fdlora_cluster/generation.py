"""Evaluation by generation, for tasks without labels: greedy decoding of each test row's prompt,
scored against the row's response by exact match and ROUGE-L F1 (eval.generate; docs/DATA.md).

The metrics are pure functions on strings (tested against hand-computed values); `greedy_decode`
runs any causal LM given as a forward callable. evaluation.generation_metrics runs it on a client
engine, collective over the client's ranks like the rest of the scoring.

Why our own greedy loop and not `model.generate`: under ZeRO-3 every forward gathers partitioned
parameters collectively, so every rank of the client must run the same number of forwards. Here
each batch keeps decoding until no row on any rank of the client is unfinished (one small
allreduce per step), ranks with fewer rows pad with a repeat row, and the loop is short enough to
read and to check against a plain argmax loop (tests/test_generation.py).
"""

from __future__ import annotations

import inspect

import torch

from .data import Example
from .data.examples import segments

METRICS = ("exact_match", "rouge_l")


# --------------------------------------------------------------------------- metrics on strings


def normalize(text: str) -> str:
    """What exact match compares: leading and trailing whitespace stripped, every inner run of
    whitespace one space. Case and punctuation are kept (a label's spelling is part of the answer)."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on whitespace tokens (Lin 2004, with beta = 1): LCS / len as precision and recall.
    Two empty strings agree (1.0); one empty string against a non-empty one scores 0.0."""
    p, r = prediction.split(), reference.split()
    if not p or not r:
        return float(not p and not r)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------- decoding


def prompt_ids(tok, ex: Example, max_len: int) -> list[int]:
    """The tokens the model sees before the response, as in training: every segment of the row
    but the last trained one (a chat row's context with its assistant header), cut from the left
    to `max_len`. An empty prompt starts from eos (a token the model has seen end a row)."""
    ids = [i for s, _ in segments(tok, ex)[:-1] for i in s]
    return ids[-max_len:] or [tok.eos_id]


def cached_forward(module, model):
    """forward(input_ids, attention_mask, position_ids, cache) -> (logits, cache) for greedy_decode,
    calling `module` (the model, or the DeepSpeed engine around it). `model` is the PEFT model, whose
    base says what the cache keyword is: `cache` since transformers 5.x renamed `past_key_values`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    key = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def forward(input_ids, attention_mask, position_ids, cache):
        out = module(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=True, **{key: cache})
        return out.logits, getattr(out, key)
    return forward


@torch.no_grad()
def greedy_decode(forward, prompts: list[list[int]], max_new_tokens: int, eos_id: int, pad_id: int,
                  device="cpu", keep_going=None) -> list[list[int]]:
    """Greedy continuation of each prompt: at most `max_new_tokens` tokens, cut before the first eos.

    `forward(input_ids, attention_mask, position_ids, cache)` returns (logits, cache), the cache
    None at the first step (`cached_forward` makes one from a model). Prompts are left-padded so
    new tokens line up; position ids count real tokens only, so a padded row decodes as it would
    alone. `keep_going(unfinished)` gets whether this batch still has a row to decode and says
    whether to run another step (default: the same); the client's ranks use it to agree, so all
    run the same number of forwards."""
    keep_going = keep_going or (lambda unfinished: unfinished)
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = [[] for _ in prompts]
    done = torch.zeros(n, dtype=torch.bool)
    cache, step_ids, step_pos = None, ids, pos
    for _ in range(max_new_tokens):
        if not keep_going(bool((~done).any())):
            break
        logits, cache = forward(step_ids, mask, step_pos, cache)
        nxt = logits[:, -1].float().argmax(-1).cpu()
        for i in range(n):
            if not done[i]:
                if int(nxt[i]) == eos_id:
                    done[i] = True
                else:
                    out[i].append(int(nxt[i]))
        step_ids = nxt.view(n, 1).to(device)
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
    return out
