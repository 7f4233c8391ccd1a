"""Who is who: the server, the clients, their leaders, and the communicators between them.

The layout is fixed by SPEC.md. For `clients: [2, 2]`:

    world=5: server [0]; client 0 [1,2] leader 1; client 1 [3,4] leader 3; federation [0,1,3]

`RankPlan` is the pure arithmetic (no MPI, unit-tested). `Topology` binds it to a live MPI world:
`COMM_WORLD.Split` gives each client its intra-client communicator and gives {server, leaders}
the federation communicator (federation rank 0 is the server, rank 1+i is client i's leader).
Everything else asks `topo.is_server`, `topo.is_leader`, `topo.client_id`, `topo.gpu`; nobody
re-derives ranks or GPU indices.

Which GPU a client rank uses is one rule, `place_gpus` (pure, unit-tested): on each host, the
client ranks that see the same GPUs take them in rank order; the server takes none. For
2 nodes x 8 GPUs and `clients: [5, 5, 5]`:

    node1: rank 0 server | client 0 ranks 1-5 -> GPUs 0-4 | client 1 ranks 6-7 -> GPUs 5-6 (7 idle)
    node2: client 1 ranks 8-10 -> GPUs 0-2 | client 2 ranks 11-15 -> GPUs 3-7
"""

from __future__ import annotations

import os
import socket
from collections import defaultdict
from dataclasses import dataclass, field

from .log import text_table

SERVER_RANK = 0


class TopologyError(RuntimeError):
    """The ranks that were started do not fit the config's topology, or launch went wrong."""


@dataclass(frozen=True)
class RankPlan:
    """Rank blocks for a list of client sizes. Rank 0 is the server."""

    client_sizes: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return 1 + sum(self.client_sizes)

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)

    def client_ranks(self, client: int) -> list[int]:
        start = 1 + sum(self.client_sizes[:client])
        return list(range(start, start + self.client_sizes[client]))

    def leader(self, client: int) -> int:
        return self.client_ranks(client)[0]

    def client_of(self, rank: int) -> int | None:
        """Client id owning `rank`, or None for the server."""
        if rank == SERVER_RANK:
            return None
        for c in range(self.num_clients):
            if rank in self.client_ranks(c):
                return c
        raise TopologyError(f"rank {rank} is outside the world of {self.world_size} ranks")

    def federation_ranks(self) -> list[int]:
        """World ranks of the federation communicator, in its rank order: the server, then the leaders."""
        return [SERVER_RANK] + [self.leader(c) for c in range(self.num_clients)]

    def federation_rank(self, client: int) -> int:
        """Rank of `client`'s leader in the federation communicator (the server is 0 there)."""
        if not 0 <= client < self.num_clients:
            raise TopologyError(f"client {client} is outside the {self.num_clients} clients")
        return 1 + client

    @property
    def clients(self) -> list[int]:
        return list(range(self.num_clients))

    def check_world(self, world_size: int) -> None:
        if world_size != self.world_size:
            sizes = " + ".join(str(s) for s in self.client_sizes)
            raise TopologyError(
                f"the config's topology needs 1 server + ({sizes}) client ranks = {self.world_size} "
                f"ranks, but the job has WORLD_SIZE({world_size}); start it with "
                f"`mpiexec -n {self.world_size} ...` or change topology.clients")

    def describe(self) -> str:
        parts = [f"world={self.world_size}: server [{SERVER_RANK}]"]
        for c in range(self.num_clients):
            r = self.client_ranks(c)
            parts.append(f"client {c} [{','.join(map(str, r))}] leader {r[0]}")
        parts.append(f"federation [{','.join(map(str, self.federation_ranks()))}]")
        return "; ".join(parts)


@dataclass
class Topology:
    """This rank's place in the job, with its MPI communicators."""

    plan: RankPlan
    rank: int
    world: object  # MPI.Comm (COMM_WORLD)
    client_comm: object | None  # this client's ranks (None on the server)
    federation_comm: object | None  # server + leaders (None on followers)
    hosts: list[str] = field(default_factory=list)  # hostname of every world rank
    gpus: list[int | None] = field(default_factory=list)  # every rank's GPU index (place_gpus); [] on CPU

    @property
    def is_server(self) -> bool:
        return self.rank == SERVER_RANK

    @property
    def client_id(self) -> int | None:
        return self.plan.client_of(self.rank)

    @property
    def is_leader(self) -> bool:
        return not self.is_server and self.rank == self.plan.leader(self.client_id)

    @property
    def local_rank_in_client(self) -> int:
        return self.client_comm.Get_rank()

    @property
    def client_size(self) -> int:
        return self.plan.client_sizes[self.client_id]

    @property
    def role(self) -> str:
        """Tag for log lines: `server`, `client 1 leader`, `client 1 rank 4`."""
        if self.is_server:
            return "server"
        return f"client {self.client_id} leader" if self.is_leader else f"client {self.client_id} rank {self.rank}"

    @property
    def gpu(self) -> int | None:
        """This rank's GPU, as an index into the GPUs it sees (None: CPU, or the server)."""
        return self.gpus[self.rank] if self.gpus else None

    @property
    def host_local_index(self) -> int:
        """Index of this rank among the job's client ranks on its host (LOCAL_RANK on CPU)."""
        return host_local_indices(self.plan, self.hosts)[self.rank]

    def client_hosts(self, client: int) -> list[str]:
        return [self.hosts[r] for r in self.plan.client_ranks(client)]

    def table(self) -> str:
        """The topology as a table (client, ranks, hosts, leader), printed by the server."""
        rows = [("server", "0", self.hosts[0], "-")]
        for c in range(self.plan.num_clients):
            ranks = self.plan.client_ranks(c)
            hosts = sorted(set(self.client_hosts(c)))
            rows.append((f"client {c}", f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0]),
                         ",".join(hosts), str(ranks[0])))
        return text_table(("role", "ranks", "hosts", "leader"), rows)


