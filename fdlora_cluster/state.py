"""Adapter state, the ground floor: what an adapter IS once it leaves the model.

An adapter's state is a `State`, `{PEFT key: tensor}` in PEFT's key order. Every module above
(transport, server, strategies, engine, client) uses the helpers here and nothing else to check,
pack, combine and fingerprint one, so a state means the same thing on every floor:

    names        PERSONAL, GLOBAL, FUSED: the adapters a client model carries
    checks       key_diff, check_same_layout
    packing      Layout: names, shapes and dtypes in packing order; one contiguous byte buffer
    arithmetic   add, sub (the ONE apply-a-change both ends of a compressed message use),
                 pseudo_gradient, l2_distance
    fingerprint  digest: equal digests mean bit-identical weights

This module imports torch only.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

PERSONAL = "personal"  # the client's own adapter: never leaves the client
GLOBAL = "global"      # the adapter the server aggregates
FUSED = "fused"        # w_p * personal + w_g * global, written by the fusion phase
ADAPTERS = (PERSONAL, GLOBAL)  # the two a client trains

State = dict[str, torch.Tensor]


# ---------------------------------------------------------------- checks

def key_diff(ref: dict, state: dict) -> str | None:
    """None when both have the same keys, else a short 'missing [...], unexpected [...]'."""
    if set(ref) == set(state):
        return None
    return f"missing {sorted(set(ref) - set(state))[:3]}, unexpected {sorted(set(state) - set(ref))[:3]}"


def check_same_layout(ref: dict, state: dict, what: str) -> None:
    """Same keys and shapes as `ref` (whose values may be ZeRO-3 partitioned parameters: their
    full shape is `ds_shape`); raises ValueError naming `what` and the first difference."""
    diff = key_diff(ref, state)
    if diff:
        raise ValueError(f"{what}: keys differ ({diff})")
    for k, p in ref.items():
        shape = tuple(getattr(p, "ds_shape", p.shape))
        if tuple(state[k].shape) != shape:
            raise ValueError(f"{what}: {k} has shape {tuple(state[k].shape)}, expected {shape}")


# ---------------------------------------------------------------- packing

@dataclass(frozen=True)
class Layout:
    """Names, shapes and dtypes of a message's tensors, in packing order."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @staticmethod
    def of(state: State) -> "Layout":
        return Layout(tuple((k, tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()))

    @property
    def nbytes(self) -> int:
        return sum(_numel(s) * _itemsize(d) for _, s, d in self.entries)

    def pack(self, state: State) -> torch.Tensor:
        if set(state) != {k for k, _, _ in self.entries}:
            raise ValueError(f"message keys {sorted(state)[:3]}... do not match the agreed layout")
        parts = []
        for k, shape, dtype in self.entries:
            t = state[k].detach().to("cpu")
            if tuple(t.shape) != shape or str(t.dtype).removeprefix("torch.") != dtype:
                raise ValueError(f"{k}: {tuple(t.shape)} {t.dtype} does not match the layout {shape} {dtype}")
            parts.append(t.contiguous().reshape(-1).view(torch.uint8))
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)

    def unpack(self, buf: torch.Tensor) -> State:
        if buf.numel() != self.nbytes:
            raise ValueError(f"{buf.numel()} bytes, but the layout holds {self.nbytes}")
        out, off = {}, 0
        for k, shape, dtype in self.entries:
            n = _numel(shape) * _itemsize(dtype)
            # clone first: a slice at an odd byte offset cannot be viewed as a wider dtype
            out[k] = buf[off:off + n].clone().view(getattr(torch, dtype)).reshape(shape)
            off += n
        return out

    def describe_difference(self, other: "Layout") -> str | None:
        """None when equal, else the first entry that differs (for the handshake's refusal)."""
        if self == other:
            return None
        mine, theirs = dict((k, (s, d)) for k, s, d in self.entries), dict((k, (s, d)) for k, s, d in other.entries)
        for k in sorted(set(mine) | set(theirs)):
            if mine.get(k) != theirs.get(k):
                return f"{k}: {mine.get(k, 'missing')} against {theirs.get(k, 'missing')}"
        return "the same tensors in another order"

    def rank_difference(self, other: "Layout") -> str | None:
        """None when the two differ at most in the LoRA rank (every `lora_A` r x n and `lora_B`
        m x r, with one r per layout): clients of different sizes may carry global adapters of
        different ranks. Else the first entry that differs otherwise."""
        def rankless(layout):
            out, ranks = [], set()
            for k, s, d in layout.entries:
                if k.endswith(".lora_A.weight") and len(s) == 2:
                    ranks.add(s[0])
                    s = ("r", s[1])
                elif k.endswith(".lora_B.weight") and len(s) == 2:
                    ranks.add(s[1])
                    s = (s[0], "r")
                out.append((k, s, d))
            return Layout(tuple(out)), ranks

        (mine, my_ranks), (theirs, their_ranks) = rankless(self), rankless(other)
        for ranks, layout in ((my_ranks, self), (their_ranks, other)):
            if len(ranks) > 1:
                return f"one adapter with ranks {sorted(ranks)} across its modules"
        diff = mine.describe_difference(theirs)
        return None if diff is None else diff.replace("'r'", "r")

    def only(self, keys) -> "Layout":
        """The entries named in `keys`, in this layout's order (`global.combine: frozen_a`: B alone travels)."""
        keys = set(keys)
        return Layout(tuple(e for e in self.entries if e[0] in keys))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _itemsize(dtype: str) -> int:
    return torch.empty(0, dtype=getattr(torch, dtype)).element_size()


# ---------------------------------------------------------------- arithmetic

def add(reference: State, change: State) -> State:
    """reference + change: the ONE function both ends use to apply a decoded change, so the server
    and every leader compute the same global adapter bit for bit."""
    return {k: reference[k] + change[k] for k in reference}


def sub(a: State, b: State) -> State:
    return {k: a[k] - b[k] for k in a}


def pseudo_gradient(before: State, after: State) -> State:
    """before - after in float64: the outer optimizer's 'gradient' (DiLoCo)."""
    return {k: before[k].to(torch.float64) - after[k].to(torch.float64) for k in before}


def l2_distance(a: State, b: State) -> float:
    """||a - b|| over all tensors of two states with the same keys."""
    total = 0.0
    for k in a:
        d = a[k].to(torch.float64, copy=True).sub_(b[k]).reshape(-1)
        total += float(torch.dot(d, d))
    return math.sqrt(total)


# ---------------------------------------------------------------- fingerprint

def digest(state: State) -> str:
    """sha256 of an adapter's bytes, in key order: equal digests mean bit-identical weights."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]
