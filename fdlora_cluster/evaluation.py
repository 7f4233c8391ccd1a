"""Scoring on a client engine: loss, perplexity and candidate accuracy (`evaluate`), the fusion
search's per-row scores (`score_rows`), FedDPA's instance-wise weighting (`dynamic_weights`,
`evaluate_instance_weighted`) and greedy-generation metrics (`generation_metrics`).

Every function that runs the model takes `engine`, the slice of a ClientEngine scoring uses:
`engine.engine` (the DeepSpeed engine, or any module, to call), `model` (the PEFT model), `tok`,
`cfg`, `device`, `comm` (the client's MPI communicator), `size` and `local_rank`
(tests/one_rank.py is a one-process one). They are collective over the client's ranks: the rows
are striped over the ranks by `Stripes`, and every rank runs the same number of forwards, because
under ZeRO-3 each forward gathers the partitioned parameters collectively.

FedDPA: Yang et al., "Dual-Personalizing Adapter for Federated Foundation Models" (NeurIPS 2024),
as their code computes it (Lydia-yang/FedDPA, GlobalModel_generated.py, `get_weight` and `set_local`):

    for a test row x, with the local (personal) adapter alone active:
        r(x)   = last-layer hidden state of x's prompt at its last token   (or the mean over tokens)
        w_g(x) = max_global_weight * mean_{j in S(x)} cos(r(x), r(x_j))   S(x): k random training rows
        output = base + w_g(x) * global(x) + (1 - w_g(x)) * local(x)         (per LoRA layer)

The pure pieces (`instance_global_weights`, `reference_sample`) are tested against a hand
computation; the decoding and the string metrics are generation.py's.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from .data import IGNORE_INDEX, Example, collate, encode_example
from .fusion import RowScores
from .generation import METRICS, cached_forward, exact_match, greedy_decode, prompt_ids, rouge_l
from .model import set_active
from .state import GLOBAL, PERSONAL
from .watchdog import beat


# --------------------------------------------------------------------------- rows over the client's ranks


class Stripes:
    """Rows 0..n-1 striped over the client's ranks: rank r takes rows r, r + size, r + 2 size, ...

    Every rank runs the same number of batches, so every rank runs the same number of forwards: a
    rank with fewer rows fills its batches up with row 0, whose results it drops."""

    def __init__(self, engine, n: int):
        self.comm, self.size, self.n = engine.comm, engine.size, n
        self.mine = list(range(engine.local_rank, n, engine.size))
        self.per_rank = -(-n // engine.size)  # the most rows any rank has

    def batches(self, batch_size: int):
        """This rank's rows in batches: (indices, real) per batch, `indices` the batch's row indices,
        of which the first `real` are this rank's own and the rest row 0, run only to keep step."""
        for start in range(0, self.per_rank, batch_size):
            beat()  # an evaluation batch is progress (watchdog.py)
            idx = self.mine[start:start + batch_size]
            real = len(idx)
            yield idx + [0] * (min(batch_size, self.per_rank - start) - real), real

    def gather(self, values: list) -> list:
        """One value per row, in row order, on every rank, from each rank's values of its own rows
        (in the order of `mine`, as `batches` gives them)."""
        out = [None] * self.n
        for r, theirs in enumerate(self.comm.allgather(values)):
            out[r::self.size] = theirs
        return out


# --------------------------------------------------------------------------- scoring


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed NLL of the labelled tokens (each predicted by the logits one position before),
    and their counts, on the CPU."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits, dim=-1)
    tok_nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
    return tok_nll.sum(-1).cpu(), mask.sum(-1).cpu()


