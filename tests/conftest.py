"""The one set of test helpers: the tiers, the tiny config, writing a config, running a real
multi-process job under a timeout, and the finished runs that several test files share.

Multi-process tests start real ranks with the environment's mpiexec (the pip `mpich` wheel) and
gloo inside clients; nothing is mocked. Every job runs under a timeout so a hang fails the test.
Tiers (pytest.ini; tests/README.md): `unit` (in-process), `job` (real mpiexec jobs on this
machine), `launcher` (Slurm, sshd, network namespaces, the DeepSpeed launcher, Open MPI, the
launch scripts); every test carries exactly one.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
DEMO = "configs/demo.yaml"
# Every job and launch in the suite runs under this timeout (seconds); a hang fails the test.
JOB_TIMEOUT = int(os.environ.get("FDLORA_TEST_JOB_TIMEOUT", "300"))
TIERS = ("unit", "job", "launcher")

# The one small job of the suite: configs/demo.yaml (1 server + 2 clients x 2 ranks, the tiny
# pretrained Llama) with fewer rows and steps. Tests add what they are about to it.
TINY = {
    "train.rounds": 2,
    "train.inner_steps": 2,
    "data.rows_per_client": 60,
    "train.personal_steps": 2,
    "fusion.budget": 4,  # the 3 anchors and one more point (demo: 20)
    "log.digests": "every",  # every rank's digest of every global adapter it received (check_run)
}
# The same, as `--set` arguments for a launch script or `fdlora-cluster launch`.
TINY_ARGS = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def pytest_collection_modifyitems(config, items):
    """Every test belongs to exactly one tier, so that `-m unit`, `-m job` and `-m launcher` add
    up to the whole suite."""
    wrong = [f"{item.nodeid}: {sorted(m.name for m in item.iter_markers() if m.name in TIERS) or 'none'}"
             for item in items if len({m.name for m in item.iter_markers() if m.name in TIERS}) != 1]
    if wrong:
        raise pytest.UsageError("every test needs exactly one tier marker (unit, job or launcher):\n  " + "\n  ".join(wrong))


def load_yaml(path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def write_config(tmp_path: Path, base: str | dict = "demo.yaml", name: str = "config.yaml", **sets) -> Path:
    """A config file in tmp_path: `base` (a file in configs/ or a dict) with dotted-key overrides."""
    from fdlora_cluster.config import apply_override, read_yaml

    raw = read_yaml(str(CONFIGS / base)) if isinstance(base, str) else dict(base)

    for k, v in sets.items():
        apply_override(raw, f"{k}={json.dumps(v)}")
    raw["output_dir"] = str(tmp_path / "run")
    path = tmp_path / name
    with open(path, "w") as f:
        yaml.safe_dump(raw, f)
    return path


def mpiexec() -> str:
    from fdlora_cluster.cli import find_mpiexec

    return find_mpiexec()


def job_env(**extra) -> dict:
    """The environment of every job and launch: this Python's bin first on PATH (fdlora-cluster,
    mpiexec, deepspeed; FDLORA names the entry point), the repository on PYTHONPATH, one thread
    per rank, DeepSpeed on the CPU; `extra` on top."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["FDLORA"] = os.path.join(os.path.dirname(sys.executable), "fdlora-cluster")
    env.update(extra)
    return env


