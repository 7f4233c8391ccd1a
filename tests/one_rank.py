"""A one-process stand-in for a ClientEngine, for tests of the evaluation code that runs on it."""

import types

import torch

from fdlora_cluster.config import load_config
from fdlora_cluster.state import GLOBAL, PERSONAL

from conftest import CONFIGS


class OneRank:
    """The slice of a ClientEngine that evaluation.py and generation.py use, on one process: the
    demo's tiny base with both adapters (random non-zero B, `scale` * N(0, 1) from `seed`, so both
    adapters change the output, differently), the engine's own scoring methods (ClientEngine.evaluate
    and score_rows, which call evaluation.py with the engine), a one-rank 'comm'."""

    def __init__(self, seed: int, scale: float, overrides: list[str] | None = None):
        from fdlora_cluster.data import get_tokenizer, load_clients
        from fdlora_cluster.engine import ClientEngine
        from fdlora_cluster.model import adapter_params, add_adapters, build_base

        self.cfg = load_config(CONFIGS / "demo.yaml", overrides=overrides or [])
        self.tok = get_tokenizer(None)
        self.model = add_adapters(build_base(self.cfg.model, self.cfg.seed, vocab_size=self.tok.vocab_size),
                                  {PERSONAL: self.cfg.lora.personal, GLOBAL: self.cfg.lora.global_}, self.cfg.seed)
        g = torch.Generator().manual_seed(seed)
        for name in (PERSONAL, GLOBAL):
            for p in adapter_params(self.model, name).values():
                p.data = scale * torch.randn(p.shape, generator=g)
        self.engine = self.model
        self.device = torch.device("cpu")
        self.size, self.local_rank = 1, 0
        self.comm = types.SimpleNamespace(allreduce=lambda x: x, allgather=lambda x: [x])
        self.data = load_clients(self.cfg.data, 2, self.cfg.seed)[0]
        for name in ("evaluate", "score_rows"):
            setattr(self, name, types.MethodType(getattr(ClientEngine, name), self))
