"""Bytes per round per client on the federation, by the transport's own message format.

For each model and adapter below, the message one leader sends per round (the 32-byte header and
the adapter packed by `transport.Layout`, or with `federation.compress` the encoded change packed
by the codec's layout) and, for comparison, full-model FedAvg (every weight of the model in fp32).
The layouts are built from the shapes alone (no model is built), with the same code the trainer
sends with, so the figures are what the byte counters report (tests/test_compress.py checks the
counters of a real job against this formula).

    python bench/bytes.py

FDLoRA sends only the global adapter; its personal adapter never travels (tests/test_privacy.py).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fdlora_cluster.compress import Codec  # noqa: E402
from fdlora_cluster.transport import HEADER, Layout  # noqa: E402

# (name, hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings)
MODELS = [
    ("demo tiny Llama (configs/demo.yaml)", 64, 128, 2, 4, 4, 258, False),
    ("SmolLM-135M shape", 576, 1536, 30, 9, 3, 49152, True),
    ("Llama-2-7B", 4096, 11008, 32, 32, 32, 32000, False),
]


def linear_shapes(hidden, inter, heads, kv):
    """(in, out) of each linear layer of one Llama block."""
    head = hidden // heads
    return {"q_proj": (hidden, hidden), "k_proj": (hidden, kv * head), "v_proj": (hidden, kv * head),
            "o_proj": (hidden, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}


def lora_layout(hidden, inter, layers, heads, kv, r, targets) -> Layout:
    shapes = linear_shapes(hidden, inter, heads, kv)
    entries = []
    for i in range(layers):
        for m in targets:
            fan_in, fan_out = shapes[m]
            entries += [(f"layers.{i}.{m}.lora_A", (r, fan_in), "float32"),
                        (f"layers.{i}.{m}.lora_B", (fan_out, r), "float32")]
    return Layout(tuple(entries))


def full_model_params(hidden, inter, layers, heads, kv, vocab, tied) -> int:
    block = sum(a * b for a, b in linear_shapes(hidden, inter, heads, kv).values()) + 2 * hidden
    return layers * block + (1 if tied else 2) * vocab * hidden + hidden  # embeddings (+ head), final norm


def fmt(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def main() -> int:
    settings = [("r=4 on q,v", 4, ["q_proj", "v_proj"]), ("r=8 on q,v", 8, ["q_proj", "v_proj"]),
                ("r=8 on all linear", 8, list(linear_shapes(1, 1, 1, 1)))]
    codecs = [("fp32 (compress: none)", None), ("bf16", Codec("bf16")), ("int8, block 256", Codec("int8", 256)),
              ("int8, per tensor", Codec("int8", 0))]
    print("| model | adapter | " + " | ".join(c for c, _ in codecs) + " |")
    print("|---|---|" + "---|" * len(codecs))
    for name, hidden, inter, layers, heads, kv, vocab, tied in MODELS:
        for label, r, targets in settings:
            layout = lora_layout(hidden, inter, layers, heads, kv, r, targets)
            cells = [fmt(HEADER.size + (layout if c is None else Layout(c.wire_entries(layout.entries))).nbytes)
                     for _, c in codecs]
            print(f"| {name} | {label} | " + " | ".join(cells) + " |")
        print(f"| {name} | full model (FedAvg of every weight) | "
              f"{fmt(HEADER.size + 4 * full_model_params(hidden, inter, layers, heads, kv, vocab, tied))} | | | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
