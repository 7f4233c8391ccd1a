"""A real single-node Slurm (slurmctld + slurmd + a private munged on this machine, as
notes/slurm.md): the shipped sbatch script runs the demo to the end, with MPICH (srun --mpi=pmi2)
and with Open MPI (srun --mpi=pmix, and Open MPI's mpirun inside the allocation).

Needs root and Slurm (tests/cluster/install.sh); the daemons are stopped afterwards.
"""

from __future__ import annotations

import pytest

from cluster import hosts
from cluster.jobs import JOB_TIMEOUT, ROOT, TINY_ARGS, check_run, job_env, openmpi_missing, openmpi_mpirun

SKIP = hosts.missing_prerequisites("slurmctld", "slurmd", "sbatch", "munged")


@pytest.fixture(scope="module")
def slurm_local():
    if SKIP:
        pytest.skip(SKIP)
    with hosts.cluster_lock(), hosts.slurm() as cluster:
        yield cluster


def sbatch(cluster, script: str, tmp_path, *options: str, **env):
    """Submit a shipped script with the demo (tiny) and wait for it; returns (job fields, console).
    `env`: knobs for the script (sbatch passes the submitting environment to the job)."""
    cluster.env = {**job_env(OUTPUT=str(tmp_path / "run"), **env), "SLURM_CONF": cluster.env["SLURM_CONF"]}
    job, fields = cluster.submit_and_wait(
        ["--overcommit", f"--output={tmp_path}/slurm-%j.out", *options, script, *TINY_ARGS],
        timeout=JOB_TIMEOUT, cwd=ROOT)
    out = tmp_path / f"slurm-{job}.out"
    return fields, out.read_text() if out.exists() else ""


def test_sbatch_runs_the_demo_on_one_node(slurm_local, tmp_path):
    job, console = sbatch(slurm_local, "launch/slurm/fdlora.sbatch", tmp_path)
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), f"{job}\n--- job console\n{console}\n{slurm_local.logs()}"
    assert "+ srun --mpi=pmi2" in console and "results per client" in console, console
    check_run(tmp_path / "run", [2, 2])


def test_sbatch_stops_at_once_when_the_allocation_does_not_fit_the_topology(slurm_local, tmp_path):
    job, console = sbatch(slurm_local, "launch/slurm/fdlora.sbatch", tmp_path, "--ntasks=3")
    assert (job["JobState"], job["ExitCode"]) == ("FAILED", "2:0"), (job, console)
    assert "needs 5 tasks (1 server + client ranks), the job has 3: submit with --ntasks=5" in console, console


def test_srun_without_an_mpi_plugin_is_stopped_with_the_fix(slurm_local, tmp_path):
    """SRUN_MPI=none: srun starts 5 tasks that are not one MPI world; each must stop and say so."""
    job, console = sbatch(slurm_local, "launch/slurm/fdlora.sbatch", tmp_path, SRUN_MPI="none")
    assert job["JobState"] == "FAILED", (job, console)
    assert "srun started 5 tasks, but they are not one MPI world" in console and "--mpi=pmi2" in console, console


OPENMPI_SKIP = openmpi_missing()


@pytest.mark.skipif(OPENMPI_SKIP is not None, reason=OPENMPI_SKIP or "")
def test_openmpi_sbatch_srun_pmix_runs_the_demo(slurm_local, tmp_path):
    """SRUN_MPI=pmix: Slurm's PMIx plugin (Debian's slurm-wlm with libpmix) makes the tasks one Open
    MPI world; each rank's mpi4py loads Open MPI because srun --mpi=pmix set PMIX_RANK."""
    listed = slurm_local.run(["srun", "--mpi=list"], timeout=30)
    if "pmix" not in listed.stdout + listed.stderr:
        pytest.skip(f"this Slurm offers no pmix plugin (srun --mpi=list: {listed.stdout.split()}); "
                    "fdlora-mpiexec.sbatch with Open MPI's mpirun is the path then (tested below)")
    job, console = sbatch(slurm_local, "launch/slurm/fdlora.sbatch", tmp_path, SRUN_MPI="pmix")
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), f"{job}\n--- job console\n{console}\n{slurm_local.logs()}"
    assert "+ srun --mpi=pmix" in console and "results per client" in console, console
    check_run(tmp_path / "run", [2, 2])


@pytest.mark.skipif(OPENMPI_SKIP is not None, reason=OPENMPI_SKIP or "")
def test_openmpi_mpirun_inside_the_allocation_runs_the_demo(slurm_local, tmp_path):
    """fdlora-mpiexec.sbatch with MPIEXEC=<Open MPI's mpirun>: mpirun reads the allocation (5
    slots from --ntasks) and starts the ranks itself."""
    job, console = sbatch(slurm_local, "launch/slurm/fdlora-mpiexec.sbatch", tmp_path, MPIEXEC=openmpi_mpirun())
    assert (job["JobState"], job["ExitCode"]) == ("COMPLETED", "0:0"), f"{job}\n--- job console\n{console}\n{slurm_local.logs()}"
    assert f"+ {openmpi_mpirun()} -n 5" in console and "results per client" in console, console
    check_run(tmp_path / "run", [2, 2])


