"""Rows, per-client splits, and their tokenisation (only the trained tokens count in the loss).

Every row becomes a list of segments, (token ids, trained?), and one function builds input ids
and labels from them: a prompt/response row is [(prompt, no), (response + eos, yes)]; a chat row
has one trained segment per assistant turn (`chat.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE_INDEX = -100  # label id that the causal-LM loss skips


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    label: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None
    """Chat rows only: the conversation as (role, content) pairs, ending with an assistant turn.
    `prompt` and `response` then hold the plain rendering before the last assistant turn and that
    turn's content (for logs and prompt representations); the tokens come from `messages`."""
    where: str = field(default="", compare=False)
    """Where the row came from (`file.jsonl:17`, `dir row 3`), for errors found after loading."""


@dataclass
class ClientData:
    """One client's rows. `candidates`: the responses scored for `accuracy`, the client's own label
    set (the distinct responses of its own rows; [] = loss only). `candidates_all`: the responses
    scored for `accuracy_all`, every client's labels together. `name`: the client id the data gave
    (a string such as 'acme'), or None where the data names clients by index only."""

    client: int
    train: list[Example]
    fewshot: list[Example]
    test: list[Example]
    candidates: list[str] = field(default_factory=list)
    candidates_all: list[str] = field(default_factory=list)
    name: str | None = None


def segments(tok, ex: Example) -> list[tuple[list[int], bool]]:
    """The row as (token ids, trained?) pieces in order; the last piece is trained."""
    if ex.messages is not None:
        from .chat import chat_segments

        return chat_segments(tok, ex.messages, ex.where)
    return [(tok.encode(ex.prompt), False), (tok.encode(ex.response) + [tok.eos_id], True)]


def encode_example(tok, ex: Example, max_len: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels): the row's segments, untrained ones masked in labels.

    Rows longer than `max_len` lose tokens from the left, so the last trained segment (the
    response with its eos, or the last assistant turn) always fits."""
    segs = segments(tok, ex)
    tail = len(segs[-1][0])
    if tail >= max_len:
        raise ValueError(f"{ex.where + ': ' if ex.where else ''}response of {tail} tokens does not fit "
                         f"train.max_seq_len={max_len}: {ex.response[:40]!r}")
    ids = [i for s, _ in segs for i in s]
    labels = [i if trained else IGNORE_INDEX for s, trained in segs for i in s]
    return ids[-max_len:], labels[-max_len:]


def collate(tok, rows: list[Example], max_len: int):
    """Right-padded batch tensors: input_ids, attention_mask, labels."""
    return pad_batch(tok, [encode_example(tok, ex, max_len) for ex in rows])


def pad_batch(tok, enc: list[tuple[list[int], list[int]]]):
    """`collate` of rows already encoded by `encode_example` (a trainer that tokenises each row once)."""
    import torch

    width = max(len(i) for i, _ in enc)
    # one tensor per field from padded lists: a tensor per row costs more than the rows' tokens
    ids = torch.tensor([i + [tok.pad_id] * (width - len(i)) for i, _ in enc], dtype=torch.long)
    labels = torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for _, lab in enc], dtype=torch.long)
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in enc], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
