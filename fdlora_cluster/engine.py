"""The client engine: one DeepSpeed engine over one client's ranks, in its own torch.distributed world
(joined in rendezvous.py: why a world per client is said there).

Why one engine for both adapters: a second DeepSpeed engine on the same module would register a
second set of ZeRO-3 parameter hooks. Instead both adapters are the engine's two parameter groups;
the one not being trained is inactive in the forward (so it gets no gradient) and its group's
learning rate is 0, so the optimizer never moves it (tests check it stays bit-identical). Each
training phase starts with fresh AdamW state for the adapter it trains. How a phase is switched
on DeepSpeed's optimizer, on every ZeRO stage, is zero_phases.py (the code a DeepSpeed upgrade
must re-check).
"""

from __future__ import annotations

import os
import time
import zlib

import numpy as np
import torch

from . import evaluation
from .config import Config
from .config import deepspeed_dict
from .data import ClientData, Example, encode_example, pad_batch
from .log import FILE_ONLY, get_logger
from .model import adapter_params, read_adapter, set_active, write_adapter
from .rendezvous import join_client_world
from .state import GLOBAL, PERSONAL, Layout
from .watchdog import beat
from .zero_phases import PhaseSwitch

def proximal_term(params: dict[str, torch.Tensor], anchor: dict[str, torch.Tensor], mu: float) -> torch.Tensor:
    """(mu/2) * ||w - anchor||^2 summed over an adapter's tensors (A and B each, as the adapter's
    parameters are what the optimizer moves). Its gradient is mu * (w - anchor): FedProx's term on
    the global adapter, Ditto's lambda term on the personal one."""
    return 0.5 * mu * sum(((p - anchor[k]) ** 2).sum() for k, p in params.items())


def frozen_branches(model, names: list[str]) -> list:
    """Forward hooks that cut the named adapters' LoRA outputs from the autograd graph; returns the
    handles (call .remove()). The adapters still add their (scaled) output to the layer, but no
    gradient reaches their weights, nor flows back through their branch, as the FedDPA authors'
    layer does (`tmp_result.detach()` in their peft/tuners/lora/layer.py)."""
    from peft.tuners.lora import LoraLayer

    handles = []
    for mod in model.modules():
        if isinstance(mod, LoraLayer):
            for n in names:
                if n in mod.lora_B:
                    handles.append(mod.lora_B[n].register_forward_hook(lambda m, args, out: out.detach()))
    return handles


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
        which = {PERSONAL: 0, GLOBAL: 1}.get(self.adapter, 2)  # 2: the fold-back stream (fusion.fold_back_steps)
        rng = np.random.default_rng([self.seed, self.client, which, self.epoch])
        return rng.permutation(len(self.rows))

    def state(self) -> tuple[int, int]:
        return self.epoch, self.position

    def load_state(self, state: tuple[int, int]) -> None:
        self.epoch, self.position = state
        self._perm = self._permutation()

    def take(self, n: int) -> list[Example]:
        out = []
        while len(out) < n:
            if self.position == len(self._perm):
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation()
            out.append(self.rows[self._perm[self.position]])
            self.position += 1
        return out


