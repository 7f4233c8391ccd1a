"""`fdlora-cluster export RUN_DIR --client I [--adapter fused|personal|global] [--merge] --out DIR`.

One client's adapter from a finished run, for serving (docs/SERVING.md):
  - default: a PEFT directory (`adapter_config.json`, `adapter_model.safetensors`) that
    `PeftModel.from_pretrained(base, DIR)` loads. A base built from `model.config` (the demo) is
    no Hugging Face checkpoint anywhere, so it is written beside the adapter as `DIR/base/`
    (weights, config, tokenizer); a base from `model.path` is referenced, not copied.
  - `--merge`: the adapter merged into the base (`merge_and_unload`), saved as a plain Hugging
    Face checkpoint with its tokenizer.

The base is the one the run used, found from the run's `config.yaml`: `model.path`, or
`model.config` + the pretrained cache `model.pretrained`, whose recipe must still be the run's.
Relative paths there are relative to the directory the run was started in, as during the run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

ADAPTER_CHOICES = ("fused", "personal", "global")
INFO_FILE = "fdlora_export.json"


class ExportError(ValueError):
    """A run or request that cannot be exported; the message says what is missing and what to do."""


def load_run_config(run_dir: str):
    """The run's recorded config, validated as the trainer would."""
    from .config import ConfigError, config_from_dict, read_yaml

    if not os.path.isdir(run_dir):
        raise ExportError(f"{run_dir}: no such directory")
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path) or not os.path.isdir(os.path.join(run_dir, "adapters")):
        raise ExportError(f"{run_dir}: not a run directory (it needs config.yaml and adapters/, "
                          "written by `fdlora-cluster run`)")
    try:
        raw = read_yaml(path)
        checkpoint = (raw.get("model") or {}).get("path")
        if checkpoint and not os.path.isdir(checkpoint):  # say more than validation's "not a directory"
            raise ExportError(_no_checkpoint(checkpoint))
        return config_from_dict(raw, source=path)
    except ConfigError as e:
        raise ExportError(str(e)) from None  # its message starts with the file


def _no_checkpoint(path: str) -> str:
    return (f"the run's base model.path = {path} is not a Hugging Face checkpoint from here ({os.getcwd()}); a "
            "relative path is relative to where the run was started: export from there, or put the checkpoint there")


def adapter_dir(run_dir: str, cfg, client: int, adapter: str) -> str:
    """The saved PEFT directory of `adapter` for `client`, or an ExportError listing what there is."""
    from .strategies import make_strategy

    n = len(cfg.client_sizes())
    if not 0 <= client < n:
        raise ExportError(f"--client {client}: this run has {n} clients, valid: 0-{n - 1}")
    if adapter not in ADAPTER_CHOICES:
        raise ExportError(f"--adapter {adapter!r}: expected one of {', '.join(ADAPTER_CHOICES)}")

    def where(name):
        own = os.path.join(run_dir, "adapters", f"client-{client}", name)
        if name == "global" and not os.path.isdir(own):  # clients of different global ranks save their own
            return os.path.join(run_dir, "adapters", "global")
        return own

    def saved(name):
        return os.path.isfile(os.path.join(where(name), "adapter_model.safetensors"))

    # Every strategy saves a personal adapter, but fedavg, fedprox and diloco never train it (it is
    # its seeded start, a zero delta): only the adapters the strategy evaluates are worth serving.
    evaluated = make_strategy(cfg).evaluated()
    usable = [a for a in ADAPTER_CHOICES if a in evaluated and saved(a)]
    if adapter not in usable:
        why = "never trained by" if saved(adapter) else "not saved by"
        raise ExportError(f"client {client} has no {adapter} adapter to export ({why} strategy {cfg.strategy}); "
                          f"what it has: {', '.join(usable) or 'nothing (did the run finish?)'}")
    return where(adapter)


