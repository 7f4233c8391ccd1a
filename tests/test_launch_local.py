"""Launching on one machine: the launcher detection, the MPI library choice, the rendezvous
address, the scripts' own logic, `fdlora-cluster launch` with Open MPI's mpirun, and the DeepSpeed
launcher (MPICH and Open MPI runners) with a hostfile on localhost through a real sshd.

The DeepSpeed tests need root (they start an sshd on 127.0.0.1:2222 and write an ssh client
config under /etc/ssh/ssh_config.d; both are removed afterwards); the Open MPI tests need Open MPI
(tests/cluster/install.sh).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cluster import hosts
from conftest import (DEMO, JOB_TIMEOUT, ROOT, TINY_ARGS, check_run, job_env, openmpi_missing, openmpi_mpirun,
                          run_launcher, show)
from fdlora_cluster.cli import select_mpi_library
from fdlora_cluster.rendezvous import RendezvousError, rendezvous_address
from fdlora_cluster.topology import _launcher_hint

# ---------------------------------------------------------------- pure checks (no processes)


@pytest.mark.unit
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


@pytest.mark.unit
def test_mpi_library_follows_the_launcher_unless_the_user_chose():
    """The mpi4py wheel would load the pip mpich wheel's libmpi under any launcher; `run` points it
    at the launcher's MPI, found by the variables that launcher sets, and only then."""
    venv_mpich = os.path.join(sys.prefix, "lib", "libmpi.so.12")  # the mpich wheel (a test extra)
    env = {"PMI_SIZE": "5", "PMI_RANK": "1"}  # MPICH's Hydra
    assert select_mpi_library(env).startswith("MPICH (PMI_SIZE is set)") and env["MPI4PY_LIBMPI"] == venv_mpich
    for env in ({}, {"WORLD_SIZE": "5", "LOCAL_RANK": "0"}, {"SLURM_STEP_NUM_TASKS": "5"},  # no MPI launcher
                {"OMPI_COMM_WORLD_SIZE": "5", "MPI4PY_MPIABI": "mpich"},  # the user's choice stands
                {"PMI_SIZE": "5", "MPI4PY_LIBMPI": "/opt/mpi/lib/libmpi.so"}):
        before = dict(env)
        assert select_mpi_library(env) is None and env == before, before
    if openmpi_mpirun():
        for env in ({"OMPI_COMM_WORLD_SIZE": "5", "PMIX_RANK": "0"},  # Open MPI's mpirun
                    {"PMIX_RANK": "2", "SLURM_STEP_NUM_TASKS": "5"}):  # srun --mpi=pmix
            assert "Open MPI" in select_mpi_library(env) and env["MPI4PY_LIBMPI"].endswith("libmpi.so.40"), env


@pytest.mark.unit
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


