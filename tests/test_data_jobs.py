"""Data as people have it, through a real job: named clients, chat and instruction rows, read
with `data.source: hf` by every client rank at once (mpiexec + gloo, like tests/test_jobs.py)."""

from __future__ import annotations

import pytest

import json
import subprocess
import sys
import time

from conftest import ROOT, TINY, assert_ok, job_env, read_summary, run_job, run_ranks, write_config

pytestmark = pytest.mark.job


def test_a_job_on_named_chat_and_instruction_files_read_through_datasets(tmp_path):
    acme, beta = tmp_path / "acme.jsonl", tmp_path / "beta.jsonl"
    with open(acme, "w") as f:  # chat rows, no labels: loss only
        for i in range(40):
            hot = i % 3 == 0
            f.write(json.dumps({"client": "acme", "messages": [
                {"role": "user", "content": f"disk {'panic' if hot else 'read'} {i}?"},
                {"role": "assistant", "content": "bad" if hot else "ok"}]}) + "\n")
    with open(beta, "w") as f:  # Alpaca rows with labels: accuracy too
        for i in range(40):
            hot = i % 3 == 0
            f.write(json.dumps({"client": "beta", "instruction": "Classify.", "input": f"net {'oom' if hot else 'ok'} {i}",
                                "output": " abnormal" if hot else " normal", "label": int(hot)}) + "\n")
    cfg = write_config(tmp_path, **{**TINY, "topology.clients": [1, 2], "data.source": "hf",
                                    "data.files": [str(acme), str(beta)], "data.fewshot_rows": 4})
    proc, run_dir = run_job(cfg)
    assert_ok(proc)
    out = proc.stdout + proc.stderr
    # every client rank reads every client's rows; one (client 0's leader) says the names
    assert out.count("data: client names -> indices: client 0 = 'acme', client 1 = 'beta'") == 1, out[-3000:]
    assert "chat rows rendered with the plain fallback template" in out, out[-3000:]
    clients = {c["client"]: c["metrics"] for c in read_summary(run_dir)["clients"]}
    for adapter, m in clients[0].items():
        assert m["loss"] > 0 and "accuracy" not in m, (adapter, m)  # chat rows: loss only
    for adapter, m in clients[1].items():
        assert m["loss"] > 0 and 0.0 <= m["accuracy"] <= 1.0, (adapter, m)


def test_a_bad_data_line_is_said_once_before_any_rank_trains(tmp_path):
    """Every client rank reads every client's rows, so a bad line used to be printed by each of
    them, after the whole job had started. `check` and `launch` read the data before any rank
    starts; `run` reads it on the client ranks before the trainer, and rank 0 says it once."""
    path = tmp_path / "rows.jsonl"
    lines = [json.dumps({"prompt": f"disk {i}?", "response": " bad" if i % 3 == 0 else " ok"}) for i in range(40)]
    lines[6] = '{"prompt": "x", "response": '
    path.write_text("\n".join(lines) + "\n")
    cfg = write_config(tmp_path, **{**TINY, "data.source": "jsonl", "data.files": [str(path)], "data.fewshot_rows": 4})
    says = f"data error: {path}:7: not valid JSON"
    for command in ("check", "launch"):  # one process; no rank starts
        proc = subprocess.run([sys.executable, "-m", "fdlora_cluster.cli", command, str(cfg)], capture_output=True,
                              text=True, env=job_env(), cwd=ROOT, timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and out.count(says) == 1, (command, out[-3000:])
        assert "mpiexec" not in out, out[-3000:]
    t0 = time.monotonic()
    proc = run_ranks(5, ["run", str(cfg)], timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and out.count(says) == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert time.monotonic() - t0 < 60  # before DeepSpeed and the model: it used to take 36-44 s to say it
