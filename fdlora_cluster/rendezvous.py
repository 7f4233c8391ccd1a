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
import time

import torch

RENDEZVOUS_ENV = "FDLORA_RENDEZVOUS_ADDR"


class RendezvousError(RuntimeError):
    pass


STALE_BUILD_LOCK_S = 900  # DeepSpeed's CPU comm op builds in ~25 s; a lock this old has no builder


def check_build_lock(name: str = "deepspeed_shm_comm", max_age_s: float = STALE_BUILD_LOCK_S) -> None:
    """Refuse to start on a stale torch JIT build lock instead of waiting on it for ever.

    DeepSpeed JIT-builds its CPU comm op the first time a rank initialises; torch serialises the
    build with a lock file and every other process waits until it disappears. A build killed
    midway (Ctrl-C, a job timeout) leaves the file behind, and every later job hangs at start."""
    try:
        from torch.utils.cpp_extension import _get_build_directory  # torch's own rule for the directory
        lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
        age = time.time() - os.stat(lock).st_mtime
    except (ImportError, OSError):
        return
    if age > max_age_s:
        raise RendezvousError(
            f"{lock} is {age / 60:.0f} minutes old: a DeepSpeed op build was killed midway and left torch's "
            "build lock behind, so this job would wait on it for ever; if no build is running, remove the file")


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
    check_build_lock()
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
