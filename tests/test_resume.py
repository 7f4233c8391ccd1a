"""Checkpoints and resume (fdlora_cluster/checkpoint.py): a job stopped after round k and resumed
ends bit-identical to an uninterrupted run, for fdlora, fedavg and local under ZeRO-2 and ZeRO-3
(one real SIGKILL, fault injected with FDLORA_FAULT; the others resume a copy of the uninterrupted
run cut back to its round-k checkpoint); torn and mismatching checkpoints are refused with the reason."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from fdlora_cluster import checkpoint
from fdlora_cluster.checkpoint import ResumeError, find_checkpoint, validate
from fdlora_cluster.config import load_config

from conftest import CHECKPOINTED_ROUNDS as ROUNDS, assert_ok, checkpointed as settings, read_metrics, run_ranks, write_config
from test_jobs import load_saved

KILLED_IN = 3  # rank 2 (client 1's leader) SIGKILLs itself at the start of round 3
TIMING = {"time", "seconds"}  # wall-clock fields: the only ones allowed to differ


def adapters(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    root = run_dir / "adapters"
    return {str(p.parent.relative_to(root)): load_saved(p.parent) for p in root.rglob("adapter_config.json")}


def after_round(run_dir: Path, k: int) -> list[dict]:
    """metrics.jsonl records of the rounds after k (and those of no round: fusion, evaluation),
    without the wall-clock fields."""
    return [{f: v for f, v in r.items() if f not in TIMING} for r in read_metrics(run_dir)
            if r["round"] is None or r["round"] > k]


def assert_same_end(whole: Path, run: Path) -> None:
    """`run`, resumed after round KILLED_IN - 1, ended bit-identical to the uninterrupted `whole`."""
    a, b = adapters(whole), adapters(run)
    assert sorted(a) == sorted(b) and a
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), f"{name}: {k} differs after the resume"
    assert after_round(run, KILLED_IN - 1) == after_round(whole, KILLED_IN - 1)
    # the records of the rounds before the stop were restored from the checkpoint, not lost
    assert {r["round"] for r in read_metrics(run) if r["round"] is not None} == \
           {r["round"] for r in read_metrics(whole) if r["round"] is not None}
    s_a = json.loads((whole / "summary.json").read_text())
    s_b = json.loads((run / "summary.json").read_text())
    assert [c["metrics"] for c in s_a["clients"]] == [c["metrics"] for c in s_b["clients"]]
    assert [c["bytes_total"] for c in s_a["clients"]] == [c["bytes_total"] for c in s_b["clients"]]


# The one real SIGKILL: ZeRO-3 (partitioned weights and optimizer state), fdlora (every phase).
KILLED = ("fdlora", 3)


@pytest.mark.job
def test_killed_and_resumed_ends_bit_identical(whole_run, tmp_path):
    whole, _ = whole_run(*KILLED)
    cut = write_config(tmp_path, **settings(*KILLED))
    killed = run_ranks(4, ["run", str(cut)], env={"FDLORA_FAULT": f"kill@rank=2,round={KILLED_IN}"})
    assert killed.returncode != 0, "the injected SIGKILL did not end the job"
    run = tmp_path / "run"
    done = checkpoint.complete_checkpoints(str(run))
    assert [k for k, _ in done] == [KILLED_IN - 2, KILLED_IN - 1]  # checkpoint.keep = 2
    assert not (run / "summary.json").exists()

    resumed = run_ranks(4, ["run", str(cut), "--resume", "auto"])
    assert_ok(resumed)
    assert f"resuming from {done[-1][1]} (end of round {KILLED_IN - 1})" in resumed.stdout + resumed.stderr
    assert_same_end(whole, run)


def copy_up_to(run: Path, k: int, dst: Path) -> Path:
    """What a job stopped during round k + 1 leaves: `run` with the checkpoints up to round k and
    none of what the end of a job writes (summary, merged metrics, adapters, TensorBoard)."""
    shutil.copytree(run, dst)
    for later in (dst / "checkpoints").glob("round-*"):
        if int(later.name.split("-")[1]) > k:
            shutil.rmtree(later)
    for name in ("summary.json", "metrics.jsonl"):
        (dst / name).unlink()
    for name in ("adapters", "tensorboard"):
        shutil.rmtree(dst / name, ignore_errors=True)
    return dst


@pytest.mark.job
@pytest.mark.parametrize("strategy, stage, compress", [("fdlora", 2, "none"), ("fedavg", 2, "none"), ("fedavg", 3, "none"),
                                                       ("local", 2, "none"), ("local", 3, "none"), ("fdlora", 2, "int8")])
def test_resumed_from_a_copy_of_round_k_ends_bit_identical(whole_run, tmp_path, strategy, stage, compress):
    """Resume (`--resume <the copy's round-k checkpoint>`) a copy of the uninterrupted run cut back
    to its round-k checkpoint: the job ends bit-identical to the run it was copied from (the
    SIGKILL itself is test_killed_and_resumed_ends_bit_identical's, for KILLED). With int8
    compression too: both ends' references and error-feedback residuals are in the checkpoint, so
    the resent global and the next updates are encoded as without the stop."""
    whole, cfg = whole_run(strategy, stage, compress)
    done = checkpoint.complete_checkpoints(str(whole))
    assert [k for k, _ in done] == [ROUNDS - 1, ROUNDS]  # checkpoint.keep = 2
    k = KILLED_IN - 1
    run = copy_up_to(whole, k, tmp_path / "run")
    ckpt = run / "checkpoints" / f"round-{k:05d}"
    resumed = run_ranks(4, ["run", str(cfg), "--resume", str(ckpt)])  # the run directory becomes the copy
    assert_ok(resumed)
    out = resumed.stdout + resumed.stderr
    assert "resuming from" in out and f"round-{k:05d} (end of round {k})" in out, out[-3000:]
    assert_same_end(whole, run)


# ------------------------------------------------------------------ refusals (no new job needed)


@pytest.fixture(scope="module")
def finished(whole_run):
    """fedavg, ZeRO-2: one of the uninterrupted runs above, checkpoints of rounds 2 and 3."""
    run, cfg = whole_run("fedavg", 2)
    return run, cfg


@pytest.mark.job
def test_auto_finds_the_newest_complete_checkpoint_and_skips_a_torn_one(finished):
    run, _ = finished
    newest = find_checkpoint("auto", str(run))
    assert newest.endswith(f"round-{ROUNDS:05d}")
    torn = run / "checkpoints" / f"round-{ROUNDS + 1:05d}"
    shutil.copytree(newest, torn)
    os.remove(torn / checkpoint.MANIFEST)  # what a job killed while writing leaves
    try:
        assert find_checkpoint("auto", str(run)) == newest
        with pytest.raises(ResumeError, match="torn checkpoint"):
            find_checkpoint(str(torn), str(run))
    finally:
        shutil.rmtree(torn)


@pytest.mark.job
def test_a_corrupt_file_is_refused_with_its_name(finished, tmp_path):
    run, cfg_path = finished
    copy = tmp_path / "round-00002"
    shutil.copytree(run / "checkpoints" / "round-00002", copy)
    with open(copy / "client-1" / "leader.pt", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ResumeError, match=r"client-1/leader.pt is corrupt"):
        validate(str(copy), load_config(cfg_path))


@pytest.mark.job
def test_another_topology_or_config_is_refused(finished):
    run, cfg_path = finished
    ckpt = str(run / "checkpoints" / "round-00002")
    with pytest.raises(ResumeError, match=r"clients \[1, 2\].*this job has \[1, 3\]"):
        validate(ckpt, load_config(cfg_path, ["topology.clients=[1,3]"]))
    with pytest.raises(ResumeError, match="another config"):
        validate(ckpt, load_config(cfg_path, ["train.inner_steps=3"]))
    # where the run is written and how often it is checkpointed may change
    validate(ckpt, load_config(cfg_path, ["checkpoint.every=2", "output_dir=elsewhere"]))


@pytest.mark.unit
def test_resume_names_a_missing_directory(tmp_path):
    with pytest.raises(ResumeError, match="no such directory"):
        find_checkpoint(str(tmp_path / "nope"), str(tmp_path))
    with pytest.raises(ResumeError, match="no complete checkpoint"):
        find_checkpoint(str(tmp_path), str(tmp_path))