@torch.no_grad()
def sequence_nll(engine, rows: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed NLL of the response tokens, and their token counts (one forward)."""
    batch = collate(engine.tok, rows, engine.cfg.train.max_seq_len)
    batch = {k: v.to(engine.device) for k, v in batch.items()}
    logits = engine.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_nll(logits, batch["labels"])


def prefix_groups(enc: list[tuple[list[int], list[int]]]) -> list[tuple[int, list[int]]]:
    """One row's candidate encodings (`encode_example`'s (ids, labels), the full-row tokens, which
    are the truth however the tokenizer splits the prompt from the candidate) grouped by the tokens
    they share before their first scored one: (prefix length P, the candidates' indices) per group,
    in order of first appearance. Usually one group (the prompt); more when the prompt is cut from
    the left by `max_seq_len`, which cuts it differently for candidates of different lengths. P >= 1
    (the first token is never scored: nothing predicts it), so a group's suffixes are ids[P:]."""
    groups: dict[tuple, list[int]] = {}
    for j, (ids, labels) in enumerate(enc):
        first = next((t for t, lab in enumerate(labels) if lab != IGNORE_INDEX), len(labels))
        groups.setdefault(tuple(ids[:max(first, 1)]), []).append(j)
    return [(len(key), members) for key, members in groups.items()]


@torch.no_grad()
def score_batch(engine, rows: list[Example], idx: list[int], candidates: list[str], weigh=None):
    """(nll, tokens, cand_nll) of a batch: `nll` and `tokens` per row as `sequence_nll` gives them,
    and `cand_nll` [len(rows), len(candidates)], each candidate's summed NLL as the response to the
    row's prompt, what `sequence_nll` gives for the full rows Example(row.prompt, candidate), with
    each prompt run once (None without candidates). Two forwards with candidates, one without,
    whatever the rows: the rows themselves (with any prefix (`prefix_groups`) that is not the start
    of its own row), then every candidate's remaining tokens batched, attending to its prefix's
    keys and values (the first forward's cache, indexed per candidate, masked past the prefix) at
    positions that continue the prefix's, so each token sees what it sees in the full row: the same
    forwards as scoring full rows, the second one on the candidates' tokens only.
    `weigh(indices)` is called before each forward with the row index (from `idx`) of each sequence."""
    tok, max_len, dev = engine.tok, engine.cfg.train.max_seq_len, engine.device
    own = [encode_example(tok, ex, max_len) for ex in rows]
    seqs, owner = [ids for ids, _ in own], list(range(len(rows)))  # the first forward's sequences
    suf = []  # (sequence, prefix length, candidate, ids, labels) per candidate and row
    for r, ex in enumerate(rows):
        enc = [encode_example(tok, Example(ex.prompt, c), max_len) for c in candidates]
        for p, members in prefix_groups(enc):
            prefix = enc[members[0]][0][:p]
            if seqs[r][:p] == prefix:  # its own row starts so: its keys and values up to p serve
                s = r
            else:  # a chat row, or a prompt cut otherwise than for the row's own response
                s = len(seqs)
                seqs.append(prefix)
                owner.append(r)
            suf.extend((s, p, j, enc[j][0][p:], enc[j][1][p:]) for j in members)
    forward = cached_forward(engine.engine, engine.model)
    width = max(len(q) for q in seqs)
    ids = torch.tensor([q + [tok.pad_id] * (width - len(q)) for q in seqs], dtype=torch.long)
    mask = torch.tensor([[1] * len(q) + [0] * (width - len(q)) for q in seqs], dtype=torch.long)
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in own], dtype=torch.long)
    if weigh is not None:
        weigh([idx[r] for r in owner])
    logits, cache = forward(ids.to(dev), mask.to(dev), torch.arange(width).expand(len(seqs), -1).to(dev), None)
    nll, toks = token_nll(logits[:len(rows)], labels.to(dev))
    if not suf:
        return nll, toks, None
    seq = torch.tensor([s for s, _, _, _, _ in suf])
    plen = torch.tensor([p for _, p, _, _, _ in suf])
    last = logits[seq.to(dev), (plen - 1).to(dev)].float()  # predicts each suffix's first token
    cache.batch_select_indices(seq.to(dev))
    s_width = max(1, max(len(t) for _, _, _, t, _ in suf))  # an empty suffix (a lone eos row) scores 0
    s_ids = torch.tensor([t + [tok.pad_id] * (s_width - len(t)) for _, _, _, t, _ in suf], dtype=torch.long)
    s_labels = torch.tensor([lab + [IGNORE_INDEX] * (s_width - len(lab)) for *_, lab in suf], dtype=torch.long)
    s_mask = torch.tensor([[1] * len(t) + [0] * (s_width - len(t)) for _, _, _, t, _ in suf], dtype=torch.long)
    prefix_mask = (torch.arange(width) < plen[:, None]).long()  # the own row's tokens past p are not the prefix
    if weigh is not None:
        weigh([idx[owner[s]] for s, _, _, _, _ in suf])
    s_logits, _ = forward(s_ids.to(dev), torch.cat([prefix_mask, s_mask], dim=1).to(dev),
                          (plen[:, None] + torch.arange(s_width)).to(dev), cache)
    # `last` in front of the suffixes' logits, an unscored label in front of theirs: token_nll's shift
    # then pairs each suffix token with the logits that predict it, as in the full row
    s_nll, _ = token_nll(torch.cat([last[:, None], s_logits.float()], dim=1),
                         torch.cat([torch.full((len(suf), 1), IGNORE_INDEX), s_labels], dim=1).to(dev))
    cand = torch.zeros(len(rows), len(candidates))
    for (s, _, j, _, _), v in zip(suf, s_nll):
        cand[owner[s], j] = v
    return nll, toks, cand


