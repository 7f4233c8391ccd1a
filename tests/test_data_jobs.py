"""Data as people have it, through a real job: named clients, chat and instruction rows, read
with `data.source: hf` by every client rank at once (mpiexec + gloo, like tests/test_jobs.py)."""

from __future__ import annotations

import pytest

import json

from conftest import TINY, assert_ok, read_summary, run_job, write_config

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
    assert "data: client names -> indices: client 0 = 'acme', client 1 = 'beta'" in out, out[-3000:]
    assert "chat rows rendered with the plain fallback template" in out, out[-3000:]
    clients = {c["client"]: c["metrics"] for c in read_summary(run_dir)["clients"]}
    for adapter, m in clients[0].items():
        assert m["loss"] > 0 and "accuracy" not in m, (adapter, m)  # chat rows: loss only
    for adapter, m in clients[1].items():
        assert m["loss"] > 0 and 0.0 <= m["accuracy"] <= 1.0, (adapter, m)