@pytest.mark.launcher
def test_scripts_print_the_command_they_run():
    env = job_env(DRY_RUN="1")
    p = _script("launch/mpirun.sh", {**env, "HOSTS": "node-a:3,node-b:2"}, *TINY_ARGS)
    assert p.returncode == 0, show(p)
    assert "-n 5 -hosts node-a:3,node-b:2" in p.stdout and "run configs/demo.yaml --set train.rounds=2" in p.stdout
    p = _script("launch/mpirun.sh", {**env, "MPI": "openmpi", "MPIEXEC": "mpirun", "HOSTS": "a:3,b:2"})
    assert "-np 5 --map-by slot --host a:3,b:2 -x PATH" in p.stdout, show(p)
    # Open MPI's -x list is launch/common.sh's OPENMPI_FORWARD, the same for every script that uses it
    forwarded = {"PYTHONPATH": "/x", "CUDA_VISIBLE_DEVICES": "0", "FDLORA_RENDEZVOUS_ADDR": "eth0"}
    p = _script("launch/mpirun.sh", {**env, **forwarded, "MPI": "openmpi", "MPIEXEC": "mpirun", "HOSTS": "a:3,b:2"})
    assert all(f"-x {v}" in p.stdout for v in forwarded), show(p)
    p = _script("launch/mpirun.sh", {**env, "MPI": "openmpi", "MPIEXEC": "mpirun", "NP": "5", "MPI4PY_MPIABI": "openmpi"})
    assert "-np 5 --map-by slot --oversubscribe -x PATH" in p.stdout and "-x MPI4PY_MPIABI" in p.stdout, show(p)
    p = _script("launch/deepspeed.sh", env)
    assert "--hostfile hostfiles/localhost-5 --launcher mpich --master_addr localhost --force_multi" in p.stdout, show(p)
    if openmpi_mpirun():  # DS_LAUNCHER=openmpi needs Open MPI's bin (ompi_info) on PATH
        p = _script("launch/deepspeed.sh", {**env, "DS_LAUNCHER": "openmpi"})
        assert "--launcher openmpi --master_addr localhost --force_multi --launcher_args --mca btl_tcp_if_include lo -x PATH" \
            in p.stdout, show(p)
        p = _script("launch/deepspeed.sh", {**env, **forwarded, "DS_LAUNCHER": "openmpi"})
        assert all(f"-x {v}" in p.stdout for v in forwarded), show(p)
    p = _script("launch/deepspeed.sh", {**env, "HOSTFILE": "hostfiles/2nodes-8gpus"})
    assert p.returncode == 2 and "16 slots, but configs/demo.yaml needs world=5" in p.stderr, show(p)
    p = _script("launch/deepspeed.sh", {**env, "DS_LAUNCHER": "pdsh"})
    assert p.returncode == 2 and "only mpich and openmpi" in p.stderr, show(p)
    p = _script("launch/slurm/fdlora-srun.sh", {**env, "NODES": "2"})
    assert "srun --nodes=2 --ntasks=5 --mpi=pmi2" in p.stdout, show(p)
    p = _script("launch/slurm/fdlora-srun.sh", env, "--set", "topology.clients=[3,3]")  # a --set sizes the job too
    assert "srun --nodes=1 --ntasks=7 --mpi=pmi2" in p.stdout, show(p)


@pytest.mark.launcher
@pytest.mark.parametrize("script", ["launch/mpirun.sh", "launch/deepspeed.sh", "launch/slurm/fdlora-srun.sh",
                                    "launch/slurm/fdlora.sbatch", "launch/slurm/fdlora-mpiexec.sbatch",
                                    "launch/slurm/fdlora-requeue.sbatch"])
def test_scripts_stop_at_a_config_error(script):
    """Every script sizes the job with `fdlora-cluster check --world-size` (launch/common.sh): a
    config error stops it there, with the error and exit 2, before it prints or starts a command."""
    p = _script(script, job_env(DRY_RUN="1", SLURM_NTASKS="5"), "--set", "topology.clients=[2,0]")
    assert p.returncode == 2, show(p)
    assert "config error:" in p.stderr and "topology.clients" in p.stderr and "cannot size the job" in p.stderr, show(p)
    assert "+ " not in p.stdout, show(p)


@pytest.mark.launcher
def test_requeue_script_resumes_in_one_run_directory():
    env = job_env(DRY_RUN="1", SLURM_JOB_ID="77")
    p = _script("launch/slurm/fdlora-requeue.sbatch", env)
    assert p.returncode == 0 and "attempt 1 of at most 10" in p.stdout, show(p)
    assert "--output runs/fdlora-77 --resume auto" in p.stdout
    p = _script("launch/slurm/fdlora-requeue.sbatch", {**env, "SLURM_RESTART_COUNT": "1"})
    assert "attempt 2: resuming from the newest complete checkpoint" in p.stdout, show(p)
    assert "--output runs/fdlora-77 --resume auto" in p.stdout
    p = _script("launch/slurm/fdlora-requeue.sbatch", {**env, "SLURM_RESTART_COUNT": "10"})
    assert p.returncode == 3 and "refusing attempt 11" in p.stderr, show(p)


# ---------------------------------------------------------------- the DeepSpeed launcher, for real

SKIP = hosts.missing_prerequisites("/usr/sbin/sshd", "ssh", "ssh-keygen")


@pytest.fixture(scope="module")
def localhost_ssh():
    if SKIP:
        pytest.skip(SKIP)
    with hosts.cluster_lock(), hosts.ssh_keys(), hosts.local_sshd():
        yield


@pytest.mark.launcher
def test_deepspeed_launcher_on_localhost_runs_the_demo(localhost_ssh, tmp_path):
    """launch/deepspeed.sh = deepspeed --hostfile hostfiles/localhost-5 --launcher mpich --force_multi."""
    p = subprocess.run(["bash", "launch/deepspeed.sh", *TINY_ARGS], capture_output=True, text=True,
                       timeout=JOB_TIMEOUT, env=job_env(OUTPUT=str(tmp_path / "run")), cwd=ROOT)
    assert p.returncode == 0, show(p)
    assert "mpirun -n 5 -ppn 5" in p.stdout + p.stderr, "DeepSpeed did not use its MPICH runner"
    check_run(tmp_path / "run", [2, 2])


