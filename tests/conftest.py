"""Shared test helpers: write a config, run a real multi-process job under a timeout.

Multi-process tests start real ranks with the environment's mpiexec (the pip `mpich` wheel) and
gloo inside clients; nothing is mocked. Every job runs under a timeout so a hang fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
JOB_TIMEOUT = int(os.environ.get("FDLORA_TEST_JOB_TIMEOUT", "300"))

# A smaller job than the demo: same model, fewer rows and steps.
TINY = {
    "train.rounds": 2,
    "train.inner_steps": 2,
    "data.rows_per_client": 60,
    "train.personal_steps": 2,
}


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


def job_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("DS_ACCELERATOR", "cpu")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
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
