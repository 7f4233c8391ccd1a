"""The client engine: one DeepSpeed engine over one client's ranks, in its own torch.distributed world
(joined in rendezvous.py: why a world per client is said there).

Why one engine for both adapters: a second DeepSpeed engine on the same module would register a
second set of ZeRO-3 parameter hooks. Instead both adapters are the engine's two parameter groups;
the one not being trained is inactive in the forward (so it gets no gradient) and its group's
learning rate is 0, so the optimizer never moves it (tests check it stays bit-identical). Each
training phase starts with fresh AdamW state for the adapter it trains.
"""

from __future__ import annotations

import math
import time
import zlib

import numpy as np
import torch

from .config import Config, deepspeed_dict
from .data import ClientData, Example, collate
from .log import get_logger
from .model import GLOBAL, PERSONAL, adapter_params, read_adapter, set_active, write_adapter
from .rendezvous import join_client_world

class BatchStream:
    """Seeded, resumable stream of training rows for one client and one adapter.

    A fresh permutation per epoch, seeded by (seed, client, adapter, epoch); `position` is the
    data position a checkpoint needs. Every rank of the client computes the same stream and
    takes its own slice of each step's rows."""

    def __init__(self, rows: list[Example], seed: int, client: int, adapter: str):
        self.rows, self.seed, self.client, self.adapter = rows, seed, client, adapter
        self.epoch, self.position = 0, 0
        self._perm = self._permutation()

    def _permutation(self):
        rng = np.random.default_rng([self.seed, self.client, 0 if self.adapter == PERSONAL else 1, self.epoch])
        return rng.permutation(len(self.rows))

    def take(self, n: int) -> list[Example]:
        out = []
        while len(out) < n:
            if self.position == len(self._perm):
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation()
            out.append(self.rows[self._perm[self.position]])
            self.position += 1
        return out