@pytest.mark.launcher
def test_deepspeed_spawning_without_mpi_is_stopped_with_the_fix(localhost_ssh, tmp_path):
    """On one host without --force_multi DeepSpeed ignores --launcher mpich and spawns the ranks
    itself (no MPI world): every rank must stop at start and say how to launch instead."""
    fdlora = job_env()["FDLORA"]
    cmd = ["deepspeed", "--hostfile", "hostfiles/localhost-5", "--launcher", "mpich",
           fdlora, "run", DEMO, "--probe", "--output", str(tmp_path / "run"), *TINY_ARGS]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=JOB_TIMEOUT, env=job_env(), cwd=ROOT)
    out = p.stdout + p.stderr
    assert p.returncode != 0, show(p)
    assert "spawned the ranks itself, without an MPI world" in out and "--force_multi" in out, show(p)
    assert not (tmp_path / "run" / "summary.json").exists()


# ---------------------------------------------------------------- Open MPI, for real

OPENMPI_SKIP = openmpi_missing()


@pytest.mark.launcher
@pytest.mark.skipif(OPENMPI_SKIP is not None, reason=OPENMPI_SKIP or "")
def test_openmpi_fdlora_launch_probes_the_demo(tmp_path):
    """`fdlora-cluster launch --probe --mpiexec <Open MPI's mpirun>`: 5 ranks on a 2-core machine
    (launch lets Open MPI oversubscribe, and allows root); each rank's mpi4py loads Open MPI, or
    every rank would be a world of its own and the job would stop at start."""
    fdlora = job_env()["FDLORA"]
    cmd = [fdlora, "launch", "--probe", "--mpiexec", openmpi_mpirun(), DEMO, "--output", str(tmp_path / "run"), *TINY_ARGS]
    p = run_launcher(cmd, job_env())
    assert p.returncode == 0, show(p)
    assert f"+ {openmpi_mpirun()} -n 5 " in p.stdout and " --probe" in p.stdout and "probe ok" in p.stdout + p.stderr, show(p)
    check_run(tmp_path / "run", [2, 2], probe=True)


@pytest.mark.launcher
@pytest.mark.skipif(OPENMPI_SKIP is not None, reason=OPENMPI_SKIP or "")
def test_openmpi_mpirun_script_on_localhost_runs_the_demo(tmp_path):
    """MPI=openmpi launch/mpirun.sh on this host: `mpirun -np 5 --map-by slot --oversubscribe`,
    root allowed by the script; each rank's mpi4py loads Open MPI (cli.select_mpi_library)."""
    env = job_env(MPI="openmpi", MPIEXEC=openmpi_mpirun(), NP="5", OUTPUT=str(tmp_path / "run"))
    p = run_launcher(["bash", "launch/mpirun.sh", *TINY_ARGS], env)
    assert p.returncode == 0, show(p)
    assert f"+ {openmpi_mpirun()} -np 5 --map-by slot --oversubscribe -x PATH" in p.stdout, show(p)
    check_run(tmp_path / "run", [2, 2])


@pytest.mark.launcher
@pytest.mark.skipif(OPENMPI_SKIP is not None, reason=OPENMPI_SKIP or "")
def test_openmpi_deepspeed_launcher_on_localhost_probes_the_demo(localhost_ssh, tmp_path):
    """DS_LAUNCHER=openmpi launch/deepspeed.sh --probe = deepspeed --launcher openmpi --force_multi,
    whose runner calls `mpirun -n 5 -hostfile ...`: Open MPI's, put first on PATH by the script."""
    p = run_launcher(["bash", "launch/deepspeed.sh", "--probe", *TINY_ARGS],
                     job_env(OUTPUT=str(tmp_path / "run"), DS_LAUNCHER="openmpi"))
    assert p.returncode == 0, show(p)
    assert "mpirun -n 5 -hostfile hostfiles/localhost-5" in p.stdout + p.stderr, "DeepSpeed did not use its openmpi runner"
    check_run(tmp_path / "run", [2, 2], probe=True)