@torch.no_grad()
def scored_batches(engine, rows: list[Example], stripes: Stripes, candidate_lists: list[list[str]], weigh=None):
    """This rank's rows scored batch by batch, with the adapters now active: per batch (indices,
    nll, tokens, right, cand_nll) for its real rows, `nll` and `tokens` as `sequence_nll` gives them,
    `right` one list per candidate list, 1.0 where the row's best-scored candidate is its own
    response, and `cand_nll` one [rows, candidates] tensor per list (each candidate response's
    summed NLL, in the list's order: the fusion's candidate cross-entropy). Every distinct response
    of all the lists is scored once per row (`score_batch`: the same forwards on every rank), and
    each list picks among its own. `weigh(indices)` is called before each forward with the row
    index of each sequence in its batch (FedDPA sets its per-row weights there)."""
    engine.engine.eval()
    union = sorted({c for cands in candidate_lists for c in cands})
    columns = [[union.index(c) for c in cands] for cands in candidate_lists]
    for idx, real in stripes.batches(engine.cfg.train.eval_batch_size):
        chunk = [rows[i] for i in idx]
        nll, toks, cn = score_batch(engine, chunk, idx, union, weigh)
        right, cand_nll = [], []
        for cands, cols in zip(candidate_lists, columns):
            best = cn[:, cols].argmin(-1)
            right.append([float(cands[int(best[i])] == chunk[i].response) for i in range(real)])
            cand_nll.append(cn[:real, cols])
        yield idx[:real], nll[:real], toks[:real], right, cand_nll


def score_rows(engine, rows: list[Example], active, scales: dict | None = None,
               candidates: list[str] | None = None) -> RowScores:
    """Per-row scores of `rows` in row order, on every rank of the client, with `active` adapters
    scaled by `scales` (model.set_active: per adapter or per module): the fusion search's objective."""
    set_active(engine.model, active, scales)
    stripes = Stripes(engine, len(rows))
    mine = []
    width = len(candidates) if candidates else 0
    for idx, nll, toks, right, cand_nll in scored_batches(engine, rows, stripes, [candidates] if candidates else []):
        for i in range(len(idx)):
            mine.append([float(nll[i]), float(toks[i]), right[0][i] if right else 0.0,
                         *(cand_nll[0][i].tolist() if cand_nll else [])])
    every = np.array(stripes.gather(mine), dtype=np.float64).reshape(len(rows), 3 + width)
    if not candidates:
        return RowScores(every[:, 0], every[:, 1])
    label = np.array([candidates.index(r.response) if r.response in candidates else -1 for r in rows])
    return RowScores(every[:, 0], every[:, 1], every[:, 2], every[:, 3:], label)


def evaluate(engine, rows: list[Example], active, scales: dict | None = None,
             candidates: list[str] | None = None, candidates_all: list[str] | None = None) -> dict:
    """Loss, perplexity and (with candidates) accuracy on `rows`, over all the client's ranks, with
    `active` adapters scaled by `scales`; with eval.generate also exact_match and rouge_l of greedy
    answers (`generation_metrics`). The same dict on every rank.

    Accuracy scores every candidate response by its summed log-likelihood and takes the best;
    a row is right when that is its own response. `accuracy` picks among `candidates` (the
    client's own label set), `accuracy_all` among `candidates_all` (every client's labels)."""
    set_active(engine.model, active, scales)
    lists = [c for c in (candidates, candidates_all) if c]
    nll, toks, right = [], [], [[] for _ in lists]
    for _, n, t, r, _ in scored_batches(engine, rows, Stripes(engine, len(rows)), lists):
        nll += n.tolist()
        toks += t.tolist()
        for j, rj in enumerate(r):
            right[j] += rj
    sums = engine.comm.allreduce(np.array([sum(nll), sum(toks), len(nll)] + [sum(r) for r in right], dtype=np.float64))
    nll_sum, tok_sum, n = sums[:3]
    loss = nll_sum / max(tok_sum, 1.0)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "rows": int(n)}
    names = [k for k, c in (("accuracy", candidates), ("accuracy_all", candidates_all)) if c]
    for k, total in zip(names, sums[3:]):
        out[k] = total / max(n, 1.0)
    if engine.cfg.eval.generate:
        out.update(generation_metrics(engine, rows))  # the same active adapters and scales
    return out


