"""Who is who: the server, the clients, their leaders, and the communicators between them.

The layout is fixed by SPEC.md. For `clients: [2, 2]`:

    world=5: server [0]; client 0 [1,2] leader 1; client 1 [3,4] leader 3; federation [0,1,3]

`RankPlan` is the pure arithmetic (no MPI, unit-tested). `Topology` binds it to a live MPI world:
`COMM_WORLD.Split` gives each client its intra-client communicator and gives {server, leaders}
the federation communicator (federation rank 0 is the server, rank 1+i is client i's leader).
Everything else asks `topo.is_server`, `topo.is_leader`, `topo.client_id`; nobody re-derives ranks.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

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
        return [SERVER_RANK] + [self.leader(c) for c in range(self.num_clients)]

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
        head = ("role", "ranks", "hosts", "leader")
        widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(lines)


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
                "Use the mpiexec of mpi4py's MPI (`python -c 'import mpi4py; print(mpi4py.get_config())'`), "
                "or rebuild mpi4py against your cluster's MPI. " + how)
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


def build_topology(client_sizes: list[int]) -> Topology:
    """Split COMM_WORLD into the client and federation communicators (collective on all ranks)."""
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
    return Topology(
        plan=plan, rank=rank, world=world,
        client_comm=None if client_comm == MPI.COMM_NULL else client_comm,
        federation_comm=None if federation_comm == MPI.COMM_NULL else federation_comm,
        hosts=hosts)