class _Kept:
    """A DeepSpeed checkpoint engine that keeps what `save_checkpoint` hands it instead of writing
    it (DeepSpeed 0.19.8 writes every state dict through `checkpoint_engine.save`; on its rank 0 it
    also copies its zero_to_fp32 recovery scripts beside them, which `commit`, called after them
    and before the closing barrier, lists as `written`). Anything else goes to the engine it
    stands in for. A DeepSpeed upgrade must re-check this, as zero_phases.py."""

    def __init__(self, inner, directory: str, lists_written: bool):
        self.inner, self.directory, self.lists_written = inner, directory, lists_written
        self.states: dict[str, object] = {}
        self.written: list[str] = []

    def create(self, info) -> None:
        pass

    def save(self, state_dict, path: str) -> None:
        self.states[os.path.relpath(path, self.directory)] = state_dict

    def commit(self, info) -> bool:
        if self.lists_written:  # only rank 0 writes files itself; another rank could list them half-copied
            self.written = sorted(os.path.relpath(os.path.join(d, n), self.directory)
                                  for d, _, names in os.walk(self.directory) for n in names)
        return True

    def is_decoupled(self) -> bool:
        return False

    def __getattr__(self, name):
        return getattr(self.inner, name)


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
        # only what requires grad (global.combine = frozen_a leaves the global adapter's A out)
        groups = [{"params": [p for p in adapter_params(model, a).values() if p.requires_grad], "lr": self.lr}
                  for a in (PERSONAL, GLOBAL)]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, config=self.ds_config)
        self.phases = PhaseSwitch(self.optimizer, self.groups, self.lr)
        self.streams = {a: BatchStream(data.train, cfg.seed, self.client, a) for a in (PERSONAL, GLOBAL)}
        # the training and few-shot rows together, made when the fusion folds the few-shot rows back
        # (after the rounds, so no checkpoint holds it: a resumed job makes it afresh, as the first did)
        self.fold_back_stream: BatchStream | None = None
        self.global_step = 0
        # each training row tokenised once (a plain loop tokenises its batches up front), keyed by
        # the row object: data.train lives as long as the engine
        self._encoded: dict[int, tuple[list[int], list[int]]] = {}

    # ------------------------------------------------------------------ checkpoints

    def state(self) -> dict:
        """What this rank carries from round to round besides the adapters and DeepSpeed's state."""
        return {"streams": {a: s.state() for a, s in self.streams.items()}, "global_step": self.global_step}

    def load_state(self, state: dict) -> None:
        for a, st in state["streams"].items():
            self.streams[a].load_state(st)
        self.global_step = state["global_step"]

    def save_engine(self, directory: str) -> tuple[dict[str, object], list[str]]:
        """DeepSpeed's own checkpoint of the engine (collective on the client's ranks): inner
        optimizer state, fp32 masters and loss scaler on every ZeRO stage; the frozen base is left
        out. Nothing is written here but what DeepSpeed copies itself (the recovery scripts, on the
        client's rank 0): DeepSpeed's `save_checkpoint` runs with a checkpoint engine that keeps each
        state dict it is given instead of saving it (`_Kept`), so the checkpoint's writer thread can
        save them off the training path (checkpoint.py). Returns ({path: state dict}, [paths of the
        files DeepSpeed wrote itself]), the paths under `directory`; the state dicts still hold live
        tensors (checkpoint.snapshot copies them)."""
        kept = _Kept(self.engine.checkpoint_engine, directory, self.local_rank == 0)
        self.engine.checkpoint_engine = kept
        try:
            self.engine.save_checkpoint(directory, tag="engine", client_state={}, save_latest=False,
                                        exclude_frozen_parameters=True)
        finally:
            self.engine.checkpoint_engine = kept.inner
        return kept.states, kept.written

    def load_engine(self, directory: str) -> None:
        # strict=False: the checkpoint holds the adapters only (exclude_frozen_parameters)
        path, _ = self.engine.load_checkpoint(directory, tag="engine", load_module_strict=False,
                                              load_optimizer_states=True, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed found no engine checkpoint under {directory}")

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

    def broadcast_from_leader(self, state: dict[str, torch.Tensor] | None, layout: Layout) -> dict[str, torch.Tensor]:
        """The leader's state on every rank of the client, packed by the federation's `layout` into
        one buffer and broadcast over the client's torch.distributed world."""
        import torch.distributed as dist

        if self.size == 1:
            return state
        if self.local_rank == 0:
            flat = layout.pack(state).to(self.device)
        else:
            flat = torch.empty(layout.nbytes, dtype=torch.uint8, device=self.device)
        dist.broadcast(flat, src=0)
        return layout.unpack(flat.cpu())

    # ------------------------------------------------------------------ training

    def _start_phase(self, name: str) -> None:
        """Train `name` only: it alone is active in the forward, and the optimizer trains its group
        alone, from fresh AdamW state (zero_phases.py)."""
        set_active(self.model, name)
        self.phases.start(name)

    def train(self, name: str, steps: int, round: int, prox_to: dict[str, torch.Tensor] | None = None,
              prox_mu: float = 0.0, tag: str = "", frozen_active: dict[str, float] | None = None,
              weight: float = 1.0, fewshot: bool = False) -> dict:
        """`steps` optimizer steps on adapter `name`; returns {"loss": mean, "steps", "seconds"}.

        With prox_mu > 0 the loss adds (mu/2) * ||w - prox_to||^2 over the adapter (FedProx on the
        global adapter, Ditto on the personal one; `proximal_term`).

        With frozen_active = {other: w_o} the other adapter also takes part in the forward, its
        output scaled by w_o and cut from the autograd graph, so it shapes the loss but gets no
        gradient (and its group's lr is 0, so it cannot move); `weight` scales `name`'s own output.
        This is FedDPA's local training with the global adapter active.

        With fewshot, the rows are drawn from the training and few-shot rows together (their own
        seeded stream): the fusion's rows folded back into the adapter once its weights are chosen."""
        if steps == 0:
            return {"loss": None, "steps": 0, "seconds": 0.0}
        self._start_phase(name)
        detach_hooks = []
        if frozen_active:
            set_active(self.model, [name, *frozen_active], {name: weight, **frozen_active})
            detach_hooks = frozen_branches(self.model, list(frozen_active))
        try:
            return self._train_steps(name, steps, round, prox_to, prox_mu, tag, fewshot)
        finally:
            for h in detach_hooks:
                h.remove()
            if frozen_active:
                set_active(self.model, name)  # back to the plain scaling for whatever runs next

    def _train_steps(self, name: str, steps: int, round: int, prox_to, prox_mu: float, tag: str,
                     fewshot: bool = False) -> dict:
        self.engine.train()
        # dropout stream seeded per client, round and adapter (the same on every rank of the client)
        torch.manual_seed(zlib.crc32(f"{self.cfg.seed}:{self.client}:{round}:{name}".encode()))
        micro = self.micro_batch
        accum = self.ds_config["gradient_accumulation_steps"]
        params = adapter_params(self.model, name)
        anchor = {k: v.to(self.device) for k, v in prox_to.items()} if prox_mu > 0 else None
        if fewshot and self.fold_back_stream is None:
            self.fold_back_stream = BatchStream(self.data.train + self.data.fewshot, self.cfg.seed, self.client,
                                                "fold-back")
        stream = self.fold_back_stream if fewshot else self.streams[name]
        t0, losses = time.perf_counter(), []
        for step in range(steps):
            beat()  # a training step is progress (watchdog.py)
            rows = stream.take(micro * accum * self.size)
            step_loss = 0.0
            for a in range(accum):
                start = (self.local_rank * accum + a) * micro
                batch = self._train_batch(rows[start:start + micro])
                loss = self.engine(**batch).loss
                if anchor is not None:
                    loss = loss + proximal_term(params, anchor, prox_mu)
                self.engine.backward(loss)
                self.engine.step()
                step_loss += float(loss.detach()) / accum
            self.global_step += 1
            losses.append(step_loss)
            if self.local_rank == 0 and ((step + 1) % self.cfg.log.every == 0 or step + 1 == steps):
                # per-step lines: the rank's log file; the console has one line per phase (train.py)
                self.log.info(f"  {tag}{name} step {step + 1}/{steps} loss {step_loss:.4f}", extra=FILE_ONLY)
        mean = float(self.comm.allreduce(sum(losses) / len(losses))) / self.size
        return {"loss": mean, "steps": steps, "seconds": time.perf_counter() - t0}

    def _train_batch(self, rows: list[Example]) -> dict[str, torch.Tensor]:
        enc = []
        for ex in rows:
            if id(ex) not in self._encoded:
                self._encoded[id(ex)] = encode_example(self.tok, ex, self.cfg.train.max_seq_len)
            enc.append(self._encoded[id(ex)])
        return {k: v.to(self.device) for k, v in pad_batch(self.tok, enc).items()}

    # ------------------------------------------------------------------ scoring (evaluation.py)

    def score_rows(self, rows: list[Example], active, scales: dict | None = None,
                   candidates: list[str] | None = None):
        """Per-row scores of `rows` in row order, on every rank of the client (evaluation.score_rows)."""
        return evaluation.score_rows(self, rows, active, scales, candidates)

    def evaluate(self, rows: list[Example], active, scales: dict | None = None,
                 candidates: list[str] | None = None, candidates_all: list[str] | None = None) -> dict:
        """Loss, perplexity, accuracy and generation metrics on `rows` (evaluation.evaluate)."""
        return evaluation.evaluate(self, rows, active, scales, candidates, candidates_all)