def run_ranks(n: int, args: list[str], timeout: int = JOB_TIMEOUT, cwd=None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`mpiexec -n n python -m fdlora_cluster.cli <args>`; a job past `timeout` fails the test.
    `env`: extra environment (e.g. FDLORA_FAULT, fdlora_cluster/faults.py)."""
    cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "fdlora_cluster.cli", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**job_env(), **(env or {})},
                              cwd=cwd or ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"job timed out after {timeout}s: {' '.join(cmd)}\n{(e.stdout or b'')[-3000:]!r}")


def run_job(config: Path, n: int | None = None, extra: list[str] | None = None, timeout: int = JOB_TIMEOUT):
    """Run a config on the ranks its topology needs; returns (process, run directory)."""
    from fdlora_cluster.config import load_config

    cfg = load_config(config)
    proc = run_ranks(n or cfg.world_size(), ["run", str(config), *(extra or [])], timeout=timeout)
    return proc, Path(cfg.output_dir)


SCRIPTS = ROOT / "tests" / "mpi_scripts"


def mpi_python(n, script, *args, timeout=JOB_TIMEOUT, env: dict | None = None) -> subprocess.CompletedProcess:
    """`mpiexec -n n python tests/mpi_scripts/<script> args...` under a timeout."""
    cmd = [mpiexec(), "-n", str(n), sys.executable, str(SCRIPTS / script), *map(str, args)]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=job_env(**(env or {})), cwd=ROOT)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"job timed out after {timeout}s: {' '.join(cmd)}\n{(e.stdout or b'')[-3000:]!r}")


def tapped_run(config: Path, n: int, out: Path, *extra: str, timeout: int = JOB_TIMEOUT, env: dict | None = None):
    """`fdlora-cluster run CONFIG` on n ranks with the payload tap and the probes of
    tests/mpi_scripts/inspect_run.py (dumped under `out`); returns the finished process."""
    return mpi_python(n, "inspect_run.py", config, out, *extra, timeout=timeout, env=env)


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"job failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def read_summary(run_dir: Path) -> dict:
    with open(run_dir / "summary.json") as f:
        return json.load(f)


@pytest.fixture(scope="session", autouse=True)
def demo_base():
    """configs/demo.yaml loads a pretrained tiny base (`model.pretrained`, relative to the working
    directory); make it once per session (~10 s), as `fdlora-cluster launch` would. Jobs run with
    cwd=ROOT; in-process tests use pytest's cwd: make sure both have it."""
    from fdlora_cluster.config import load_config
    from fdlora_cluster.pretrain import ensure_pretrained

    cfg = load_config(CONFIGS / "demo.yaml")
    here = os.getcwd()
    for where in dict.fromkeys([str(ROOT), here]):
        os.chdir(where)
        try:
            ensure_pretrained(cfg, log=lambda m: None)
        finally:
            os.chdir(here)


# ---------------------------------------------------------------- launches (launcher tier)


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
              zero: dict[int, int] | None = None, probe: bool = False) -> None:
    """The job (or, with `probe`, the `run --probe`) finished: a summary for every client; every
    `global_received` event has one digest per rank of its client and they are all equal (the
    client's ranks hold identical weights, or the probe's tensor); `spans` names the hosts a
    client's ranks must cover; `zero` the ZeRO stage per client."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert bool(summary.get("probe")) == probe, f"expected {'a probe' if probe else 'a training run'}: {summary}"
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
        if probe:  # the probe also records the hosts each rank reported
            assert set(summary["clients"][client]["hosts"]) == hosts, summary["clients"][client]


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


# ---------------------------------------------------------------- finished runs shared by several tests


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """THE finished run of the suite, shared by the console, report, tracking, export and privacy
    tests: the demo's topology (1 server + 2 clients x 2 ranks, ZeRO-2), fdlora with a Nesterov
    outer step, TensorBoard on, the console as `fdlora-cluster run` prints it (torch's C++ INFO
    logging asked for, so the test can see that it stays in the log files), tapped by
    tests/mpi_scripts/inspect_run.py (payloads, logits, fusion rows, phases under `out`)."""
    where = tmp_path_factory.mktemp("finished")
    config = write_config(where, "demo.yaml", **{
        **TINY, "strategy": "fdlora", "fusion.budget": 3, "data.fewshot_rows": 4, "log.tensorboard": True,
        "outer.optimizer": "nesterov", "outer.lr": 0.7})
    proc = tapped_run(config, 5, where / "inspect", env={"TORCH_CPP_LOG_LEVEL": "INFO"})
    from fdlora_cluster.config import load_config

    return SimpleNamespace(proc=proc, config=config, cfg=load_config(config), tmp=where, dir=where / "run",
                           out=where / "inspect")


# Each strategy's tapped run (strategy_run below): one-rank clients, 3 rounds; what a strategy's
# schedule test needs on top (tests/README.md says which test reads which).
STRATEGY_RUN = {**TINY, "topology.clients": [1, 1], "train.rounds": 3}
STRATEGY_SETS = {
    # personal <- global every round: the sync's copies are on the wire for the privacy test
    "fdlora": {"personal.sync_every": 1}, "fedavg": {"personal.sync_every": 1},
    # log.digests: the default (final) and off, where every other run digests every round
    "fedprox": {"personal.sync_every": 1, "log.digests": "final"},
    "diloco": {"personal.sync_every": 1, "log.digests": "off"},
    "feddpa": {"feddpa.local_weight": 0.3},
    "ditto": {"ditto.lambda": 50.0, "personal.steps_per_round": 4},
}
STRATEGIES = ["fdlora", "fdlora_paper", "local", "fedavg", "fedprox", "diloco", "feddpa", "feddpa_f", "ditto"]


@pytest.fixture(scope="session")
def strategy_run(tmp_path_factory):
    """`strategy_run(name, **sets)`: the tapped run of configs/<name>.yaml with STRATEGY_RUN,
    STRATEGY_SETS[name] and `sets`, made once per session and shared by every test that asks
    (strategy results, privacy, schedule, fusion rows, FedAvg's average)."""
    from fdlora_cluster.config import load_config

    runs = {}

    def get(name: str, **sets):
        key = (name, json.dumps(sets, sort_keys=True))
        if key not in runs:
            where = tmp_path_factory.mktemp(name)
            config = write_config(where, f"{name}.yaml", **{**STRATEGY_RUN, **STRATEGY_SETS.get(name, {}), **sets})
            proc = tapped_run(config, 3, where / "inspect", timeout=600)
            runs[key] = SimpleNamespace(proc=proc, config=config, cfg=load_config(config), dir=where / "run",
                                        out=where / "inspect")
        assert_ok(runs[key].proc)
        return runs[key]

    return get


# The checkpointed runs (whole_run below): 1 server + client 0 [1] + client 1 [2, 3], a one-rank and
# a two-rank client, 3 rounds, a checkpoint after each (checkpoint.keep = 2 keeps rounds 2 and 3).
CHECKPOINTED_ROUNDS = 3


def checkpointed(strategy: str, stage: int, compress: str = "none") -> dict:
    return {**TINY, "strategy": strategy, "train.rounds": CHECKPOINTED_ROUNDS, "topology.clients": [1, 2],
            "checkpoint.every": 1, "deepspeed": {"zero_optimization": {"stage": stage}},
            "federation.compress": compress}


@pytest.fixture(scope="session")
def whole_run(tmp_path_factory):
    """`whole_run(strategy, stage)`: the uninterrupted checkpointed job, made once per session;
    returns (run directory, config). The resume tests resume copies of it and read its
    checkpoints; test_jobs.py's ZeRO-2 / ZeRO-3 rounds test reads the fedavg ones."""
    runs = {}

    def get(strategy: str, stage: int, compress: str = "none"):
        key = strategy, stage, compress
        if key not in runs:
            where = tmp_path_factory.mktemp(f"whole-{strategy}-{stage}-{compress}")
            config = write_config(where, **checkpointed(strategy, stage, compress))
            runs[key] = where, config, run_ranks(4, ["run", str(config)])
        where, config, proc = runs[key]
        assert_ok(proc)
        return where / "run", config

    return get
