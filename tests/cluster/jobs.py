"""What every launch test checks in a finished job, the environment its ranks get, and where
Open MPI is (the second MPI the launch tests run, beside the pip `mpich` wheel)."""

from __future__ import annotations

import json
import functools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO = "configs/demo.yaml"
# A small job (~20 s of training work): one round, one local step, few rows.
TINY_ARGS = ["--set", "train.rounds=1", "--set", "train.inner_steps=1", "--set", "train.personal_steps=2",
             "--set", "fusion.budget=4", "--set", "data.rows_per_client=40"]
JOB_TIMEOUT = int(os.environ.get("FDLORA_LAUNCH_JOB_TIMEOUT", "300"))


def job_env(**extra) -> dict:
    """This Python's bin first on PATH (fdlora-cluster, mpiexec, deepspeed), one thread per rank, CPU."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["FDLORA"] = os.path.join(os.path.dirname(sys.executable), "fdlora-cluster")
    env.update(extra)
    return env


def run_launcher(cmd: list[str], env: dict, timeout: int = JOB_TIMEOUT, cwd=ROOT) -> subprocess.CompletedProcess:
    """Run a launcher in its own process group; on timeout kill the whole group (mpirun, its
    daemons and the ranks would otherwise outlive the test) and return exit 124 with the output."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(cmd, p.returncode, out, err)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return subprocess.CompletedProcess(cmd, 124, out, f"{err}\n[timed out after {timeout}s: process group killed]")


def show(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n--- stdout\n{p.stdout[-5000:]}\n--- stderr\n{p.stderr[-5000:]}"


def check_run(run_dir: Path, client_sizes: list[int], spans: dict[int, set[str]] | None = None,
              zero: dict[int, int] | None = None) -> None:
    """The run finished: summary for every client; every `global_received` event has one digest
    per rank of its client and they are all equal (the client's ranks hold identical weights);
    `spans` names the hosts a client's ranks must cover; `zero` the ZeRO stage per client."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert sorted(c["client"] for c in summary["clients"]) == list(range(len(client_sizes))), summary
    for c in summary["clients"]:
        assert c["ranks"] == client_sizes[c["client"]], c
        if zero and c["client"] in zero:
            assert c["zero_stage"] == zero[c["client"]], c
    events = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    got = [e for e in events if e["event"] == "global_received"]
    assert {e["client"] for e in got} == set(range(len(client_sizes))), "a client received no global adapter"
    for e in got:
        assert len(e["digests"]) == client_sizes[e["client"]], e
        assert len(set(e["digests"])) == 1, f"client {e['client']}'s ranks differ: {e}"
    for client, hosts in (spans or {}).items():
        assert client_hosts(run_dir, client) == hosts, (client, client_hosts(run_dir, client))


def client_hosts(run_dir: Path, client: int) -> set[str]:
    """Hosts of a client's ranks, from the topology table the server logs (role ranks hosts leader)."""
    for line in (run_dir / "logs" / "rank-0.log").read_text().splitlines():
        parts = line.split()
        if parts[:2] == ["client", str(client)] and len(parts) >= 4:
            return set(parts[3].split(","))
    raise AssertionError(f"no topology row for client {client} in {run_dir}/logs/rank-0.log")


@functools.cache
def openmpi_mpirun() -> str | None:
    """Open MPI's mpirun (the one beside `ompi_info`, as DeepSpeed's openmpi runner finds it; Debian's
    openmpi-bin), or None when Open MPI is not installed. Not the venv's `mpirun`: that is MPICH's."""
    info = shutil.which("ompi_info")
    mpirun = os.path.join(os.path.dirname(info), "mpirun") if info else None
    if mpirun is None or not os.path.exists(mpirun):
        return None
    p = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    return mpirun if "Open MPI" in p.stdout + p.stderr else None


def openmpi_missing() -> str | None:
    """Why the Open MPI tests cannot run here (None when they can)."""
    if openmpi_mpirun():
        return None
    return ("Open MPI is not installed (no ompi_info + mpirun on PATH): tests/cluster/install.sh installs "
            "Debian's openmpi-bin when run as root" + ("" if os.geteuid() == 0 else ", and this is not root"))