class ClientEngine:
    """DeepSpeed over one client's ranks, training and evaluating the named adapters."""

    def __init__(self, cfg: Config, topo, model, tokenizer, data: ClientData):
        import deepspeed

        self.cfg, self.topo, self.model, self.tok, self.data = cfg, topo, model, tokenizer, data
        self.client = topo.client_id
        self.log = get_logger()
        self.comm = topo.client_comm
        self.local_rank = self.comm.Get_rank()
        self.size = self.comm.Get_size()
        self.ds_config = deepspeed_dict(cfg, self.client)
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        # bf16/fp16 from DeepSpeed's own config: base and adapters run in that dtype, DeepSpeed keeps
        # fp32 masters of the trained adapters, and read/write go through those (model.read_adapter).
        self.mixed_precision = cfg.base_dtype(self.client) != "float32"
        self.device = join_client_world(topo, cfg.client_backend(), cfg.topology.rendezvous_addr)
        # lr and micro batch from the DeepSpeed dict: train.* unless the user's DeepSpeed keys say otherwise
        self.lr = float(self.ds_config["optimizer"]["params"]["lr"])
        self.micro_batch = int(self.ds_config["train_micro_batch_size_per_gpu"])
        self.groups = {PERSONAL: 0, GLOBAL: 1}
        groups = [{"params": list(adapter_params(model, PERSONAL).values()), "lr": self.lr},
                  {"params": list(adapter_params(model, GLOBAL).values()), "lr": self.lr}]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, config=self.ds_config)
        self.streams = {a: BatchStream(data.train, cfg.seed, self.client, a) for a in (PERSONAL, GLOBAL)}
        self.global_step = 0

    # ------------------------------------------------------------------ world

    # ------------------------------------------------------------------ adapters

    def read(self, name: str) -> dict[str, torch.Tensor]:
        """Full fp32 CPU copy of an adapter (collective on the client's ranks under ZeRO-3)."""
        return read_adapter(self.model, name, self.zero_stage, self.mixed_precision)

    def write(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Overwrite an adapter on every rank, and the optimizer's fp32 master copies, which ZeRO
        and DeepSpeed's bf16/fp16 optimizers keep apart from the model's parameters (else the next
        step would undo this)."""
        write_adapter(self.model, name, state, self.zero_stage, self.mixed_precision)
        if not self.mixed_precision and hasattr(self.optimizer, "refresh_fp32_params"):
            self.optimizer.refresh_fp32_params()

    def broadcast_from_leader(self, state: dict[str, torch.Tensor] | None, like: str) -> dict[str, torch.Tensor]:
        """The leader's state on every rank of the client, over the client's torch.distributed world."""
        import torch.distributed as dist

        ref = {k: (tuple(getattr(p, "ds_shape", p.shape)), p.dtype) for k, p in adapter_params(self.model, like).items()}
        sizes = [math.prod(s) for s, _ in ref.values()]
        dtype = torch.float32  # adapters travel as their fp32 (master) weights, also under bf16/fp16
        if self.local_rank == 0:
            flat = torch.cat([state[k].reshape(-1).to(dtype) for k in ref]).to(self.device)
        else:
            flat = torch.empty(sum(sizes), dtype=dtype, device=self.device)
        if self.size > 1:
            dist.broadcast(flat, src=0)
        flat = flat.cpu()
        out, off = {}, 0
        for (k, (shape, _)), n in zip(ref.items(), sizes):
            out[k] = flat[off:off + n].reshape(shape).clone()
            off += n
        return out

    # ------------------------------------------------------------------ training

    def _inner_optimizer(self):
        opt = self.optimizer
        while hasattr(opt, "optimizer"):
            opt = opt.optimizer
        return opt

    def _start_phase(self, name: str) -> None:
        """Train `name` only: it alone is active in the forward, the other group's lr is 0, and the
        trained group's AdamW state starts fresh."""
        set_active(self.model, name)
        inner = self._inner_optimizer()  # ZeRO wrappers expose the same param_groups as this
        for adapter, i in self.groups.items():
            inner.param_groups[i]["lr"] = self.lr if adapter == name else 0.0
            if adapter == name:
                for p in inner.param_groups[i]["params"]:
                    inner.state.pop(p, None)

    def train(self, name: str, steps: int, round: int, prox_to: dict[str, torch.Tensor] | None = None,
              prox_mu: float = 0.0, tag: str = "") -> dict:
        """`steps` optimizer steps on adapter `name`; returns {"loss": mean, "steps", "seconds"}.

        With prox_mu > 0 the loss adds (mu/2) * ||w - prox_to||^2 over the adapter (FedProx)."""
        if steps == 0:
            return {"loss": None, "steps": 0, "seconds": 0.0}
        self._start_phase(name)
        self.engine.train()
        # dropout stream seeded per client, round and adapter (the same on every rank of the client)
        torch.manual_seed(zlib.crc32(f"{self.cfg.seed}:{self.client}:{round}:{name}".encode()))
        micro = self.micro_batch
        accum = self.ds_config["gradient_accumulation_steps"]
        params = adapter_params(self.model, name)
        anchor = {k: v.to(self.device) for k, v in prox_to.items()} if prox_mu > 0 else None
        t0, losses = time.perf_counter(), []
        for step in range(steps):
            rows = self.streams[name].take(micro * accum * self.size)
            step_loss = 0.0
            for a in range(accum):
                start = (self.local_rank * accum + a) * micro
                batch = {k: v.to(self.device) for k, v in collate(self.tok, rows[start:start + micro],
                                                                   self.cfg.train.max_seq_len).items()}
                loss = self.engine(**batch).loss
                if anchor is not None:
                    loss = loss + 0.5 * prox_mu * sum(((p - anchor[k]) ** 2).sum() for k, p in params.items())
                self.engine.backward(loss)
                self.engine.step()
                step_loss += float(loss.detach()) / accum
            self.global_step += 1
            losses.append(step_loss)
            if self.local_rank == 0 and ((step + 1) % self.cfg.log.every == 0 or step + 1 == steps):
                self.log.info(f"  {tag}{name} step {step + 1}/{steps} loss {step_loss:.4f}")
        mean = float(self.comm.allreduce(sum(losses) / len(losses))) / self.size
        return {"loss": mean, "steps": steps, "seconds": time.perf_counter() - t0}

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def _sequence_nll(self, rows: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row summed NLL of the response tokens, and their token counts."""
        batch = collate(self.tok, rows, self.cfg.train.max_seq_len)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        logits = self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()
        labels = batch["labels"][:, 1:]
        mask = labels != -100
        logp = torch.log_softmax(logits, dim=-1)
        tok_nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
        return tok_nll.sum(-1).cpu(), mask.sum(-1).cpu()

    def evaluate(self, rows: list[Example], active, scales: dict[str, float] | None = None,
                 candidates: list[str] | None = None) -> dict:
        """Loss, perplexity and (with candidates) accuracy on `rows`, over all the client's ranks.

        Accuracy scores every candidate response by its summed log-likelihood and takes the best;
        a row is right when that is its own response. Every rank runs the same number of forwards
        (ZeRO-3 gathers parameters collectively), padding with a repeat row it then ignores."""
        set_active(self.model, active, scales)
        self.engine.eval()
        mine = rows[self.local_rank::self.size]
        per_rank = -(-len(rows) // self.size)
        bs = self.cfg.train.eval_batch_size
        cands = candidates or []
        nll_sum = tok_sum = correct = n = 0.0
        for start in range(0, per_rank, bs):
            chunk = mine[start:start + bs]
            real = len(chunk)
            chunk = chunk + [rows[0]] * (min(bs, per_rank - start) - real)
            nll, toks = self._sequence_nll(chunk)
            nll_sum += float(nll[:real].sum())
            tok_sum += float(toks[:real].sum())
            n += real
            if cands:
                scored = [Example(ex.prompt, c) for ex in chunk for c in cands]
                cn, _ = self._sequence_nll(scored)
                best = cn.view(len(chunk), len(cands)).argmin(-1)
                correct += sum(1 for i in range(real) if cands[int(best[i])] == chunk[i].response)
        nll_sum, tok_sum, correct, n = self.comm.allreduce(np.array([nll_sum, tok_sum, correct, n]))
        loss = nll_sum / max(tok_sum, 1.0)
        out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "rows": int(n)}
        if cands:
            out["accuracy"] = correct / max(n, 1.0)
        return out
