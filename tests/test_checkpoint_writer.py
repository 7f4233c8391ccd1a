"""The checkpoint writer thread (checkpoint.py: Writer, Checkpointer.write/close), in-process: one
write in flight, a failed write raised in the main thread naming the checkpoint, a snapshot that
the next round cannot change, and a checkpoint complete only with its manifest."""

import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fdlora_cluster import checkpoint
from fdlora_cluster.checkpoint import (MANIFEST, CheckpointWriteError, Checkpointer, Writer, complete_checkpoints,
                                       round_dir, snapshot, validate)
from fdlora_cluster.config import load_config

pytestmark = pytest.mark.unit

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def checkpointer(tmp_path, world: int = 1, rank: int = 0) -> Checkpointer:
    cfg = load_config(CONFIGS / "demo.yaml", [f"output_dir={tmp_path}"])
    topo = SimpleNamespace(rank=rank, world=SimpleNamespace(Get_size=lambda: world))
    return Checkpointer(cfg, topo, str(tmp_path))


def test_one_write_in_flight_and_in_order():
    events, gate = [], threading.Event()

    def job(name, hold=False):
        def run():
            events.append(f"{name} start")
            if hold:
                gate.wait(10)
            events.append(f"{name} end")
        return run

    w = Writer()
    w.submit("a", job("a", hold=True))
    submitted = threading.Event()
    t = threading.Thread(target=lambda: (w.submit("b", job("b")), submitted.set()))
    t.start()
    time.sleep(0.2)
    assert not submitted.is_set(), "a second write was handed over while the first was still in flight"
    assert events == ["a start"]
    gate.set()
    t.join(10)
    w.wait()
    assert events == ["a start", "a end", "b start", "b end"]


def test_a_failed_write_is_raised_in_the_main_thread_naming_the_checkpoint(tmp_path):
    ckpt = checkpointer(tmp_path)
    (tmp_path / "checkpoints").write_text("a file where the checkpoints directory goes")
    ckpt.write(1, {"server.pt": {"round": 1}})  # the failure happens on the writer thread
    with pytest.raises(CheckpointWriteError, match=f"checkpoint {ckpt.partial(1)}: writing it failed: "):
        ckpt.close()
    ckpt.close()  # raised once: the job fails with it, it is not raised again
    # raised at the next boundary too, before that round's snapshot is handed over
    ckpt.write(2, {"server.pt": {"round": 2}})
    with pytest.raises(CheckpointWriteError, match="round-00002.partial"):
        ckpt.write(3, {"server.pt": {"round": 3}})


def test_the_snapshot_does_not_alias_what_training_changes_next(tmp_path, monkeypatch):
    live = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "records": [{"round": 1}]}
    live["view"] = live["w"][0]  # a view: copied on its own (saved alone, as DeepSpeed's clones)
    live["again"] = live["w"]  # one tensor met twice: copied once
    want = {k: v.clone() for k, v in live.items() if torch.is_tensor(v)}
    snap = snapshot(live)
    assert snap["w"].data_ptr() != live["w"].data_ptr() and snap["again"] is snap["w"]
    assert snap["view"].untyped_storage().nbytes() == 3 * 4 and torch.equal(snap["view"], want["view"])
    assert snap["records"] == live["records"] and snap["records"][0] is not live["records"][0]

    # end to end: the writer saves only after the "next round" changed everything in place
    gate, save = threading.Event(), checkpoint.save_atomic

    def held_save(obj, path):
        gate.wait(10)
        return save(obj, path)

    monkeypatch.setattr(checkpoint, "save_atomic", held_save)
    ckpt = checkpointer(tmp_path)
    ckpt.write(1, {"server.pt": live})
    live["w"].add_(100.0)
    live["records"].append({"round": 2})
    gate.set()
    ckpt.close()
    saved = torch.load(os.path.join(round_dir(str(tmp_path), 1), "server.pt"), weights_only=False)
    assert torch.equal(saved["w"], want["w"]) and torch.equal(saved["view"], want["view"])
    assert saved["records"] == [{"round": 1}]


def test_complete_only_with_every_part_and_the_manifest(tmp_path):
    """Two ranks: the first rank's part alone leaves a torn directory; the second completes it."""
    first, second = checkpointer(tmp_path, world=2, rank=0), checkpointer(tmp_path, world=2, rank=1)
    first.write(1, {"server.pt": {"round": 1}})
    first.close()
    assert complete_checkpoints(str(tmp_path)) == [] and os.path.isdir(first.partial(1))
    second.write(1, {"client-0/rank-0.pt": {"rng": torch.zeros(3)}})
    second.close()
    assert complete_checkpoints(str(tmp_path)) == [(1, round_dir(str(tmp_path), 1))]
    manifest = validate(round_dir(str(tmp_path), 1), first.cfg)
    assert sorted(manifest["files"]) == ["client-0/rank-0.pt", "server.pt"]
    assert os.path.isfile(os.path.join(round_dir(str(tmp_path), 1), MANIFEST))


def test_the_writer_beats_only_through_a_waiting_main_thread(tmp_path, monkeypatch):
    """A file written while the main thread trains (or hangs) is no heartbeat of the rank; while
    the main thread waits for the writer, each file written is one (watchdog.py)."""
    beats, second, save = [], threading.Event(), checkpoint.save_atomic
    monkeypatch.setattr(checkpoint, "beat", lambda: beats.append(threading.current_thread().name))

    def held_save(obj, path):
        if path.endswith("b.pt"):
            second.wait(10)
            time.sleep(0.6)  # written while the main thread waits below
        return save(obj, path)

    monkeypatch.setattr(checkpoint, "save_atomic", held_save)
    ckpt = checkpointer(tmp_path)
    ckpt.write(1, {"a.pt": {"x": 1}, "b.pt": {"x": 2}})
    time.sleep(0.6)  # a.pt is written meanwhile, nobody waiting
    assert os.path.isfile(os.path.join(ckpt.partial(1), "a.pt")) and beats == []
    second.set()
    ckpt.close()
    assert beats and set(beats) == {threading.main_thread().name}