def _resolve_base(cfg) -> str:
    """Where the run's base is; ExportError when it is not there (or no longer the run's)."""
    from .pretrain import is_cached

    m = cfg.model
    if m.path:
        if not os.path.isfile(os.path.join(m.path, "config.json")):
            raise ExportError(_no_checkpoint(m.path))
        return os.path.abspath(m.path)
    if m.pretrained and not is_cached(cfg):
        # A cache made by another recipe would load without error into a different model.
        state = "is made by another recipe" if os.path.isdir(m.pretrained) else "is missing"
        raise ExportError(f"the run's base (model.config pretrained into model.pretrained = {m.pretrained}) {state} "
                          f"from here ({os.getcwd()}); a relative path is relative to where the run was started. Export "
                          "from there, or rebuild it there with `fdlora-cluster pretrain RUN_DIR/config.yaml`")
    return os.path.abspath(m.pretrained) if m.pretrained else "built from model.config"


def byte_tokenizer_hf():
    """The trainer's ByteTokenizer (ids 0-255 = UTF-8 bytes, 256 pad, 257 eos) as a Hugging Face
    fast tokenizer, so `AutoTokenizer.from_pretrained` gives the ids the run trained on.

    One BPE token per byte and no merges; GPT-2's byte-to-character table maps raw bytes onto the
    printable characters the `tokenizers` byte-level step uses. split_special_tokens: a literal
    "</s>" in text stays four bytes, as in ByteTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from .data.tokenizer import ByteTokenizer

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    vocab = {char[b]: b for b in range(256)} | {"<pad>": ByteTokenizer.pad_id, "</s>": ByteTokenizer.eos_id}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   split_special_tokens=True)


def _base_and_tokenizer(cfg, client: int):
    """The run's base for `client` (its dtype as in the run) and a Hugging Face tokenizer for it."""
    from .data import get_tokenizer
    from .model import build_base

    tok = get_tokenizer(cfg.model.path)
    base = build_base(cfg.model, cfg.seed, vocab_size=tok.vocab_size, dtype=cfg.base_dtype(client))
    base.config.use_cache = True  # the trainer turns the KV cache off; generation wants it
    if cfg.model.path:
        return base, tok.tok
    # Built from config: its special-token ids are the config class's defaults (Llama: bos 1, eos 2,
    # two byte ids here); make generate() stop where the run's rows end.
    hf_tok = byte_tokenizer_hf()
    for c in (base.config, base.generation_config):
        c.bos_token_id, c.eos_token_id, c.pad_token_id = None, hf_tok.eos_token_id, hf_tok.pad_token_id
    return base, hf_tok


def export(run_dir: str, client: int, out: str, adapter: str = "fused", merge: bool = False) -> dict:
    """Write the export to `out` (absent or empty). Returns what was written (also `out/fdlora_export.json`)."""
    cfg = load_run_config(run_dir)
    src = adapter_dir(run_dir, cfg, client, adapter)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ExportError(f"--out {out} exists and is not empty; choose a new directory")
    base_at = _resolve_base(cfg)
    with open(os.path.join(src, "adapter_config.json")) as f:
        lora = json.load(f)
    info = {"run_dir": os.path.abspath(run_dir), "client": client, "adapter": adapter, "merged": merge,
            "strategy": cfg.strategy, "base": base_at, "dtype": cfg.base_dtype(client),
            "r": lora["r"], "lora_alpha": lora["lora_alpha"], "target_modules": lora["target_modules"]}

    from peft import PeftModel

    base, tok = _base_and_tokenizer(cfg, client)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    # Written next to `out` and renamed at the end, so a failed export leaves no half directory.
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(os.path.abspath(out))}.tmp-")
    try:
        if merge:
            model = PeftModel.from_pretrained(base, src).merge_and_unload()
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
        else:
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
            if not cfg.model.path:  # no checkpoint of this base exists: ship one
                base.save_pretrained(os.path.join(tmp, "base"))
                tok.save_pretrained(os.path.join(tmp, "base"))
            # AutoPeftModelForCausalLM loads the base from here (an absolute path: move both together)
            info["base_checkpoint"] = lora["base_model_name_or_path"] = (
                base_at if cfg.model.path else os.path.join(os.path.abspath(out), "base"))
            with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
                json.dump(lora, f, indent=2)
        with open(os.path.join(tmp, INFO_FILE), "w") as f:
            json.dump(info, f, indent=2)
        if os.path.isdir(out):
            os.rmdir(out)  # empty, checked above
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info