def host_local_indices(plan: RankPlan, hosts: list[str]) -> list[int | None]:
    """Per world rank: its index among the client ranks on its host (None for the server)."""
    seen: dict[str, int] = defaultdict(int)
    out: list[int | None] = [None]
    for r in range(1, plan.world_size):
        out.append(seen[hosts[r]])
        seen[hosts[r]] += 1
    return out


def place_gpus(plan: RankPlan, hosts: list[str], visible: list[list[str]], share_gpus: bool = False) -> list[int | None]:
    """The GPU of every client rank, as an index into the GPUs that rank sees (None for the server).

    `hosts[r]` is world rank r's host; `visible[r]` the GPUs it sees, by id (CUDA_VISIBLE_DEVICES
    entries, or "0".."n-1" when that is unset; see `visible_gpus`). On each host, the client ranks
    that see the same list take its GPUs in rank order, wrapping around when they outnumber them;
    a launcher that binds each rank to its own GPU (srun --gpus-per-task, a per-rank
    CUDA_VISIBLE_DEVICES) gives every rank its own list, so each takes that one GPU.

    The result is what DeepSpeed and torch must agree on (LOCAL_RANK, set_device, NCCL's device_id).
    Refused with a TopologyError naming the host, its GPUs and the ranks: a client rank that sees no
    GPU; two ranks of ONE client on one GPU (NCCL refuses two ranks of a communicator on one device);
    ranks of DIFFERENT clients on one GPU unless `share_gpus` (topology.share_gpus) allows it."""
    if len(hosts) != plan.world_size or len(visible) != plan.world_size:
        raise ValueError(f"place_gpus: {len(hosts)} hosts and {len(visible)} GPU lists for {plan.world_size} ranks")
    taken: dict[tuple[str, tuple[str, ...]], int] = defaultdict(int)  # (host, GPU list) -> ranks placed
    gpus: list[int | None] = [None]
    users: dict[tuple[str, str], list[int]] = defaultdict(list)  # (host, GPU id) -> ranks on it
    for r in range(1, plan.world_size):
        seen = tuple(visible[r])
        if not seen:
            raise TopologyError(f"rank {r} (client {plan.client_of(r)}) on host {hosts[r]} sees no GPU, "
                                "but the job runs on GPUs (topology.backend nccl, or auto with CUDA present); "
                                "check CUDA_VISIBLE_DEVICES and the GPUs the launcher gives each task, or set "
                                "topology.backend: gloo to run on CPU")
        index = taken[hosts[r], seen] % len(seen)
        taken[hosts[r], seen] += 1
        gpus.append(index)
        users[hosts[r], seen[index]].append(r)
    for (host, gpu_id), ranks in users.items():
        if len(ranks) == 1:
            continue
        n_gpus = len(_ids_on(host, visible, hosts))
        by_client = defaultdict(list)
        for r in ranks:
            by_client[plan.client_of(r)].append(r)
        for client, rs in by_client.items():
            if len(rs) > 1:
                raise TopologyError(
                    f"host {host} has {n_gpus} GPU(s) (ids {_ranks(sorted(_ids_on(host, visible, hosts)))}), and ranks "
                    f"{_ranks(rs)} of client {client} would share GPU {gpu_id}: NCCL refuses two ranks of one "
                    f"client on one GPU. Give that "
                    f"host at least as many GPUs as the client has ranks there, or fewer ranks per client on it")
        if not share_gpus:
            listed = ", ".join(f"{r} (client {plan.client_of(r)})" for r in ranks)
            raise TopologyError(
                f"host {host} has {n_gpus} GPU(s) (ids {_ranks(sorted(_ids_on(host, visible, hosts)))}), and ranks "
                f"{listed} would share GPU {gpu_id}. Ranks of different clients may share a GPU only when the config says so "
                f"(topology.share_gpus: true; docs/LAUNCH.md), or give the host more GPUs")
    return gpus


def _ids_on(host: str, visible: list[list[str]], hosts: list[str]) -> set[str]:
    return {g for r in range(1, len(hosts)) if hosts[r] == host for g in visible[r]}


def _ranks(rs: list[int]) -> str:
    return ",".join(map(str, rs))