def generation_metrics(engine, rows: list[Example], before_batch=None) -> dict:
    """exact_match and rouge_l (the means over rows of eval.metrics) of greedy answers to `rows`'
    prompts with the adapters now active, over all the client's ranks; the same dict on every rank.

    `eval.generate_rows` rows at most (the first ones), striped over the ranks as `evaluate` does.
    `before_batch(indices)` is called with the batch's row indices before it is decoded (FedDPA
    sets its per-row weights there)."""
    ev, tr = engine.cfg.eval, engine.cfg.train
    rows = rows[: ev.generate_rows] if ev.generate_rows else rows
    engine.engine.eval()
    forward = cached_forward(engine.engine, engine.model)

    def keep_going(unfinished: bool) -> bool:  # every rank steps while any rank of the client has a row left
        return engine.comm.allreduce(int(unfinished)) > 0

    sums = np.zeros(len(METRICS) + 1)
    for idx, real in Stripes(engine, len(rows)).batches(tr.eval_batch_size):
        if before_batch is not None:
            before_batch(idx)
        gen = greedy_decode(forward, [prompt_ids(engine.tok, rows[i], tr.max_seq_len) for i in idx],
                            ev.max_new_tokens, engine.tok.eos_id, engine.tok.pad_id, engine.device, keep_going)
        for i, g in zip(idx[:real], gen[:real]):
            text = engine.tok.decode(g)
            sums += [exact_match(text, rows[i].response), rouge_l(text, rows[i].response), 1.0]
    sums = engine.comm.allreduce(sums)
    n = max(float(sums[-1]), 1.0)
    out = {m: float(s) / n for m, s in zip(METRICS, sums) if m in ev.metrics}
    out["generated_rows"] = int(sums[-1])
    return out


# --------------------------------------------------------------------------- FedDPA's instance-wise weighting


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
    stripes = Stripes(engine, len(rows))
    mine: list[np.ndarray] = []
    for idx, real in stripes.batches(engine.cfg.train.eval_batch_size):
        ids, mask = _prompt_batch(engine.tok, [rows[i].prompt for i in idx], engine.cfg.train.max_seq_len)
        hidden = engine.engine(input_ids=ids.to(engine.device), attention_mask=mask.to(engine.device),
                               output_hidden_states=True).hidden_states[-1].float().cpu()
        if how == "last":  # right padding: the last real token is at length - 1
            rep = hidden[torch.arange(len(idx)), mask.sum(-1) - 1]
        else:  # mean over real tokens (the authors' "avg" also averages pads; we leave them out)
            rep = (hidden * mask[..., None]).sum(1) / mask.sum(-1, keepdim=True)
        mine.extend(rep[:real].numpy())
    every = stripes.gather(mine)
    return torch.stack([torch.as_tensor(v) for v in every]) if every else torch.zeros(0, 0)


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
    weighted w_global[i] * global + (1 - w_global[i]) * personal. The same scoring as `evaluate`;
    with eval.generate (and `generate`) also its exact_match and rouge_l, each row decoded under
    its own weights."""
    set_active(engine.model, [PERSONAL, GLOBAL])  # plain alpha / r scaling; the row weights come on top
    cands = candidates or []
    current = {GLOBAL: [None], PERSONAL: [None]}

    def weigh(idx):  # each sequence of the next forward takes its row's weights
        w = w_global[list(idx)].float()
        current[GLOBAL][0], current[PERSONAL][0] = w, 1.0 - w

    # Sums per batch in float32, where `evaluate` sums the rows in float64: kept as it was, so the
    # recorded metrics stay bit-identical; making the two agree is a change of the numbers.
    nll_sum = tok_sum = correct = n = 0.0
    gen = {}
    with row_weighted_branches(engine.model, current):
        for idx, nll, toks, right, _ in scored_batches(engine, rows, Stripes(engine, len(rows)),
                                                       [cands] if cands else [], weigh):
            nll_sum += float(nll.sum())
            tok_sum += float(toks.sum())
            n += len(idx)
            if right:
                correct += sum(right[0])
        if generate and engine.cfg.eval.generate:
            gen = generation_metrics(engine, rows, before_batch=weigh)
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
