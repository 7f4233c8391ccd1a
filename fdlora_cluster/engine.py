"""The client engine: one DeepSpeed engine over one client's ranks, in its own torch.distributed world.

Why a world per client: one shared world with DeepSpeed `mpu=` sub-groups breaks ZeRO-3 (its
init calls a world-wide barrier), so each client's leader picks a rendezvous address and port,
broadcasts them over the MPI client communicator, and every rank of the client initialises
torch.distributed with client-local RANK / WORLD_SIZE (measured in SPEC.md).

Why one engine for both adapters: a second DeepSpeed engine on the same module would register a
second set of ZeRO-3 parameter hooks. Instead both adapters are the engine's two parameter groups;
the one not being trained is inactive in the forward (so it gets no gradient) and its group's
learning rate is 0, so the optimizer never moves it (tests check it stays bit-identical). Each
training phase starts with fresh AdamW state for the adapter it trains.
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
import time
import zlib

import numpy as np
import torch

from .config import Config, deepspeed_dict
from .data import ClientData, Example, collate
from .log import get_logger
from .model import GLOBAL, PERSONAL, adapter_params, read_adapter, set_active, write_adapter

RENDEZVOUS_ENV = "FDLORA_RENDEZVOUS_ADDR"


class RendezvousError(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _interface_address(name: str) -> str | None:
    """IPv4 address of the local network interface `name` (eth0, ib0, ...), None if there is none."""
    import fcntl
    import struct

    if name not in {n for _, n in socket.if_nameindex()}:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:  # SIOCGIFADDR
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None  # the interface has no IPv4 address
    return socket.inet_ntoa(packed[20:24])


def _route_address(peer_hosts: list[str]) -> str | None:
    """The local address this host uses to reach the first resolvable, non-loopback peer host
    (a UDP connect sends nothing; it only asks the kernel for the route's source address)."""
    for host in peer_hosts:
        try:
            ip = socket.gethostbyname(host)
            if ipaddress.ip_address(ip).is_loopback:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((ip, 9))
                addr = s.getsockname()[0]
        except OSError:
            continue
        if not ipaddress.ip_address(addr).is_loopback:
            return addr
    return None


def rendezvous_address(client_hosts: list[str], configured: str | None) -> str:
    """The address the leader publishes: env override, then config, then the leader's host address.

    The override (env FDLORA_RENDEZVOUS_ADDR, else topology.rendezvous_addr) is an address, a host
    name, or the name of a network interface of the leader's host (`eth0`, `ib0`); an interface
    name is the form that suits every leader of a job at once, since each leader resolves it on
    its own host. A client on one host always uses loopback (so one override for the whole job
    cannot misdirect it). A client spanning hosts uses the override, else the address its
    leader's host name resolves to, or, when that is loopback (Debian maps the host name to
    127.0.1.1), the local address of the route to the client's other hosts. A loopback address
    for a client spanning hosts is refused (the other hosts would connect to themselves), with
    how to fix it."""
    if len(set(client_hosts)) <= 1:
        return "127.0.0.1"
    addr = os.environ.get(RENDEZVOUS_ENV) or configured
    me = socket.gethostname()
    if addr is None:
        addr = socket.gethostbyname(me)
        source = f"the address of host {me!r}"
        if ipaddress.ip_address(addr).is_loopback:
            routed = _route_address([h for h in client_hosts if h != me])
            if routed is not None:
                addr, source = routed, f"the address of host {me!r} on the route to the client's other hosts"
    else:
        source = f"{RENDEZVOUS_ENV} / topology.rendezvous_addr = {addr!r}"
        addr = _interface_address(addr) or addr
    try:
        loopback = ipaddress.ip_address(socket.gethostbyname(addr)).is_loopback
    except (OSError, ValueError):
        raise RendezvousError(f"rendezvous address {addr!r} (from {source}) does not resolve") from None
    if loopback:
        raise RendezvousError(
            f"this client spans hosts {sorted(set(client_hosts))}, but {source} is loopback ({addr}); "
            f"set {RENDEZVOUS_ENV} or topology.rendezvous_addr to an address or a network interface "
            f"(e.g. eth0) that the other hosts reach")
    return addr


def node_local_rank(topo) -> int:
    """Index of this rank among the job's client ranks on the same host (picks the GPU)."""
    me = topo.hosts[topo.rank]
    return sum(1 for r in range(1, topo.rank) if topo.hosts[r] == me)


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
        self.device = self._init_world()
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

    def _init_world(self) -> torch.device:
        import deepspeed

        backend = self.cfg.topology.backend
        if backend == "auto":
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            device = torch.device("cuda", node_local_rank(self.topo) % torch.cuda.device_count())
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        addr = port = None
        if self.local_rank == 0:
            addr = rendezvous_address(self.topo.client_hosts(self.client), self.cfg.topology.rendezvous_addr)
            port = _free_port()
        addr, port = self.comm.bcast((addr, port), root=0)
        # The launcher's one-world variables must not leak into this client's world.
        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(self.local_rank),
                          WORLD_SIZE=str(self.size), LOCAL_RANK=str(node_local_rank(self.topo)))
        self.log.debug(f"client world: {backend} tcp://{addr}:{port} rank {self.local_rank}/{self.size}")
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                                   init_method=f"tcp://{addr}:{port}", rank=self.local_rank, world_size=self.size)
        return device

    # ------------------------------------------------------------------ adapters

    def read(self, name: str) -> dict[str, torch.Tensor]:
        """Full CPU copy of an adapter (collective on the client's ranks under ZeRO-3)."""
        return read_adapter(self.model, name, self.zero_stage)

    def write(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Overwrite an adapter on every rank and refresh the optimizer's fp32 master copies,
        which ZeRO keeps apart from the model's parameters (else the next step would undo this)."""
        write_adapter(self.model, name, state, self.zero_stage)
        if hasattr(self.optimizer, "refresh_fp32_params"):
            self.optimizer.refresh_fp32_params()

    def broadcast_from_leader(self, state: dict[str, torch.Tensor] | None, like: str) -> dict[str, torch.Tensor]:
        """The leader's state on every rank of the client, over the client's torch.distributed world."""
        import torch.distributed as dist

        ref = {k: (tuple(getattr(p, "ds_shape", p.shape)), p.dtype) for k, p in adapter_params(self.model, like).items()}
        sizes = [math.prod(s) for s, _ in ref.values()]
        dtype = next(iter(ref.values()))[1]
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
              prox_mu: float = 0.0, tag: str = "", frozen_active: dict[str, float] | None = None,
              weight: float = 1.0) -> dict:
        """`steps` optimizer steps on adapter `name`; returns {"loss": mean, "steps", "seconds"}.

        With prox_mu > 0 the loss adds (mu/2) * ||w - prox_to||^2 over the adapter (FedProx on the
        global adapter, Ditto on the personal one; `proximal_term`).

        With frozen_active = {other: w_o} the other adapter also takes part in the forward, its
        output scaled by w_o and cut from the autograd graph, so it shapes the loss but gets no
        gradient (and its group's lr is 0, so it cannot move); `weight` scales `name`'s own output.
        This is FedDPA's local training with the global adapter active."""
        if steps == 0:
            return {"loss": None, "steps": 0, "seconds": 0.0}
        self._start_phase(name)
        detach_hooks = []
        if frozen_active:
            set_active(self.model, [name, *frozen_active], {name: weight, **frozen_active})
            detach_hooks = frozen_branches(self.model, list(frozen_active))
        try:
            return self._train_steps(name, steps, round, prox_to, prox_mu, tag)
        finally:
            for h in detach_hooks:
                h.remove()
            if frozen_active:
                set_active(self.model, name)  # back to the plain scaling for whatever runs next

    def _train_steps(self, name: str, steps: int, round: int, prox_to, prox_mu: float, tag: str) -> dict:
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
                    loss = loss + proximal_term(params, anchor, prox_mu)
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
