"""Launching on one machine: the launcher detection, the rendezvous address, the scripts' own
logic, and the DeepSpeed launcher with a hostfile on localhost through a real sshd.

The DeepSpeed tests need root (they start an sshd on 127.0.0.1:2222 and write an ssh client
config under /etc/ssh/ssh_config.d; both are removed afterwards).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from cluster import hosts
from cluster.jobs import DEMO, JOB_TIMEOUT, ROOT, TINY_ARGS, check_run, job_env, show
from fdlora_cluster.rendezvous import RendezvousError, rendezvous_address
from fdlora_cluster.topology import _launcher_hint

# ---------------------------------------------------------------- pure checks (no processes)


@pytest.mark.parametrize("env, says", [
    ({"WORLD_SIZE": "5", "LOCAL_RANK": "0", "RANK": "0"}, "--force_multi"),
    ({"LOCAL_RANK": "0"}, "--launcher mpich"),
    ({"SLURM_STEP_NUM_TASKS": "5", "SLURM_PROCID": "2"}, "srun --mpi=pmi2"),
    ({"PMI_SIZE": "5", "PMI_RANK": "1"}, "another MPI than the one mpi4py uses"),
    ({"OMPI_COMM_WORLD_SIZE": "5", "WORLD_SIZE": "5"}, "another MPI than the one mpi4py uses"),
    ({}, "mpiexec -n N fdlora-cluster run"),
])
def test_launcher_hint_names_the_launcher_and_the_fix(env, says):
    assert says in _launcher_hint(env, mpi_library="MPICH Version: 5.0.2")


def test_rendezvous_address_refuses_loopback_for_a_client_spanning_hosts(monkeypatch):
    monkeypatch.delenv("FDLORA_RENDEZVOUS_ADDR", raising=False)
    assert rendezvous_address(["h1", "h1"], None) == "127.0.0.1"
    assert rendezvous_address(["h1", "h1"], "10.0.0.1") == "127.0.0.1"  # one host: loopback, always
    with pytest.raises(RendezvousError, match="spans hosts.*loopback"):
        rendezvous_address(["h1", "h2"], "127.0.0.1")
    # an interface name is resolved on the leader's own host
    with pytest.raises(RendezvousError, match="'lo' is loopback"):
        rendezvous_address(["h1", "h2"], "lo")
    monkeypatch.setenv("FDLORA_RENDEZVOUS_ADDR", "localhost")  # the environment wins over the config
    with pytest.raises(RendezvousError, match="FDLORA_RENDEZVOUS_ADDR"):
        rendezvous_address(["h1", "h2"], "10.0.0.1")


def _script(path: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", path, *args], capture_output=True, text=True, timeout=60, env=env, cwd=ROOT)


def test_scripts_print_the_command_they_run():
    env = job_env(DRY_RUN="1")
    p = _script("launch/mpirun.sh", {**env, "HOSTS": "node-a:3,node-b:2"}, *TINY_ARGS)
    assert p.returncode == 0, show(p)
    assert "-n 5 -hosts node-a:3,node-b:2" in p.stdout and "run configs/demo.yaml --set train.rounds=1" in p.stdout
    p = _script("launch/mpirun.sh", {**env, "MPI": "openmpi", "HOSTS": "a:3,b:2"})
    assert "-np 5 --map-by slot --host a:3,b:2 -x PATH" in p.stdout, show(p)
    p = _script("launch/deepspeed.sh", env)
    assert "--hostfile hostfiles/localhost-5 --launcher mpich --master_addr localhost --force_multi" in p.stdout, show(p)
    p = _script("launch/deepspeed.sh", {**env, "HOSTFILE": "hostfiles/2nodes-8gpus"})
    assert p.returncode == 2 and "16 slots, but configs/demo.yaml needs world=5" in p.stderr, show(p)
    p = _script("launch/deepspeed.sh", {**env, "DS_LAUNCHER": "pdsh"})
    assert p.returncode == 2 and "only mpich and openmpi" in p.stderr, show(p)
    p = _script("launch/slurm/fdlora-srun.sh", {**env, "NODES": "2"})
    assert "srun --nodes=2 --ntasks=5 --mpi=pmi2" in p.stdout, show(p)


def test_requeue_script_says_resume_is_not_available():
    env = job_env(DRY_RUN="1", SLURM_JOB_ID="77")
    p = _script("launch/slurm/fdlora-requeue.sbatch", env)
    assert p.returncode == 0 and "checkpoints do not exist yet" in p.stdout, show(p)
    assert "--output runs/fdlora-77/attempt-1" in p.stdout
    p = _script("launch/slurm/fdlora-requeue.sbatch", {**env, "SLURM_RESTART_COUNT": "1"})
    assert "RESUME NOT AVAILABLE" in p.stdout and "FROM SCRATCH" in p.stdout, show(p)
    assert "--output runs/fdlora-77/attempt-2" in p.stdout
    p = _script("launch/slurm/fdlora-requeue.sbatch", {**env, "SLURM_RESTART_COUNT": "3"})
    assert p.returncode == 3 and "refusing attempt 4" in p.stderr, show(p)


# ---------------------------------------------------------------- the DeepSpeed launcher, for real

SKIP = hosts.missing_prerequisites("/usr/sbin/sshd", "ssh", "ssh-keygen")


@pytest.fixture(scope="module")
def localhost_ssh():
    if SKIP:
        pytest.skip(SKIP)
    with hosts.cluster_lock(), hosts.ssh_keys(), hosts.local_sshd():
        yield


def test_deepspeed_launcher_on_localhost_runs_the_demo(localhost_ssh, tmp_path):
    """launch/deepspeed.sh = deepspeed --hostfile hostfiles/localhost-5 --launcher mpich --force_multi."""
    p = subprocess.run(["bash", "launch/deepspeed.sh", *TINY_ARGS], capture_output=True, text=True,
                       timeout=JOB_TIMEOUT, env=job_env(OUTPUT=str(tmp_path / "run")), cwd=ROOT)
    assert p.returncode == 0, show(p)
    assert "mpirun -n 5 -ppn 5" in p.stdout + p.stderr, "DeepSpeed did not use its MPICH runner"
    check_run(tmp_path / "run", [2, 2])


def test_deepspeed_spawning_without_mpi_is_stopped_with_the_fix(localhost_ssh, tmp_path):
    """On one host without --force_multi DeepSpeed ignores --launcher mpich and spawns the ranks
    itself (no MPI world): every rank must stop at start and say how to launch instead."""
    fdlora = job_env()["FDLORA"]
    cmd = ["deepspeed", "--hostfile", "hostfiles/localhost-5", "--launcher", "mpich",
           fdlora, "run", DEMO, "--output", str(tmp_path / "run"), *TINY_ARGS]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT, env=job_env(), cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode != 0, show(p)
    assert "spawned the ranks itself, without an MPI world" in out and "--force_multi" in out, show(p)
    assert not (tmp_path / "run" / "summary.json").exists()
