"""Rows, per-client splits, and their tokenisation (prompt tokens masked out of the loss)."""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = -100  # label id that the causal-LM loss skips


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    label: str | None = None


@dataclass
class ClientData:
    """One client's rows. `candidates`: the responses scored for `accuracy`, the client's own label
    set (the distinct responses of its own rows; [] = loss only). `candidates_all`: the responses
    scored for `accuracy_all`, every client's labels together."""

    client: int
    train: list[Example]
    fewshot: list[Example]
    test: list[Example]
    candidates: list[str] = field(default_factory=list)
    candidates_all: list[str] = field(default_factory=list)


def encode_example(tok, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): prompt + response + eos, with the prompt masked in labels.

    Rows longer than `max_len` lose prompt tokens from the left, so the response always fits."""
    p = tok.encode(ex.prompt)
    r = tok.encode(ex.response) + [tok.eos_id]
    if len(r) >= max_len:
        raise ValueError(f"response of {len(r)} tokens does not fit train.max_seq_len={max_len}: {ex.response[:40]!r}")
    p = p[-(max_len - len(r)):] if len(p) + len(r) > max_len else p
    return p + r, [IGNORE_INDEX] * len(p) + r


def collate(tok, rows: list[Example], max_len: int):
    """Right-padded batch tensors: input_ids, attention_mask, labels."""
    import torch

    enc = [encode_example(tok, ex, max_len) for ex in rows]
    width = max(len(i) for i, _ in enc)
    ids = torch.full((len(enc), width), tok.pad_id, dtype=torch.long)
    labels = torch.full((len(enc), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(enc), width), dtype=torch.long)
    for k, (i, l) in enumerate(enc):
        ids[k, : len(i)] = torch.tensor(i)
        labels[k, : len(l)] = torch.tensor(l)
        mask[k, : len(i)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
