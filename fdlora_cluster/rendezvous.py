"""Joining a client's own torch.distributed world: the rendezvous address, the port, and the
variables DeepSpeed and torch read.

Why a world per client: one shared world with DeepSpeed `mpu=` sub-groups breaks ZeRO-3 (its
init calls a world-wide barrier), so each client's leader picks a rendezvous address and port,
broadcasts them over the MPI client communicator, and every rank of the client initialises
torch.distributed with client-local RANK / WORLD_SIZE (measured in SPEC.md).

Network plumbing only; which rank is which and which GPU it uses come from topology.py.
"""

from __future__ import annotations

import ipaddress
import os
import socket

import torch

RENDEZVOUS_ENV = "FDLORA_RENDEZVOUS_ADDR"


class RendezvousError(RuntimeError):
    pass


def skip_deepspeed_shm_op() -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory all-reduce op at init.

    DeepSpeed's torch backend builds that op whenever the accelerator is the CPU, but only
    `inference_all_reduce` (tensor-parallel inference) uses it; training never does. The build costs
    a compiler run (~25 s the first time) and, on every start, a turn at torch's build lock file: a
    rank killed while it holds the lock (a job that aborts at start, a timeout) leaves the file, and
    every later job on that build cache waits on it for ever. We need none of it."""
    import importlib

    # importlib, not `import deepspeed.comm.torch as ...`: that name resolves to the torch module
    # deepspeed.comm imports
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None


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


def join_client_world(topo, backend: str, rendezvous_addr: str | None) -> torch.device:
    """Initialise this rank's client world with `backend` (nccl or gloo; collective over the
    client's ranks); returns its device.

    Before DeepSpeed looks, the environment says what the topology decided: RANK / WORLD_SIZE are
    client-local, and LOCAL_RANK is this rank's GPU (`topo.gpu`, an index into the GPUs it sees),
    since DeepSpeed picks the device from LOCAL_RANK in init_process_group and in its engine. Under
    Open MPI, DeepSpeed also asserts LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK; that variable counts
    the server and every client on the host, so it is set to the same value (MPI read it at
    MPI_Init, long before this; nothing else in the process reads it)."""
    import deepspeed

    if backend == "nccl":
        if topo.gpu is None:
            raise RendezvousError(f"rank {topo.rank}: backend nccl but no GPU was placed for it (topology.backend)")
        local_rank = topo.gpu
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        local_rank = topo.host_local_index
        device = torch.device("cpu")
    skip_deepspeed_shm_op()
    comm = topo.client_comm
    addr = port = None
    if comm.Get_rank() == 0:
        addr = rendezvous_address(topo.client_hosts(topo.client_id), rendezvous_addr)
        port = _free_port()
    addr, port = comm.bcast((addr, port), root=0)
    rank, size = comm.Get_rank(), comm.Get_size()
    # The launcher's one-world variables must not leak into this client's world.
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(local_rank))
    if "OMPI_COMM_WORLD_LOCAL_RANK" in os.environ:
        os.environ["OMPI_COMM_WORLD_LOCAL_RANK"] = str(local_rank)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               init_method=f"tcp://{addr}:{port}", rank=rank, world_size=size)
    return device
