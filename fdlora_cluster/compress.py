"""Opt-in compression of what crosses MPI (`federation.compress`): bf16, or int8 with scales.

What is compressed is a *change*, never an adapter: a leader sends its update as the difference to
the global adapter of the round (plus its error-feedback residual), and the server sends each new
global adapter as the difference to the previous one. The transport owns that bookkeeping
(`transport.Transport`); this module is the pure codec:

    none   nothing is compressed (the default; the fp32 adapter travels as it is)
    bf16   each value rounded to bfloat16: half the bytes
    int8   each block of `block` values (federation.compress_block; 0 = one block per tensor) as
           int8 with one fp32 scale, max|x| / 127: about a quarter of the bytes

Error feedback (as DiLoCo-style systems do): what rounding lost this time, `residual = sent -
decode(encode(sent))`, is added to the next change the same end sends, so no part of an update is
lost for good, only delayed.
"""

from __future__ import annotations

import math

import torch

from .state import State

MODES = ("none", "bf16", "int8")


class Codec:
    """encode(change) -> wire tensors, decode(wire tensors) -> change, `wire_entries` for the Layout."""

    def __init__(self, mode: str, block: int = 256):
        if mode not in MODES[1:]:
            raise ValueError(f"compression {mode!r}; expected one of {MODES[1:]}")
        if block < 0:
            raise ValueError(f"compress block {block} must be >= 0 (0 = one scale per tensor)")
        self.mode, self.block = mode, block

    def _blocks(self, numel: int) -> tuple[int, int]:
        """(number of blocks, block size) of a tensor of `numel` values."""
        size = self.block or max(numel, 1)
        return math.ceil(numel / size) if numel else 0, size

    def wire_entries(self, entries) -> tuple:
        """The Layout entries (name, shape, dtype) of an encoded message, from the adapter's."""
        out = []
        for name, shape, _ in entries:
            numel = math.prod(shape)
            if self.mode == "bf16":
                out.append((name, tuple(shape), "bfloat16"))
            else:
                n, size = self._blocks(numel)
                out += [(name, (n * size,), "int8"), (name + ".scale", (n,), "float32")]
        return tuple(out)

    def encode(self, change: State) -> State:
        if self.mode == "bf16":
            return {k: v.to(torch.bfloat16) for k, v in change.items()}
        out = {}
        for k, v in change.items():
            n, size = self._blocks(v.numel())
            flat = torch.zeros(n * size, dtype=torch.float32)
            flat[:v.numel()] = v.reshape(-1).float()
            blocks = flat.view(n, size)
            scale = blocks.abs().amax(dim=1) / 127.0
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero block stays zero
            out[k] = torch.round(blocks / safe[:, None]).clamp_(-127, 127).to(torch.int8).reshape(-1)
            out[k + ".scale"] = scale
        return out

    def decode(self, wire: State, like: State) -> State:
        """The change `wire` encodes, in the shapes and dtypes of `like` (the reference adapter)."""
        if self.mode == "bf16":
            return {k: wire[k].to(v.dtype) for k, v in like.items()}
        out = {}
        for k, v in like.items():
            scale = wire[k + ".scale"]
            blocks = wire[k].view(scale.numel(), -1).float() * scale[:, None]
            out[k] = blocks.reshape(-1)[:v.numel()].view(v.shape).to(v.dtype)
        return out
