"""`fdlora-cluster run --probe CONFIG`: everything a launch sets up, and no model.

What a launcher has to get right is the wiring, not the training: one MPI world of the right size,
the client and federation communicators, each client's own torch.distributed world (its
rendezvous address across hosts, LOCAL_RANK, the backend), and messages between the server and
the leaders. The probe does exactly that, in the order the trainer does, then one federation round
trip of a small tensor:

    server --MPI (federation)--> leader --torch broadcast (client world)--> every client rank
           <--MPI (federation)-- leader <--torch all-reduce (client world)-- every client rank

Every client rank digests what it received (gathered at its leader); the server checks that the
sum each leader returns is client size x what it sent. It writes what `run` writes for the launch
tests to read, under the run directory: logs/rank-<r>.log (the server's holds the topology table),
metrics.jsonl (one `global_received` record per client: round 1, one digest per rank, as the
trainer records them), and summary.json (`"probe": true`; per client its ranks, hosts, backend and
ZeRO stage). It builds no model, reads no data and imports DeepSpeed only to join the client
worlds (as the trainer does), so it takes seconds where a job takes a minute. `--resume` is ignored.
"""

from __future__ import annotations

import json
import os
import time

import torch

from .config import Config
from .log import setup_logging
from .rendezvous import join_client_world
from .state import digest
from .topology import build_topology

PROBE_NUMEL = 64  # the tensor that makes the round trip: 256 bytes of float32
TAG_OUT, TAG_BACK = 901, 902


class ProbeError(RuntimeError):
    """A probe's check failed: the message names the client and what disagreed."""


def probe_tensor(seed: int) -> torch.Tensor:
    """What the server sends: seeded, so that a digest of it names this config's probe."""
    return torch.arange(PROBE_NUMEL, dtype=torch.float32) + float(seed)


def tensor_digest(t: torch.Tensor) -> str:
    """The probe tensor's digest, as the trainer digests an adapter (state.digest)."""
    return digest({"probe": t.detach().cpu()})


