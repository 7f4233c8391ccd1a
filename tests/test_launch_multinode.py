"""Two hosts on one machine: network namespaces node-a (10.77.0.1) and node-b (10.77.0.2) with
their own hostnames and sshd, sharing the filesystem (notes/multinode-netns.md). Jobs whose
clients span both hosts run through mpiexec with a host list, through the DeepSpeed launcher
with a two-host hostfile, and through a two-node Slurm (slurmctld + one slurmd per host); each
must finish with every client's ranks holding identical weights.

Needs root, iproute2, sshd and Slurm (tests/cluster/install.sh); everything started here is
stopped, the namespaces deleted and the /etc/hosts lines removed afterwards.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from cluster import hosts
from conftest import JOB_TIMEOUT, ROOT, TINY_ARGS, check_run, job_env, openmpi_missing, openmpi_mpirun, run_launcher, show
from conftest import write_config

pytestmark = pytest.mark.launcher

SKIP = hosts.missing_prerequisites("ip", "nsenter", "unshare", "/usr/sbin/sshd", "ssh", "slurmctld", "slurmd", "munged")
A, B = hosts.HOSTS


@pytest.fixture(scope="module")
def two_hosts():
    if SKIP:
        pytest.skip(SKIP)
    with hosts.cluster_lock(), hosts.ssh_keys(), hosts.netns_hosts() as h:
        yield h


def on_node_a(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    """Run a launcher on node-a, as a user logged in there would."""
    return subprocess.run(A.wrap(cmd), capture_output=True, text=True, timeout=JOB_TIMEOUT, env=env, cwd=ROOT)


def test_mpiexec_host_list_uneven_clients_one_spanning_both_hosts(two_hosts, tmp_path):
    """1 server + clients [1, 1, 3] with ZeRO 1 / 2 / 3 and their own K; hosts node-a:4,node-b:2
    put client 2 on node-a (rank 3) and node-b (ranks 4, 5). Its leader publishes the address of
    the interface named in FDLORA_RENDEZVOUS_ADDR (node-a's veth)."""
    overrides = {0: {"deepspeed": {"zero_optimization": {"stage": 1}}, "inner_steps": 2},
                 1: {"deepspeed": {"zero_optimization": {"stage": 2}}, "micro_batch_size": 2},
                 2: {"deepspeed": {"zero_optimization": {"stage": 3}}}}
    config = write_config(tmp_path, **{"topology.clients": [1, 1, 3], "client_overrides": overrides})
    env = job_env(CONFIG=str(config), HOSTS=f"{A.name}:4,{B.name}:2", FDLORA_RENDEZVOUS_ADDR=hosts.VETH[0])
    p = on_node_a(["bash", "launch/mpirun.sh", *TINY_ARGS], env)
    assert p.returncode == 0, show(p)
    assert "-hosts node-a:4,node-b:2" in p.stdout
    run = tmp_path / "run"
    check_run(run, [1, 1, 3], spans={0: {A.name}, 1: {A.name}, 2: {A.name, B.name}}, zero={0: 1, 1: 2, 2: 3})


def test_deepspeed_launcher_two_host_hostfile(two_hosts, tmp_path):
    """deepspeed --hostfile hostfiles/netns-2hosts --launcher mpich, `run --probe`: clients [3, 2],
    client 0 on node-a (ranks 1, 2) and node-b (rank 3); its leader publishes node-a's address
    (default path: the host name's address)."""
    env = job_env(HOSTFILE="hostfiles/netns-2hosts", OUTPUT=str(tmp_path / "run"))
    p = on_node_a(["bash", "launch/deepspeed.sh", "--probe", "--set", "topology.clients=[3,2]", *TINY_ARGS], env)
    assert p.returncode == 0, show(p)
    assert "mpirun -n 6 -ppn 3" in p.stdout + p.stderr and "-hosts node-a,node-b" in p.stdout + p.stderr
    check_run(tmp_path / "run", [3, 2], spans={0: {A.name, B.name}, 1: {B.name}}, probe=True)


OPENMPI_SKIP = openmpi_missing()


@pytest.mark.skipif(OPENMPI_SKIP is not None, reason=OPENMPI_SKIP or "")
def test_openmpi_mpirun_host_list_spanning_client(two_hosts, tmp_path):
    """MPI=openmpi launch/mpirun.sh with HOSTS=node-a:3,node-b:2 and clients [1, 3]: Open MPI's
    mpirun starts its daemon on node-b over ssh; remote ranks get only the -x variables the script
    names; client 1 has rank 2 on node-a and ranks 3, 4 on node-b. `run --probe`."""
    env = job_env(MPI="openmpi", HOSTS=f"{A.name}:3,{B.name}:2", OUTPUT=str(tmp_path / "run"),
                  FDLORA_RENDEZVOUS_ADDR=hosts.VETH[0])
    p = run_launcher(A.wrap(["bash", "launch/mpirun.sh", "--probe", "--set", "topology.clients=[1,3]", *TINY_ARGS]), env)
    assert p.returncode == 0, show(p)
    assert f"+ {openmpi_mpirun()} -np 5 --map-by slot --host node-a:3,node-b:2 -x PATH" in p.stdout, show(p)
    check_run(tmp_path / "run", [1, 3], spans={0: {A.name}, 1: {A.name, B.name}}, probe=True)


def test_loopback_rendezvous_for_a_spanning_client_is_refused(two_hosts, tmp_path):
    """A client on node-a and node-b told to meet at 127.0.0.1 would have node-b connect to
    itself: the job must stop promptly with the cause, not hang."""
    env = job_env(HOSTS=f"{A.name}:3,{B.name}:2", FDLORA_RENDEZVOUS_ADDR="127.0.0.1", OUTPUT=str(tmp_path / "run"))
    p = on_node_a(["bash", "launch/mpirun.sh", "--probe", "--set", "topology.clients=[1,3]", *TINY_ARGS], env)
    assert p.returncode != 0, show(p)
    assert "spans hosts ['node-a', 'node-b']" in p.stderr and "'127.0.0.1' is loopback" in p.stderr, show(p)


def test_route_address_is_the_hosts_own_address_towards_its_peers(two_hosts):
    """The fallback when a host name resolves to loopback: node-a's source address towards node-b."""
    code = "from fdlora_cluster.rendezvous import _route_address as r; print(r(['node-b']), r(['localhost']))"
    p = subprocess.run(A.wrap([sys.executable, "-c", code]), capture_output=True, text=True, timeout=60,
                       env=job_env(), cwd=ROOT)
    assert p.stdout.split() == [A.addr, "None"], show(p)


# ---------------------------------------------------------------- two-node Slurm


@pytest.fixture(scope="module")
def slurm_two_nodes(two_hosts):
    with hosts.slurm(two_hosts) as cluster:
        yield cluster


def _sbatch(cluster, script: str, tmp_path, *args: str):
    """Submit a shipped script with `run --probe` on two nodes and wait for it; returns its console."""
    cluster.env = {**job_env(OUTPUT=str(tmp_path / "run")), "SLURM_CONF": cluster.env["SLURM_CONF"]}
    job, fields = cluster.submit_and_wait(
        ["--nodes=2", "--ntasks=5", "--overcommit", f"--output={tmp_path}/slurm-%j.out", script, "--probe", *TINY_ARGS, *args],
        timeout=JOB_TIMEOUT, cwd=ROOT)
    out = tmp_path / f"slurm-{job}.out"
    console = out.read_text() if out.exists() else ""
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), f"{fields}\n{console}\n{cluster.logs()}"
    assert fields["NodeList"] in ("node-[a-b]", "node-a,node-b"), fields
    return console