def visible_gpus() -> list[str]:
    """Ids of the GPUs this process sees: CUDA_VISIBLE_DEVICES entries, else "0".."n-1"."""
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ids = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    return ids[:n] if len(ids) >= n and ids else [str(i) for i in range(n)]


def _env_int(env, *names: str) -> int | None:
    """The first of `names` set to an integer in `env`, else None."""
    for n in names:
        try:
            return int(env[n])
        except (KeyError, ValueError):
            continue
    return None


def _launcher_hint(env=None, mpi_library: str = "") -> str:
    """Why this process is an MPI singleton although the job needs more ranks, and how to launch.

    A launcher that starts N processes without making them one MPI world leaves its own traces in
    the environment; the most specific one wins:
      - an MPI launcher's size (PMI_SIZE, OMPI_COMM_WORLD_SIZE, PMIX_SIZE...) > 1: that mpiexec
        belongs to another MPI than the one mpi4py is built on, so every rank is alone;
      - SLURM_STEP_NUM_TASKS > 1: srun started the tasks without an MPI plugin (--mpi=...);
      - WORLD_SIZE > 1 or LOCAL_RANK (torch-style launchers): the DeepSpeed launcher spawning the
        ranks itself (one node without --force_multi, or --launcher pdsh), or torchrun."""
    env = os.environ if env is None else env
    how = ("Launch with `fdlora-cluster launch CONFIG` (one machine), `mpiexec -n N fdlora-cluster run CONFIG`, "
           "`srun --mpi=pmi2 ... fdlora-cluster run CONFIG` (launch/slurm/), or `deepspeed --hostfile HOSTFILE "
           "--launcher mpich|openmpi [--force_multi on one node] ...` (launch/deepspeed.sh); see docs/LAUNCH.md.")
    mpi_size = _env_int(env, "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")
    if mpi_size is not None and mpi_size > 1:
        return (f"An MPI launcher started {mpi_size} processes, but each one is a world of its own: that "
                f"launcher belongs to another MPI than the one mpi4py uses ({mpi_library or 'see MPI.Get_library_version()'}). "
                "Use the mpiexec of mpi4py's MPI (`python -c 'import mpi4py; print(mpi4py.get_config())'`); with "
                "the pip mpi4py wheel, set MPI4PY_LIBMPI to the launcher's libmpi (docs/LAUNCH.md, 'Which MPI "
                "library'); or rebuild mpi4py against your cluster's MPI. " + how)
    tasks = _env_int(env, "SLURM_STEP_NUM_TASKS")
    if tasks is not None and tasks > 1:
        return (f"srun started {tasks} tasks, but they are not one MPI world: srun needs an MPI plugin that "
                "your MPI speaks, e.g. `srun --mpi=pmi2` (list them with `srun --mpi=list`), or run mpiexec "
                "inside the allocation (launch/slurm/fdlora-mpiexec.sbatch). " + how)
    if _env_int(env, "WORLD_SIZE") not in (None, 1) or "LOCAL_RANK" in env:
        return (f"A launcher set WORLD_SIZE={env.get('WORLD_SIZE')} LOCAL_RANK={env.get('LOCAL_RANK')} and spawned "
                "the ranks itself, without an MPI world: the DeepSpeed launcher does this on one node without "
                "--force_multi, and with --launcher pdsh; torchrun does too. With the DeepSpeed launcher use "
                "`--launcher mpich` or `--launcher openmpi`, and add `--force_multi` when the hostfile has one "
                "host. " + how)
    return how


def build_topology(client_sizes: list[int], use_gpus: bool = False, share_gpus: bool = False) -> Topology:
    """Split COMM_WORLD into the client and federation communicators and, with `use_gpus`, place
    every client rank on a GPU (`place_gpus`). Collective on all ranks; a placement that does not
    fit raises the same TopologyError on every rank."""
    from mpi4py import MPI  # heavy import at the seam

    world = MPI.COMM_WORLD
    plan = RankPlan(tuple(client_sizes))
    size, rank = world.Get_size(), world.Get_rank()
    if size == 1 and plan.world_size > 1:
        raise TopologyError(
            f"the config's topology needs {plan.world_size} ranks but this is a single process. "
            + _launcher_hint(mpi_library=MPI.Get_library_version().splitlines()[0].strip()))
    plan.check_world(size)
    client = plan.client_of(rank)
    # Split is collective: every rank passes a colour; UNDEFINED gives COMM_NULL.
    client_comm = world.Split(MPI.UNDEFINED if client is None else client, rank)
    in_fed = rank in plan.federation_ranks()
    federation_comm = world.Split(0 if in_fed else MPI.UNDEFINED, rank)
    hosts = world.allgather(socket.gethostname())
    gpus = place_gpus(plan, hosts, world.allgather(visible_gpus() if rank != SERVER_RANK else []), share_gpus) \
        if use_gpus else []
    return Topology(
        plan=plan, rank=rank, world=world,
        client_comm=None if client_comm == MPI.COMM_NULL else client_comm,
        federation_comm=None if federation_comm == MPI.COMM_NULL else federation_comm,
        hosts=hosts, gpus=gpus)