def run(cfg: Config) -> dict | None:
    """Probe this rank's part of the launch; returns the summary on the server, None elsewhere.
    Collective on every rank of the job."""
    t0 = time.monotonic()
    backend = cfg.client_backend()
    topo = build_topology(cfg.client_sizes(), use_gpus=backend == "nccl", share_gpus=cfg.topology.share_gpus)
    logs = os.path.join(cfg.output_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    console = topo.is_server or topo.is_leader or cfg.log.followers_on_console
    log = setup_logging(topo.role, topo.rank, logs, cfg.log.level, console)
    if topo.is_server:
        log.info(f"fdlora-cluster --probe (no model): {topo.plan.describe()}")
        log.info("topology:\n" + topo.table())
    sent = probe_tensor(cfg.seed)
    records = []
    info = {"rank": topo.rank, "host": topo.hosts[topo.rank], "client": topo.client_id}
    if topo.is_server:
        back = _server_round_trip(topo, sent)
    else:
        info.update(_client_round_trip(cfg, topo, backend, sent, records))
    gathered_records = topo.world.gather(records, root=0)
    infos = topo.world.gather(info, root=0)
    if not topo.is_server:
        return None
    return _finish(cfg, topo, backend, sent, back, [r for rs in gathered_records for r in rs], infos,
                   time.monotonic() - t0, log)


def _server_round_trip(topo, sent: torch.Tensor) -> dict[int, torch.Tensor]:
    """Send the tensor to every leader, then take back each client's sum."""
    fed = topo.federation_comm
    for c in topo.plan.clients:
        fed.Send(sent.numpy(), dest=topo.plan.federation_rank(c), tag=TAG_OUT)
    back = {}
    for c in topo.plan.clients:
        buf = torch.empty(PROBE_NUMEL, dtype=torch.float32)
        fed.Recv(buf.numpy(), source=topo.plan.federation_rank(c), tag=TAG_BACK)
        back[c] = buf
    return back


def _client_round_trip(cfg, topo, backend: str, sent: torch.Tensor, records: list) -> dict:
    """Join the client's world, take the server's tensor through it and back; returns what this
    rank saw (its client-world rank, LOCAL_RANK, device)."""
    import torch.distributed as dist

    device = join_client_world(topo, backend, cfg.topology.rendezvous_addr)
    # DeepSpeed's engine asserts this under Open MPI (notes/gpu.md); a probe never builds an engine,
    # so it checks the same here.
    ompi_local = os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK")
    if ompi_local is not None and ompi_local != os.environ["LOCAL_RANK"]:
        raise ProbeError(f"rank {topo.rank}: LOCAL_RANK {os.environ['LOCAL_RANK']} != "
                         f"OMPI_COMM_WORLD_LOCAL_RANK {ompi_local}: DeepSpeed would refuse this rank")
    if dist.get_rank() != topo.local_rank_in_client or dist.get_world_size() != topo.client_size:
        raise ProbeError(f"rank {topo.rank}: client world rank {dist.get_rank()}/{dist.get_world_size()}, "
                         f"expected {topo.local_rank_in_client}/{topo.client_size}")
    t = torch.empty(PROBE_NUMEL, dtype=torch.float32)
    if topo.is_leader:
        topo.federation_comm.Recv(t.numpy(), source=0, tag=TAG_OUT)
    on_device = t.to(device)
    dist.broadcast(on_device, src=0)
    digests = topo.client_comm.gather(tensor_digest(on_device), root=0)
    dist.all_reduce(on_device)  # every rank adds what it holds: client size x the server's tensor
    if topo.is_leader:
        topo.federation_comm.Send(on_device.cpu().numpy(), dest=0, tag=TAG_BACK)
        records.append({"time": time.time(), "rank": topo.rank, "event": "global_received", "round": 1,
                        "client": topo.client_id, "digests": digests, "skipped": []})
    seen = {"client_world_rank": dist.get_rank(), "local_rank": int(os.environ["LOCAL_RANK"]), "device": str(device)}
    dist.destroy_process_group()
    return seen


def _finish(cfg, topo, backend, sent, back, records, infos, seconds, log) -> dict:
    """Check what came back, write metrics.jsonl and summary.json, say it on the console."""
    from .config import deepspeed_dict

    want = tensor_digest(sent)
    problems = []
    for c in topo.plan.clients:
        size = topo.plan.client_sizes[c]
        if not torch.equal(back[c], sent * size):
            problems.append(f"client {c}: its leader returned {back[c][:4].tolist()}..., expected "
                            f"{size} x {sent[:4].tolist()}...")
    for r in records:
        if set(r["digests"]) != {want}:
            problems.append(f"client {r['client']}: its ranks hold digests {r['digests']}, the server sent {want}")
    with open(os.path.join(cfg.output_dir, "metrics.jsonl"), "w") as f:
        for r in sorted(records, key=lambda r: r["client"]):
            f.write(json.dumps(r) + "\n")
    clients = []
    for c in topo.plan.clients:
        ranks = topo.plan.client_ranks(c)
        clients.append({"client": c, "ranks": len(ranks), "world_ranks": ranks,
                        "hosts": sorted({infos[r]["host"] for r in ranks}), "backend": backend,
                        "zero_stage": int(deepspeed_dict(cfg, c).get("zero_optimization", {}).get("stage", 0)),
                        "local_ranks": [infos[r]["local_rank"] for r in ranks],
                        "devices": [infos[r]["device"] for r in ranks]})
    summary = {"probe": True, "ok": not problems, "problems": problems, "world_size": topo.plan.world_size,
               "server_host": infos[0]["host"], "bytes_each_way": PROBE_NUMEL * 4, "seconds": seconds,
               "clients": clients}
    with open(os.path.join(cfg.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if problems:
        raise ProbeError("probe failed:\n  " + "\n  ".join(problems))
    log.info(f"probe ok: {topo.plan.world_size} ranks; {len(clients)} client worlds ({backend}) joined; "
             f"a {PROBE_NUMEL * 4} B tensor went server -> leaders -> every client rank and back, "
             f"digests agree on every rank ({seconds:.1f} s)")
    return summary