def test_sbatch_two_nodes(slurm_two_nodes, tmp_path):
    """The shipped sbatch script (srun --mpi=pmi2 inside) with --nodes=2: the demo, server and
    client 0 on node-a, client 1 on node-b."""
    console = _sbatch(slurm_two_nodes, "launch/slurm/fdlora.sbatch", tmp_path)
    assert "+ srun --mpi=pmi2" in console and "probe ok" in console, console
    check_run(tmp_path / "run", [2, 2], spans={0: {A.name}, 1: {B.name}}, probe=True)


def test_srun_variant_two_nodes(slurm_two_nodes, tmp_path):
    """launch/slurm/fdlora-srun.sh (srun -N 2 --mpi=pmi2 from a login shell on node-a): the demo."""
    env = {**job_env(NODES="2", SRUN_ARGS="--overcommit", OUTPUT=str(tmp_path / "run")),
           "SLURM_CONF": slurm_two_nodes.env["SLURM_CONF"]}
    p = on_node_a(["bash", "launch/slurm/fdlora-srun.sh", "--probe", *TINY_ARGS], env)
    assert p.returncode == 0, f"{show(p)}\n{slurm_two_nodes.logs()}"
    assert "srun --nodes=2 --ntasks=5 --mpi=pmi2" in p.stdout
    check_run(tmp_path / "run", [2, 2], spans={0: {A.name}, 1: {B.name}}, probe=True)


def test_mpiexec_inside_the_allocation_two_nodes_spanning_client(slurm_two_nodes, tmp_path):
    """launch/slurm/fdlora-mpiexec.sbatch with --nodes=2 and clients [1, 3]: Hydra reads the
    allocation; client 1 has rank 2 on node-a and ranks 3, 4 on node-b."""
    console = _sbatch(slurm_two_nodes, "launch/slurm/fdlora-mpiexec.sbatch", tmp_path, "--set", "topology.clients=[1,3]")
    assert "mpiexec -n 5" in console and "probe ok" in console, console
    check_run(tmp_path / "run", [1, 3], spans={0: {A.name}, 1: {A.name, B.name}}, probe=True)
